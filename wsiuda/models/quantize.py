"""Post-training int8 quantization of S for CPU inference.

On a CPU without wide vector units for half precision, 8-bit integer convolutions are the one way to make
the forward pass much cheaper: the default U-Net's forward pass of a 1472² window runs in 330 ms in int8
against 887 ms in float32 on one core of a 2-core EPYC with AVX-512 VNNI
(benchmarks/results/segment_throughput.md; the gain depends on the CPU's int8 instructions), with the same
held-out Dice to three decimals (benchmarks/results/default_model.md).

Quantization is static: the range of every intermediate activation is observed once, on training images,
when the model file is written (:func:`calibrate`), and stored in its metadata as plain numbers. Loading
rebuilds the int8 network from the float weights and those ranges (:func:`quantize`). Fixed ranges keep
predictions independent of what else is in the batch or tile, so tiled and whole-image predictions still
agree. Two layers stay in float: the transposed convolutions (per-channel int8 weights do not fit their
weight layout and wreck the output) and the 1x1 head, whose logits would otherwise be rounded to steps of
a quarter logit around the decision threshold. They run on a band of rows at a time
(:mod:`.row_bands`), which keeps their float tensors small.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from wsiuda.errors import ModelError
from wsiuda.models.row_bands import BAND_ROWS, float_layers_in_row_bands

ActivationRanges = dict[str, list[float]]
"""Observed (min, max) of each quantized activation, by the observer's name in the traced network."""

# Modules kept in float, by name in the U-Net.
_FLOAT_MODULE_NAMES = ("head",)


def quantization_available() -> bool:
    """Whether this torch build has a CPU int8 engine and the FX quantization API."""
    try:
        import torch.ao.quantization.quantize_fx
    except ImportError:
        return False
    return "x86" in torch.backends.quantized.supported_engines


@contextlib.contextmanager
def _quiet_deprecation() -> Iterator[None]:
    # torch 2.13 marks torch.ao quantization and its quantized tensors deprecated (in favour of torchao,
    # which is not a dependency); they work, and the pinned torch keeps them.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        yield


def calibrate(network: nn.Module, images: Iterable[torch.Tensor]) -> ActivationRanges:
    """Activation ranges of ``network`` (float, eval mode, BatchNorm folded) over normalised image batches."""
    prepared = _prepare(network)
    seen = 0
    with torch.no_grad():
        for batch in images:
            prepared(batch.to("cpu", torch.float32).contiguous())
            seen += 1
    if not seen:
        raise ValueError("calibration needs at least one image")
    ranges = {}
    for name, observer in _observers(prepared).items():
        low, high = float(observer.min_val), float(observer.max_val)
        ranges[name] = [low, high]
    return ranges


def quantize(
    network: nn.Module, ranges: ActivationRanges, *, in_place: bool = False, band_rows: int | None = BAND_ROWS
) -> nn.Module:
    """The int8 network of ``network`` (float, eval mode, BatchNorm folded) with the stored ``ranges``.

    ``in_place`` builds it from ``network``'s own modules, which are then spent, instead of a copy: for a
    caller whose ``network`` is a copy made for this. It saves a deep copy, about 0.1 s of the default
    model's 0.7 s load (timed by hand). ``band_rows`` is the input rows per band of the float layers
    (:mod:`.row_bands`); None runs them on whole tensors, as converted.
    """
    from torch.ao.quantization.quantize_fx import convert_fx

    prepared = _prepare(network, in_place=in_place)
    observers = _observers(prepared)
    if set(observers) != set(ranges):
        raise ModelError(
            "the model's int8 calibration does not fit this network (it was made by another wsiuda or "
            "torch); use --precision float32"
        )
    for name, observer in observers.items():
        low, high = ranges[name]
        observer.min_val.copy_(torch.tensor(float(low)))
        observer.max_val.copy_(torch.tensor(float(high)))
    torch.backends.quantized.engine = "x86"
    with _quiet_deprecation():
        quantized = convert_fx(prepared)
    if band_rows is not None:
        quantized = float_layers_in_row_bands(quantized, rows=band_rows)
    return quantized.to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]


def _prepare(network: nn.Module, *, in_place: bool = False) -> Any:
    """``network`` traced, with Conv2d+ReLU fused and an observer after every quantized activation."""
    from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver, QConfig, QConfigMapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    if not quantization_available():
        raise ModelError("this torch build has no x86 int8 engine; use --precision float32")
    qconfig = QConfig(
        # 7-bit activations keep AVX2's 16-bit multiply-add from saturating.
        activation=MinMaxObserver.with_args(dtype=torch.quint8, quant_min=0, quant_max=127),
        weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
    )
    mapping = QConfigMapping().set_global(qconfig).set_object_type(nn.ConvTranspose2d, None)
    for name in _FLOAT_MODULE_NAMES:
        mapping = mapping.set_module_name(name, None)
    torch.backends.quantized.engine = "x86"
    plain = _without_identities((network if in_place else copy.deepcopy(network)).float().eval())
    plain = plain.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    with _quiet_deprecation(), _without_stack_traces():
        return prepare_fx(plain, mapping, example_inputs=(torch.zeros(1, 3, 32, 32),))


@contextlib.contextmanager
def _without_stack_traces() -> Iterator[None]:
    # Tracing would record a Python stack trace per node, which imports most of torch._dynamo: 2 of the
    # 3 s that building the int8 network took (timed by hand).
    import torch.fx.config

    before = torch.fx.config.do_not_emit_stack_traces
    torch.fx.config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        torch.fx.config.do_not_emit_stack_traces = before


def _without_identities(module: nn.Module) -> nn.Module:
    """``module`` with the Identity placeholders of folded BatchNorms dropped, so Conv2d and ReLU fuse."""
    for name, child in module.named_children():
        if isinstance(child, nn.Sequential):
            kept = [_without_identities(part) for part in child if not isinstance(part, nn.Identity)]
            setattr(module, name, nn.Sequential(*kept))
        else:
            _without_identities(child)
    return module


def _observers(prepared: nn.Module) -> dict[str, Any]:
    from torch.ao.quantization import MinMaxObserver

    return {name: m for name, m in prepared.named_modules() if isinstance(m, MinMaxObserver)}
