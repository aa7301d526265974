"""The float layers of an int8 network, run on a band of rows at a time.

The int8 U-Net keeps its transposed convolutions and its 1x1 head in float (see :mod:`.quantize`). As
converted, each of them dequantizes its whole input, computes its whole float output and, for the
transposed convolutions, quantizes it again: at the last decoder level of a 1472² window that is a
69 MB float input and a 139 MB float output for a 35 MB int8 result, and two tasks run such passes side
by side. Both kinds of layer map each input pixel to output pixels of its own (a 2x2 stride-2 transposed
convolution to a 2x2 block, a 1x1 convolution to one pixel), so computing them a band of rows at a time
into a preallocated output gives exactly the same numbers while only one band is ever in float.

On a 2-core AMD EPYC, two int8 passes of a 1472² window side by side, one thread each, peaked at
873 MiB in bands against 1028 MiB on whole tensors, and took 0.25 against 0.35 s per window: the bands
also spare the page faults of the large float tensors (process with glibc's default malloc settings;
benchmarks/results/forward_arrangements.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

BAND_ROWS = 32
"""Input rows per band: a few MB of float at the top of the default U-Net, so the bands cost nothing in
speed while the float tensors stay small."""


class RowBands(nn.Module):
    """``layer`` on a quantized input, ``rows`` input rows at a time, quantized again if asked.

    ``layer`` must map input row ``r`` to output rows ``r * k`` to ``r * k + k - 1`` only, where ``k`` is
    ``rows_out_per_row_in``.
    """

    def __init__(
        self,
        layer: nn.Module,
        *,
        rows_out_per_row_in: int,
        rows: int,
        requantize: tuple[Any, Any, Any] | None,
    ):
        super().__init__()
        self.layer = layer
        self.rows_out_per_row_in = rows_out_per_row_in
        self.rows = rows
        self.requantize = requantize
        """(scale, zero point, dtype) of the quantized output; None keeps it in float."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor | None = None
        k = self.rows_out_per_row_in
        for start in range(0, x.shape[2], self.rows):
            band = self.layer(x[:, :, start : start + self.rows].dequantize())
            if self.requantize is not None:
                scale, zero_point, dtype = self.requantize
                band = torch.quantize_per_tensor(band, scale, zero_point, dtype)
            if out is None:
                out = _empty_like(band, height=x.shape[2] * k)
            out[:, :, start * k : start * k + band.shape[2]].copy_(band)
        assert out is not None, "an input of no rows"
        return out


def _empty_like(band: torch.Tensor, *, height: int) -> torch.Tensor:
    """An empty tensor like ``band`` (dtype, quantization) but ``height`` rows high, in channels_last."""
    shape = (band.shape[0], band.shape[1], height, band.shape[3])
    if band.is_quantized:
        return torch._empty_affine_quantized(
            shape,
            scale=band.q_scale(),
            zero_point=band.q_zero_point(),
            dtype=band.dtype,
            memory_format=torch.channels_last,
        )
    return torch.empty(shape, dtype=band.dtype, memory_format=torch.channels_last)


def _rows_out_per_row_in(layer: nn.Module) -> int | None:
    """How many output rows each input row alone makes, for the layers that work row by row."""
    if isinstance(layer, nn.ConvTranspose2d):
        # Kernel equal to stride, undilated, unpadded: each input pixel makes a block of its own.
        unpadded = layer.padding == (0, 0) and layer.output_padding == (0, 0)
        if layer.kernel_size == layer.stride and layer.dilation == (1, 1) and unpadded:
            return int(layer.stride[0])
        return None
    if isinstance(layer, nn.Conv2d):
        if layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding in ((0, 0), "valid"):
            return 1
        return None
    return None


def float_layers_in_row_bands(network: fx.GraphModule, *, rows: int = BAND_ROWS) -> fx.GraphModule:
    """``network`` (an int8 network from ``convert_fx``) with its row-by-row float layers run in bands.

    Each ``dequantize -> layer [-> quantize_per_tensor]`` chain whose layer works row by row becomes one
    :class:`RowBands` module. Other float layers are left as they are. ``network`` is changed in place.
    """
    graph = network.graph
    for dequantize in list(graph.nodes):
        if not (dequantize.op == "call_method" and dequantize.target == "dequantize"):
            continue
        if len(dequantize.users) != 1:
            continue
        (call,) = dequantize.users
        if call.op != "call_module":
            continue
        layer = network.get_submodule(call.target)
        rows_out = _rows_out_per_row_in(layer)
        if rows_out is None:
            continue
        quantize = _only_quantize_after(call)
        requantize = None
        if quantize is not None:
            _, scale_node, zero_point_node, dtype = quantize.args
            requantize = (_attribute(network, scale_node), _attribute(network, zero_point_node), dtype)
        name = f"{call.target.replace('.', '_')}_in_row_bands"
        network.add_submodule(
            name, RowBands(layer, rows_out_per_row_in=rows_out, rows=rows, requantize=requantize)
        )
        with graph.inserting_before(dequantize):
            banded = graph.call_module(name, (dequantize.args[0],))
        last = quantize if quantize is not None else call
        last.replace_all_uses_with(banded)
        for node in (quantize, call, dequantize):
            if node is not None:
                graph.erase_node(node)
    graph.eliminate_dead_code()
    network.delete_all_unused_submodules()
    network.recompile()
    return network


def _only_quantize_after(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target is torch.quantize_per_tensor:
        return users[0]
    return None


def _attribute(network: fx.GraphModule, node: Any) -> Any:
    """The value of a ``get_attr`` argument (a scale or zero point the converter stored on the network)."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = network
        for part in str(node.target).split("."):
            value = getattr(value, part)
        return value
    return node
