"""Batched greedy generation and next-token scoring on any `transformers` causal LM.

`generate_responses` applies the tokenizer's chat template when it has one (`next_token_logprobs`
scores texts as given; render them with `chat_texts` first if needed). Both batch with LEFT padding
(so the last position of every row is the real last token) and leave the tokenizer as they found it.

Generation is plain greedy decoding (`greedy_token_ids`), written for throughput on a CPU, where a
decoding step costs about the same for 1 or 16 rows (it reads every weight once): prompts are
batched by length (little padding), a row leaves the batch as soon as it emits a stop token, and a
quantized model's KV cache holds keys and values already rotated and quantized
(`aaq.attention.kv_as_cached`) instead of transforming the whole cache again at every step. Its
answers are `model.generate(do_sample=False)`'s at batch 1 up to float rounding, which the batch
shape changes: see `benchmarks/generation_speed.py` for how often that flips a near-tie.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

from aaq.errors import AaqError
from aaq.models.attention import KV_QUANTIZER, QK_ROTATION, kv_as_cached, mark_as_cached


@dataclass
class GenerationConfig:
    """How responses are generated: greedy decoding, `max_new_tokens` per prompt, at most `batch_size` prompts decoded
    together (on a CPU a decoding step of 64 rows costs about 8 of one, `benchmarks/generation_speed.py`)."""

    max_new_tokens: int = 64
    batch_size: int = 64

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


# Prompts per prefill forward: each chunk of length-sorted prompts is padded only to its own longest prompt.
PREFILL_ROWS = 16


class _PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer with room for `capacity` positions, written in place: a decoding step does not
    copy the whole cache into a longer tensor, as concatenation does."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.key_room = key_states.new_zeros(*key_states.shape[:2], self.capacity, key_states.shape[-1])
        self.value_room = value_states.new_zeros(*value_states.shape[:2], self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self.key_room[:, :, self.length : end] = key_states
        self.value_room[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.key_room[:, :, :end], self.value_room[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.key_room, self.value_room = self.key_room[indices], self.value_room[indices]
            self.keys, self.values = self.key_room[:, :, : self.length], self.value_room[:, :, : self.length]

    @classmethod
    def stacked(cls, parts: Sequence[_PreallocatedLayer], capacity: int, shared: int) -> _PreallocatedLayer:
        """The rows of `parts` one after the other, each part's first `shared` positions kept in place and the rest
        moved to end where the longest part ends (the gap in between is padding the attention mask hides)."""
        layer = cls(capacity)
        layer.length = max(part.length for part in parts)
        layer.device, layer.is_initialized = parts[0].device, True
        lengths = [part.length for part in parts]
        layer.key_room = _stacked_room([part.key_room for part in parts], lengths, capacity, shared, layer.length)
        layer.value_room = _stacked_room([part.value_room for part in parts], lengths, capacity, shared, layer.length)
        layer.keys, layer.values = layer.key_room[:, :, : layer.length], layer.value_room[:, :, : layer.length]
        return layer


def _stacked_room(rooms: Sequence[torch.Tensor], lengths: Sequence[int], capacity: int, shared: int, end: int) -> torch.Tensor:
    stacked = rooms[0].new_zeros(sum(room.shape[0] for room in rooms), rooms[0].shape[1], capacity, rooms[0].shape[-1])
    start = 0
    for room, length in zip(rooms, lengths, strict=True):
        stop, own = start + room.shape[0], length - shared
        stacked[start:stop, :, :shared] = room[:, :, :shared]
        stacked[start:stop, :, end - own : end] = room[:, :, shared:length]
        start = stop
    return stacked


class _GenerationCache(Cache):
    """The KV cache of `greedy_token_ids`: the given layers, and keys and values stored as aaq's attention reads them
    (rotated, quantized) for the layers in `attentions` (layer index -> attention module)."""

    def __init__(self, layers: list, attentions: dict[int, torch.nn.Module]) -> None:
        super().__init__(layers=layers)
        self.attentions = attentions

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        attention = self.attentions.get(layer_idx)
        if attention is None:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        keys, values = super().update(*kv_as_cached(attention, key_states, value_states), layer_idx, *args, **kwargs)
        mark_as_cached(keys)
        return keys, values


def _kv_attentions(model) -> dict[int, torch.nn.Module]:
    """The attention modules that transform keys and values (R3, the KV quantizer), by layer index."""
    return {
        module.layer_idx: module
        for module in model.modules()
        if hasattr(module, "layer_idx") and (getattr(module, QK_ROTATION, None) or getattr(module, KV_QUANTIZER, None))
    }


def _decoding_cache(model, capacity: int) -> _GenerationCache:
    """A cache for sequences of at most `capacity` positions: preallocated when every layer attends to all positions
    (sliding-window layers keep transformers' own), K/V transformed on write where the attention transforms them."""
    layers = DynamicCache(config=model.config).layers
    if all(type(layer) is DynamicLayer for layer in layers):
        layers = [_PreallocatedLayer(capacity) for _ in layers]
    return _GenerationCache(layers, _kv_attentions(model))


def stop_token_ids(model, tokenizer) -> set[int]:
    """Return the token ids that end an answer: the model's generation config's EOS ids, else the tokenizer's EOS."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        return set()
    return {int(configured)} if isinstance(configured, int) else {int(token) for token in configured}


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of `lengths` sorted by length, in the fewest batches of at most `batch_size` with sizes differing by <= 1."""
    order = sorted(range(len(lengths)), key=lambda index: lengths[index])
    count = -(-len(order) // batch_size)
    bounds = [len(order) * number // count for number in range(count + 1)] if count else [0]
    return [order[start:stop] for start, stop in itertools.pairwise(bounds)]


def _left_padded(rows: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[index, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _shared_prefix_length(rows: Sequence[list[int]], own: int = 1) -> int:
    """How many leading tokens all rows share (a chat template's system prompt), leaving every row `own` of its own."""
    shared = 0
    for tokens in zip(*rows, strict=False):
        if any(token != tokens[0] for token in tokens):
            break
        shared += 1
    return max(0, min(shared, min(len(row) for row in rows) - own))


def _shared_prefix(model, rows: Sequence[list[int]], own: int = 1) -> tuple[int, _GenerationCache | None]:
    """The number of leading tokens all rows share (each keeping `own` of its own) and their keys and values,
    computed once at batch 1; (0, None) for a single row or a model whose cache cannot take them (sliding windows)."""
    shared = _shared_prefix_length(rows, own) if len(rows) > 1 else 0
    if not shared:
        return 0, None
    prefix = _decoding_cache(model, shared)
    if not all(isinstance(layer, _PreallocatedLayer) for layer in prefix.layers):
        return 0, None
    device = next(model.parameters()).device
    model(input_ids=torch.tensor([rows[0][:shared]], device=device), cache=prefix, use_cache=True, logits_to_keep=1)
    return shared, prefix


def _prefill_rows(
    model, rows: Sequence[list[int]], cache: _GenerationCache, pad_id: int, shared: int, prefix: _GenerationCache | None, keep: int = 1
) -> tuple[_GenerationCache, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run `rows` through the model into `cache`, after the keys and values of their first `shared` tokens (`prefix`,
    computed once): the cache, the logits of the last `keep` positions, the attention mask and each row's next position."""
    device = next(model.parameters()).device
    if prefix is not None:
        for layer, computed in zip(cache.layers, prefix.layers, strict=True):
            # The layer's own update: the keys and values were transformed when the prefix cache stored them.
            layer.update(computed.keys.expand(len(rows), -1, -1, -1), computed.values.expand(len(rows), -1, -1, -1))
    ids, own_mask = _left_padded([row[shared:] for row in rows], pad_id, device)
    mask = torch.cat([own_mask.new_ones(len(rows), shared), own_mask], dim=-1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=keep).logits
    return cache, logits, mask, positions[:, -1] + 1


def _prefill(model, rows: Sequence[list[int]], capacity: int, pad_id: int) -> tuple[Cache, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the prompts (sorted by length) through the model: the filled cache, the last position's logits, the
    attention mask and each row's next position.

    The tokens all prompts start with (a chat template's system prompt) are computed once and their keys and
    values copied to every row; the rest goes in chunks of `PREFILL_ROWS` prompts, each padded only to its own
    longest; the cache holds [shared | padding | own tokens] per row.
    """
    cache = _decoding_cache(model, capacity)
    if len(rows) == 1 or not all(isinstance(layer, _PreallocatedLayer) for layer in cache.layers):
        return _prefill_rows(model, rows, cache, pad_id, 0, None)
    shared, prefix = _shared_prefix(model, rows)
    parts = []
    for start in range(0, len(rows), PREFILL_ROWS):
        chunk = rows[start : start + PREFILL_ROWS]
        parts.append(_prefill_rows(model, chunk, _decoding_cache(model, max(map(len, chunk))), pad_id, shared, prefix))
    width = max(mask.shape[1] for _, _, mask, _ in parts)
    layers = [_PreallocatedLayer.stacked([part[0].layers[index] for part in parts], capacity, shared) for index in range(len(cache.layers))]
    masks = [torch.cat([mask[:, :shared], mask.new_zeros(len(mask), width - mask.shape[1]), mask[:, shared:]], dim=-1) for _, _, mask, _ in parts]
    return (
        _GenerationCache(layers, cache.attentions),
        torch.cat([logits for _, logits, _, _ in parts]),
        torch.cat(masks),
        torch.cat([position for *_, position in parts]),
    )


def _greedy_batch(model, rows: Sequence[list[int]], max_new_tokens: int, stop_ids: set[int], pad_id: int) -> list[list[int]]:
    """Greedy continuations of one batch of prompts; each row stops at its first stop token (kept) or at the limit."""
    device = next(model.parameters()).device
    cache, logits, mask, next_position = _prefill(model, rows, max(len(row) for row in rows) + max_new_tokens, pad_id)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    active = torch.arange(len(rows), device=device)  # which prompt each remaining row answers
    answers: list[list[int]] = [[] for _ in rows]
    for step in range(max_new_tokens):
        tokens = logits[:, -1].argmax(-1)
        for row, token in zip(active.tolist(), tokens.tolist(), strict=True):
            answers[row].append(token)
        going = ~torch.isin(tokens, stops)
        if step == max_new_tokens - 1 or not going.any():
            break
        if not going.all():
            # A finished row leaves the batch: the next steps compute only the rows still answering.
            keep = going.nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            active, tokens, mask, next_position = active[keep], tokens[keep], mask[keep], next_position[keep]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=-1)
        logits = model(
            input_ids=tokens[:, None], attention_mask=mask, position_ids=next_position[:, None], cache=cache, use_cache=True
        ).logits
        next_position = next_position + 1
    return answers


@torch.no_grad()
def greedy_token_ids(
    model, prompts: Sequence[list[int]], max_new_tokens: int, batch_size: int, stop_ids: set[int], pad_id: int = 0
) -> list[list[int]]:
    """Return the greedy continuation (token ids) of each tokenized prompt, in order: at most `max_new_tokens`,
    ending with the first of `stop_ids` when one is generated. At most `batch_size` prompts are decoded together."""
    answers: list[list[int]] = [[] for _ in prompts]
    batches = length_sorted_batches([len(prompt) for prompt in prompts], batch_size)
    for batch in tqdm(batches, desc="generate", unit="batch", leave=False):
        for index, answer in zip(batch, _greedy_batch(model, [prompts[i] for i in batch], max_new_tokens, stop_ids, pad_id), strict=True):
            answers[index] = answer
    return answers


@torch.no_grad()
def last_position_logits(model, rows: Sequence[list[int]], keep: int, pad_id: int = 0) -> torch.Tensor:
    """Return the logits of the last `keep` positions of each token row (each at least `keep` long), a
    `[len(rows), keep, vocab]` tensor; the tokens all rows start with are computed once."""
    shared, prefix = _shared_prefix(model, rows, own=keep)
    cache = _decoding_cache(model, max(map(len, rows)))
    return _prefill_rows(model, rows, cache, pad_id, shared, prefix, keep)[1]


def prompt_token_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Return each prompt rendered by the chat template (when there is one) and tokenized, as generation sees it."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    # A rendered chat template already carries its own BOS; adding special tokens again would double it.
    return [tokenizer(text, add_special_tokens=not templated)["input_ids"] for text in chat_texts(tokenizer, prompts)]


def generate_responses(model, tokenizer, prompts: Sequence[str], config: GenerationConfig | None = None) -> list[str]:
    """Return the model's greedy response (new text only, special tokens removed) to each prompt, in order."""
    config = config or GenerationConfig()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    answers = greedy_token_ids(
        model, prompt_token_ids(tokenizer, prompts), config.max_new_tokens, config.batch_size, stop_token_ids(model, tokenizer), pad_id
    )
    return [response.strip() for response in tokenizer.batch_decode(answers, skip_special_tokens=True)]


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
            logits = model(**batch, position_ids=positions, use_cache=False, logits_to_keep=1).logits[:, -1, :]
            rows.append(torch.log_softmax(logits.float(), dim=-1)[:, ids].cpu())
    return torch.cat(rows) if rows else torch.empty(0, len(ids))
