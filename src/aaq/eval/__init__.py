"""Evaluation: perplexity, refusal / complied / garbled verdicts, benign compliance, SafetyBench and lm-eval tasks, reports."""
