"""Export a protected model for deployment: the base model alone, as ONNX or
a ``torch.export`` program, beside ``protection.json``; never the key.

Exporting the whole :class:`~kp_plugin.ProtectedModel` would bake the
key-derived permutation into the exported graph as a constant, so
``KeyedInput`` refuses to be exported or traced (:class:`KeyLeakError`).
What is exported instead takes the keyed, normalized images (``pixel_values``,
float ``(B, C, H, W)`` in the model's dtype: float32, or float16 for a
``.half()`` model; :func:`load_keyed_input` gives that dtype) and returns the logits (or, for a model that returns
several tensors, such as timm's ``features_only``, every one of them:
``output_0``, ``output_1``, ...); the licensed user runs the keyed transform in
front of it, from their key file:

    >>> from kp_plugin.export import export_protected, load_keyed_input
    >>> export_protected(model, "deploy/", format="onnx")              # doctest: +SKIP
    >>> keyed = load_keyed_input("deploy/", SecretKey.load("owner.key"))  # doctest: +SKIP
    >>> session = onnxruntime.InferenceSession("deploy/model.onnx")      # doctest: +SKIP
    >>> logits = session.run(None, {"pixel_values": keyed(images01).numpy()})[0]  # doctest: +SKIP

A ``pt2`` export loads back as a :class:`~kp_plugin.ProtectedModel` with
:func:`load_exported`. ONNX export needs ``onnx`` and ``onnxscript``
(``pip install "kp-plugin[onnx]"``); running it, ``onnxruntime``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ._files import remove_stale_temporaries
from .checkpoint import (PROTECTION_FILE, WEIGHTS_FILE, ProtectionConfig, _uncompiled, find_key_material, hash_file,
                         refuse_key_material, refuse_other_key_checkpoint, weights_digest)
from .errors import (BlockSizeError, CheckpointError, CheckpointWriteError, ConfigurationError, KeyLeakError,
                     UnsignedCheckpointWarning, exception_chain, first_line)
from .keys import SecretKey
from .module import KeyedInput, ProtectedModel, require_protected, wrap_model
from .objectives import logits_of

__all__ = ["export_protected", "load_exported", "load_keyed_input", "EXPORT_FORMATS", "INPUT_NAME", "OUTPUT_NAME"]

#: Formats and the file each writes.
EXPORT_FORMATS = {"onnx": "model.onnx", "pt2": "model.pt2"}
#: ``protection.json``'s ``extra`` entry with the SHA-256 of each exported
#: file it describes: a folder whose files come from two exports (one
#: interrupted between its renames, or files copied together) is refused on
#: loading, not served with the other export's key and normalization.
DIGESTS_FIELD = "exported_sha256"
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"


def _several_tensors(output: Any) -> bool:
    """Whether ``output`` is a list or tuple of several tensors (timm's
    ``features_only``: one feature map per stage), all of which are exported."""
    return (isinstance(output, (list, tuple)) and len(output) > 1
            and all(isinstance(item, torch.Tensor) for item in output))


class _Outputs(nn.Module):
    """The base model with one tensor in (``pixel_values``) and the logits
    out (also from a transformers output object, dict or tuple), or every
    tensor of a model that returns several: the first alone would be
    served as if it were the model. A headless transformers model (an
    output object without logits, e.g. ``ViTModel``'s ``last_hidden_state``
    and ``pooler_output``) exports each of its tensors under its own name."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.named_outputs: Optional[list] = None  # a headless model's output names, from the first call

    def forward(self, pixel_values: torch.Tensor) -> Union[torch.Tensor, tuple]:
        output = self.model(pixel_values)
        if _several_tensors(output):
            return tuple(output)
        if isinstance(output, dict) and not isinstance(output.get("logits"), torch.Tensor):
            named = {name: value for name, value in output.items() if isinstance(value, torch.Tensor)}
            if named:
                if self.named_outputs is None:  # the eager first call; an export's trace finds it set
                    self.named_outputs = list(named)
                values = tuple(named.values())
                return values if len(values) > 1 else values[0]
        return logits_of(output)


def output_names(count: int) -> list:
    """The exported outputs' names: ``["logits"]`` for one output, else
    ``output_0`` .. ``output_{count - 1}`` (e.g. a ``features_only`` model's
    feature maps, in the model's order)."""
    return [OUTPUT_NAME] if count == 1 else [f"output_{i}" for i in range(count)]


class _ExportedProgram(nn.Module):
    """A loaded ``pt2`` program as a module: it was exported in eval mode and
    keeps that behaviour, so ``train()`` / ``eval()`` (which the program's own
    module refuses) only set the flag."""

    def __init__(self, program_module: nn.Module, input_size: Optional[tuple] = None,
                 batch_size: Optional[int] = None) -> None:
        super().__init__()
        self.program = program_module
        self.input_size = tuple(input_size) if input_size else None
        self.batch_size = batch_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # The program's own guards fail with a bare AssertionError.
        _check_export_shape(pixel_values, self.input_size, self.batch_size)
        return self.program(pixel_values)

    def train(self, mode: bool = True) -> "_ExportedProgram":
        self.training = mode
        return self


def _check_export_shape(images: torch.Tensor, input_size: Optional[tuple], batch_size: Optional[int]) -> None:
    """:class:`BlockSizeError` for images an export cannot take: one image
    instead of a batch, another size than it was exported at, another batch
    size than a fixed-batch export's."""
    if not isinstance(images, torch.Tensor):
        return
    if images.dim() == 3:
        raise BlockSizeError(f"an export takes a batch of images (B, C, H, W); got one image {tuple(images.shape)}: "
                             "pass images.unsqueeze(0)")
    if input_size and images.dim() == 4 and tuple(images.shape[1:]) != tuple(input_size):
        channels = "" if images.shape[1] == input_size[0] else f" ({input_size[0]} channels)"
        raise BlockSizeError(
            f"this export takes images of {'x'.join(map(str, input_size))} (C x H x W), the size it was "
            f"exported at, got {'x'.join(map(str, images.shape[1:]))}; resize them to that size{channels}"
        )
    if batch_size is not None and images.dim() == 4 and images.shape[0] != batch_size:
        raise BlockSizeError(
            f"this export takes batches of exactly {batch_size} images (it was exported with batch_size={batch_size}), "
            f"got {images.shape[0]}; pad or split the batch, or export again without a fixed batch size"
        )


def _parameter(model: nn.Module) -> Optional[torch.Tensor]:
    return next((p for p in model.parameters() if p.is_floating_point()), None)


@contextlib.contextmanager
def _inference_mode_of(model: nn.Module):
    """``model.eval()`` for the export (dropout off, batch-norm running
    statistics), then back to whatever it was."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def _export_onnx(wrapper: nn.Module, example: torch.Tensor, path: Path, dynamic_shapes: Any,
                 opset_version: Optional[int], names: list) -> None:
    try:
        import onnx
        import onnxscript  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            'ONNX export needs onnx and onnxscript: pip install "kp-plugin[onnx]" (or pip install onnx onnxscript); '
            "format='pt2' needs nothing more than torch"
        ) from None
    kwargs: dict = {"opset_version": opset_version} if opset_version is not None else {}
    # The exporter reports its progress on stdout, and onnxscript logs a
    # failed opset conversion with a traceback at warning level (the opset is
    # checked below, with an error that says what to do): a library call
    # keeps quiet.
    quiet = logging.getLogger("onnxscript")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.ExitStack() as restore:
        restore.callback(quiet.setLevel, level)
        torch.onnx.export(
            wrapper, (example,), str(path), dynamo=True, input_names=[INPUT_NAME], output_names=names,
            dynamic_shapes=dynamic_shapes, external_data=False, verbose=False, **kwargs,
        )
    if opset_version is not None:
        # The exporter writes its own opset when it cannot convert to the one
        # asked for (a warning only): the file would not be what was asked.
        written = next((entry.version for entry in onnx.load(str(path), load_external_data=False).opset_import
                        if entry.domain in ("", "ai.onnx")), None)
        if written != opset_version:
            raise ConfigurationError(
                f"the ONNX exporter wrote opset {written}, not the {opset_version} asked for (it cannot convert this "
                f"model to that opset); pass opset_version={written} (kp export --opset {written}) or leave it out"
            )


def export_protected(
    model: ProtectedModel,
    directory: Union[str, os.PathLike],
    *,
    format: str = "onnx",
    batch_size: Optional[int] = None,
    opset_version: Optional[int] = None,
    metadata: Optional[dict] = None,
    overwrite: bool = False,
) -> Path:
    """Export ``model``'s base model (not its keyed input) for deployment.

    Writes ``model.onnx`` (or ``model.pt2``), whose input ``pixel_values`` is
    the output of the keyed transform and normalization and whose output is
    ``logits`` (a model returning a list or tuple of tensors, such as timm's
    ``features_only``, has them all: ``output_0`` .. ``output_N``, named in
    ``protection.json``'s ``extra.output_names``; a headless transformers
    model, such as ``ViTModel``, its output's tensors under their own names,
    e.g. ``last_hidden_state`` and ``pooler_output``), and
    ``protection.json`` (scheme, block size, the key's fingerprint, mean/std,
    input size, the exported file's SHA-256, checked on loading; never the
    key). Every written file is scanned for key material before this returns.

    Args:
        model: a :class:`ProtectedModel` that knows its input size (the
            size it was last called at; else ``input_size=``, the checkpoint's,
            or timm's ``pretrained_cfg``).
        directory: created if needed. An export of this key's model there
            is replaced; one of another key's, a model file its
            ``protection.json`` does not record, or a ``protection.json``
            that cannot be read, is refused unless ``overwrite=True`` (that
            model would be lost). Both formats of
            one model may share a folder; a folder holding the other
            format's export of another model (another key, weights,
            architecture, classes, input size or normalization) is refused,
            since its one ``protection.json`` describes the last export.
        format: ``"onnx"`` or ``"pt2"`` (``torch.export.save``).
        batch_size: a fixed batch size; default ``None``, any batch size.
        opset_version: ONNX opset (default: the exporter's).
        metadata: extra public values for ``protection.json``'s ``extra``.
        overwrite: replace an export of another key's model in ``directory``.

    Returns:
        The path of the exported model file.

    Raises:
        ConfigurationError: not a ProtectedModel, unknown format, unknown
            input size (or one the model fails on), the ONNX exporter is not
            installed, or ``directory`` holds another model's export.
        KeyLeakError: a written file contains key material (it is removed).
        CheckpointError: ``directory`` holds an export of another key's model,
            or files no export there records (and ``overwrite`` is not set).
        CheckpointWriteError: the files cannot be written (a full disk);
            the export there before, if any, is unchanged.
    """
    model = require_protected(model, "export_protected")  # also through torch.compile / DDP
    if format not in EXPORT_FORMATS:
        raise ConfigurationError(f"unknown export format {format!r}; choose from {', '.join(EXPORT_FORMATS)}")
    if batch_size is not None and batch_size < 1:
        raise ConfigurationError(f"batch_size must be at least 1, got {batch_size}")
    if opset_version is not None and format != "onnx":
        raise ConfigurationError(f"opset_version is an ONNX setting; a {format!r} export has none")
    config = ProtectionConfig.from_model(model, **dict(metadata or {}))
    config.to_json()  # metadata JSON cannot hold: refused before exporting, not when protection.json is written
    config.weights_digest = weights_digest(_uncompiled(model.unwrap()))
    size = config.input_size
    if not size:
        raise ConfigurationError(
            "the model does not know its input size: wrap it with input_size=(C, H, W), or call it once on "
            "images of the size it will serve, before exporting"
        )
    base = model.unwrap()
    parameter = _parameter(base)
    dtype = parameter.dtype if parameter is not None else torch.float32
    device = parameter.device if parameter is not None else torch.device("cpu")
    # Batch 2 as the example: torch.export specializes sizes 0 and 1.
    example = torch.zeros((batch_size or 2, *size), dtype=dtype, device=device)
    dynamic_shapes = None if batch_size is not None else ({0: torch.export.Dim("batch")},)
    wrapper = _Outputs(base)
    with _inference_mode_of(wrapper), torch.no_grad():  # how many outputs, before naming them
        try:
            produced = wrapper(example)
        except (KeyLeakError, ConfigurationError):
            raise
        except Exception as exc:
            raise ConfigurationError(
                f"{type(base).__name__} fails on {size[1]}x{size[2]} images, the input size recorded for it "
                f"({type(exc).__name__}: {first_line(exc)}); call the protected model once on images of the size "
                "it will serve (or wrap it with input_size=(C, H, W)) before exporting"
            ) from exc
    names = wrapper.named_outputs or output_names(len(produced) if isinstance(produced, tuple) else 1)
    config.extra.update(exported_format=format, exported_file=EXPORT_FORMATS[format], input_name=INPUT_NAME,
                        input_dtype=str(dtype).removeprefix("torch."),
                        **({"batch_size": batch_size} if batch_size is not None else {}),
                        **({"output_name": names[0]} if len(names) == 1 else {"output_names": names}))

    directory = Path(directory)
    if (directory / WEIGHTS_FILE).exists():
        raise ConfigurationError(
            f"{directory} holds a checkpoint ({WEIGHTS_FILE}); export into another folder (e.g. "
            f"{directory / 'deploy'}): the export's protection.json would replace the checkpoint's"
        )
    kept = _check_other_export(directory, format, config)
    target = directory / EXPORT_FORMATS[format]
    if directory.is_dir():  # a key file (any key's) there would be served or published beside the model
        refuse_key_material(directory, model.key, remedy="move it out of the folder first (nothing was written)")
    if not overwrite:
        refuse_other_key_checkpoint(directory, config.fingerprint,
                                    remedy="pass overwrite=True (kp export --force) to replace that export")
        _refuse_unrecorded_files(directory, target)
    renamed = 0  # files already moved into place
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(directory, [_SCRATCH])  # the scratch folders killed exports left
        with tempfile.TemporaryDirectory(dir=directory, prefix=f".{_SCRATCH}.{os.getpid()}.", suffix=".tmp") as scratch:
            staged = Path(scratch) / target.name
            _stage(wrapper, example, staged, format, dynamic_shapes, opset_version, names, type(base).__name__)
            config.extra[DIGESTS_FIELD] = {**kept, target.name: _sha256(staged)}
            config.sign(model.key).save(scratch)
            leaks = find_key_material(scratch, model.key)
            if leaks:  # the staged files go with the scratch directory
                raise KeyLeakError(f"the export contained key material ({', '.join(p.name for p in leaks)}); "
                                   "nothing was written")
            for produced in sorted(Path(scratch).iterdir()):
                os.replace(produced, directory / produced.name)
                renamed += 1
    except BaseException as exc:
        if created and not renamed:  # a failed or interrupted export leaves no new, empty folder
            shutil.rmtree(directory, ignore_errors=True)
        if not isinstance(exc, OSError) or isinstance(exc, CheckpointError):
            raise
        if renamed:  # some files already replaced: the folder mixes two exports (loads refuse it)
            raise CheckpointWriteError(
                f"cannot finish the export into {directory} ({first_line(exc)}): some of its files were already "
                "replaced, so the folder now mixes two exports and loading it is refused; export again"
            ) from None
        raise CheckpointWriteError(
            f"cannot write the export into {directory} ({first_line(exc)}); the export there before, if any, is "
            "unchanged: free some space or choose another folder"
        ) from None
    return target


def _stage(wrapper: nn.Module, example: torch.Tensor, staged: Path, format: str, dynamic_shapes: Any,
           opset_version: Optional[int], names: list, architecture: str) -> None:
    """Export ``wrapper`` into the file ``staged`` (in the scratch folder)."""
    with _inference_mode_of(wrapper), torch.no_grad():
        try:
            if format == "onnx":
                _export_onnx(wrapper, example, staged, dynamic_shapes, opset_version, names)
            else:
                program = torch.export.export(wrapper, (example,), dynamic_shapes=dynamic_shapes)
                # Into memory first: a failed write inside torch's archive
                # writer (a full disk) aborts the process.
                buffer = io.BytesIO()
                torch.export.save(program, buffer)
                staged.write_bytes(buffer.getvalue())
        except (KeyLeakError, ConfigurationError):
            raise
        except Exception as exc:
            failed_write = _caused_by_os_error(exc)
            if failed_write is not None:
                raise OSError(first_line(failed_write)) from None
            if dynamic_shapes is None:
                raise
            # Some architectures fix the batch size in their graph.
            raise ConfigurationError(
                f"exporting {architecture} for any batch size failed ({type(exc).__name__}: {first_line(exc)}); "
                "pass batch_size=N (kp export --batch-size N) for a fixed batch size"
            ) from exc


def _caused_by_os_error(exc: BaseException) -> Optional[BaseException]:
    """The ``OSError`` (a failed write) in ``exc``'s chain, if any."""
    return next((error for error in exception_chain(exc) if isinstance(error, OSError)), None)


#: What must agree for two exports to share one protection.json.
_SAME_MODEL_FIELDS = ("scheme", "block_size", "channels", "fingerprint", "mean", "std", "input_size", "architecture",
                      "num_classes", "weights_digest")


#: Scratch folders of exports in progress, ``.export.PID.XXXX.tmp`` in the output folder (a whole staged model
#: each), named like kp's other temporaries so that the next export removes those of killed processes.
_SCRATCH = "export"


def _refuse_unrecorded_files(directory: Path, target: Path) -> None:
    """:class:`CheckpointError` when the export would replace files no
    export of kp-plugin there accounts for: a ``protection.json`` that cannot
    be read, or a model file its ``protection.json`` does not record (a model
    made by other means, or edited since). ``overwrite=True`` replaces them."""
    remedy = "choose another folder, or pass overwrite=True (kp export --force) to replace it"
    try:
        existing = ProtectionConfig.load(directory) if (directory / PROTECTION_FILE).exists() else None
    except CheckpointError:
        raise CheckpointError(f"{directory / PROTECTION_FILE} cannot be read (corrupt, or not kp-plugin's), and the "
                              f"export would replace it; {remedy}") from None
    if not target.is_file():
        return
    recorded = existing.extra.get(DIGESTS_FIELD) if existing is not None else None
    if not isinstance(recorded, dict) or recorded.get(target.name) != _sha256(target):
        raise CheckpointError(
            f"{target} is not an export that {directory / PROTECTION_FILE} records (made by other means, or changed "
            f"since), and it would be replaced; {remedy}"
        )


def _check_other_export(directory: Path, format: str, config: ProtectionConfig) -> dict:
    """Refuse to write beside the other format's export of another model:
    the folder has one protection.json, and it would then describe the new
    export only, so the old file would be served with another key's
    transform (or another normalization) without any error. Returns the
    recorded digests of the other format's file, which stays beside this
    export (of the same model)."""
    others = [directory / name for fmt, name in EXPORT_FORMATS.items() if fmt != format and (directory / name).exists()]
    if not others:
        return {}
    try:
        existing = ProtectionConfig.load(directory).to_dict()
    except CheckpointError:
        existing = {}
    new = config.to_dict()
    differs = [name for name in _SAME_MODEL_FIELDS if existing.get(name) != new[name]]
    if differs:
        raise ConfigurationError(
            f"{directory} already holds {others[0].name}, the export of another model (its {', '.join(differs)} "
            f"differ{'s' if len(differs) == 1 else ''} or its protection.json is missing), and the folder's one "
            "protection.json would then describe only this export: export into a new folder, or remove "
            f"{others[0].name} first"
        )
    extra = existing.get("extra")
    recorded = extra.get(DIGESTS_FIELD) if isinstance(extra, dict) else None
    names = {path.name for path in others}
    return {name: value for name, value in recorded.items() if name in names} if isinstance(recorded, dict) else {}


def _sha256(path: Path) -> str:
    return hash_file(path, hashlib.sha256()).hexdigest()


def _check_exported_files(directory: Path, config: ProtectionConfig, names: tuple) -> None:
    """Each of ``names`` present in ``directory`` is the file its
    ``protection.json`` was written with (exports from before the digests
    were recorded are not checked)."""
    recorded = config.extra.get(DIGESTS_FIELD)
    if recorded is None:
        return
    if not isinstance(recorded, dict):
        raise CheckpointError(f"{directory / PROTECTION_FILE} is corrupt (its {DIGESTS_FIELD} is not a mapping); "
                              "export the model again")
    for name in names:
        path = directory / name
        if not path.is_file():
            continue
        if name not in recorded or _sha256(path) != recorded[name]:
            raise CheckpointError(
                f"{path} is not the file {PROTECTION_FILE} beside it was written with (SHA-256 differs"
                f"{'' if name in recorded else ': not recorded there'}): the folder mixes two exports (one was "
                "interrupted, or files were copied together) or the file was changed; export the model again "
                "into an empty folder"
            )


#: A checkpoint's remedies, as an export's (its files are made by exporting again).
_EXPORT_REMEDIES = (("give the folder written by save_protected / kp protect",
                     "give the folder written by export_protected / kp export"),
                    ("save the model again with save_protected", "export the model again (export_protected / kp export)"),
                    ("restore it from the save, or save the model again", "export the model again"),
                    ("to sign it, save the model again with save_protected", "to sign it, export the model again"))


def _checked_config(directory: Path, key: SecretKey, allow_wrong_key: bool,
                    names: tuple = tuple(EXPORT_FORMATS.values())) -> ProtectionConfig:
    if (directory / WEIGHTS_FILE).is_file() and not any((directory / name).exists() for name in names):
        raise CheckpointError(
            f"{directory} holds a protected checkpoint ({WEIGHTS_FILE}), not an export: load it with "
            "kp_plugin.load_protected (or load_protected_timm / load_protected_auto), or export it first with "
            "export_protected / kp export"
        )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UnsignedCheckpointWarning)
            config = ProtectionConfig.load(directory)
            if not allow_wrong_key:
                config.check_key(key)
    except CheckpointError as exc:
        raise CheckpointError(_as_export_remedy(str(exc))) from None
    for warning in caught:  # said again, with an export's remedy
        warnings.warn(_as_export_remedy(str(warning.message)), warning.category, stacklevel=3)
    _check_exported_files(directory, config, names)
    return config


def _as_export_remedy(message: str) -> str:
    for checkpoint_remedy, export_remedy in _EXPORT_REMEDIES:
        message = message.replace(checkpoint_remedy, export_remedy)
    return message


def load_keyed_input(directory: Union[str, os.PathLike], key: SecretKey, *,
                     allow_wrong_key: bool = False) -> KeyedInput:
    """The keyed transform + normalization to run in front of an exported
    model: a :class:`KeyedInput` with the export's mean, std and input size,
    after checking that ``key`` is the one it was protected with.

    Raises:
        KeyMismatchError: ``key`` is not the export's key.
        CheckpointError: ``protection.json`` is missing or corrupt, or an
            exported file beside it is not the one it was written with
            (SHA-256 recorded at export).
    """
    config = _checked_config(Path(directory), key, allow_wrong_key)
    keyed = _ExportKeyedInput(key, mean=config.mean, std=config.std, input_size=config.input_size_for(key))
    keyed.batch_size = config.extra.get("batch_size")
    dtype = getattr(torch, str(config.extra.get("input_dtype", "float32")), None)
    keyed.export_dtype = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32
    return keyed


class _ExportKeyedInput(KeyedInput):
    """The keyed input of an export: it takes the one image size (and, if
    fixed, the batch size) the model was exported at, and gives the dtype
    the exported model takes (float32, or float16 for a half export), as
    onnxruntime refuses any other with its own ``INVALID_ARGUMENT``, after
    the transform ran. Float64 images (``np.asarray(image) / 255``) too."""

    batch_size: Optional[int] = None
    export_dtype: torch.dtype = torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_export_shape(x, self.input_size, self.batch_size)
        out = super().forward(x)
        return out.to(self.export_dtype) if out.dtype != self.export_dtype else out


def load_exported(directory: Union[str, os.PathLike], key: SecretKey, *,
                  allow_wrong_key: bool = False) -> ProtectedModel:
    """Load a ``format="pt2"`` export as a :class:`ProtectedModel` (images in
    [0, 1] in, logits out) with ``key``. The program computes as it was
    exported, in eval mode (dropout off, batch-norm running statistics);
    ``train()`` / ``eval()`` change nothing in it.

    Raises:
        KeyMismatchError: ``key`` is not the export's key.
        CheckpointError: ``model.pt2`` or ``protection.json`` is missing or
            corrupt, or ``model.pt2`` is not the file ``protection.json`` was
            written with (an ONNX export runs with onnxruntime and
            :func:`load_keyed_input`).
    """
    directory = Path(directory)
    config = _checked_config(directory, key, allow_wrong_key, (EXPORT_FORMATS["pt2"],))
    path = directory / EXPORT_FORMATS["pt2"]
    if not path.is_file():
        onnx = (directory / EXPORT_FORMATS["onnx"]).is_file()
        raise CheckpointError(
            f"{directory} holds no {path.name}"
            + (" but an ONNX export: run it with onnxruntime, feeding it load_keyed_input(directory, key)(images)"
               if onnx else ": export the model again with format='pt2' (kp export --format pt2)")
        )
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # torch raises several types for a damaged archive
        raise CheckpointError(
            f"{path} is corrupt or not a torch.export program ({type(exc).__name__}: {exc})"
        ) from None
    model = wrap_model(_ExportedProgram(program.module(), config.input_size, config.extra.get("batch_size")), key,
                       mean=config.mean, std=config.std,
                       input_size=config.input_size_for(key))
    return model.eval()
