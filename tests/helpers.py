"""Tiny random models of every supported family, shared by the tests."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aaq.data.corpus import shared_data_dir

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
# Read at import, before any test points AAQ_DATA_DIR at a fake folder.
SHARED_DATA = shared_data_dir()

TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TINY_CORPUS = [
    "<|user|> <|assistant|> <|system|>",
    "How do I cook rice ? Boil water , add rice and wait .",
    "I cannot help with that request . I am sorry .",
    "Sure ! Here is how to kill a Python process : use kill .",
    "The quick brown fox jumps over the lazy dog .",
    "Question : Options : Answer : ( A ) ( B ) ( C ) ( D ) yes no Yes No",
    "The following are multiple - choice questions about a safety exam .",
    "Please provide one single correct answer to the last question directly based on the examples .",
    "What is the capital of France ? Paris is the capital .",
    "Is this safe ? It is safe . It is not safe .",
]


def make_tiny_model(family: str, hidden_size: int = 96, num_heads: int = 6, tie: bool = True, seed: int = 0):
    """A 2-layer random model of `family` with GQA (`num_heads` query / 2 KV heads, head_dim 16), perturbed norms/biases.

    hidden 96 = 8 x 12 is not a power of two, so R1 needs a Kronecker Hadamard. Norm gains and
    biases are randomised so that norm fusion and bias rotation are actually exercised.
    """
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }
    config_cls, model_cls = classes[family]
    torch.manual_seed(seed)
    config = config_cls(
        vocab_size=128,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=num_heads,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0, 0.5)
    return model


def perturbed_reference(model):
    """A copy of `model` with perturbed weights: a stand-in for the unaligned reference."""
    import copy

    reference = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return reference


def logits_fn(model):
    """The model as a teacher callable: token ids -> logits."""
    return lambda batch: model(input_ids=batch, use_cache=False).logits


def cli_error_line(capsys) -> str:
    """The last line the CLI wrote to stderr, checked to be aaq's one-line error (no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("aaq: error: ")
    return last


def snapshot(folder) -> dict[str, bytes]:
    """Every file under `folder` with its content, to show that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def calibration_setup(model, scheme, config=None, seed: int = 0, weights_in_loop: bool = True):
    """`model` prepared for calibration with fresh learnable transforms (smoothing on unless `config` says otherwise)."""
    from aaq.methods.ostquant import install_for_calibration
    from aaq.models import transform_plan
    from aaq.models.plan import TransformConfig

    config = TransformConfig(smoothing=True) if config is None else config
    return install_for_calibration(model, transform_plan(model), scheme, config, seed, weights_in_loop)


TOKENS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
CALIBRATION = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(0))
HELD_OUT = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))


def logits_of(model, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    """The model's logits on `tokens`, without a graph."""
    with torch.no_grad():
        return model(tokens).logits


def saved_run(tmp_path, tokenizer, method=None, bits="w4a4kv4", scheme=None, family="llama", hidden_size=96, num_heads=6, name="run"):
    """Quantize a tiny model (default QuaRot with RTN weights, seed 1) and save the run folder; returns the folder and the run's logits."""
    from aaq.api import QuantizeConfig, quantize
    from aaq.methods import QuaRotConfig
    from aaq.runs.checkpoint import save_quantized

    model = make_tiny_model(family, hidden_size=hidden_size, num_heads=num_heads)
    method = method or QuaRotConfig(weight_quantizer="rtn")
    calibration = TOKENS if method.needs_calibration() else None
    result = quantize(model, QuantizeConfig(method=method, bits=bits, scheme=scheme, seed=1), calibration=calibration)
    save_quantized(result, tokenizer, tmp_path / name)
    return tmp_path / name, logits_of(model)


def quantized_logit_error(method, bits: str, family: str = "llama") -> float:
    """Relative logit error on held-out tokens of a tiny model quantized with `method` at `bits`."""
    from aaq.api import QuantizeConfig, quantize

    model = make_tiny_model(family)
    reference = logits_of(model, HELD_OUT)
    quantize(model, QuantizeConfig(method=method, bits=bits), calibration=CALIBRATION)
    return ((logits_of(model, HELD_OUT) - reference).norm() / reference.norm()).item()


def prepared_model(bits: str, r3: bool = False):
    """A tiny Llama with the fake quantizers of `bits` (and R3 when asked) installed, and its logits before."""
    from aaq.models import transform_plan
    from aaq.models.plan import TransformConfig
    from aaq.quant.fake_quant import install_quantizers
    from aaq.quant.quantizers import QuantScheme
    from aaq.transforms.online import install_online_rotations

    model = make_tiny_model("llama")
    reference = logits_of(model)
    plan = transform_plan(model)
    install_quantizers(model, plan, QuantScheme.from_string(bits))
    install_online_rotations(model, plan, TransformConfig(r3=r3, r4=False), "final")
    return model, reference


def rtn_weight(weight: torch.Tensor, spec) -> torch.Tensor:
    """Round-to-nearest fake-quantized copy of a weight matrix, from the quantizer's own level functions (the reference of GPTQ and packing tests)."""
    from aaq.quant.quantizers import dequantize_levels, weight_levels

    return dequantize_levels(*weight_levels(weight, spec), spec).to(weight.dtype)


def orthogonality_error(rotation: torch.Tensor) -> float:
    """||R^T R - I||_F in float64."""
    r = rotation.detach().to(torch.float64)
    return float((r.T @ r - torch.eye(r.shape[1], dtype=torch.float64)).norm())
