"""The transform plan: switches validated once, roles listed once, linears in data-flow order."""

import pytest

from aaq.errors import AaqError
from aaq.models.plan import ChannelPair, HeadPair, LayerPlan, NormReaders, TransformConfig


def _layer(prefix: str = "b") -> LayerPlan:
    def n(name: str) -> str:
        return f"{prefix}.{name}"

    return LayerPlan(
        block=prefix,
        attention=n("attn"),
        attention_input=NormReaders(n("ln1"), (n("q"), n("k"), n("v"))),
        values=HeadPair(writer=n("v"), reader=n("o")),
        mlp_input=NormReaders(n("ln2"), (n("gate"), n("up"))),
        mlp_hidden=ChannelPair(writer=n("up"), reader=n("down")),
        residual_writers=(n("o"), n("down")),
    )


def test_a_layer_lists_each_projection_once_in_data_flow_order():
    assert _layer().linears == ("b.q", "b.k", "b.v", "b.o", "b.gate", "b.up", "b.down")


def test_smoothing_pairs_name_the_four_kinds():
    layer = _layer()
    pairs = layer.smoothing_pairs()
    assert list(pairs) == ["attn", "mlp", "vo", "down"]
    assert pairs["attn"] is layer.attention_input and pairs["down"] is layer.mlp_hidden
    assert layer.stream_inputs == (layer.attention_input, layer.mlp_input)


@pytest.mark.parametrize(("changes", "needle"), [({"r1": "dct"}, "unknown r1 rotation 'dct'"), ({"r4": "yes"}, "r4 must be true or false")])
def test_switches_are_validated(changes, needle):
    with pytest.raises(AaqError, match=needle):
        TransformConfig(**changes)


def test_online_is_true_only_with_an_online_rotation():
    assert TransformConfig().online and TransformConfig(r3=False).online
    assert not TransformConfig(r3=False, r4=False).online
