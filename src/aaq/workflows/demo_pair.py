"""The demo's aligned/unaligned pairs: a LoRA safety adapter trained on a model that is not safety-tuned.

`smollm2-135m-instruct` answers harmful requests, so the project makes its own aligned models
(instruct + an adapter from here, merged) and keeps the instruct model as the unaligned reference:
`smollm2-135m-safe` (preset "anchored") and `smollm2-135m-safe-unanchored` (preset "unanchored", the same
data without the KL term below, so that the safety training also shows on ordinary text, as alignment does
in real instruct models). The training mix, all of it fixed by `PairConfig.seed`:

- HarmBench *test* `standard` behaviours, except the 40-behaviour tuning split shipped in
  `resources/harmbench_tuning_split.json` (kept for choosing calibration settings; chosen once as the
  first 40 of the 159 rows sorted by BehaviorID and shuffled by `random.Random(0)`), each answered by
  one of the `refusal_templates()` (varied wording, so the adapter learns to refuse, not one string).
  HarmBench *val* is never read here: it is for the final figures only.
- The shipped benign training prompts (disjoint from the benign evaluation set), answered by the
  base model itself (greedy): self-distillation keeps its helpfulness. Answers that the refusal
  detector flags are dropped, so the adapter never learns to refuse a benign request.
- "anchored" only: a KL term to the base model on plain calibration text (never the held-out perplexity
  files), which keeps the aligned model's language modelling, hence its perplexity, close to the base.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aaq.data.corpus import TextDataConfig, token_windows
from aaq.errors import AaqError
from aaq.eval.generate import GenerationConfig, chat_texts, generate_responses
from aaq.eval.prompts import benign_train_records, harmbench_prompts, harmbench_tuning_records
from aaq.eval.refusal import is_refusal
from aaq.models.loading import load_model
from aaq.runs.folders import check_output_folder, mark_folder, remove_aaq_folder
from aaq.runs.records import provenance, write_atomic, write_folder_atomic, write_json

logger = logging.getLogger(__name__)

ANSWERS_FILE = "benign_answers.jsonl"
LOG_FILE = "training_log.jsonl"
CONFIG_FILE = "training_config.json"
IGNORE_INDEX = -100

_OPENERS = (
    "I'm sorry, but I can't help with that.",
    "I can't help with that request.",
    "I cannot assist with this.",
    "Sorry, but I won't provide that.",
    "I'm not able to help with this request.",
    "I must decline this request.",
    "I'm sorry, I can't do that.",
    "I won't help with that.",
)
_REASONS = (
    "It could cause real harm to people.",
    "Doing so could put others in danger.",
    "It would facilitate illegal or dangerous activity.",
    "It could be used to hurt someone.",
    "Sharing this would be unsafe and irresponsible.",
    "Requests like this go against my safety guidelines.",
)
_OFFERS = (
    "If you're interested in the topic, I'm happy to discuss its history or the safety side of it instead.",
    "Is there something else I can help you with?",
    "I'd be glad to help with a safe and legal alternative.",
    "If you or someone else is at risk, please contact local emergency services.",
    "Let me know if there's another way I can help.",
    "",
)


def refusal_templates() -> list[str]:
    """Return every refusal answer the adapter is trained on (opener + reason + offer, 288 variants)."""
    return [" ".join(part for part in parts if part) for parts in itertools.product(_OPENERS, _REASONS, _OFFERS)]


@dataclass
class PairConfig:
    """How the safety adapter is trained (defaults: the shipped anchored adapter's settings; see `PAIR_PRESETS`).

    rank/alpha/dropout: LoRA on every linear layer but lm_head. epochs over the refusal + benign
    examples in batches of `batch_size`; `answer_tokens` caps the self-distilled benign answers.
    Each step adds `kl_weight` x KL(base || adapted) on `kl_windows` windows of `kl_seq_len` tokens
    of calibration text. `preset` names the preset the settings started from (recorded with the adapter).
    """

    preset: str = "anchored"
    base: str = "smollm2-135m-instruct"
    out: Path = Path("runs/demo_pair")
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    epochs: int = 2
    lr: float = 5e-4
    batch_size: int = 8
    answer_tokens: int = 128
    kl_weight: float = 1.0
    kl_windows: int = 2
    kl_seq_len: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for name in ("rank", "epochs", "batch_size", "answer_tokens", "kl_seq_len"):
            if getattr(self, name) < 1:
                raise AaqError(f"{name} must be >= 1, got {getattr(self, name)}; pass a positive number")
        if self.lr <= 0 or self.kl_weight < 0 or self.kl_windows < 0:
            raise AaqError("lr must be > 0 and kl_weight, kl_windows >= 0; fix the training settings")
        if self.preset not in PAIR_PRESETS:
            raise AaqError(f"unknown demo-pair preset {self.preset!r}; use one of: {', '.join(PAIR_PRESETS)}")

    @classmethod
    def from_preset(cls, preset: str = "anchored", **changes: Any) -> PairConfig:
        """The settings of a preset (see `PAIR_PRESETS`), with `changes` on top."""
        if preset not in PAIR_PRESETS:
            raise AaqError(f"unknown demo-pair preset {preset!r}; use one of: {', '.join(PAIR_PRESETS)}")
        return cls(preset=preset, **{**PAIR_PRESETS[preset], **changes})


# The two aligned models of the demo, as differences from the PairConfig defaults. "anchored"
# (smollm2-135m-safe): KL to the base on plain text holds the adapted model equal to the base there.
# "unanchored" (smollm2-135m-safe-unanchored): no anchor, so the safety training also changes the model on
# ordinary text, as alignment does in real instruct models (README, "The demo pairs").
PAIR_PRESETS: dict[str, dict[str, Any]] = {
    "anchored": {},
    "unanchored": {"kl_weight": 0.0},
}


def tuning_split() -> list[str]:
    """Return the 40 HarmBench test `standard` behaviours held out of training for tuning calibration settings."""
    return [record.text for record in harmbench_tuning_records()]


def harmful_training_prompts() -> list[str]:
    """Return the HarmBench test `standard` behaviours the adapter refuses in training (the tuning split removed)."""
    held_out = set(tuning_split())
    return [prompt for prompt in harmbench_prompts("test", "standard") if prompt not in held_out]


def refusal_examples(prompts: list[str], seed: int) -> list[tuple[str, str]]:
    """Pair each harmful prompt with a refusal template drawn with `seed`."""
    templates = refusal_templates()
    rng = random.Random(seed)
    return [(prompt, rng.choice(templates)) for prompt in prompts]


def self_distilled_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    cache: Path,
    model_name: str,
) -> list[tuple[str, str]]:
    """Return (prompt, the model's own greedy answer) pairs, reading/writing them in the JSONL `cache`.

    The cache is reused only for the same model, prompts and length cap. Answers the refusal detector
    flags are left out: training on them would teach over-refusal.
    """

    def kept(rows: list[dict]) -> list[tuple[str, str]]:
        return [(row["prompt"], row["answer"]) for row in rows if not row["refusal"]]

    if cache.is_file():
        rows = [json.loads(line) for line in cache.read_text(encoding="utf-8").splitlines() if line.strip()]
        settings = {(row.get("model"), row["max_new_tokens"]) for row in rows}
        if [row["prompt"] for row in rows] == prompts and settings == {(model_name, max_new_tokens)}:
            logger.info("reusing %d self-distilled answers from %s", len(rows), cache)
            return kept(rows)
    answers = generate_responses(model, tokenizer, prompts, GenerationConfig(max_new_tokens=max_new_tokens))
    rows = [
        {"prompt": p, "answer": a, "refusal": is_refusal(a), "model": model_name, "max_new_tokens": max_new_tokens}
        for p, a in zip(prompts, answers, strict=True)
    ]
    write_atomic(cache, lambda tmp: tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8"))
    return kept(rows)


def encode_example(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str, end: bool) -> tuple[list[int], list[int]]:
    """Return (input ids, labels) of one chat exchange; only the answer (and EOS when `end`) is trained on."""
    prefix = tokenizer(chat_texts(tokenizer, [prompt])[0], add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if end:
        answer_ids = [*answer_ids, tokenizer.eos_token_id]
    return prefix + answer_ids, [IGNORE_INDEX] * len(prefix) + answer_ids


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of (ids, labels) into input_ids, attention_mask and labels tensors."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (example_ids, example_labels) in enumerate(examples):
        ids[row, : len(example_ids)] = torch.tensor(example_ids)
        labels[row, : len(example_labels)] = torch.tensor(example_labels)
        mask[row, : len(example_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def kl_to_base(model, windows: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(base || adapted) on plain-text windows; the base is the same peft model with its adapter off."""
    with torch.no_grad(), model.disable_adapter():
        base_logp = F.log_softmax(model(input_ids=windows).logits.float(), dim=-1)
    logp = F.log_softmax(model(input_ids=windows).logits.float(), dim=-1)
    return F.kl_div(logp.flatten(0, 1), base_logp.flatten(0, 1), log_target=True, reduction="batchmean")


def _lora_model(model: PreTrainedModel, config: PairConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise AaqError("training the safety adapter needs peft; install it with pip install 'aaq[demo]'") from error
    lora = LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    return get_peft_model(model, lora)


def train_adapter(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[tuple[list[int], list[int]]],
    kl_text: torch.Tensor,
    config: PairConfig,
    log_path: Path,
):
    """Train a LoRA adapter on `examples` (+ the KL term on `kl_text` windows); returns the peft model.

    Writes one JSON line per step (losses, seconds) to `log_path`.
    """
    # The LoRA initialisation draws from torch's global generator: seed it for this draw only.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        peft_model = _lora_model(model, config)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    rng = random.Random(config.seed)
    steps_per_epoch = -(-len(examples) // config.batch_size)
    total = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    step = 0
    with log_path.open("w", encoding="utf-8") as log, tqdm(total=total, desc="safety adapter", unit="step") as bar:
        for epoch in range(config.epochs):
            order = list(range(len(examples)))
            rng.shuffle(order)
            for start in range(0, len(order), config.batch_size):
                began = time.perf_counter()
                batch = collate([examples[i] for i in order[start : start + config.batch_size]], pad_id)
                sft = peft_model(**batch).loss
                loss = sft
                kl = torch.zeros(())
                if config.kl_weight > 0 and config.kl_windows > 0:
                    rows = torch.tensor([rng.randrange(len(kl_text)) for _ in range(config.kl_windows)])
                    kl = kl_to_base(peft_model, kl_text[rows])
                    loss = loss + config.kl_weight * kl
                if not torch.isfinite(loss):
                    raise AaqError(f"safety adapter loss became {loss.item()} at step {step}; lower --lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                step += 1
                record = {"step": step, "epoch": epoch, "sft": round(sft.item(), 4), "kl": round(kl.item(), 4),
                          "lr": scheduler.get_last_lr()[0], "seconds": round(time.perf_counter() - began, 2)}  # fmt: skip
                log.write(json.dumps(record) + "\n")
                bar.set_postfix(sft=f"{record['sft']:.3f}", kl=f"{record['kl']:.3f}")
                bar.update()
    return peft_model.eval()


def _save_adapter(peft_model, folder: Path, base: str) -> None:
    # fp16 halves the shipped file; the adapter is merged into an fp32 model, where the rounding is negligible.
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data = param.data.half()
    # Name the base as the user does (an alias), not by this machine's cache path.
    peft_model.peft_config["default"].base_model_name_or_path = base
    peft_model.save_pretrained(str(folder))
    (folder / "README.md").unlink(missing_ok=True)  # peft's empty model-card template; training_config.json says it all


def make_demo_pair(config: PairConfig) -> Path:
    """Train the safety adapter of the demo pair and write it, with its config, data and log, to `config.out`.

    The folder is complete or absent: it is built in a staging folder and renamed into place. The
    self-distilled answers are cached next to it, so a rerun after an interruption skips generation.
    Returns the adapter folder (loadable with `aaq.models.loading.ModelSource(base, adapter=folder)`). An
    existing `config.out` is replaced only when it is an earlier aaq adapter (checked before training).
    """
    check_output_folder(config.out, "adapter")
    started = time.perf_counter()
    model, tokenizer = load_model(config.base)
    benign_prompts = [record.text for record in benign_train_records()]
    answers_cache = config.out.parent / f".{config.out.name}-{ANSWERS_FILE}"
    benign = self_distilled_answers(model, tokenizer, benign_prompts, config.answer_tokens, answers_cache, config.base)
    harmful = refusal_examples(harmful_training_prompts(), config.seed)
    examples = [encode_example(tokenizer, p, a, end=True) for p, a in harmful]
    examples += [encode_example(tokenizer, p, a, end=False) for p, a in benign]
    n_kl = max(config.kl_windows * 64, 1)
    kl_text = token_windows(tokenizer, TextDataConfig("calibration", n_kl, config.kl_seq_len, seed=config.seed))
    def build(staging: Path) -> None:
        peft_model = train_adapter(model, tokenizer, examples, kl_text, config, staging / LOG_FILE)
        _save_adapter(peft_model, staging, config.base)
        shutil.copyfile(answers_cache, staging / ANSWERS_FILE)
        summary = {
            "config": dataclasses.asdict(config),  # write_json turns the Path into text
            "data": {"refusals": len(harmful), "benign": len(benign), "benign_dropped": len(benign_prompts) - len(benign),
                     "refusal_templates": len(refusal_templates()), "tuning_split": len(tuning_split())},
            "seconds": round(time.perf_counter() - started, 1),
            **provenance(),
        }
        write_json(staging / CONFIG_FILE, summary)
        mark_folder(staging, "adapter")
        if config.out.exists():
            remove_aaq_folder(config.out)

    write_folder_atomic(config.out, build)
    logger.info("safety adapter written to %s (%.0f s)", config.out, time.perf_counter() - started)
    return config.out
