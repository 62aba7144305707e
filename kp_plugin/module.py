"""``KeyedInput`` and ``ProtectedModel``: the keyed transform as an nn.Module
in front of any image model.

``wrap_model(model, key)`` returns a :class:`ProtectedModel` whose forward
takes images in [0, 1] and computes ``model(normalize(T_key(x)))``. The
key-derived tensors are non-persistent buffers, so ``state_dict()`` holds the
base model's weights and nothing derived from the key; the key object itself
refuses to be pickled (except by multiprocessing, to a child process).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import re
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from torch import nn

from .errors import (BlockSizeError, ConfigurationError, InputDtypeError, InputGradientWarning, InputSizeWarning,
                     KeyLeakError, KeyMismatchError, NormalizationWarning)
from .keys import SecretKey, require_key
from .transforms import (
    TransformPlan,
    _functorch_active,
    check_float_range,
    check_image_size,
    compile_plan,
    lookup_table,
)

__all__ = ["KeyedInput", "ProtectedModel", "wrap_model", "unwrap", "protected_model_of", "require_protected",
           "resolve_normalization", "fixed_image_size", "set_pretrained_cfg"]


#: Outputs at least this large (bytes, CPU) are written into a buffer the
#: module keeps from a previous call, when nothing else still holds that
#: buffer. A large fresh allocation can come as new pages from the OS and
#: cost a page fault per 4 KB on first touch: 10 ms of KeyedInput's 23 ms at
#: (64, 3, 224, 224) on the dev CPU (docs/benchmarks.md "transform-allocation").
#: Below a few MB the allocator's own reuse is as fast: at (256, 3, 32, 32),
#: 3 MB, a pool from 1 MiB took 0.51-0.72 ms against 0.55-0.70 without
#: (benchmarks/transform_variants.py, four runs).
REUSE_MIN_BYTES = 4 << 20

#: Output bytes per piece of the gather and multiply-add: large batches go a
#: few images at a time, so the multiply-add finds the gathered values still
#: in cache and the temporaries (uint8 gathers, lookup indices) stay small.
#: benchmarks/transform_variants.py on the dev CPU, (64, 3, 224, 224): uint8
#: input 9.0-10.7 ms in pieces against 20.4-23.4 whole in three runs with a
#: mixed-dtype multiply-add, 9.7 against 10.4 in one run with the copy_ below;
#: float input no steady difference (15.7-18.5 against 13.4-18.2, four runs).
CHUNK_BYTES = 4 << 20
SPARE_OUTPUTS = 2

_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _use_count(tensor: torch.Tensor) -> tuple:
    """References to ``tensor``'s storage: in C++ (tensors, views,
    saved-for-backward copies, NumPy arrays sharing it), as torch's own
    CUDA-graph trees read it to know when an output is dead; to its Python
    storage object (``untyped_storage()`` / ``storage()`` held by a caller,
    which torch keeps as one object without a C++ reference of its own); and
    its size (a caller may free it with ``resize_(0)``)."""
    storage = tensor.untyped_storage()
    return int(_storage_use_count(storage._cdata)), sys.getrefcount(storage), storage.nbytes()


try:  # the plan is real data even when a fake-tensor trace runs forward
    from torch._subclasses.fake_tensor import unset_fake_temporarily as _real_tensors
except ImportError:  # pragma: no cover - older torch
    from contextlib import nullcontext as _real_tensors

_is_exporting_function = getattr(torch.compiler, "is_exporting", lambda: False)


def _is_exporting() -> bool:
    """``torch.compiler.is_exporting()``, read from its flag where torch has
    one: some torch releases (2.11 among them) fold the function itself to
    True for every dynamo trace, which made plain ``torch.compile`` of a
    ProtectedModel raise the export refusal."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return bool(flag) if flag is not None else _is_exporting_function()


try:  # symbolic tracing only (is_fx_tracing also answers for torch.export, with a warning each call)
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as _is_fx_tracing
except ImportError:  # pragma: no cover - older torch
    try:
        from torch.fx._symbolic_trace import is_fx_tracing as _is_fx_tracing
    except ImportError:
        def _is_fx_tracing() -> bool:
            return False

#: Why a ProtectedModel refuses torch.export / ONNX export / TorchScript and FX tracing.
EXPORT_REFUSAL = (
    "exporting or tracing a model with its KeyedInput would write the key-derived permutation into the exported "
    "graph (a file that must never hold key material). Export the base model instead: "
    "kp_plugin.export.export_protected(model, directory) writes it (ONNX or torch.export) with protection.json and "
    "no key, and kp_plugin.export.load_keyed_input(directory, key) gives the keyed transform to run in front of it"
)


def _refuse_export() -> None:
    """Raise :class:`KeyLeakError` inside torch.export / ONNX export /
    TorchScript or FX tracing: the graph would hold the key's permutation."""
    if _is_exporting() or torch.jit.is_tracing() or _is_fx_tracing():
        raise KeyLeakError(EXPORT_REFUSAL)


def _eager_only(reason: str):
    """``torch.compiler.disable`` with a reason dynamo shows (torch versions
    without the ``reason`` argument get the plain decorator)."""
    try:
        return torch.compiler.disable(reason=reason)
    except TypeError:
        return torch.compiler.disable


class _Plan(NamedTuple):
    """The compiled buffers one forward call uses, read together."""

    source_index: torch.Tensor
    value_scale: Optional[torch.Tensor]
    value_bias: Optional[torch.Tensor]
    lookup_offsets: Optional[torch.Tensor]
    value_lookup: Optional[torch.Tensor]


def _as_triple(values: Sequence[float], channels: int, name: str) -> tuple:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().reshape(-1).tolist()
    try:
        values = tuple(float(v) for v in (values if isinstance(values, (list, tuple)) else [values]))
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"{name} must be a number or one number per channel, e.g. {name}=(0.5, 0.5, 0.5); got {values!r}"
        ) from None
    if not all(math.isfinite(v) for v in values):
        raise ConfigurationError(f"{name} must be finite numbers, got {values}")
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ConfigurationError(
            f"{name} has {len(values)} values but the key is for {channels} channels: the model takes "
            f"{len(values)}-channel images; use a key for them (SecretKey.generate(channels={len(values)}), "
            f"kp keygen --channels {len(values)}) or pass {name}= with {channels} values"
        )
    if name == "std" and any(v <= 0 for v in values):
        raise ConfigurationError(f"std must be positive, got {values}")
    return values


#: Largest image side accepted as an input size (a plan holds an index per value).
MAX_INPUT_SIDE = 16384


def _checked_input_size(input_size: Any) -> tuple:
    """``input_size`` as ``(C, H, W)`` of positive integers, or a
    :class:`ConfigurationError` that says what is expected."""
    try:
        values = tuple(_as_int_value(v) for v in input_size)
    except (TypeError, ValueError):
        values = None
    if values is None or len(values) != 3 or min(values) < 1 or max(values[1:]) > MAX_INPUT_SIDE:
        raise ConfigurationError(
            f"input_size must be (C, H, W), three positive integers with sides up to {MAX_INPUT_SIDE}, e.g. "
            f"(3, 224, 224); got {input_size!r}"
        )
    return values


def _as_int_value(value: Any) -> int:
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(value)
    result = int(value)
    if result != value:
        raise ValueError(value)
    return result


def _pieces(flat: torch.Tensor, out: torch.Tensor, source_index: torch.Tensor):
    """``(input rows, output rows, gather index)`` of a few images at a time
    (CHUNK_BYTES of output each)."""
    rows = max(1, CHUNK_BYTES // max(1, out.shape[1] * out.element_size()))
    for start in range(0, flat.shape[0], rows):
        part = flat[start:start + rows]
        yield part, out[start:start + rows], source_index.expand(part.shape[0], -1)


def _gather_scale_shift(flat: torch.Tensor, source_index: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                        out: torch.Tensor) -> None:
    """``out = bias + scale * flat[:, source_index]``, a few images at a time
    so the multiply-add reads the gather's output from cache."""
    for part, dest, index in _pieces(flat, out, source_index):
        if part.dtype == torch.uint8:
            # Gather the bytes (a quarter of the traffic) and convert them in
            # the copy: a same-dtype multiply-add after it beat one
            # mixed-dtype multiply-add (benchmarks/transform_variants.py).
            dest.copy_(torch.gather(part, 1, index))
        else:
            torch.gather(part, 1, index, out=dest)
        torch.addcmul(bias, dest, scale, out=dest)


class KeyedInput(nn.Module):
    """Keyed block-wise transform followed by mean/std normalization.

    Input: images ``(B, C, H, W)`` (or ``(C, H, W)``), float in [0, 1] or
    uint8. Output: normalized, ready for the model, in the images' float
    dtype (uint8 images: float32, or the dtype ``.half()`` / ``.to(dtype)``
    gave the module); the plan's constants stay float32. The transform
    and the normalization are fused: one gather, then one multiply-add (or
    one table lookup when the scheme has 8-bit steps).

    On CPU, an output of 4 MiB or more is written into the buffer of one of
    the module's last two outputs when nothing references that output any
    more (checked by its storage's use count, which counts views, NumPy
    arrays and tensors saved for backward, and by references to its Python
    storage object), saving the page faults of a fresh allocation. A result
    you hold is never overwritten.

    Args:
        key: the secret key.
        mean, std: the model's normalization (per channel, or one value).
        input_size: ``(C, H, W)`` to compile for now; other sizes compile on
            first use.
        check_range: reject float input clearly outside [0, 1] (typically
            already normalized) with :class:`InputRangeError`. The check reads
            the batch once and, on CUDA, synchronizes; it is skipped while
            ``torch.compile`` traces and inside ``torch.func`` transforms
            (``vmap``, ``grad``), which cannot read values on the host.

    A new image size compiles the plan in Python; ``torch.compile`` breaks
    the graph there, so with ``fullgraph=True`` give ``input_size`` (or call
    the module once) before compiling.

    Example:
        >>> keyed = KeyedInput(SecretKey.generate(block_size=4), mean=0.5, std=0.5)
        >>> z = keyed(torch.rand(2, 3, 32, 32))
    """

    def __init__(
        self,
        key: SecretKey,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        input_size: Optional[Sequence[int]] = None,
        check_range: bool = True,
    ) -> None:
        super().__init__()
        self.key = key
        self.mean = _as_triple(mean, key.channels, "mean")
        self.std = _as_triple(std, key.channels, "std")
        self.check_range = check_range
        self._size: Optional[tuple] = None
        # The last large output buffers, each with its use count when only
        # this module held it (see _output_buffer).
        self._spare: list = []
        # Plan constants cast to the images' float dtype: {(name, dtype): (buffer, cast)}.
        self._casts: dict = {}
        # The plan's value dtype before there is a plan: .half() / .to(dtype)
        # on a module that has not compiled yet (see _apply).
        self._value_dtype = torch.float32
        # Compiling for a new size swaps several buffers; threads sharing the
        # module read them together under this lock (see _plan_for).
        self._lock = threading.Lock()
        #: ``(H, W)`` a loaded model was saved for; with block scrambling
        #: (whose block order depends on the image size) other sizes warn
        #: (:class:`~kp_plugin.errors.InputSizeWarning`). ``None`` (the
        #: default) takes any multiple of the block size silently.
        self.trained_size: Optional[tuple] = None
        # (C, H, W) of the last images seen in training mode: what a save
        # records, over a later evaluation at another size.
        self._train_size: Optional[tuple] = None
        self.input_size: Optional[tuple] = None
        if input_size is not None:
            input_size = _checked_input_size(input_size)
            if input_size[0] != key.channels:
                raise ConfigurationError(
                    f"input_size has {input_size[0]} channels but the key is for {key.channels}"
                )
            check_image_size(input_size[1], input_size[2], key.block_size)
            self.input_size = input_size
            self._compile(input_size, torch.device("cpu"), torch.float32)

    @property
    def key(self) -> SecretKey:
        """The secret key. Assigning another key (same channel count) makes
        the next call compile that key's plan; the old plan is never used
        with it."""
        return self._key

    @key.setter
    def key(self, key: SecretKey) -> None:
        require_key(key)
        old = self.__dict__.get("_key")
        if old is not None and key.channels != old.channels:
            raise ConfigurationError(
                f"the new key is for {key.channels} channels but this KeyedInput normalizes {old.channels}; "
                "build a new KeyedInput (or wrap_model) for it"
            )
        if old is not None and self.input_size is not None:
            check_image_size(self.input_size[1], self.input_size[2], key.block_size)
        self._replan("_key", key)

    @property
    def mean(self) -> tuple:
        """Per-channel mean of the normalization (fused into the plan:
        assigning it makes the next call compile again)."""
        return self._mean

    @mean.setter
    def mean(self, mean: Sequence[float]) -> None:
        self._replan("_mean", _as_triple(mean, self.key.channels, "mean"))

    @property
    def std(self) -> tuple:
        """Per-channel std of the normalization (see :attr:`mean`)."""
        return self._std

    @std.setter
    def std(self, std: Sequence[float]) -> None:
        self._replan("_std", _as_triple(std, self.key.channels, "std"))

    def _replan(self, name: str, value: Any) -> None:
        """Set a setting the compiled plan depends on; the next call compiles
        the plan again (the cached one was made with the old value)."""
        lock = self.__dict__.get("_lock")
        with lock if lock is not None else contextlib.nullcontext():
            self.__dict__[name] = value
            self._size = None

    # The buffers hold the compiled plan for one image size. They are
    # non-persistent: never in state_dict, but moved by .to() / .half().
    @_eager_only(
        "KeyedInput compiles its plan for a new image size in Python (key derivation); for "
        "torch.compile(fullgraph=True) pass input_size=(C, H, W) or call the module once before compiling")
    def _compile(self, size: tuple, device: torch.device, dtype: torch.dtype) -> None:
        # The plan is real, ordinary data on the CPU first, whatever the
        # context: under a fake-tensor trace it would be fake, and stay
        # registered after it (every later eager call would read garbage);
        # under a meta default device it would hold no data; made in
        # inference mode it could never be saved for backward, so a later
        # call whose images need gradients would fail.
        with _real_tensors(), torch.device("cpu"), torch.inference_mode(False):
            self._compile_real(size, device, dtype)

    def _compile_real(self, size: tuple, device: torch.device, dtype: torch.dtype) -> None:
        plan: TransformPlan = compile_plan(self.key, *size)
        mean = torch.tensor(self.mean, dtype=torch.float64)
        std = torch.tensor(self.std, dtype=torch.float64)
        if plan.value_table is not None:
            # Normalized value of every (position, 8-bit value) pair.
            pos_channel = torch.arange(plan.value_table.shape[0]) % plan.channels
            lookup = (plan.value_table.double() / 255 - mean[pos_channel, None]) / std[pos_channel, None]
            tensors = {
                "source_index": plan.source_index,
                "lookup_offsets": plan.lookup_offsets().to(torch.int32),
                "value_lookup": lookup.reshape(-1).to(dtype),
            }
        else:
            # Per block position p (whose channel is p % C), then spread over
            # the image: normalize(np(v)) = (1 - 2 f) / std * v + (f - mean) / std.
            length = self.key.block_length
            pos_channel = torch.arange(length) % plan.channels
            if "np" in plan.scheme:
                flip = torch.tensor(self.key.np_mask(length), dtype=torch.float64)
            else:
                flip = torch.zeros(length, dtype=torch.float64)
            scale = ((1 - 2 * flip) / std[pos_channel]).to(dtype)
            bias = ((flip - mean[pos_channel]) / std[pos_channel]).to(dtype)
            tensors = {
                "source_index": plan.source_index,
                "value_scale": scale[plan.position],
                "value_bias": bias[plan.position],
            }
        for name in ("source_index", "lookup_offsets", "value_lookup", "value_scale", "value_bias"):
            if name in self._buffers:
                del self._buffers[name]
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor.to(device), persistent=False)
        self._size = tuple(size)

    def _buffer_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The plan's value dtype: float32, or what ``.half()`` / ``.to(dtype)``
        made it; never the dtype of whichever call came first."""
        for name in ("value_lookup", "value_scale"):
            if name in self._buffers:
                return self._buffers[name].dtype
        return self._value_dtype

    def _in_dtype(self, name: str, tensor: torch.Tensor, dtype: torch.dtype, functional: bool) -> torch.Tensor:
        """The plan constant ``name`` (``tensor``) in ``dtype``: cast once, and
        again only when the plan's buffer changes (a new size, ``.to()``)."""
        if tensor.dtype == dtype:
            return tensor
        if functional:
            return tensor.to(dtype)
        cached = self._casts.get((name, dtype))
        if cached is None or cached[0] is not tensor:
            with torch.inference_mode(False):  # as the plan itself: a later call may need gradients
                cached = (tensor, tensor.to(dtype))
            self._casts[(name, dtype)] = cached
        return cached[1]

    def _output_buffer(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous ``shape`` / ``dtype`` tensor for the output: one of the
        last two calls' buffers when the caller has dropped every reference
        to it (so reuse is invisible), else a new one. Two, so that
        ``y = keyed(x)`` in a loop (the old ``y`` alive during the call)
        reuses too."""
        if (device.type != "cpu" or _storage_use_count is None
                or shape.numel() * dtype.itemsize < REUSE_MIN_BYTES):
            return torch.empty(shape, dtype=dtype, device=device)
        pool, taken = self._spare, []
        # list.pop is atomic: a buffer taken here is invisible to another
        # thread in forward, so one buffer never serves two calls at once.
        while len(taken) < SPARE_OUTPUTS:
            try:
                taken.append(pool.pop())
            except IndexError:
                break
        inference = torch.is_inference_mode_enabled()  # an inference tensor is read-only outside that mode
        taken = [entry for entry in taken if entry[0].shape == shape and entry[0].dtype == dtype
                 and entry[0].is_inference() == inference]
        chosen = next((entry for entry in taken
                       if not entry[0].is_shared() and _use_count(entry[0]) == entry[1]), None)
        if chosen is None:
            buffer = torch.empty(shape, dtype=dtype, device=device)
            chosen = (buffer, _use_count(buffer))
        # Hand out a view (a second tensor on the storage) before the buffer
        # goes back to the pool: from then on its use count is above the
        # "alone" count until the caller drops every view of it.
        claimed = chosen[0].view(shape)
        pool.extend([chosen] + [entry for entry in taken if entry is not chosen][: SPARE_OUTPUTS - 1])
        del pool[:-SPARE_OUTPUTS]
        return claimed

    def __getstate__(self) -> dict:
        state = super().__getstate__()  # nn.Module's: a copy of __dict__
        state["_spare"] = []  # a cache, not state: copies start without it
        state["_casts"] = {}
        state.pop("_lock", None)  # locks do not copy; each copy gets its own
        # The key first: pickle writes the state in this order, and the key
        # refuses before the plan's buffers (the permutation) reach the file.
        return {"_key": state.pop("_key"), **state}

    def _apply(self, fn, recurse: bool = True):
        self._spare = []  # .to() / .half() / .cuda(): outputs of the old device or dtype are not kept
        try:  # the float dtype fn gives, kept for a plan compiled later (no buffers to carry it yet)
            probe = fn(torch.empty(0, dtype=self._value_dtype))
        except Exception:  # a custom fn that takes only real parameters: nothing to learn from it
            probe = None
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            self._value_dtype = probe.dtype
        before = self._buffers.get("source_index")
        result = super()._apply(fn, recurse)
        index = self._buffers.get("source_index")
        if (self._size is not None and index is not None and index is not before
                and index.device.type != "meta"):
            # to_empty() (meta-device initialization, FSDP) leaves the buffers
            # uninitialized: rebuild the plan where they now are, in their dtype.
            values = self._buffers.get("value_lookup", self._buffers.get("value_scale"))
            with self._lock:
                self._compile(self._size, index.device, values.dtype if values is not None else torch.float32)
        return result

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._lock = threading.Lock()

    def _plan_for(self, x: torch.Tensor) -> _Plan:
        """The buffers for ``x``'s size and device, compiled first if needed,
        as one consistent snapshot even while another thread recompiles."""
        if torch.compiler.is_compiling():
            return self._plan_unlocked(x)
        with self._lock:
            return self._plan_unlocked(x)

    def _plan_unlocked(self, x: torch.Tensor) -> _Plan:
        size = tuple(x.shape[1:])
        if size != self._size or self._buffers["source_index"].device != x.device:
            check_image_size(size[1], size[2], self.key.block_size)
            self._check_trained_size(size)
            self._compile(size, x.device, self._buffer_dtype(x))
        return _Plan(*(self._buffers.get(name) for name in _Plan._fields))

    def _check_trained_size(self, size: tuple) -> None:
        trained = self.trained_size
        if trained is None or "scramble" not in self.key.scheme or tuple(size[1:]) == tuple(trained):
            return
        # A warning, not an error: the recorded size can be the model's
        # default rather than one it was trained at (saved before any use).
        warnings.warn(
            f"images are {size[1]}x{size[2]} but this model was saved for {trained[0]}x{trained[1]} images, and "
            "its key's block scrambling orders the blocks for that size: if it was trained there, other sizes "
            f"give wrong predictions even with the right key; resize the images to {trained[0]}x{trained[1]} "
            "(to use another size on purpose, set model.keyed.trained_size = None)",
            InputSizeWarning, stacklevel=4,
        )

    def __prepare_scriptable__(self) -> None:
        # torch.jit.script calls this first; a scripted module would carry the
        # plan's buffers (the permutation) into a saved TorchScript file.
        raise KeyLeakError(EXPORT_REFUSAL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _refuse_export()
        if not isinstance(x, torch.Tensor):
            raise InputDtypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise InputDtypeError(
                f"images have dtype {x.dtype}; KeyedInput takes float images in [0, 1] or uint8 "
                "images in 0..255 (convert with x.float() / 255)"
            )
        single = x.dim() == 3
        if single:
            x = x.unsqueeze(0)
        if x.dim() != 4:
            raise BlockSizeError(f"expected images shaped (B, C, H, W) or (C, H, W), got {tuple(x.shape)}")
        size = tuple(x.shape[1:])
        if size[0] != self.key.channels:
            raise BlockSizeError(
                f"images have {size[0]} channels but the key is for {self.key.channels} "
                "(channels-first layout (B, C, H, W) is expected)"
            )
        plan = self._plan_for(x)
        if self.training and size != self._train_size:
            self._train_size = size
        functional = torch.compiler.is_compiling() or _functorch_active()
        if self.check_range and x.is_floating_point() and not functional:
            check_float_range(x)

        flat = x.flatten(1)
        scale, bias, table = plan.value_scale, plan.value_bias, plan.value_lookup
        if flat.is_floating_point():  # the output keeps the images' float dtype
            if table is not None:
                table = self._in_dtype("value_lookup", table, flat.dtype, functional)
            else:
                scale = self._in_dtype("value_scale", scale, flat.dtype, functional)
                bias = self._in_dtype("value_bias", bias, flat.dtype, functional)
        if table is not None:
            if flat.requires_grad and torch.is_grad_enabled():
                warnings.warn(
                    f"the key's scheme ({self.key.scheme_name}) maps values through 8-bit lookup tables (shift / "
                    "ffx), which have no gradient: none reaches these images (their .grad stays None), while the "
                    "model's parameters get theirs as usual; for gradients with respect to the images (saliency, "
                    "gradient attacks) use a scheme without shift and ffx",
                    InputGradientWarning, stacklevel=3)
            if functional:
                gathered = torch.gather(flat, 1, plan.source_index.expand(flat.shape[0], -1))
                out = lookup_table(gathered, plan.lookup_offsets, table, owned=True)
            else:
                out = self._output_buffer(flat.shape, table.dtype, flat.device)
                for part, dest, index in _pieces(flat, out, plan.source_index):
                    lookup_table(torch.gather(part, 1, index), plan.lookup_offsets, table, owned=True, out=dest)
        else:
            if flat.dtype == torch.uint8:
                scale = scale / 255  # 0..255 -> [0, 1], folded into the multiply-add
            if functional or flat.requires_grad:
                out = torch.addcmul(bias, torch.gather(flat, 1, plan.source_index.expand(flat.shape[0], -1)), scale)
            else:
                out = self._output_buffer(flat.shape, bias.dtype, flat.device)
                _gather_scale_shift(flat, plan.source_index, scale, bias, out)
        out = out.view(x.shape)  # always a view: the buffer itself stays private
        return out[0] if single else out

    def extra_repr(self) -> str:
        return (
            f"fingerprint={self.key.fingerprint}, block_size={self.key.block_size}, "
            f"scheme={self.key.scheme_name}, mean={self.mean}, std={self.std}"
        )


def _for_channels(values: Optional[Sequence[float]], channels: Optional[int]) -> Optional[tuple]:
    if values is None or not isinstance(channels, int) or channels < 1 or len(values) == channels:
        return None if values is None else tuple(values)
    if channels == 1:
        return (sum(values) / len(values),)
    return tuple(values[i % len(values)] for i in range(channels))


def fixed_image_size(model: nn.Module) -> Optional[tuple]:
    """``(H, W)`` a model with a patch embedding was built for (timm ViT,
    DeiT, Swin: ``img_size=32`` gives position embeddings for 32x32 and
    refuses other sizes), unless it takes any size (``dynamic_img_size``);
    ``None`` for other models. timm leaves ``pretrained_cfg["input_size"]``
    at the weights' size (224) when a model is made for another."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if getattr(model, "dynamic_img_size", False) or not isinstance(size, (tuple, list)) or len(size) != 2:
        return None
    return tuple(size) if all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size) else None


def set_pretrained_cfg(model: nn.Module, cfg: dict) -> None:
    """Give a timm model a new ``pretrained_cfg``. timm keeps
    ``default_cfg`` as the same dict (its older name, still read by timm's
    own helpers and by user code), so both names get it: replaced alone,
    ``default_cfg`` kept the old input size."""
    model.pretrained_cfg = cfg
    if hasattr(model, "default_cfg"):
        model.default_cfg = cfg


def resolve_normalization(
    model: nn.Module,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    input_size: Optional[Sequence[int]] = None,
) -> tuple:
    """Find mean, std and input size for ``model``: explicit arguments first,
    then timm's ``pretrained_cfg``, then an HF config's ``image_mean`` /
    ``image_std`` / ``image_size`` / ``num_channels``."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        # timm keeps the pretrained (RGB) config when a model is created with
        # another in_chans; adapt it as timm adapts the first convolution's
        # weights: averaged for one channel, repeated cyclically for more.
        channels = getattr(model, "in_chans", None)
        mean = mean if mean is not None else _for_channels(cfg.get("mean"), channels)
        std = std if std is not None else _for_channels(cfg.get("std"), channels)
        if input_size is None and cfg.get("input_size") is not None:
            input_size = tuple(cfg["input_size"])
            if isinstance(channels, int) and channels != input_size[0]:
                input_size = (channels, *input_size[1:])
            built_for = fixed_image_size(model)  # what the model says over what its weights' source said
            if built_for is not None:
                input_size = (input_size[0], *built_for)
    hf_config = getattr(model, "config", None)
    if hf_config is not None and not isinstance(hf_config, dict):
        mean = mean if mean is not None else getattr(hf_config, "image_mean", None)
        std = std if std is not None else getattr(hf_config, "image_std", None)
        if mean is None or std is None:
            found = _transformers_processor_normalization(model, hf_config)
            if found is not None:
                mean = mean if mean is not None else found[0]
                std = std if std is not None else found[1]
        if input_size is None:
            side = getattr(hf_config, "image_size", None)
            channels = getattr(hf_config, "num_channels", None)
            if isinstance(side, int) and isinstance(channels, int):
                input_size = (channels, side, side)
    if mean is None or std is None:
        raise ConfigurationError(
            f"cannot tell the normalization of {type(model).__name__}: it has no timm pretrained_cfg "
            "or HF config with image_mean/image_std. Pass them, e.g. "
            "wrap_model(model, key, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)), or for a "
            "transformers model its image processor: kp_plugin.hf.wrap_hf_model(model, key, image_processor=...)"
        )
    return mean, std, input_size


def _transformers_processor_normalization(model: nn.Module, config: Any) -> Optional[tuple]:
    """mean, std of a transformers model's image processor (transformers
    keeps them there, not in the config): the ``preprocessor_config.json``
    saved beside the weights it was loaded from, else the defaults of its
    architecture's image processor class (with a
    :class:`~kp_plugin.errors.NormalizationWarning`); ``None`` for other
    models. Reads only files already on disk."""
    import json

    transformers = sys.modules.get("transformers")  # a transformers model means it is imported
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        return None
    from transformers.models.auto.image_processing_auto import get_image_processor_class_from_name

    # what it normalizes with: none, or EfficientNet's twice
    from .hf.processor import _as_list, _normalization, image_processor_classes

    saved = _file_beside_weights(config, "preprocessor_config.json")
    if saved is not None:
        settings: dict = {}
        try:
            settings = json.loads(saved.read_text(encoding="utf-8"))
            cls = get_image_processor_class_from_name(str(settings.get("image_processor_type") or ""))
            processor = cls.from_dict(settings) if cls is not None else None
        except Exception:  # noqa: BLE001 - unreadable or of an unknown class: its values as written
            processor = None
        settings = settings if isinstance(settings, dict) else {}
        if processor is None and settings.get("image_mean") is not None and settings.get("image_std") is not None:
            processor = _SavedSettings(settings)
        if processor is not None:
            mean, std = _normalization(processor)
            return _as_list(mean), _as_list(std)
    for cls in image_processor_classes(getattr(config, "model_type", None)):
        name = cls.__name__
        try:
            processor = cls()
            mean, std = _normalization(processor)
        except Exception:  # noqa: BLE001 - a processor that needs arguments: try the next class
            mean = std = None
        if mean is not None and std is not None:
            mean, std = _as_list(mean), _as_list(std)
            warnings.warn(
                f"{type(model).__name__}'s config has no image_mean / image_std (transformers keeps them in the "
                f"image processor); using {name}'s defaults, mean {tuple(mean)}, std {tuple(std)}"
                f"{'' if getattr(processor, 'do_normalize', False) else ' (it does not normalize)'}. Pass "
                "mean=/std= or use kp_plugin.hf.wrap_hf_model(model, key, image_processor=...) for the processor "
                "the model was trained with",
                NormalizationWarning, stacklevel=4,
            )
            return mean, std
    return None


class _SavedSettings:
    """A saved processor's settings read as attributes (a processor class
    transformers does not know here): normalizes unless it says not to."""

    def __init__(self, settings: dict) -> None:
        self.do_normalize = settings.get("do_normalize", True)
        self.image_mean, self.image_std = settings["image_mean"], settings["image_std"]
        self.include_top = settings.get("include_top", False)


def _takes_pixel_values_later(model: nn.Module) -> bool:
    """Whether ``model.forward`` names ``pixel_values`` but not as its first
    parameter (a transformers model that takes text first): the images
    must then go by keyword."""
    try:
        names = [p.name for p in inspect.signature(model.forward).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except (TypeError, ValueError, AttributeError):
        return False
    return "pixel_values" in names and names[0] != "pixel_values"


#: Base-model methods that take images, reached through
#: :class:`ProtectedModel`'s attribute fall-through: they get the keyed,
#: normalized images as ``forward`` does (timm's feature / embedding
#: extraction, transformers' ``get_image_features``).
IMAGE_METHODS = frozenset({"forward_features", "forward_intermediates", "get_intermediate_layers", "forward_train",
                           "get_image_features"})


def _accept_base_names(module: "ProtectedModel", state_dict: dict, prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook of :class:`ProtectedModel`: a state dict in
    the base model's own names (``conv1.weight``, as the base's
    ``state_dict()`` or a plain checkpoint has them) is renamed to the
    wrapper's (``model.conv1.weight``), with its version metadata; one
    already in the wrapper's names is left as it is."""
    mine = [name for name in state_dict if name.startswith(prefix)]
    base = set(module.model.state_dict())
    if not mine or any(name[len(prefix):].startswith("model.") and name[len(prefix) + 6:] in base for name in mine):
        return
    if not any(name[len(prefix):] in base for name in mine):
        return  # neither naming: the usual missing / unexpected keys report it
    for name in mine:
        state_dict[f"{prefix}model.{name[len(prefix):]}"] = state_dict.pop(name)
    metadata = getattr(state_dict, "_metadata", None)  # module path (no trailing dot) -> version
    if metadata is not None:
        for path in [path for path in metadata if path.startswith(prefix) and path != prefix[:-1]]:
            metadata.setdefault(f"{prefix}model.{path[len(prefix):]}", metadata[path])
        metadata.setdefault(f"{prefix}model", metadata.get(prefix[:-1], {}))


def _under_model(pattern: str) -> str:
    """A regular expression over the base's parameter names as one over the
    wrapper's (``model.`` in front); timm applies them with ``re.match``."""
    return r"model\.(?:" + re.sub(r"(^|\|)\^", r"\1", pattern) + ")"


def _prefixed_group_matcher(method: Callable) -> Callable:
    """timm's ``group_matcher`` of the base model, for the wrapper's
    parameter names: timm's optimizer factory (layer-wise learning-rate
    decay) groups ``model.named_parameters()`` with it, and the base's
    patterns matched none of them (one group for the whole model)."""

    @functools.wraps(method)
    def group_matcher(*args: Any, **kwargs: Any) -> Any:
        matcher = method(*args, **kwargs)
        if callable(matcher):
            return lambda name: matcher(name[len("model."):]) if name.startswith("model.") else (float("inf"),)
        if not isinstance(matcher, dict):
            return matcher
        out = {}
        for group, spec in matcher.items():
            if isinstance(spec, str):
                out[group] = _under_model(spec)
            elif isinstance(spec, (list, tuple)):
                out[group] = [(_under_model(entry[0]), *entry[1:]) for entry in spec]
            else:
                out[group] = spec
        return out

    return group_matcher


def _prefixed_names(method: Callable) -> Callable:
    """timm's ``no_weight_decay`` of the base model (names or fnmatch
    patterns of parameters kept out of weight decay: position embeddings,
    class tokens), for the wrapper's parameter names."""

    @functools.wraps(method)
    def names(*args: Any, **kwargs: Any) -> Any:
        return {f"model.{name}" for name in method(*args, **kwargs)}

    return names


#: Base-model methods that name parameters, reached through attribute
#: fall-through: their names get the wrapper's ``model.`` prefix.
_PARAMETER_NAME_METHODS = {"group_matcher": _prefixed_group_matcher, "no_weight_decay": _prefixed_names}


#: transformers save_pretrained keywords that save something other than the
#: model's own weights as one file: refused by ProtectedModel.save_pretrained.
_CUSTOM_SAVE_KEYWORDS = frozenset({"state_dict", "save_function", "variant"})


#: KeyedInput settings a ProtectedModel answers for when its base model has
#: no attribute of that name (``model.mean``, ``model.input_size``).
_KEYED_SETTINGS = ("mean", "std", "input_size")


class ProtectedModel(nn.Module):
    """A model behind a :class:`KeyedInput`.

    ``forward`` transforms the images (the first positional argument, or
    ``pixel_values=``) and passes everything else through, so a transformers
    model keeps its calling convention (``labels=``, output objects with
    ``loss``). Attribute access falls through to the base model (its
    image-taking methods, :data:`IMAGE_METHODS` such as timm's
    ``forward_features``, get keyed images as ``forward`` does); where the
    base has no ``mean``, ``std`` or ``input_size`` of its own, those are the
    keyed input's (what the images are normalized with, the size its plan is
    compiled for). ``unwrap()`` returns it. ``state_dict()`` has the base
    model's keys under ``model.`` and nothing derived from the key; ``load_state_dict`` also takes the base
    model's own state dict (its names without ``model.``), so a plain
    checkpoint of the base loads into the protected model as it is.
    """

    def __init__(self, model: nn.Module, keyed: KeyedInput) -> None:
        super().__init__()
        self.keyed = keyed
        self.model = model
        self._pixel_values_by_keyword = _takes_pixel_values_later(model)
        self.register_load_state_dict_pre_hook(_accept_base_names)

    @property
    def key(self) -> SecretKey:
        return self.keyed.key

    def __prepare_scriptable__(self) -> None:
        raise KeyLeakError(EXPORT_REFUSAL)  # as KeyedInput's: torch.jit.script

    def forward(self, pixel_values: Optional[torch.Tensor] = None, *args: Any,
                labels: Optional[torch.Tensor] = None, **kwargs: Any) -> Any:
        # Named like a transformers forward on purpose: Trainer keeps only the
        # dataset columns that forward's signature names (pixel_values,
        # labels) and finds label names in it; a (*args, **kwargs) forward
        # would make it drop both.
        _refuse_export()
        if pixel_values is None:
            raise InputDtypeError("ProtectedModel expects images as the first argument or as pixel_values=")
        if labels is not None:
            kwargs["labels"] = labels
        if not args and self._pixel_values_by_keyword:
            # CLIPModel / SiglipModel: forward(input_ids, pixel_values, ...)
            return self.model(pixel_values=self._prepare(pixel_values), **kwargs)
        return self.model(self._prepare(pixel_values), *args, **kwargs)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and images.dim() == 3:
            # KeyedInput takes one image; the models it is put in front of do
            # not, and failed deep inside with an untyped error.
            raise BlockSizeError(
                f"ProtectedModel takes a batch of images (B, C, H, W), as the model it wraps does; got one image "
                f"{tuple(images.shape)}: pass images.unsqueeze(0)"
            )
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            self._check_fixed_size(tuple(images.shape[-2:]))
        out = self.keyed(images)
        dtype = _parameter_dtype(self.model)
        if dtype is not None and out.dtype != dtype and not torch.is_autocast_enabled(out.device.type):
            out = out.to(dtype)
        return out

    def _check_fixed_size(self, size: tuple) -> None:
        """A model built for one image size (timm ViT, DeiT, Swin) refuses
        others deep inside with a bare ``AssertionError``; say it here."""
        built_for = fixed_image_size(self.model)
        if built_for is None or size == built_for:
            return
        if not getattr(getattr(self.model, "patch_embed", None), "strict_img_size", True):
            return  # timm pads or interpolates: other sizes work
        raise BlockSizeError(
            f"images are {size[0]}x{size[1]} but this {type(self.model).__name__} takes {built_for[0]}x{built_for[1]} "
            f"images only (it was built for that size); resize them to {built_for[0]}x{built_for[1]}, or create the "
            f"model for {size[0]}x{size[1]} (create_protected_model(..., input_size={size}) or timm's img_size)"
        )

    def unwrap(self) -> nn.Module:
        """The base model, without the keyed input."""
        return self.model

    def save_pretrained(self, save_directory, *, metadata: Optional[dict] = None, is_main_process: bool = True,
                        safe_serialization: bool = True, push_to_hub: bool = False, repo_id: Optional[str] = None,
                        overwrite: bool = False, **hub_kwargs: Any) -> None:
        """:func:`kp_plugin.save_protected` (weights, native config where
        there is one, ``protection.json``; never the key), with the
        transformers keywords that apply: ``is_main_process=False`` writes
        nothing (other ranks), ``push_to_hub=True`` then publishes the folder
        with :func:`kp_plugin.hub.push_protected` to ``repo_id`` (default: the
        folder's name), passing ``private``, ``token``, ``commit_message``,
        ``revision`` ... on. Weights are always one safetensors file."""
        from .checkpoint import save_protected

        _require_safetensors(safe_serialization)
        hub_kwargs.pop("max_shard_size", None)  # the weights are one file whatever their size, as push_to_hub's
        custom = sorted(set(hub_kwargs) & _CUSTOM_SAVE_KEYWORDS)
        if custom:
            raise ConfigurationError(
                f"save_pretrained does not take {', '.join(custom)} for a protected model: it writes the model's own "
                "weights, one safetensors file, and signs them in protection.json; to save other weights, load them "
                "into the model first (model.load_state_dict)"
            )
        hub_only = sorted(hub_kwargs) + (["repo_id"] if repo_id else [])
        if hub_only and not push_to_hub:
            raise TypeError(f"save_pretrained got {hub_only}, which only apply with push_to_hub=True")
        if not is_main_process:
            return
        directory = save_protected(self, save_directory, metadata=metadata, overwrite=overwrite)
        if push_to_hub:
            from .hub import push_protected

            hub_kwargs.setdefault("key", self.key)  # the leak scan looks for the key's own bytes too
            if hub_kwargs.get("processor") is None:  # as push_to_hub: wrap_hf_model's processor goes up too
                hub_kwargs["processor"] = getattr(self, "keyed_image_processor", None)
            push_protected(directory, repo_id or Path(directory).name, **hub_kwargs)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> "ProtectedModel":
        """Refused: through attribute fall-through it was the base model's
        ``from_pretrained``, which returns a plain, unprotected model."""
        raise ConfigurationError(
            "ProtectedModel.from_pretrained would load the base model alone, without its keyed transform; load a "
            "protected checkpoint with kp_plugin.autoload.load_protected_auto(path, key), or build the base model "
            "and use kp_plugin.load_protected(path, model, key)"
        )

    def push_to_hub(self, repo_id: str, **hub_kwargs: Any):
        """Publish on the Hub with :func:`kp_plugin.hub.push_protected`
        (weights, native config, ``protection.json``, a model card; never
        the key; every file scanned first), under the method name
        transformers models have. Without it, the base model's own
        ``push_to_hub`` would be reached through attribute delegation and
        upload a repository with no ``protection.json`` that
        ``pull_protected`` cannot load. Takes ``push_protected``'s keywords
        (``private`` (default ``True``), ``token``, ``revision``,
        ``commit_message``, ``endpoint`` ...); transformers' ``use_temp_dir``
        and ``max_shard_size`` change nothing (one safetensors file).
        Returns ``push_protected``'s result."""
        from .hub import push_protected

        hub_kwargs.pop("use_temp_dir", None)
        hub_kwargs.pop("max_shard_size", None)
        _require_safetensors(hub_kwargs.pop("safe_serialization", True))
        return push_protected(self, repo_id, **hub_kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "keyed"):
                raise
            try:
                attribute = getattr(self.model, name)
            except AttributeError:
                if name in _KEYED_SETTINGS:  # the base has none of its own: the normalization and size it gets
                    return getattr(self.keyed, name)
                raise
            if name in IMAGE_METHODS and callable(attribute):
                return self._keyed_method(name, attribute)
            if name in _PARAMETER_NAME_METHODS and callable(attribute):
                return _PARAMETER_NAME_METHODS[name](attribute)
            return attribute

    def _keyed_method(self, name: str, method: Any) -> Any:
        """The base model's ``method`` (e.g. timm's ``forward_features``)
        with its images keyed and normalized as ``forward`` does: reached
        through attribute fall-through, it would see raw pixels."""

        @functools.wraps(method)
        def keyed(*args: Any, **kwargs: Any) -> Any:
            _refuse_export()
            if kwargs.get("pixel_values") is not None:
                kwargs["pixel_values"] = self._prepare(kwargs["pixel_values"])
            elif args:
                args = (self._prepare(args[0]), *args[1:])
            else:
                raise InputDtypeError(f"{name} expects images as the first argument or as pixel_values=")
            return method(*args, **kwargs)

        return keyed


def _require_safetensors(safe_serialization: bool) -> None:
    """transformers' ``safe_serialization=False`` asks for pickled weights,
    which protected checkpoints never are."""
    if not safe_serialization:
        raise ConfigurationError("protected checkpoints are always written as safetensors; leave "
                                 "safe_serialization=True")


def _parameter_dtype(model: nn.Module) -> Optional[torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def wrap_model(
    model: nn.Module,
    key: SecretKey,
    *,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    input_size: Optional[Sequence[int]] = None,
    check_range: bool = True,
) -> ProtectedModel:
    """Put the keyed transform in front of ``model``.

    mean/std (and the input size) come from timm's ``pretrained_cfg`` or an
    HF config when the model has one; otherwise pass them.

    Args:
        model: any image model taking normalized ``(B, C, H, W)`` input.
        key: the secret key.
        mean, std: normalization, when the model does not say.
        input_size: ``(C, H, W)``, when the model does not say.
        check_range: see :class:`KeyedInput`.

    Example:
        >>> model = wrap_model(timm.create_model("resnet18", num_classes=10), key)  # doctest: +SKIP
        >>> logits = model(images01)                                             # doctest: +SKIP
    """
    if isinstance(model, ProtectedModel):
        raise ConfigurationError("model is already protected; call model.unwrap() first to re-key it")
    if isinstance(model, nn.Module) and any(isinstance(m, KeyedInput) for m in model.modules()):
        # A ProtectedModel inside torch.compile / DDP / a container, or a
        # KeyedInput placed by hand: wrapping would apply a key twice.
        raise ConfigurationError(
            f"model ({type(model).__name__}) already contains a keyed transform (a KeyedInput, e.g. a protected "
            "model inside torch.compile, DDP or a container); wrapping it would apply a key twice: wrap the base "
            "model instead (kp_plugin.unwrap(model))"
        )
    if not isinstance(model, nn.Module):
        raise ConfigurationError(
            f"wrap_model takes an nn.Module, got {type(model).__name__}; build the model first (e.g. "
            "timm.create_model(name), or kp_plugin.timm.create_protected_model(name, key))"
        )
    require_key(key)
    explicit_size = input_size is not None
    if explicit_size:
        input_size = _checked_input_size(input_size)
    if mean is None and std is None:
        mean, std, input_size = _settings_saved_beside(model, key, input_size)
    mean, std, input_size = resolve_normalization(model, mean, std, input_size)
    if input_size is not None and not explicit_size and (
        input_size[-1] % key.block_size or input_size[-2] % key.block_size
    ):
        # The model's native size (e.g. 299 for Inception) need not suit the
        # key; images are resized by the caller, so compile on first use and
        # let a wrong size fail there with a BlockSizeError.
        input_size = None
    # timm's in_chans first: an input_size given with the key's channel count
    # says nothing about the model's first convolution.
    in_chans = getattr(model, "in_chans", None)
    model_channels = in_chans if isinstance(in_chans, int) and not isinstance(in_chans, bool) else None
    for channels in (model_channels, input_size[0] if input_size is not None else None):
        if channels is not None and channels != key.channels:
            raise ConfigurationError(
                f"the model takes {channels}-channel images but the key is for {key.channels} channels; "
                f"generate a key with SecretKey.generate(channels={channels})"
            )
    keyed = KeyedInput(key, mean=mean, std=std, input_size=input_size, check_range=check_range)
    return ProtectedModel(model, keyed)


def _file_beside_weights(config: Any, name: str) -> Optional[Path]:
    """The file ``name`` in the folder a transformers model was loaded from
    (its config's ``_name_or_path``), when there is one; ``None`` for a
    model loaded by Hub id, built from a config, or without that file."""
    source = getattr(config, "_name_or_path", None)
    if not isinstance(source, (str, os.PathLike)) or not str(source):
        return None
    path = Path(str(source)) / name
    return path if path.is_file() else None


def _settings_saved_beside(model: nn.Module, key: SecretKey, input_size: Optional[tuple]) -> tuple:
    """mean, std (and input size, unless given) from the ``protection.json``
    beside the folder a transformers model was loaded from (a protected
    checkpoint read with the base class's ``from_pretrained``), after
    checking it names ``key``: wrapped with the architecture's default
    normalization, or another key, it predicted wrongly without an error.
    ``(None, None, input_size)`` for other models."""
    import json

    config = getattr(model, "config", None)
    path = _file_beside_weights(config, "protection.json") if not isinstance(config, dict) else None
    try:
        saved = json.loads(path.read_text(encoding="utf-8")) if path is not None else None
    except (OSError, ValueError):  # unreadable: the usual normalization lookup, as before
        saved = None
    if not isinstance(saved, dict) or not isinstance(saved.get("fingerprint"), str):
        return None, None, input_size
    if saved["fingerprint"] != key.fingerprint:
        raise KeyMismatchError(
            f"this {type(model).__name__} was loaded from {path.parent}, a checkpoint protected with another key "
            f"(fingerprint {saved['fingerprint']}; the key given has {key.fingerprint}), so with this key it would "
            "predict wrongly. Load it with its owner's key (kp_plugin.autoload.load_protected_auto(path, key)); to "
            "put these weights behind this key on purpose, pass mean= and std= to wrap_model"
        )
    mean, std, size = saved.get("mean"), saved.get("std"), saved.get("input_size")
    if input_size is None and isinstance(size, list) and len(size) == 3:
        input_size = tuple(size)
    return mean, std, input_size


def protected_model_of(model: Any) -> Optional[ProtectedModel]:
    """The :class:`ProtectedModel` inside ``model``: itself, or the module
    that ``torch.compile`` (``_orig_mod``) or ``DistributedDataParallel`` /
    ``DataParallel`` (``.module``) wrap, at any depth; ``None`` if there is
    none."""
    for _ in range(8):
        if isinstance(model, ProtectedModel):
            return model
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(model, nn.Module) and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return None
    return None


def require_protected(model: Any, who: str) -> ProtectedModel:
    """:func:`protected_model_of` ``model``, or a :class:`ConfigurationError`
    saying that ``who`` needs one."""
    protected = protected_model_of(model)
    if protected is None:
        raise ConfigurationError(
            f"{who} expects a ProtectedModel (from wrap_model or load_protected), got {type(model).__name__}"
        )
    return protected


def unwrap(model: nn.Module) -> nn.Module:
    """The base model of a :class:`ProtectedModel`, also one wrapped by
    ``torch.compile`` or DDP (other modules unchanged)."""
    protected = protected_model_of(model)
    return protected.unwrap() if protected is not None else model
