"""Batched greedy generation and next-token scoring on any `transformers` causal LM.

`generate_responses` applies the tokenizer's chat template when it has one (`next_token_logprobs`
scores texts as given; render them with `chat_texts` first if needed). Both batch with LEFT padding
(so the last position of every row is the real last token) and leave the tokenizer as they found it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from aaq.errors import AaqError


@dataclass
class GenerationConfig:
    """How responses are generated: greedy decoding, `max_new_tokens` per prompt, `batch_size` prompts per call."""

    max_new_tokens: int = 64
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise AaqError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}; pass a positive number")
        if self.batch_size < 1:
            raise AaqError(f"batch_size must be >= 1, got {self.batch_size}; pass a positive number")


def chat_texts(tokenizer, prompts: Sequence[str]) -> list[str]:
    """Return each prompt as a single user turn rendered by the chat template, or unchanged if there is none."""
    if not getattr(tokenizer, "chat_template", None):
        return list(prompts)
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        for prompt in prompts
    ]


@contextlib.contextmanager
def left_padding(tokenizer) -> Iterator[None]:
    """Temporarily pad on the left (with EOS as pad token if none is set); restores the tokenizer on exit.

    A fast tokenizer's backend keeps the padding it last used, and `save_pretrained` writes it into
    `tokenizer.json`: it is restored too, so a caller's tokenizer saved after an evaluation is unchanged.
    """
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    backend = getattr(tokenizer, "backend_tokenizer", None)
    backend_padding = None if backend is None else backend.padding
    tokenizer.padding_side = "left"
    if pad is None:
        if tokenizer.eos_token is None:
            raise AaqError("tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token before evaluating")
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.padding_side = side
        tokenizer.pad_token = pad
        if backend is not None and backend_padding is None:
            backend.no_padding()
        elif backend is not None:
            backend.enable_padding(**backend_padding)


def _encode(tokenizer, texts: Sequence[str], templated: bool, device: torch.device) -> dict[str, torch.Tensor]:
    # A rendered chat template already carries its own BOS; adding special tokens again would double it.
    batch = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=not templated)
    return {key: value.to(device) for key, value in batch.items() if key in ("input_ids", "attention_mask")}


def batched(items: Sequence, size: int) -> list[Sequence]:
    """`items` in consecutive slices of at most `size`."""
    return [items[start : start + size] for start in range(0, len(items), size)]


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: Sequence[str], config: GenerationConfig | None = None) -> list[str]:
    """Return the model's greedy response (new text only, special tokens removed) to each prompt, in order."""
    config = config or GenerationConfig()
    templated = bool(getattr(tokenizer, "chat_template", None))
    texts = chat_texts(tokenizer, prompts)
    device = next(model.parameters()).device
    responses: list[str] = []
    with left_padding(tokenizer):
        for chunk in tqdm(batched(texts, config.batch_size), desc="generate", unit="batch", leave=False):
            batch = _encode(tokenizer, chunk, templated, device)
            output = model.generate(
                **batch,
                max_new_tokens=config.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            responses.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return [response.strip() for response in responses]


@torch.no_grad()
def next_token_logprobs(
    model,
    tokenizer,
    texts: Sequence[str],
    token_ids: Sequence[int],
    batch_size: int = 8,
    templated: bool = False,
    desc: str = "score",
) -> torch.Tensor:
    """Return a float32 `[len(texts), len(token_ids)]` tensor: log P(token | text) for the token right after each text.

    `templated=True` means the texts were rendered by a chat template and get no extra special tokens.
    """
    device = next(model.parameters()).device
    ids = torch.tensor(list(token_ids), device=device)
    rows: list[torch.Tensor] = []
    with left_padding(tokenizer):
        for chunk in tqdm(batched(list(texts), batch_size), desc=desc, unit="batch", leave=False):
            batch = _encode(tokenizer, chunk, templated, device)
            # Left padding shifts positions; give every row positions 0..len-1 over its real tokens.
            positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            logits = model(**batch, position_ids=positions, use_cache=False).logits[:, -1, :]
            rows.append(torch.log_softmax(logits.float(), dim=-1)[:, ids].cpu())
    return torch.cat(rows) if rows else torch.empty(0, len(ids))
