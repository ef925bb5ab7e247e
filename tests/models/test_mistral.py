"""The Mistral adapter: sliding-window attention only changes the mask, so the transforms keep its function."""

import torch
from transformers import MistralConfig, MistralForCausalLM

from aaq.models import adapter_for, transform_plan
from aaq.models.mistral import MistralAdapter
from aaq.models.plan import TransformConfig
from aaq.quant.fake_quant import install_quantizers
from aaq.quant.quantizers import QuantScheme
from aaq.transforms.online import install_online_rotations
from aaq.transforms.rotation import rotate_model
from tests.helpers import logits_of

TOKENS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))


def test_rotations_keep_the_function_with_a_window_shorter_than_the_sequence():
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=6, max_position_embeddings=64,
    )  # fmt: skip
    model = MistralForCausalLM(config).eval()
    assert adapter_for(model) is MistralAdapter
    reference = logits_of(model, TOKENS)
    plan = transform_plan(model)
    rotate_model(model, plan, TransformConfig())
    install_quantizers(model, plan, QuantScheme.from_string("fp"))
    install_online_rotations(model, plan, TransformConfig(), "final")
    assert ((logits_of(model, TOKENS) - reference).norm() / reference.norm()) < 1e-4
