"""The fast signal of an audit: KL(original || quantized) of the next-token distributions at the first answer token.

One forward pass per prompt and model, no generation: each prompt is rendered with the original's chat template
(as the models answer it) and both models' distributions over the vocabulary at the position where the answer
starts are compared. The first answer token is where an aligned model decides to open with a refusal ("I'm
sorry") or with an answer ("Sure", "To ..."), so a quantized model that changes that decision shows up here
before any answer is generated; a model broken into noise shows up as a large divergence on every prompt.
"""

from __future__ import annotations

import torch

from aaq.errors import AaqError
from aaq.eval.generate import chat_texts, next_token_logprobs


def first_token_log_probs(model, tokenizer, prompts: list[str], batch_size: int) -> torch.Tensor:
    """`[len(prompts), len(tokenizer)]` float32 log-probabilities of the first answer token (the chat template applied)."""
    vocabulary = len(tokenizer)
    if model.config.get_text_config().vocab_size < vocabulary:
        raise AaqError(f"the model's vocabulary ({model.config.get_text_config().vocab_size}) is smaller than its tokenizer's ({vocabulary}); pass a complete model")
    templated = bool(getattr(tokenizer, "chat_template", None))
    return next_token_logprobs(model, tokenizer, chat_texts(tokenizer, prompts), range(vocabulary), batch_size, templated, desc="first token")


def kl_divergences(original: torch.Tensor, quantized: torch.Tensor) -> list[float]:
    """KL(original || quantized) in nats per row of two log-probability tensors (rows: prompts)."""
    p = original.exp()
    # A token the original never produces adds nothing (0 * log 0 = 0), even where its log-probability is -inf.
    terms = torch.where(p > 0, p * (original - quantized), torch.zeros_like(p))
    return terms.sum(dim=-1).clamp(min=0.0).tolist()


def top1_agreement(original: torch.Tensor, quantized: torch.Tensor) -> float:
    """Share of rows whose most likely token is the same under both."""
    return (original.argmax(dim=-1) == quantized.argmax(dim=-1)).float().mean().item()
