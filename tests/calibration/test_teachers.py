"""The on-disk teacher cache: same loss and gradients as the uncached path, and clear errors when unusable."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from aaq.calibration.losses import LossConfig, TeacherTargets, compute_loss, teacher_targets
from aaq.calibration.pair_stats import PairStatistics, PairSummary, PushSet
from aaq.calibration.teachers import TeacherCache, build_teacher_cache, open_or_build
from aaq.errors import AaqError

VOCAB, HIDDEN, NUM_SEQ, SEQ_LEN = 37, 8, 5, 6


class TinyLM(nn.Module):
    """Token embedding followed by a linear head: logits (b, T, V) that depend on the parameters."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


@pytest.fixture(scope="module")
def models() -> tuple[TinyLM, TinyLM, TinyLM]:
    aligned = TinyLM(0)
    reference = TinyLM(0)
    student = TinyLM(0)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.5 * torch.randn_like(param))
        for param in student.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return aligned.requires_grad_(False), reference.requires_grad_(False), student


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (NUM_SEQ, SEQ_LEN), generator=torch.Generator().manual_seed(1))


def loss_and_grads(student: TinyLM, batch: torch.Tensor, targets: TeacherTargets, config: LossConfig):
    student.zero_grad()
    terms = compute_loss(student(batch), targets, config)
    terms.total.backward()
    return terms, [param.grad.clone() for param in student.parameters()]


@pytest.mark.parametrize("k", [7, 100])
@pytest.mark.parametrize(
    "config_kwargs",
    [
        {"name": "apc"},
        {"name": "apc", "bounded": True},
        {"name": "kl_top"},
        {"name": "apc", "push_tokens": "reference"},
        {"name": "apc", "push_tokens": "vocab", "bounded": True},
        {"name": "apc", "push_tokens": "vocab"},
        {"name": "apc", "push_k": 3},
    ],
)
def test_fp32_cache_gives_the_uncached_loss_and_gradients(models, tokens, tmp_path: Path, k, config_kwargs) -> None:
    aligned, reference, student = models
    config = LossConfig(k=k, **config_kwargs)
    ref = reference if config.needs_reference else None
    cache = build_teacher_cache(
        aligned, ref, tokens, tmp_path, k=k, value_dtype=torch.float32, batch_size=2,
        push_k=config.push_k, push_tokens=config.push_tokens,
    )  # fmt: skip
    seqs = [3, 0, 4]
    batch = tokens[seqs]
    on_the_fly = teacher_targets(aligned(batch), None if ref is None else reference(batch), k, config.push_k, config.push_tokens)
    cached = cache.targets(seqs)
    assert torch.equal(cached.pull_idx, on_the_fly.pull_idx)
    uncached_terms, uncached_grads = loss_and_grads(student, batch, on_the_fly, config)
    cached_terms, cached_grads = loss_and_grads(student, batch, cached, config)
    assert cached_terms.total.item() == pytest.approx(uncached_terms.total.item(), abs=1e-6)
    assert uncached_terms.total.item() != 0.0
    for got, want in zip(cached_grads, uncached_grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
        assert want.abs().max() > 0


def test_fp16_cache_is_close_to_uncached(models, tokens, tmp_path: Path) -> None:
    aligned, reference, student = models
    config = LossConfig(name="apc", k=7)
    cache = build_teacher_cache(aligned, reference, tokens, tmp_path, k=7)
    assert cache.meta.value_dtype == "float16"
    assert np.load(tmp_path / "pull_prob.npy", mmap_mode="r").dtype == np.float16
    assert np.load(tmp_path / "pull_idx.npy", mmap_mode="r").dtype == np.int32
    seqs = list(range(NUM_SEQ))
    cached = cache.targets(seqs)
    assert cached.pull_prob.dtype == torch.float32 and cached.pull_idx.dtype == torch.int64
    on_the_fly = teacher_targets(aligned(tokens), reference(tokens), 7)
    cached_terms, cached_grads = loss_and_grads(student, tokens, cached, config)
    uncached_terms, uncached_grads = loss_and_grads(student, tokens, on_the_fly, config)
    assert cached_terms.pull.item() == pytest.approx(uncached_terms.pull.item(), rel=1e-3)
    assert cached_terms.push.item() == pytest.approx(uncached_terms.push.item(), rel=1e-3)
    for got, want in zip(cached_grads, uncached_grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())


def test_cache_layout_and_metadata(models, tokens, tmp_path: Path) -> None:
    aligned, reference, _ = models
    cache = build_teacher_cache(aligned, reference, tokens, tmp_path, k=1000, batch_size=3)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["k"] == 1000 and meta["vocab_size"] == VOCAB and meta["num_sequences"] == NUM_SEQ
    assert meta["seq_len"] == SEQ_LEN and meta["has_push"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["meta.json", "pull_idx.npy", "pull_prob.npy", "push_idx.npy", "push_prob.npy", "push_ref.npy"]
    )
    targets = cache.targets(torch.tensor([1, 2]))
    assert targets.pull_idx.shape == (2 * SEQ_LEN, VOCAB)
    assert targets.push_ref.shape == (2 * SEQ_LEN,)


def test_cache_without_reference_has_no_push(models, tokens, tmp_path: Path) -> None:
    aligned, _, _ = models
    cache = build_teacher_cache(aligned, None, tokens, tmp_path, k=5)
    targets = cache.targets([0])
    assert not targets.has_push and targets.push_ref is None
    assert not (tmp_path / "push_idx.npy").exists()


def test_open_or_build_reuses_a_valid_cache(models, tokens, tmp_path: Path) -> None:
    aligned, reference, _ = models
    build_teacher_cache(aligned, reference, tokens, tmp_path, k=7)

    def must_not_run(batch: torch.Tensor) -> torch.Tensor:
        raise AssertionError("teacher called although a valid cache exists")

    cache = open_or_build(must_not_run, must_not_run, tokens, tmp_path, k=7)
    assert cache.meta.k_eff == 7
    with pytest.raises(AaqError, match="delete"):
        open_or_build(must_not_run, must_not_run, tokens, tmp_path, k=9)


def test_interrupted_build_is_not_a_cache(models, tokens, tmp_path: Path) -> None:
    aligned, reference, _ = models
    build_teacher_cache(aligned, reference, tokens, tmp_path, k=7)
    calls = []

    def dies_on_second_batch(batch: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return aligned(batch)

    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(dies_on_second_batch, reference, tokens, tmp_path, k=7)
    assert not TeacherCache.exists(tmp_path)
    cache = open_or_build(aligned, reference, tokens, tmp_path, k=7)
    expected = teacher_targets(aligned(tokens), reference(tokens), 7)
    assert torch.equal(cache.targets(range(NUM_SEQ)).push_idx, expected.push_idx)


def test_truncated_file_is_an_error(models, tokens, tmp_path: Path) -> None:
    aligned, reference, _ = models
    build_teacher_cache(aligned, reference, tokens, tmp_path, k=7)
    path = tmp_path / "push_prob.npy"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(AaqError, match="corrupt.*delete"):
        TeacherCache.open(tmp_path, tokens)


def test_other_tokens_are_rejected(models, tokens, tmp_path: Path) -> None:
    aligned, reference, _ = models
    build_teacher_cache(aligned, reference, tokens, tmp_path, k=7)
    other = tokens.clone()
    other[2, 3] = (other[2, 3] + 1) % VOCAB
    with pytest.raises(AaqError, match="other calibration tokens"):
        TeacherCache.open(tmp_path, other)
    with pytest.raises(AaqError, match="other calibration tokens"):
        TeacherCache.open(tmp_path, tokens.reshape(SEQ_LEN, NUM_SEQ))


def test_missing_cache_and_bad_settings_are_errors(models, tokens, tmp_path: Path) -> None:
    aligned, _, _ = models
    with pytest.raises(AaqError, match="no teacher cache"):
        TeacherCache.open(tmp_path, tokens)
    with pytest.raises(AaqError, match="float16 or torch.float32"):
        build_teacher_cache(aligned, None, tokens, tmp_path, k=7, value_dtype=torch.bfloat16)
    with pytest.raises(AaqError, match="vocab"):
        build_teacher_cache(aligned, lambda batch: aligned(batch)[..., :-1], tokens, tmp_path, k=7)
    with pytest.raises(AaqError, match="logits"):
        build_teacher_cache(lambda batch: aligned(batch)[0], None, tokens, tmp_path, k=7)
    cache = build_teacher_cache(aligned, None, tokens, tmp_path, k=7)
    with pytest.raises(AaqError, match="sequence indices"):
        cache.targets([NUM_SEQ])


def test_targets_written_in_row_chunks_match(models, tokens, tmp_path: Path, monkeypatch) -> None:
    aligned, reference, _ = models
    monkeypatch.setattr("aaq.calibration.teachers._ROWS_PER_CHUNK", 4)  # chunks straddle sequence and batch borders
    cache = build_teacher_cache(aligned, reference, tokens, tmp_path, k=7, value_dtype=torch.float32, batch_size=2)
    cached = cache.targets(range(NUM_SEQ))
    expected = teacher_targets(aligned(tokens), reference(tokens), 7)
    for field in ("pull_idx", "push_idx"):
        assert torch.equal(getattr(cached, field), getattr(expected, field))
    for field in ("pull_prob", "push_prob", "push_ref"):
        assert torch.allclose(getattr(cached, field), getattr(expected, field), rtol=1e-6, atol=1e-7)


def test_stored_size_is_what_the_metadata_says(models, tokens, tmp_path: Path) -> None:
    aligned, reference, _ = models
    cache = build_teacher_cache(aligned, reference, tokens, tmp_path, k=7)
    on_disk = sum(np.load(path, mmap_mode="r").nbytes for path in tmp_path.glob("*.npy"))
    assert cache.meta.nbytes == on_disk > 0


@pytest.mark.parametrize("fallocate", [True, False])
def test_a_full_disk_is_an_error_that_removes_the_partial_files(models, tokens, tmp_path: Path, monkeypatch, fallocate) -> None:
    import errno
    import os

    aligned, reference, _ = models
    if fallocate:
        monkeypatch.setattr(os, "posix_fallocate", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    else:  # systems without fallocate get their blocks by writing zeros, which raise on a full disk as well
        monkeypatch.delattr(os, "posix_fallocate")
        real_open = Path.open

        def full_when_writing(self, mode="r", *args, **kwargs):
            handle = real_open(self, mode, *args, **kwargs)
            if mode == "r+b":
                handle.write = lambda data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
            return handle

        monkeypatch.setattr(Path, "open", full_when_writing)
    with pytest.raises(AaqError, match=r"could not write the teacher cache in .* \(No space left on device\); free some disk space"):
        build_teacher_cache(aligned, reference, tokens, tmp_path, k=7)
    assert list(tmp_path.iterdir()) == []


def test_allocation_by_writing_zeros_gives_a_usable_cache(models, tokens, tmp_path: Path, monkeypatch) -> None:
    import os

    aligned, reference, _ = models
    monkeypatch.delattr(os, "posix_fallocate")
    cache = build_teacher_cache(aligned, reference, tokens, tmp_path, k=7)
    assert torch.equal(cache.targets([2]).pull_idx, teacher_targets(aligned(tokens[[2]]), reference(tokens[[2]]), 7).pull_idx)


def test_vocabulary_push_stores_probabilities_only(models, tokens, tmp_path: Path) -> None:
    aligned, reference, _ = models
    cache = build_teacher_cache(aligned, reference, tokens, tmp_path, k=7, push_tokens="vocab")
    assert not (tmp_path / "push_idx.npy").exists()
    assert np.load(tmp_path / "push_prob.npy", mmap_mode="r").shape == (NUM_SEQ, SEQ_LEN, VOCAB)
    targets = cache.targets([1, 2])
    assert targets.push_idx is None and targets.push_prob.shape == (2 * SEQ_LEN, VOCAB)
    assert torch.allclose(targets.push_prob.sum(-1), torch.ones(2 * SEQ_LEN), atol=1e-2)
    fp16_bytes = NUM_SEQ * SEQ_LEN * (7 * (4 + 2) + VOCAB * 2 + 4)  # pull idx+prob, push prob, push_ref
    assert cache.meta.nbytes == fp16_bytes
    assert sum((tmp_path / f"{field}.npy").stat().st_size for field in cache.meta.fields) > fp16_bytes


def test_push_k_sizes_the_push_arrays_only(models, tokens, tmp_path: Path) -> None:
    aligned, reference, _ = models
    cache = build_teacher_cache(aligned, reference, tokens, tmp_path, k=7, push_k=3, push_tokens="reference")
    targets = cache.targets([0])
    assert targets.pull_idx.shape == (SEQ_LEN, 7) and targets.push_idx.shape == (SEQ_LEN, 3)
    expected = reference(tokens[:1]).reshape(SEQ_LEN, VOCAB).topk(3, dim=-1).indices
    assert torch.equal(targets.push_idx, expected)


def test_reusing_a_cache_with_other_push_tokens_is_an_error(models, tokens, tmp_path: Path) -> None:
    aligned, reference, _ = models
    build_teacher_cache(aligned, reference, tokens, tmp_path, k=7)
    assert open_or_build(aligned, reference, tokens, tmp_path, k=7, push_k=7).meta.push_set.label == "diff@7"
    with pytest.raises(AaqError, match="push tokens.*delete"):
        open_or_build(aligned, reference, tokens, tmp_path, k=7, push_tokens="vocab")
    with pytest.raises(AaqError, match="delete"):
        open_or_build(aligned, None, tokens, tmp_path, k=7)


def test_cache_records_the_pair_statistics_of_its_windows(models, tokens, tmp_path: Path) -> None:
    aligned, reference, _ = models
    build_teacher_cache(aligned, reference, tokens, tmp_path, k=7, batch_size=2)
    recorded = PairSummary.from_dict(json.loads((tmp_path / "meta.json").read_text())["pair_statistics"])
    direct = PairStatistics(PushSet("diff", 7).with_alternatives(7))
    direct.add(aligned(tokens), reference(tokens))
    expected = direct.summary()
    assert recorded.positions == NUM_SEQ * SEQ_LEN and recorded.kl == pytest.approx(expected.kl, rel=1e-5)
    assert [s.push.label for s in recorded.push] == ["diff@7", "reference@7", "vocab"]
    for got, want in zip(recorded.push, expected.push, strict=True):
        assert got.mass == pytest.approx(want.mass, rel=1e-5) and got.contrast == pytest.approx(want.contrast, rel=1e-5)
    assert recorded.kl > 0.01 and not recorded.of(PushSet("vocab", None)).sees_nothing
    assert build_teacher_cache(aligned, None, tokens, tmp_path / "pull", k=7).meta.pair_statistics is None


def test_a_cache_larger_than_the_free_disk_is_refused_before_writing(models, tokens, tmp_path: Path, monkeypatch) -> None:
    aligned, reference, _ = models
    monkeypatch.setattr("aaq.runs.folders.shutil.disk_usage", lambda path: SimpleNamespace(total=10**4, used=9000, free=1000))
    with pytest.raises(AaqError, match=r"not enough free disk space .* \(teacher cache"):
        build_teacher_cache(aligned, reference, tokens, tmp_path, k=7, push_tokens="vocab")
    assert not list(tmp_path.glob("*.npy*"))
