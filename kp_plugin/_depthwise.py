"""The weight gradient of depthwise convolutions on feature maps no larger
than their kernel, computed on the CPU without oneDNN's slow path.

Why: EfficientNet / MobileNet-style models at the small image sizes this
library fine-tunes on (32x32 digits) end in depthwise 3x3 and 5x5
convolutions on 1x1, 2x2 and 4x4 feature maps. For those shapes oneDNN's
depthwise kernels on CPUs without AVX-512 hand the weight gradient to a
general GEMM path ("x64:gemm:jit" in ``ONEDNN_VERBOSE``) that took 15-39 ms
a layer for a batch of 64 on the dev CPU (AMD EPYC, AVX2), where this
module's weight gradient takes 0.4-2.6 ms (14-79x less); those layers were
most of a training step at 32x32 (docs/benchmarks.md, "Depthwise
convolutions on small maps", ``benchmarks/bench_depthwise.py``).

How: inside :func:`small_map_depthwise`, a ``conv2d`` call that is a
depthwise convolution (one filter per channel) on a CPU float tensor whose
map has no more positions than the kernel has taps (and at most
:data:`MAX_POSITIONS`) runs as
:class:`_SmallMapDepthwise`: the forward and the input gradient are
torch's own (the same kernels as outside the context); the weight gradient
is ``sum_n g[n, c, o] * x[n, c, i]`` for every (output, input) position
pair as one batched matrix product over channels, then summed into kernel
taps through a fixed 0/1 matrix of which pairs each tap connects. The same
gradient up to float rounding (``tests/test_depthwise.py`` compares it
with torch's); every other call passes through unchanged.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

__all__ = ["small_map_depthwise", "depthwise_weight_grad", "depthwise_call"]

_CONV2D = frozenset({F.conv2d, torch.conv2d})
_DTYPES = (torch.float32, torch.float64)
#: Feature maps up to this many positions take the batched-product path
#: (its work grows with the square of the map; the slow oneDNN path was only
#: seen on maps of at most 4x4).
MAX_POSITIONS = 64


def _pair(value: Union[int, Sequence[int]]) -> Optional[tuple]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return tuple(value)
    if isinstance(value, (tuple, list)) and len(value) == 1 and isinstance(value[0], int):
        return (value[0], value[0])
    return None  # 'same' / 'valid' strings, tensors: leave to torch


@functools.lru_cache(maxsize=512)
def _tap_matrix(size: tuple, kernel: tuple, stride: tuple, padding: tuple, dilation: tuple,
                dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(kh*kw, OH*OW*H*W)`` 0/1 matrix: 1 where kernel tap ``t`` connects
    output position ``o`` with input position ``i`` (flattened ``o*H*W + i``);
    one per layer shape, dtype and device (built once, not on every step)."""
    (h, w), (kh, kw), (sh, sw), (ph, pw), (dh, dw) = size, kernel, stride, padding, dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    taps = torch.zeros(kh * kw, oh * ow, h * w, dtype=torch.float64)
    for i in range(kh):
        for a in range(oh):
            row = a * sh + i * dh - ph
            if not 0 <= row < h:
                continue
            for j in range(kw):
                for b in range(ow):
                    col = b * sw + j * dw - pw
                    if 0 <= col < w:
                        taps[i * kw + j, a * ow + b, row * w + col] = 1
    return taps.reshape(kh * kw, -1).to(device=device, dtype=dtype)


def depthwise_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel: tuple, stride: tuple, padding: tuple,
                          dilation: tuple) -> torch.Tensor:
    """The gradient of a depthwise ``conv2d`` (``groups`` = channels, one
    filter each) with respect to its ``(C, 1, kh, kw)`` weight."""
    n, c, h, w = x.shape
    oh, ow = grad_out.shape[-2:]
    # Channel-major copies (small maps: a few MB at most); a strided batch
    # would make bmm loop over the channels one by one.
    inputs = x.permute(1, 0, 2, 3).reshape(c, n, h * w).contiguous()
    grads = grad_out.permute(1, 2, 3, 0).reshape(c, oh * ow, n).contiguous()
    pairs = torch.bmm(grads, inputs).reshape(c, -1)  # (C, OH*OW*H*W): sum over the batch of g[o] * x[i]
    taps = _tap_matrix((h, w), kernel, stride, padding, dilation, x.dtype, x.device)
    return (pairs @ taps.T).reshape(c, 1, *kernel)


class _SmallMapDepthwise(torch.autograd.Function):
    """A depthwise ``conv2d``: torch's forward and input gradient,
    :func:`depthwise_weight_grad` for the weight."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: tuple,
                padding: tuple, dilation: tuple) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.settings = (stride, padding, dilation)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation, x.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.settings
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, list(stride), list(padding), list(dilation), False, [0, 0], x.shape[1],
                [True, False, False],
            )[0]
        if ctx.needs_input_grad[1]:
            grad_w = depthwise_weight_grad(x, grad_out, tuple(weight.shape[-2:]), stride, padding, dilation)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(dim=(0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None


_CONV2D_PARAMETERS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def depthwise_call(args: tuple, kwargs: dict) -> Optional[tuple]:
    """``(x, weight, bias, stride, padding, dilation)`` of a ``conv2d`` call
    that is a depthwise convolution (4-D tensors, ``groups`` = channels,
    one filter each, integer settings as pairs), else ``None``."""
    bound = dict(zip(_CONV2D_PARAMETERS, args))
    if len(args) > len(_CONV2D_PARAMETERS) or any(name not in _CONV2D_PARAMETERS or name in bound
                                                  for name in kwargs):
        return None
    bound.update(kwargs)
    x, weight, bias = bound.get("input"), bound.get("weight"), bound.get("bias")
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)) or x.dim() != 4 or weight.dim() != 4:
        return None
    channels = x.shape[1]
    if bound.get("groups", 1) != channels or channels < 2 or tuple(weight.shape[:2]) != (channels, 1):
        return None
    stride, padding, dilation = (_pair(bound.get(name, default)) for name, default in
                                 (("stride", 1), ("padding", 0), ("dilation", 1)))
    if stride is None or padding is None or dilation is None:
        return None
    return x, weight, bias, stride, padding, dilation


def _small_map_call(args: tuple, kwargs: dict) -> Optional[tuple]:
    """The arguments of a ``conv2d`` call that takes the small-map path, or
    ``None``."""
    call = depthwise_call(args, kwargs)
    if call is None:
        return None
    x, weight, bias = call[:3]
    if not torch.is_grad_enabled() or not weight.requires_grad:
        return None  # nothing to speed up without a weight gradient
    if x.device.type != "cpu" or x.dtype not in _DTYPES or weight.dtype != x.dtype or weight.device != x.device:
        return None
    if bias is not None and not (isinstance(bias, torch.Tensor) and bias.dtype == x.dtype):
        return None
    h, w = x.shape[-2:]
    if h * w > min(MAX_POSITIONS, weight.shape[-2] * weight.shape[-1]):
        return None
    return call


class _SmallMapDepthwiseMode(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func in _CONV2D and not torch.compiler.is_compiling():  # compiled code: inductor's own kernels
            call = _small_map_call(args, kwargs)
            if call is not None:
                return _SmallMapDepthwise.apply(*call)
        return func(*args, **kwargs)


def small_map_depthwise() -> TorchFunctionMode:
    """A context in which depthwise ``conv2d`` calls on CPU feature maps
    no larger than their kernel compute their weight gradient with a batched
    matrix product (see the module's docstring). Every other call, and the
    values computed, are as outside it (up to float rounding).

    Example:
        >>> conv = torch.nn.Conv2d(8, 8, 5, padding=2, groups=8)
        >>> with small_map_depthwise():
        ...     conv(torch.rand(4, 8, 2, 2)).sum().backward()
        >>> tuple(conv.weight.grad.shape)
        (8, 1, 5, 5)
    """
    return _SmallMapDepthwiseMode()
