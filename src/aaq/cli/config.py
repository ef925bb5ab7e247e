"""The flags that make a QuantizeConfig (shared by `aaq quantize` and `aaq plan`), and the config they describe."""

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from aaq.calibration.losses import LOSS_NAMES
from aaq.cli.options import add_calibration_data, add_push, calibration_changes
from aaq.methods import MethodOptions, method_names
from aaq.methods.weight_step import WEIGHT_QUANTIZERS
from aaq.models.plan import ROTATION_KINDS, TransformConfig
from aaq.quant.quantizers import SchemeOptions
from aaq.recipes import QuantizeOptions, configure, load_recipe


def add_quantize_config(p: argparse.ArgumentParser) -> None:
    """The flags that make a QuantizeConfig: recipe, method, bits, scheme, calibration, transforms, weights, training."""
    p.add_argument("--recipe", type=Path, help="YAML recipe with the config (flags given explicitly override it)")
    p.add_argument("--method", choices=method_names(), help="quantization method (default: the recipe's, else quarot)")
    p.add_argument("--bits", help="w<W>a<A>[kv<KV>]: w4a4kv4, w4a8kv8, w4a16, w8a8 ... (default: w4a4kv4)")
    p.add_argument("--seed", type=int, help="seed for rotations and calibration sampling (default: 0)")
    p.add_argument("--weight-group-size", type=int, help="quantize weights in groups of this many inputs")
    p.add_argument("--act-group-size", type=int, help="quantize activations in groups of this many channels")
    p.add_argument("--symmetric-acts", action="store_true", default=None, help="symmetric activations (default asymmetric)")
    p.add_argument("--a-clip", type=float, help="activation clip ratio in (0, 1]")
    p.add_argument("--kv-clip", type=float, help="KV cache clip ratio in (0, 1]")
    add_calibration_data(p)
    g = p.add_argument_group("weights (GPTQ for methods gptq, quarot, ostquant, aaq)")
    g.add_argument("--weight-quantizer", choices=WEIGHT_QUANTIZERS, help="weight quantizer of quarot, ostquant and aaq (default: gptq)")
    g.add_argument("--damp", type=float, help="damping, fraction of the mean Hessian diagonal (default: 0.01)")
    g.add_argument("--no-act-order", dest="act_order", action="store_false", default=None, help="keep column order")
    g.add_argument("--static-groups", action="store_true", default=None, help="group scales fixed up front, so act-order groups stay contiguous (exportable)")
    g.add_argument("--onload-layers", action="store_true", default=None, help="GPTQ with the model on the host, one layer on the device at a time")
    g = p.add_argument_group("transforms (methods quarot, ostquant, aaq)")
    for switch in dataclasses.fields(TransformConfig):
        if switch.type == "bool":
            g.add_argument(f"--no-{switch.name}", dest=switch.name, action="store_false", default=None, help=f"no {switch.metadata['help']}")
        else:
            g.add_argument(f"--{switch.name}", choices=ROTATION_KINDS, help=f"{switch.metadata['help']} (default: {switch.default})")
    g = p.add_argument_group("learned transforms (methods ostquant, aaq)")
    g.add_argument("--reference", help="unaligned reference model sharing the tokenizer (needed by aaq)")
    g.add_argument("--no-cache", dest="cache", action="store_false", default=None, help="run the teachers every step instead of caching their targets")
    g.add_argument("--steps", type=int, help="calibration steps (default: recipe or 150)")
    g.add_argument("--step-batch", dest="batch_size", type=int, help="calibration sequences per step (default: recipe or 4)")
    g.add_argument("--loss", choices=LOSS_NAMES, help="calibration loss")
    g.add_argument("--lam", type=float, help="push weight lambda of the apc loss (default: 0.1)")
    g.add_argument("--weights-in-loop", choices=["on", "off"], help="fake-quantize the weights during calibration (default: on with --weight-quantizer rtn or 16-bit activations)")
    g.add_argument("--activation-checkpointing", choices=["on", "off"], help="recompute each layer in the backward: half the memory, a third more time (default: off)")
    g.add_argument("--teacher-batch", type=int, help="sequences per teacher forward (default: sized to the free device memory)")
    g.add_argument("--heldout-windows", type=int, help="calibration sequences set aside to measure the loss on windows not trained on (default: 0, none)")
    g.add_argument("--heldout-every", type=int, help="measure the held-out loss every N steps (default: 10)")
    g.add_argument("--restore-best", action="store_true", default=None, help="end with the transforms of the step with the lowest held-out loss (needs --heldout-windows)")
    g.add_argument("--heldout-patience", type=int, help="stop after N held-out measurements in a row without a new best (needs --heldout-windows)")
    g.add_argument("--sequential-teachers", action="store_true", default=None, help="one teacher model on the device at a time (the aligned model waits on the host)")
    g.add_argument("--micro-batch", type=int, help="sequences per forward+backward within a step, gradients added up (default: the whole step batch)")
    g.add_argument("--optimizer", choices=["cayley_sgd", "riemannian_adam"], help="Stiefel optimiser of R1/R2 (default: cayley_sgd)")
    g.add_argument("--rotation-lr", type=float, help="learning rate of R1/R2 (default: recipe or 0.017)")
    g.add_argument("--scale-lr", type=float, help="learning rate of the smoothing scales (default: recipe or 0.0018)")
    g.add_argument("--top-k", type=int, help="pull tokens I_a: top-k of the aligned logits (default: 1000)")
    add_push(p)


def _given(args: argparse.Namespace, cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of dataclass `cls` that the arguments set, by name."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in skip and getattr(args, f.name, None) is not None}


def quantize_config(args: argparse.Namespace):
    """The QuantizeConfig a recipe file plus the explicitly given flags describe (a flag the method would ignore is an error)."""
    on_off = {name: getattr(args, name) == "on" for name in ("weights_in_loop", "activation_checkpointing") if getattr(args, name) is not None}
    method = MethodOptions(**_given(args, MethodOptions, skip=("transforms", *on_off)), transforms=_given(args, TransformConfig), **on_off)
    options = QuantizeOptions(args.method, args.bits, args.seed, method, SchemeOptions(**_given(args, SchemeOptions)), calibration_changes(args))
    return configure(options, None if args.recipe is None else load_recipe(args.recipe))
