"""Perplexity of a causal LM on a fixed budget of held-out token windows."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from aaq.data.corpus import TextDataConfig, resolve_dataset, token_windows
from aaq.errors import AaqError

logger = logging.getLogger(__name__)


@dataclass
class PerplexityConfig:
    """Held-out corpus ("auto", "python-docs", "wikitext2", "c4"), token budget (n_samples x seq_len) and batch size."""

    dataset: str = "auto"
    n_samples: int = 24
    seq_len: int = 512
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise AaqError(f"batch_size must be >= 1 (got {self.batch_size}); pass a positive batch size")


@dataclass
class PerplexityResult:
    """exp(mean next-token NLL), the mean NLL in nats, the number of predicted tokens, the corpus used and wall time."""

    ppl: float
    nll: float
    n_tokens: int
    dataset: str
    seconds: float


# Positions whose float32 logits exist at once. A window's full logits would be (batch, seq, vocab):
# 4 x 2048 x 128256 float32 values are 4.2 GB, and the log-softmax doubles that.
NLL_CHUNK = 1024


def window_nll_sum(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Return the summed next-token NLL (fp32) of token windows under a causal LM."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or not hasattr(model, "get_decoder"):
        output = model(input_ids=input_ids)
        return _nll_sum(output.logits if hasattr(output, "logits") else output[0], input_ids, lambda logits: logits)
    hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state
    return _nll_sum(hidden, input_ids, head)


def _nll_sum(states: torch.Tensor, input_ids: torch.Tensor, to_logits) -> torch.Tensor:
    """Sum of -log p(next token) from per-position states (hidden states or logits), a chunk of positions at a time."""
    states = states[:, :-1].reshape(-1, states.shape[-1])
    targets = input_ids[:, 1:].reshape(-1).to(states.device)
    total = torch.zeros((), dtype=torch.float32, device=states.device)
    for chunk, target in zip(states.split(NLL_CHUNK), targets.split(NLL_CHUNK), strict=True):
        logits = to_logits(chunk).float()
        total += F.cross_entropy(logits, target.to(logits.device), reduction="sum").to(total.device)
    return total


def perplexity_of(nll: float) -> float:
    """exp(`nll`): inf when that overflows a float (a mean NLL above ~709.8 nats), NaN for a NaN NLL."""
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


def evaluate_perplexity(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, config: PerplexityConfig
) -> PerplexityResult:
    """Return the perplexity of `model` on the first n_samples x seq_len held-out tokens of `config.dataset`."""
    start = time.perf_counter()
    dataset = resolve_dataset(config.dataset)
    windows = token_windows(
        tokenizer, TextDataConfig(split="heldout", n_samples=config.n_samples, seq_len=config.seq_len, dataset=dataset)
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll = 0.0
    # no_grad rather than inference_mode: wrapped models may cache tensors built during evaluation
    # (e.g. Hadamard matrices) that calibration later needs in autograd.
    with torch.no_grad():
        for batch in tqdm(windows.split(config.batch_size), desc="perplexity", unit="batch"):
            total_nll += window_nll_sum(model, batch.to(device)).item()
    model.train(was_training)
    n_tokens = windows.shape[0] * (windows.shape[1] - 1)
    nll = total_nll / n_tokens
    result = PerplexityResult(
        ppl=perplexity_of(nll), nll=nll, n_tokens=n_tokens, dataset=dataset, seconds=time.perf_counter() - start
    )
    logger.info("perplexity %.4g on %d %s tokens (%.1f s)", result.ppl, n_tokens, dataset, result.seconds)
    return result
