"""Placement: devices and dtypes resolved once, offloaded forward passes equal resident ones, nothing left on the wrong device."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from aaq.errors import AaqError
from aaq.models import transform_plan
from aaq.models.plan import TransformConfig
from aaq.quant.fake_quant import install_quantizers
from aaq.quant.quantizers import QuantScheme
from aaq.runtime.devices import Placement, dispatched, model_device, parse_memory, placement_of, tf32_matmuls
from aaq.transforms.online import install_online_rotations
from aaq.transforms.rotation import rotate_model
from tests.helpers import TOKENS, calibration_setup, logits_of, make_tiny_model


def test_defaults_follow_the_device():
    cpu = Placement(device="cpu")
    assert cpu.torch_dtype == torch.float32 and cpu.rest_device == torch.device("cpu")
    assert Placement(device="cuda").torch_dtype == torch.bfloat16  # resolved without needing a GPU
    offloading = Placement(device="cuda:1", max_memory={"cuda:1": "20GiB"})
    assert offloading.rest_device == torch.device("cpu") and offloading.fusion_target == torch.device("cuda:1")
    assert Placement(device="cuda", fusion_device="cpu").fusion_target == torch.device("cpu")


@pytest.mark.parametrize(("kwargs", "needle"), [({"dtype": "int4"}, "unknown dtype"), ({"device": "tpu:x"}, "unknown device")])
def test_bad_placements_are_one_line_errors(kwargs, needle):
    with pytest.raises(AaqError, match=needle):
        Placement(**kwargs)


def test_a_missing_gpu_is_named_before_any_work():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(AaqError, match="cuda is not available") as info:
        Placement(device="cuda").check_available()
    assert info.value.setting == "device"


def test_memory_budgets_parse_and_bad_ones_say_how():
    assert parse_memory("cuda:0=20GiB, cpu=64GiB") == {"cuda:0": "20GiB", "cpu": "64GiB"}
    with pytest.raises(AaqError, match="DEVICE=AMOUNT"):
        parse_memory("20GiB")


def test_placement_of_reads_the_models_device_and_dtype():
    model = make_tiny_model("llama").to(torch.bfloat16)
    assert placement_of(model) == Placement(device="cpu", dtype="bfloat16")


def test_tf32_setting_is_restored():
    before = torch.backends.cuda.matmul.allow_tf32
    with tf32_matmuls(not before):
        assert torch.backends.cuda.matmul.allow_tf32 is (not before)
    assert torch.backends.cuda.matmul.allow_tf32 is before


def test_offloaded_forwards_equal_resident_ones_and_the_weights_come_back():
    """A budget smaller than the model sends layers to a folder on disk; accelerate streams them back per forward."""
    model = make_tiny_model("llama")
    resident = logits_of(model)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    placement = Placement(device="cpu", max_memory={"cpu": 500_000})
    with dispatched(model, placement):
        assert any(p.device.type == "meta" for p in model.parameters())  # something was really offloaded
        torch.testing.assert_close(logits_of(model), resident)
    for name, param in model.named_parameters():
        assert param.device.type == "cpu" and torch.equal(param, weights[name]), name


def test_budgets_too_small_for_anything_are_a_clear_error():
    with pytest.raises(AaqError, match="cannot hold even the embeddings"), dispatched(make_tiny_model("llama"), Placement(device="cpu", max_memory={"cpu": 1000})):
        pass


def test_the_activation_form_trains_through_offloading():
    model = make_tiny_model("qwen2")
    setup = calibration_setup(model, QuantScheme.from_string("w16a4kv4"), weights_in_loop=False)
    with dispatched(model, Placement(device="cpu", max_memory={"cpu": 500_000})):
        model(TOKENS).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in setup.transforms.parameters())


class _OneDeviceOnly(TorchDispatchMode):
    """Fails any operation that mixes `meta` tensors (the model's device here) with tensors elsewhere."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0]
        devices = {t.device.type for t in tensors}
        if "meta" in devices and len(devices) > 1:
            raise AssertionError(f"{func} mixes devices {sorted(devices)}")
        return func(*args, **(kwargs or {}))


def _meta_model(family: str):
    with torch.device("meta"):
        return make_tiny_model(family)


def test_a_tensor_on_the_wrong_device_is_caught():
    """Guards the guard: a rotation built on the CPU and applied to meta weights must fail."""
    weight = torch.empty(4, 4, device="meta")
    with pytest.raises(AssertionError, match="mixes devices"), _OneDeviceOnly():
        weight @ torch.ones(4, 4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fusion_quantizers_and_online_rotations_keep_every_tensor_on_the_models_device(family):
    model = _meta_model(family)
    plan = transform_plan(model)
    with _OneDeviceOnly():
        rotate_model(model, plan, TransformConfig())
        install_quantizers(model, plan, QuantScheme.from_string("w4a4kv4"))
        install_online_rotations(model, plan, TransformConfig(), "final")
        logits = model(TOKENS.to("meta")).logits
    assert logits.device.type == "meta" and model_device(model).type == "meta"


@pytest.mark.parametrize("weights_in_loop", [True, False])
def test_learnable_transforms_compute_and_fuse_on_the_models_device(weights_in_loop):
    model = _meta_model("mistral")
    with _OneDeviceOnly():
        setup = calibration_setup(model, QuantScheme.from_string("w4a4kv4"), weights_in_loop=weights_in_loop)
        model(TOKENS.to("meta")).logits.float().square().mean().backward()
        assert all(p.device.type == "meta" for p in setup.transforms.parameters())
        setup.fuse()


def test_a_stage_measures_its_own_peak_and_an_enclosing_stage_includes_it():
    from aaq.runtime.devices import StageMeter

    meter = StageMeter()
    with meter.stage("outer"):
        with meter.stage("big"):
            block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
            del block
        with meter.stage("small"):
            pass
    big, small, outer = (meter.records[name] for name in ("big", "small", "outer"))
    assert big.peak_host - small.peak_host > 48 * 2**20
    assert outer.peak_host >= big.peak_host and outer.seconds >= big.seconds + small.seconds
    assert big.peak_device is None and set(meter.to_dict()["big"]) == {"seconds", "peak_host", "peak_device", "peak_host_anon"}


def test_pages_of_a_mapped_file_count_in_the_resident_set_but_not_in_its_anonymous_part(tmp_path):
    import time

    import numpy as np

    from aaq.runtime.devices import StageMeter

    size = 64 * 2**20
    np.ones(size, dtype=np.uint8).tofile(tmp_path / "weights.bin")
    meter = StageMeter()
    with meter.stage("mapped"):
        mapped = np.memmap(tmp_path / "weights.bin", dtype=np.uint8, mode="r")
        assert int(mapped.sum()) == size  # every page read
        time.sleep(0.1)
        del mapped
    with meter.stage("allocated"):
        block = torch.ones(size // 4)
        time.sleep(0.1)  # the anonymous part is sampled every 20 ms
        del block
    mapped, allocated = meter.records["mapped"], meter.records["allocated"]
    assert mapped.peak_host - mapped.peak_host_anon > 48 * 2**20
    assert allocated.peak_host_anon - mapped.peak_host_anon > 48 * 2**20
