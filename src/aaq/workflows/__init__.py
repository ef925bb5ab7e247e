"""Whole runs as library calls: quantize-and-evaluate runs, the demo, the demo pair, pair diagnostics."""
