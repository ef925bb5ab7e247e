"""A fifth, made-up family: a Llama whose every module has another name, supported by one adapter alone.

If any code outside the adapters named a module (`down_proj`, `self_attn`, `lm_head`, ...), rotation,
calibration, fake quantization or export would fail or silently skip it here; each test checks the
function against the untouched model.
"""

from collections import OrderedDict
from typing import ClassVar

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from aaq import models as models_module
from aaq.api import QuantizeConfig, quantize
from aaq.auditing.sources import simulated_compressed_model
from aaq.exporting import ExportConfig, export
from aaq.methods import GPTQConfig, QuaRotConfig
from aaq.models import ModelAdapter, register_adapter, supported_architectures, transform_plan
from aaq.models.plan import NO_TRANSFORMS, TransformConfig
from aaq.quant.fake_quant import install_quantizers
from aaq.quant.quantizers import QuantScheme, QuantSpec
from aaq.runs.checkpoint import load, load_quantized, save_quantized
from aaq.transforms.hadamard import hadamard_matrix
from aaq.transforms.online import install_online_rotations
from aaq.transforms.rotation import rotate_model
from tests.helpers import calibration_setup

TOKENS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
FP = QuantScheme.from_string("fp")
LLAMA_WORDS = ("model", "layers", "embed_tokens", "self_attn", "q_proj", "k_proj", "v_proj", "o_proj", "mlp", "gate_proj",
               "up_proj", "down_proj", "input_layernorm", "post_attention_layernorm", "lm_head")  # fmt: skip
# Per module: old child name -> new child name. The modeling code still reaches each child by its old name.
TOP = {"model": "backbone", "lm_head": "output"}
RENAMES = {
    "LlamaModel": {"embed_tokens": "tok_embeddings", "layers": "blocks", "norm": "final_ln"},
    "LlamaDecoderLayer": {"self_attn": "attn", "mlp": "ffn", "input_layernorm": "ln_attn", "post_attention_layernorm": "ln_ffn"},
    "LlamaAttention": {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo"},
    "LlamaMLP": {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"},
}
_SUBCLASSES: dict[type, type] = {}


def _renamed_class(cls: type, names: dict[str, str]) -> type:
    """`cls` with properties giving the renamed children under their old names."""
    if cls not in _SUBCLASSES:
        properties = {old: property(lambda self, new=new: self._modules[new]) for old, new in names.items()}
        _SUBCLASSES[cls] = type(f"Renamed{cls.__name__}", (cls,), properties)
    return _SUBCLASSES[cls]


def _renamed_children(module: nn.Module, names: dict[str, str]) -> OrderedDict:
    return OrderedDict((names.get(key, key), child) for key, child in module._modules.items())


class RenamedLlamaConfig(LlamaConfig):
    model_type = "aaq_renamed_llama"


class RenamedLlamaForCausalLM(LlamaForCausalLM):
    config_class = RenamedLlamaConfig
    base_model_prefix = "backbone"
    _tied_weights_keys: ClassVar[dict] = {}
    model = property(lambda self: self._modules["backbone"])
    lm_head = property(lambda self: self._modules["output"])

    def __init__(self, config: RenamedLlamaConfig) -> None:
        super().__init__(config)
        for module in list(self.modules())[1:]:
            if type(module).__name__ in RENAMES:
                names = RENAMES[type(module).__name__]
                module._modules = _renamed_children(module, names)
                module.__class__ = _renamed_class(type(module), names)
        self._modules = _renamed_children(self, TOP)


class RenamedLlamaAdapter(ModelAdapter):
    """The made-up family: the only place its module names appear."""

    architectures = ("RenamedLlamaForCausalLM",)
    embeddings = "backbone.tok_embeddings"
    decoder_layers = "backbone.blocks"
    final_norm = "backbone.final_ln"
    lm_head = "output"
    attention = "attn"
    attention_norm = "ln_attn"
    q_proj, k_proj, v_proj, o_proj = "attn.wq", "attn.wk", "attn.wv", "attn.wo"
    mlp_norm = "ln_ffn"
    gate_proj, up_proj, down_proj = "ffn.w1", "ffn.w3", "ffn.w2"


@pytest.fixture(scope="module", autouse=True)
def _registered():
    AutoConfig.register(RenamedLlamaConfig.model_type, RenamedLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(RenamedLlamaConfig, RenamedLlamaForCausalLM, exist_ok=True)
    register_adapter(RenamedLlamaAdapter)
    assert "RenamedLlamaForCausalLM" in supported_architectures()
    yield
    models_module._ADAPTERS.remove(RenamedLlamaAdapter)


def _model(dtype: torch.dtype = torch.float32) -> RenamedLlamaForCausalLM:
    """A 2-layer random model of the made-up family (hidden 96 = 8 x 12, GQA 6/2), norms perturbed so fusion matters."""
    torch.manual_seed(0)
    config = RenamedLlamaConfig(
        vocab_size=128, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    model = RenamedLlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ln" in name:
                param.uniform_(0.5, 1.5)
    return model.to(dtype)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_the_family_names_nothing_like_llama_and_computes_llamas_function():
    model = _model()
    names = [name for name, _ in model.named_modules()] + list(model.state_dict())
    assert not [name for name in names if any(word in name.split(".") for word in LLAMA_WORDS)]
    plain = LlamaForCausalLM(LlamaConfig(**model.config.to_diff_dict() | {"model_type": "llama"})).eval()
    renamed_to_plain = {new: old for names in (TOP, *RENAMES.values()) for old, new in names.items()}
    plain.load_state_dict({".".join(renamed_to_plain.get(part, part) for part in key.split(".")): value for key, value in model.state_dict().items()})
    assert torch.equal(_logits(plain), _logits(model))


def test_plan_names_only_existing_modules():
    model = _model()
    plan = transform_plan(model)
    assert len(plan.layers) == 2 and plan.lm_head == "output"
    for layer in plan.layers:
        assert all(isinstance(model.get_submodule(name), nn.Linear) for name in layer.linears)
        assert len(layer.linears) == 7


def test_quarot_keeps_the_function():
    model = _model()
    reference = _logits(model)
    plan = transform_plan(model)
    rotate_model(model, plan, TransformConfig())
    install_quantizers(model, plan, FP)
    install_online_rotations(model, plan, TransformConfig(), "final")
    assert _relative_error(_logits(model), reference) < 1e-4


def _moved_away_from_the_start(transforms) -> None:
    """Random orthogonal R1/R2 and random scales: any transform must still keep the function."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for rotation in transforms.rotation_parameters():
            q, _ = torch.linalg.qr(torch.randn(rotation.shape, generator=generator, dtype=torch.float64))
            rotation.copy_(q.to(rotation.dtype))
        for scale in transforms.scale_parameters():
            scale.copy_(0.3 * torch.randn(scale.shape, generator=generator, dtype=torch.float64))


@pytest.mark.parametrize("weights_in_loop", [True, False])
def test_learnable_transforms_keep_the_function_in_both_forms(weights_in_loop):
    model = _model()
    reference = _logits(model)
    setup = calibration_setup(model, FP, weights_in_loop=weights_in_loop)
    _moved_away_from_the_start(setup.transforms)
    assert _relative_error(_logits(model), reference) < 1e-4
    setup.fuse()
    assert not any(parametrize.is_parametrized(m) or m._forward_hooks for m in model.modules())
    assert _relative_error(_logits(model), reference) < 1e-4


def test_activation_form_equals_the_weight_form_under_quantization():
    scheme = QuantScheme.from_string("w16a4kv4")
    models, setups = {}, {}
    for weights_in_loop in (True, False):
        models[weights_in_loop] = _model(torch.float64)
        setups[weights_in_loop] = calibration_setup(models[weights_in_loop], scheme, weights_in_loop=weights_in_loop)
        setups[weights_in_loop].transforms.double()
        _moved_away_from_the_start(setups[weights_in_loop].transforms)
    weight_form, activation_form = _logits(models[True]), _logits(models[False])
    assert _relative_error(activation_form, weight_form) < 1e-5
    assert _relative_error(weight_form, _logits(_model(torch.float64))) > 1e-3
    for setup in setups.values():
        setup.fuse()
    fused = models[False].state_dict()
    for name, value in models[True].state_dict().items():
        assert torch.allclose(fused[name], value, rtol=1e-12, atol=1e-12), name


W4A4 = QuantScheme(
    weights=QuantSpec(bits=4, symmetric=True, group_size=32, clip_search=True),
    activations=QuantSpec(bits=4, symmetric=True, half_range_scale=True),
)


def _saved_run(tmp_path, tiny_tokenizer, transforms: TransformConfig, name: str):
    model = _model()
    method = QuaRotConfig(transforms=transforms, gptq=GPTQConfig(static_groups=True))
    calibration = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(2))
    result = quantize(model, QuantizeConfig(method=method, scheme=W4A4), calibration=calibration)
    save_quantized(result, tiny_tokenizer, tmp_path / name)
    return tmp_path / name, _logits(model)


def test_both_export_formats_give_the_runs_logits(tmp_path, tiny_tokenizer, monkeypatch):
    run, logits = _saved_run(tmp_path, tiny_tokenizer, TransformConfig(), "run")
    export(run, tmp_path / "packed", ExportConfig(format="aaq", dtype="float32"))
    packed, _ = load(tmp_path / "packed")
    assert torch.equal(_logits(packed), logits)

    no_r4, _ = _saved_run(tmp_path, tiny_tokenizer, TransformConfig(r4=False), "no_r4")
    assert export(no_r4, tmp_path / "w4a16", ExportConfig(format="compressed-tensors", scheme="W4A16", strict=True, dtype="float32")).differences == []
    simulation, _, _ = load_quantized(no_r4, scheme=QuantScheme(weights=W4A4.weights), transforms=NO_TRANSFORMS)
    in_transformers = AutoModelForCausalLM.from_pretrained(tmp_path / "w4a16").eval()
    torch.testing.assert_close(_logits(in_transformers), _logits(simulation), rtol=1e-5, atol=1e-5)

    report = export(run, tmp_path / "w4a4", ExportConfig(format="compressed-tensors", scheme="W4A4", strict=True, dtype="float32"))
    assert report.differences == []
    vllm_like = simulated_compressed_model(tmp_path / "w4a4")
    assert hasattr(vllm_like.backbone.blocks[1].ffn.w2, "R4_input")
    # compressed-tensors applies R4 as a dense matmul; computed the same way aaq's simulation must agree exactly.
    n = vllm_like.config.intermediate_size
    matrix, norm = hadamard_matrix(n).T.float(), torch.tensor(n, dtype=torch.float64).sqrt()
    monkeypatch.setattr("aaq.transforms.online.fast_hadamard_transform", lambda v: (v @ matrix) / norm)
    simulation, _, _ = load_quantized(run, scheme=W4A4, transforms=TransformConfig(r3=False, r4=True))
    torch.testing.assert_close(_logits(vllm_like), _logits(simulation), rtol=1e-5, atol=1e-5)
