"""The transform plan: which transforms apply, and where each one acts in a model, as data.

`TransformConfig` holds the switches (the only place they exist). `TransformPlan` lists, by full
module name, every point where a transform acts; the model adapters in `aaq.models` produce it, so
nothing outside them names a module:

- R1 rotates the residual stream: the `embeddings` and each layer's `residual_writers` write it;
  the `readers` of every `NormReaders` group (each layer's attention and MLP inputs, and the lm_head
  behind the final norm) read it, once the norm's gain is fused into them.
- R2 rotates each attention head between `values.writer` (one block per KV head) and
  `values.reader` (one block per query head).
- R3, an online Hadamard, rotates queries and keys after RoPE inside `attention`; the KV-cache
  quantizer acts at the same point.
- R4, an online Hadamard, rotates the input of `mlp_hidden.reader`; its inverse is fused into that
  linear's weight.
- Smoothing scales act on four pairs per layer (`LayerPlan.smoothing_pairs`): the source (a norm's
  gain or a writer's rows) is divided by the scale and the readers' input columns multiplied by it.

Offline fusion (`aaq.transforms.rotation`), the learnable transforms in both forms (`aaq.transforms.learnable`), the
online rotations (`aaq.transforms.online`), the quantizers (`aaq.quant.fake_quant`), GPTQ and both export formats
read the plan; `model.get_submodule(name)` turns a name into the module.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from aaq.errors import AaqError

RotationKind = Literal["hadamard", "random_hadamard", "random", "none"]
ROTATION_KINDS: tuple[str, ...] = ("hadamard", "random_hadamard", "random", "none")
SMOOTHING_KINDS: tuple[str, ...] = ("attn", "mlp", "vo", "down")


@dataclass(frozen=True)
class TransformConfig:
    """Which transforms apply.

    `r1`/`r2`: the kind of the residual-stream and per-head rotations (`none` = no rotation); for
    the learned methods, the matrix they start from. `r3`/`r4`: the online Hadamards on queries and
    keys after RoPE and on the input of the MLP's down projection. `smoothing`: learnable smoothing
    scales (learned methods only).
    """

    r1: RotationKind = field(default="random_hadamard", metadata={"help": "residual-stream rotation; the start of the learned one"})
    r2: RotationKind = field(default="random_hadamard", metadata={"help": "per-head value/output rotation; the start of the learned one"})
    r3: bool = field(default=True, metadata={"help": "online Hadamard on queries and keys after RoPE"})
    r4: bool = field(default=True, metadata={"help": "online Hadamard on the MLP down projection's input"})
    smoothing: bool = field(default=False, metadata={"help": "learnable smoothing scales (ostquant, aaq)"})

    def __post_init__(self) -> None:
        for name in ("r1", "r2"):
            if getattr(self, name) not in ROTATION_KINDS:
                raise AaqError(f"unknown {name} rotation {getattr(self, name)!r}; use one of {', '.join(ROTATION_KINDS)}")
        for name in ("r3", "r4", "smoothing"):
            if not isinstance(getattr(self, name), bool):
                raise AaqError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def online(self) -> bool:
        """Whether any transform runs in the forward pass (R3 or R4)."""
        return self.r3 or self.r4


NO_TRANSFORMS = TransformConfig(r1="none", r2="none", r3=False, r4=False)
# The switches by name, as options and flags name them.
TRANSFORM_SWITCHES: tuple[str, ...] = tuple(f.name for f in fields(TransformConfig))


@dataclass(frozen=True)
class Geometry:
    """The shapes that rotations, smoothing and quantizers depend on."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @property
    def kv_groups(self) -> int:
        """Query heads sharing one key/value head (GQA)."""
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class NormReaders:
    """A norm and the linears that read its output (R1 readers; the norm -> readers smoothing pair)."""

    norm: str
    readers: tuple[str, ...]


@dataclass(frozen=True)
class HeadPair:
    """A linear writing one block per KV head and the linear reading one block per query head (R2; v -> o smoothing)."""

    writer: str
    reader: str


@dataclass(frozen=True)
class ChannelPair:
    """A linear writing hidden channels and the linear reading them (up -> down smoothing; R4 at the reader's input)."""

    writer: str
    reader: str


SmoothingPair = NormReaders | HeadPair | ChannelPair


@dataclass(frozen=True)
class LayerPlan:
    """Where the transforms act in one decoder layer (full module names)."""

    block: str
    attention: str
    attention_input: NormReaders
    values: HeadPair
    mlp_input: NormReaders
    mlp_hidden: ChannelPair
    residual_writers: tuple[str, ...]

    @property
    def linears(self) -> tuple[str, ...]:
        """Every projection of the layer (the quantized linears), in data-flow order."""
        names = (
            *self.attention_input.readers, self.values.writer, self.values.reader,
            *self.mlp_input.readers, self.mlp_hidden.writer, self.mlp_hidden.reader, *self.residual_writers,
        )  # fmt: skip
        return tuple(dict.fromkeys(names))

    @property
    def input_groups(self) -> tuple[tuple[str, ...], ...]:
        """The projections grouped by the input they read, in data-flow order (GPTQ shares their Hessian)."""
        return (self.attention_input.readers, (self.values.reader,), self.mlp_input.readers, (self.mlp_hidden.reader,))

    @property
    def stream_inputs(self) -> tuple[NormReaders, NormReaders]:
        """The two norms whose readers take the residual stream in (attention, then MLP)."""
        return (self.attention_input, self.mlp_input)

    def smoothing_pairs(self) -> dict[str, SmoothingPair]:
        """The smoothing pairs by scale kind (`SMOOTHING_KINDS`)."""
        return {"attn": self.attention_input, "mlp": self.mlp_input, "vo": self.values, "down": self.mlp_hidden}


@dataclass(frozen=True)
class TransformPlan:
    """Every point where a transform acts in one model (see the module docstring)."""

    geometry: Geometry
    embeddings: str
    output: NormReaders
    layers: tuple[LayerPlan, ...]

    @property
    def lm_head(self) -> str:
        """The output projection to the vocabulary (the reader behind the final norm)."""
        return self.output.readers[0]

    @property
    def linears(self) -> tuple[str, ...]:
        """Every quantized projection of the model, layer by layer."""
        return tuple(name for layer in self.layers for name in layer.linears)

    @property
    def norm_groups(self) -> tuple[NormReaders, ...]:
        """Every norm with its readers, the final norm included (what norm fusion folds)."""
        return (*(group for layer in self.layers for group in layer.stream_inputs), self.output)
