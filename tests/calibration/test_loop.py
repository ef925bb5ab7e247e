"""The calibration loop lowers the loss, resumes exactly, stops on divergence, and caching does not change it."""

import copy
from dataclasses import replace
from functools import partial

import pytest
import torch

import aaq.calibration.loop as calibrate_module
from aaq.calibration.loop import CalibrationSettings, batch_indices, calibrate, heldout_split, student_loss
from aaq.calibration.losses import LossConfig, chunked_loss, compute_loss
from aaq.calibration.teachers import build_teacher_cache, cached_teacher, live_teacher
from aaq.errors import AaqError
from aaq.quant.quantizers import QuantScheme
from tests.helpers import calibration_setup, logits_fn, make_tiny_model, perturbed_reference

SCHEME = QuantScheme.from_string("w4a4kv4")
TOKENS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
APC = LossConfig(name="apc", lam=0.1, k=32)


def _student_and_cache(tmp_path, value_dtype=torch.float32, weights_in_loop=True):
    """A tiny W4A4KV4 student with fresh transforms, the teachers' cache, and the untouched teachers."""
    model = make_tiny_model("llama")
    reference = perturbed_reference(model)
    aligned = copy.deepcopy(model)
    cache = build_teacher_cache(logits_fn(model), logits_fn(reference), TOKENS, tmp_path / "cache", APC.k, value_dtype, 2)
    installed = calibration_setup(model, SCHEME, weights_in_loop=weights_in_loop)
    return model, installed, cache, aligned, reference


def _settings(**changes) -> CalibrationSettings:
    base = {"steps": 4, "batch_size": 2, "loss": APC, "checkpoint_every": 1, "cache_dtype": "float32"}
    return CalibrationSettings(**{**base, **changes})


def _params(installed) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in installed.transforms.state_dict().items()}


def test_batch_indices_cover_every_sequence_once_per_epoch_and_are_deterministic():
    epoch = torch.cat([batch_indices(step, 10, 5, seed=3) for step in range(2)])
    assert sorted(epoch.tolist()) == list(range(10))
    assert torch.equal(batch_indices(7, 10, 4, seed=3), batch_indices(7, 10, 4, seed=3))
    assert not torch.equal(batch_indices(0, 10, 10, seed=3), batch_indices(0, 10, 10, seed=4))
    straddling = batch_indices(2, 10, 4, seed=3)  # positions 8..11: the end of epoch 0 and start of epoch 1
    assert straddling.unique().numel() >= 3 and straddling.max() < 10


@pytest.mark.parametrize("weights_in_loop", [True, False])
def test_a_few_aaq_steps_lower_the_loss(tmp_path, weights_in_loop):
    model, installed, cache, _, _ = _student_and_cache(tmp_path, weights_in_loop=weights_in_loop)
    teacher = cached_teacher(cache)
    indices = torch.arange(4)
    # Adam: on a tiny random model the APC gradients are too small for Cayley SGD to move far in 8 steps.
    settings = _settings(steps=8, batch_size=4, rotation_lr=0.01, scale_lr=0.01, optimizer="riemannian_adam")
    with torch.no_grad():
        before = student_loss(model, TOKENS[indices], teacher(indices), APC).total.item()
    result = calibrate(model, installed.transforms, TOKENS, teacher, settings, seed=0)
    with torch.no_grad():
        after = student_loss(model, TOKENS[indices], teacher(indices), APC).total.item()
    assert len(result.history) == 8 and result.history[0]["loss"] == pytest.approx(before, abs=1e-6)
    assert after < before - 3e-4
    assert {"loss", "pull", "push"} <= set(result.history[0])


@pytest.mark.parametrize("weights_in_loop", [True, False])
@pytest.mark.parametrize("optimizer", ["cayley_sgd", "riemannian_adam"])
def test_resume_reaches_the_same_parameters_as_an_uninterrupted_run(tmp_path, optimizer, weights_in_loop):
    model, installed, cache, _, _ = _student_and_cache(tmp_path, weights_in_loop=weights_in_loop)
    calibrate(model, installed.transforms, TOKENS, cached_teacher(cache), _settings(optimizer=optimizer), seed=0)
    uninterrupted = _params(installed)

    checkpoints = tmp_path / "calibration"
    model, installed, _, _, _ = _student_and_cache(tmp_path / "killed", weights_in_loop=weights_in_loop)
    calibrate(model, installed.transforms, TOKENS, cached_teacher(cache), _settings(optimizer=optimizer, steps=2), 0, checkpoints)
    model, installed, _, _, _ = _student_and_cache(tmp_path / "resumed", weights_in_loop=weights_in_loop)
    settings = _settings(optimizer=optimizer)
    result = calibrate(model, installed.transforms, TOKENS, cached_teacher(cache), settings, 0, checkpoints, resume=True)
    assert len(result.history) == 2 and result.steps == 4
    resumed = _params(installed)
    for name, value in uninterrupted.items():
        assert torch.allclose(resumed[name], value, atol=1e-6, rtol=0), name
    assert len(list(checkpoints.glob("state-*.safetensors"))) == 1


def test_resume_with_other_settings_is_an_error(tmp_path):
    model, installed, cache, _, _ = _student_and_cache(tmp_path)
    checkpoints = tmp_path / "calibration"
    calibrate(model, installed.transforms, TOKENS, cached_teacher(cache), _settings(steps=1), 0, checkpoints)
    with pytest.raises(AaqError, match="other calibration settings"):
        calibrate(model, installed.transforms, TOKENS, cached_teacher(cache), _settings(rotation_lr=0.1), 0, checkpoints, resume=True)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    model, installed, cache, _, _ = _student_and_cache(tmp_path)
    real_loss = calibrate_module.chunked_loss
    calls = {"n": 0}

    def nan_after_two_steps(*args):
        calls["n"] += 1
        terms = real_loss(*args)
        return terms if calls["n"] <= 2 else terms._replace(total=terms.total * float("nan"))

    monkeypatch.setattr(calibrate_module, "chunked_loss", nan_after_two_steps)
    checkpoints = tmp_path / "calibration"
    with pytest.raises(AaqError, match=r"not finite at step 2.*lower the learning rates") as error:
        calibrate(model, installed.transforms, TOKENS, cached_teacher(cache), _settings(), 0, checkpoints)
    assert "\n" not in str(error.value)
    assert (checkpoints / "state-000002.safetensors").is_file()


def test_exploding_loss_is_reported(tmp_path, monkeypatch):
    model, installed, cache, _, _ = _student_and_cache(tmp_path)
    real_loss = calibrate_module.chunked_loss
    calls = {"n": 0}

    def explode(*args):
        calls["n"] += 1
        terms = real_loss(*args)
        return terms if calls["n"] == 1 else terms._replace(total=terms.total + 1e3)

    monkeypatch.setattr(calibrate_module, "chunked_loss", explode)
    with pytest.raises(AaqError, match="exploded"):
        calibrate(model, installed.transforms, TOKENS, cached_teacher(cache), _settings(), 0)


def test_cached_and_uncached_first_step_give_the_same_loss_and_gradients(tmp_path):
    model, installed, cache, aligned, reference = _student_and_cache(tmp_path)
    indices = torch.tensor([2, 0])
    gradients = []
    losses = []
    for teacher in (cached_teacher(cache), live_teacher(aligned, reference, TOKENS, APC)):
        for p in installed.transforms.parameters():
            p.grad = None
        terms = student_loss(model, TOKENS[indices], teacher(indices), APC)
        terms.total.backward()
        losses.append(terms.scalars())
        gradients.append([p.grad.clone() for p in installed.transforms.parameters()])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-7)
    for cached, live in zip(*gradients, strict=True):
        assert torch.allclose(cached, live, rtol=1e-4, atol=1e-7)


LOSSES = {
    "mse": LossConfig(name="mse"),
    "kl": LossConfig(name="kl"),
    "kl_top": LossConfig(name="kl_top", k=32),
    "apc": APC,
    "apc_bounded": LossConfig(name="apc", lam=0.3, k=32, bounded=True, margin=0.05),
    "apc_reference": LossConfig(name="apc", k=32, push_tokens="reference"),
    "apc_vocab": LossConfig(name="apc", k=32, push_tokens="vocab"),
    "apc_push_k": LossConfig(name="apc", k=32, push_k=5),
}


def _float64_student(tmp_path, loss: LossConfig, cached: bool, weights_in_loop: bool):
    """A tiny float64 W4A4KV4 student with moved transforms, and its teacher (cached in float32, or the live float64 models)."""
    model = make_tiny_model("llama").double()
    reference, aligned = perturbed_reference(model), copy.deepcopy(model)
    if cached:
        cache = build_teacher_cache(logits_fn(aligned), logits_fn(reference), TOKENS, tmp_path / "cache", loss.k, torch.float32, 2, loss.push_k, loss.push_tokens)
        teacher = cached_teacher(cache)
    else:
        teacher = live_teacher(aligned, reference if loss.needs_reference else None, TOKENS, loss)
    installed = calibration_setup(model, SCHEME, weights_in_loop=weights_in_loop)
    transforms = installed.transforms.double()
    with torch.no_grad():  # away from the start, so that every parameter has a gradient of its own
        for p in transforms.scale_parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    return model, transforms, teacher


def _loss_and_gradients(loss_fn, transforms) -> tuple[dict[str, float], list[torch.Tensor]]:
    for p in transforms.parameters():
        p.grad = None
    terms = loss_fn()
    terms.total.backward()
    return {k: float(v.detach()) for k, v in terms._asdict().items() if v is not None}, [p.grad.clone() for p in transforms.parameters()]


@pytest.mark.parametrize("weights_in_loop", [False, True], ids=["activation_form", "weight_form"])
@pytest.mark.parametrize(("name", "cached"), [(name, cached) for name in LOSSES for cached in (True, False) if LOSSES[name].cacheable or not cached])
def test_chunked_student_loss_equals_the_whole_batch_loss_in_value_and_gradient(tmp_path, monkeypatch, name, cached, weights_in_loop):
    """Chunks of 5 positions (straddling the sequences of a 2 x 16 batch) give the loss of the whole batch's logits, float64."""
    loss = LOSSES[name]
    model, transforms, teacher = _float64_student(tmp_path, loss, cached, weights_in_loop)
    indices = torch.tensor([3, 1])
    batch, targets = TOKENS[indices], teacher(indices)
    whole = _loss_and_gradients(lambda: compute_loss(model(input_ids=batch, use_cache=False).logits, targets, loss), transforms)
    monkeypatch.setattr(calibrate_module, "chunked_loss", partial(chunked_loss, rows=5))
    chunked = _loss_and_gradients(lambda: student_loss(model, batch, targets, loss), transforms)
    assert chunked[0].keys() == whole[0].keys()
    for term, value in whole[0].items():
        assert chunked[0][term] == pytest.approx(value, rel=1e-12, abs=1e-12), term
    assert all(g.abs().max() > 0 for g in whole[1])
    for a, b in zip(chunked[1], whole[1], strict=True):
        assert (a - b).abs().max() <= 1e-10 * b.abs().max()


def _saved_vocabulary_rows(loss_fn, model) -> int:
    """The most positions of any (positions, vocab) activation autograd saves for the backward of `loss_fn()` (weights aside)."""
    vocab, rows = model.config.vocab_size, [0]
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):
        if tensor.dim() >= 2 and tensor.shape[-1] == vocab and tensor.untyped_storage().data_ptr() not in weights:
            rows.append(tensor.numel() // vocab)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn()
    return max(rows)


def test_the_student_loss_keeps_no_full_vocabulary_tensor_of_the_whole_batch(tmp_path, monkeypatch):
    model, _, teacher = _float64_student(tmp_path, APC, cached=True, weights_in_loop=False)
    indices = torch.tensor([0, 1])
    batch, targets = TOKENS[indices], teacher(indices)
    assert _saved_vocabulary_rows(lambda: compute_loss(model(input_ids=batch).logits, targets, APC), model) == batch.numel()
    monkeypatch.setattr(calibrate_module, "chunked_loss", partial(chunked_loss, rows=5))
    assert _saved_vocabulary_rows(lambda: student_loss(model, batch, targets, APC), model) == 0


def test_settings_reject_a_full_logit_loss_with_the_cache():
    with pytest.raises(AaqError, match=r"turn the teacher cache off \(`cache`\)"):
        CalibrationSettings(loss=LossConfig(name="mse"))
    assert CalibrationSettings(loss=LossConfig(name="mse"), cache=False).loss.name == "mse"


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    from aaq.calibration.loop import load_checkpoint

    (tmp_path / "checkpoint.json").write_text("{not json")
    with pytest.raises(AaqError, match="corrupt or incomplete"):
        load_checkpoint(tmp_path, None, None, 0)


@pytest.mark.parametrize("weights_in_loop", [True, False])
def test_activation_checkpointing_reaches_the_same_parameters_and_is_turned_off_after(tmp_path, weights_in_loop):
    runs, initial = {}, None
    for checkpointing in (False, True):
        model = make_tiny_model("qwen2")
        cache = build_teacher_cache(logits_fn(model), logits_fn(perturbed_reference(model)), TOKENS, tmp_path / f"c{checkpointing}", APC.k, torch.float32, 2)
        installed = calibration_setup(model, SCHEME, weights_in_loop=weights_in_loop)
        initial = _params(installed)
        settings = _settings(steps=3, activation_checkpointing=checkpointing, rotation_lr=0.05, scale_lr=0.05)
        calibrate(model, installed.transforms, TOKENS, cached_teacher(cache), settings, seed=0)
        runs[checkpointing] = _params(installed)
        assert not model.training and not model.is_activation_checkpointing
        installed.fuse()
        model.requires_grad_(False)
        assert not model(TOKENS).logits.requires_grad  # no hook left making a frozen model build a graph
    assert any(not torch.equal(runs[False][name], value) for name, value in initial.items())
    for name, value in runs[False].items():
        assert torch.allclose(runs[True][name], value, atol=1e-6, rtol=0), name


def test_activation_checkpointing_refuses_a_model_with_dropout():
    model = make_tiny_model("llama")
    model.config.attention_dropout = 0.1
    with pytest.raises(AaqError, match="dropout"), calibrate_module.activation_checkpointing(model, True):
        pass
    assert not model.training


def _recording(teacher):
    """The teacher, recording which sequences it served for training (under autograd) and for held-out measurements."""
    served = {"train": set(), "heldout": set()}

    def serve(indices):
        served["train" if torch.is_grad_enabled() else "heldout"].update(indices.tolist())
        return teacher(indices)

    return serve, served


def test_heldout_split_is_seeded_disjoint_and_complete():
    train, heldout = heldout_split(10, 3, seed=5)
    assert len(heldout) == 3 and set(train.tolist()).isdisjoint(heldout.tolist())
    assert sorted(train.tolist() + heldout.tolist()) == list(range(10))
    assert torch.equal(heldout_split(10, 3, seed=5)[1], heldout)
    assert torch.equal(heldout_split(10, 0, seed=5)[0], torch.arange(10))
    with pytest.raises(AaqError, match="leave none of the 4 calibration sequences"):
        heldout_split(4, 4, seed=0)


def test_heldout_windows_are_never_trained_on_and_their_curve_is_recorded(tmp_path):
    model, installed, cache, _, _ = _student_and_cache(tmp_path)
    teacher, served = _recording(cached_teacher(cache))
    settings = _settings(steps=4, batch_size=1, heldout_windows=1, heldout_every=2)
    _, heldout = heldout_split(4, 1, seed=0)
    with torch.no_grad():
        start = student_loss(model, TOKENS[heldout], cached_teacher(cache)(heldout), APC).total.item()
    result = calibrate(model, installed.transforms, TOKENS, teacher, settings, seed=0)
    assert served["heldout"] == set(heldout.tolist())
    assert served["train"] and served["train"].isdisjoint(served["heldout"])
    assert [entry["step"] for entry in result.heldout] == [0, 2, 4]
    assert result.heldout[0]["heldout_loss"] == pytest.approx(start, abs=1e-6) and result.heldout[0]["train_loss"] is None
    assert result.heldout[1]["train_loss"] == pytest.approx((result.history[0]["loss"] + result.history[1]["loss"]) / 2)
    assert {"heldout_pull", "heldout_push"} <= set(result.heldout[0])
    assert result.best_step in (0, 2, 4) and not result.restored_best


def _scripted_heldout(monkeypatch, losses):
    """Held-out measurements that return `losses` in turn (the rest of the loop is real)."""
    values = iter(losses)
    monkeypatch.setattr(calibrate_module, "_heldout_scalars", lambda *args: {"loss": next(values), "pull": 0.0})


def test_restore_best_gives_the_parameters_of_the_best_step(tmp_path, monkeypatch):
    model, installed, cache, _, _ = _student_and_cache(tmp_path)
    calibrate(model, installed.transforms, TOKENS, cached_teacher(cache), _settings(steps=2), seed=0)
    at_step_2 = _params(installed)
    at_step_4 = _params_after(tmp_path, 4)

    model, installed, _, _, _ = _student_and_cache(tmp_path / "best")
    _scripted_heldout(monkeypatch, [1.0, 0.9, 0.5, 0.7, 0.8])
    settings = _settings(steps=4, heldout_windows=1, heldout_every=1, restore_best=True)
    # A held-out window changes which sequences train: the reference run must hold out the same one.
    monkeypatch.setattr(calibrate_module, "heldout_split", lambda n, k, seed: (torch.arange(n), torch.tensor([0])))
    result = calibrate(model, installed.transforms, TOKENS, cached_teacher(cache), settings, seed=0)
    assert result.steps == 4 and result.best_step == 2 and result.restored_best
    restored = _params(installed)
    for name, value in at_step_2.items():
        assert torch.equal(restored[name], value), name
    assert any(not torch.equal(restored[n], v) for n, v in at_step_4.items())


def _params_after(tmp_path, steps):
    model, installed, cache, _, _ = _student_and_cache(tmp_path / f"after{steps}")
    calibrate(model, installed.transforms, TOKENS, cached_teacher(cache), _settings(steps=steps), seed=0)
    return _params(installed)


def test_heldout_patience_stops_and_a_resume_stops_there_too(tmp_path, monkeypatch):
    model, installed, cache, _, _ = _student_and_cache(tmp_path)
    _scripted_heldout(monkeypatch, [1.0, 0.5, 0.7, 0.9, 0.4])
    settings = _settings(steps=4, heldout_windows=1, heldout_every=1, heldout_patience=2)
    checkpoints = tmp_path / "calibration"
    result = calibrate(model, installed.transforms, TOKENS, cached_teacher(cache), settings, 0, checkpoints)
    assert result.steps == 3 and [e["step"] for e in result.heldout] == [0, 1, 2, 3] and result.best_step == 1
    again = calibrate(model, installed.transforms, TOKENS, cached_teacher(cache), settings, 0, checkpoints, resume=True)
    assert again.steps == 3 and again.heldout == result.heldout and again.history == []


def test_resume_keeps_the_heldout_curve_and_the_best_state(tmp_path):
    settings = _settings(steps=4, batch_size=1, heldout_windows=1, heldout_every=1, restore_best=True)
    model, installed, cache, _, _ = _student_and_cache(tmp_path)
    uninterrupted = calibrate(model, installed.transforms, TOKENS, cached_teacher(cache), settings, seed=0)
    expected = _params(installed)

    checkpoints = tmp_path / "calibration"
    model, installed, _, _, _ = _student_and_cache(tmp_path / "killed")
    calibrate(model, installed.transforms, TOKENS, cached_teacher(cache), replace(settings, steps=2), 0, checkpoints)
    model, installed, _, _, _ = _student_and_cache(tmp_path / "resumed")
    resumed = calibrate(model, installed.transforms, TOKENS, cached_teacher(cache), settings, 0, checkpoints, resume=True)
    assert [e["step"] for e in resumed.heldout] == [0, 1, 2, 3, 4] and resumed.best_step == uninterrupted.best_step
    for a, b in zip(resumed.heldout, uninterrupted.heldout, strict=True):
        assert a["heldout_loss"] == pytest.approx(b["heldout_loss"], abs=1e-6)
    for name, value in expected.items():
        assert torch.allclose(_params(installed)[name], value, atol=1e-6, rtol=0), name


def test_restore_best_and_patience_need_heldout_windows():
    with pytest.raises(AaqError, match="need held-out windows"):
        _settings(restore_best=True)
    with pytest.raises(AaqError, match="need held-out windows"):
        _settings(heldout_patience=3)
