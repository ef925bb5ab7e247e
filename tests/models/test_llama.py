"""The Llama adapter: the layout every family shares, including the tied embeddings of small Llamas (SmolLM2)."""

from aaq.models import adapter_for, transform_plan
from aaq.models.llama import LlamaAdapter
from aaq.models.plan import TransformConfig
from aaq.transforms.rotation import rotate_model, ties_embeddings
from tests.helpers import logits_of, make_tiny_model


def test_llama_is_served_by_its_adapter_with_the_shared_names():
    model = make_tiny_model("llama")
    assert adapter_for(model) is LlamaAdapter
    layer = transform_plan(model).layers[0]
    assert layer.values.writer == "model.layers.0.self_attn.v_proj" and layer.mlp_hidden.reader == "model.layers.0.mlp.down_proj"


def test_tied_embeddings_are_untied_before_their_rows_and_columns_are_rotated():
    model = make_tiny_model("llama", tie=True)
    plan = transform_plan(model)
    assert ties_embeddings(model, plan)
    rotate_model(model, plan, TransformConfig(r3=False, r4=False))
    embedding, lm_head = model.get_submodule(plan.embeddings).weight, model.get_submodule(plan.lm_head).weight
    assert not ties_embeddings(model, plan) and not model.config.tie_word_embeddings
    assert (embedding - lm_head).abs().max() > 1e-3  # E R1 vs W diag(g) R1: different once the final norm gain is fused
    assert logits_of(model).isfinite().all()
