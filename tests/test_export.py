"""Deployment export: the base model as ONNX / torch.export beside
protection.json, never the key; the wrapped model refuses to be exported."""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from kp_plugin import BlockSizeError, KeyedInput, KeyLeakError, KeyMismatchError, SecretKey, save_protected, wrap_model
from kp_plugin.checkpoint import CheckpointError, ProtectionConfig, find_key_material
from kp_plugin.errors import CheckpointWriteError, ConfigurationError, exception_chain
from kp_plugin.export import export_protected, load_exported, load_keyed_input
from kp_plugin.transforms import apply_transform

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = (3, 16, 16)


def _caused_by(exc: BaseException, error_type: type) -> bool:
    return any(isinstance(error, error_type) for error in exception_chain(exc))


def _keyed_reference(x: torch.Tensor, key: SecretKey, keyed: KeyedInput) -> torch.Tensor:
    mean = torch.tensor(keyed.mean)[:, None, None]
    std = torch.tensor(keyed.std)[:, None, None]
    return (apply_transform(x, key) - mean) / std


@pytest.fixture
def protected(tiny_timm_model, shuffle_np_key):
    return wrap_model(tiny_timm_model, shuffle_np_key, input_size=SIZE)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Exporting a model while it is in training mode")
@pytest.mark.parametrize("how", ["torch.export", "onnx", "jit.trace", "fx", "jit.script", "jit.script keyed"])
def test_the_wrapped_model_refuses_to_be_exported_and_still_works(how, tiny_timm_model, shuffle_np_key, tmp_path):
    # No input_size: the plan is first compiled inside the trace, where a
    # fake-tensor plan used to stay registered and make eager calls garbage.
    model = wrap_model(tiny_timm_model, shuffle_np_key)
    x = torch.rand(2, *SIZE)
    with pytest.raises(Exception) as caught:
        if how == "torch.export":
            torch.export.export(model, (x,))
        elif how == "onnx":
            pytest.importorskip("onnxscript")
            torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=True)
        elif how == "fx":
            torch.fx.symbolic_trace(model)
        elif how.startswith("jit.script"):
            torch.jit.script(model.keyed if how.endswith("keyed") else model)
        else:
            torch.jit.trace(model, (x,))
    assert _caused_by(caught.value, KeyLeakError), caught.value
    assert "export_protected" in str(caught.value)
    assert list(tmp_path.iterdir()) == []
    torch.testing.assert_close(model.keyed(x), _keyed_reference(x, shuffle_np_key, model.keyed))


def test_a_fake_tensor_trace_leaves_the_plan_real(shuffle_np_key):
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    keyed = KeyedInput(shuffle_np_key, mean=0.5, std=0.5, check_range=False)
    x = torch.rand(3, *SIZE)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        out = keyed(mode.from_tensor(x))
    assert out.shape == x.shape
    assert not any(isinstance(b, FakeTensor) for b in keyed.buffers())
    for _ in range(3):
        torch.testing.assert_close(keyed(x), _keyed_reference(x, shuffle_np_key, keyed))


def test_pt2_export_loads_back_with_the_key_and_holds_no_key(protected, shuffle_np_key, tmp_path):
    protected.train()
    path = export_protected(protected, tmp_path / "deploy", format="pt2", metadata={"dataset": "digits"})
    assert path == tmp_path / "deploy" / "model.pt2"
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt2", "protection.json"]
    assert find_key_material(path.parent, shuffle_np_key) == []
    assert protected.training and protected.unwrap().training  # the export ran in eval mode, then put it back
    config = ProtectionConfig.load(path.parent)
    assert config.fingerprint == shuffle_np_key.fingerprint and config.input_size == list(SIZE)
    assert config.extra["dataset"] == "digits" and config.extra["exported_format"] == "pt2"

    protected.eval()
    loaded = load_exported(path.parent, shuffle_np_key)
    loaded.train()  # the exported program keeps its eval-mode computation
    loaded.eval()
    for batch in (1, 5):  # any batch size
        x = torch.rand(batch, *SIZE)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), protected(x))
    with pytest.raises(BlockSizeError, match=r"takes images of 3x16x16.*got 3x32x32"):
        loaded(torch.rand(2, 3, 32, 32))  # the program's guard: a bare AssertionError
    with pytest.raises(KeyMismatchError):
        load_exported(path.parent, SecretKey.generate_like(shuffle_np_key))
    wrong = load_exported(path.parent, SecretKey.generate_like(shuffle_np_key), allow_wrong_key=True)
    x = torch.rand(4, *SIZE)
    assert not torch.allclose(wrong(x), loaded(x))


def test_onnx_export_runs_in_onnxruntime_behind_the_keyed_input(protected, shuffle_np_key, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = export_protected(protected, tmp_path, format="onnx")
    assert find_key_material(tmp_path, shuffle_np_key) == []
    session = ort.InferenceSession(str(path))
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    keyed = load_keyed_input(tmp_path, shuffle_np_key)
    protected.eval()
    x = torch.rand(3, *SIZE)
    logits = session.run(None, {"pixel_values": keyed(x).numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), protected(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(KeyMismatchError):
        load_keyed_input(tmp_path, SecretKey.generate_like(shuffle_np_key))
    with pytest.raises(CheckpointError, match="onnxruntime"):
        load_exported(tmp_path, shuffle_np_key)
    # Another size passed the keyed input and failed in onnxruntime with its own INVALID_ARGUMENT.
    with pytest.raises(BlockSizeError, match="this export takes images of 3x16x16.*got 3x32x32"):
        keyed(torch.rand(2, 3, 32, 32))


def test_export_of_a_transformers_model_returns_its_logits(tmp_path):
    pytest.importorskip("transformers")
    from hf_fixtures import BLOCK_SIZE, IMAGE_SIZE, tiny_vit

    key = SecretKey.generate(block_size=BLOCK_SIZE)
    model = wrap_model(tiny_vit(num_labels=4), key, mean=0.5, std=0.5, input_size=(3, IMAGE_SIZE, IMAGE_SIZE)).eval()
    export_protected(model, tmp_path, format="pt2")
    assert find_key_material(tmp_path, key) == []
    x = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(tmp_path, key)(x), model(x).logits)


def test_export_errors_say_what_to_do(tiny_timm_model, tiny_cnn, shuffle_np_key, tmp_path):
    with pytest.raises(ConfigurationError, match="ProtectedModel"):
        export_protected(tiny_timm_model, tmp_path)
    unsized = wrap_model(tiny_cnn, shuffle_np_key, mean=0.5, std=0.5)  # no pretrained_cfg to give a size
    with pytest.raises(ConfigurationError, match="input_size"):
        export_protected(unsized, tmp_path, format="pt2")
    with pytest.raises(ConfigurationError, match="onnx, pt2"):
        export_protected(wrap_model(tiny_timm_model, shuffle_np_key, input_size=SIZE), tmp_path, format="tflite")
    with pytest.raises(CheckpointError):
        load_exported(tmp_path, shuffle_np_key)  # nothing there


class _FixedBatch(torch.nn.Module):
    """A model whose graph hard-codes a batch of 2."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3 * 16 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.reshape(2, -1))


def test_a_graph_with_a_fixed_batch_size_is_told_to_pass_one(shuffle_np_key, tmp_path):
    model = wrap_model(_FixedBatch(), shuffle_np_key, mean=0.5, std=0.5, input_size=SIZE)
    with pytest.raises(ConfigurationError, match="batch_size=N"):
        export_protected(model, tmp_path, format="pt2")
    export_protected(model, tmp_path, format="pt2", batch_size=2)
    x = torch.rand(2, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(tmp_path, shuffle_np_key)(x), model(x))


def test_a_damaged_pt2_file_is_a_checkpoint_error(protected, shuffle_np_key, tmp_path):
    path = export_protected(protected, tmp_path, format="pt2")
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(CheckpointError, match="model.pt2"):
        load_exported(tmp_path, shuffle_np_key)


def test_a_compiled_model_exports_as_its_protected_model(protected, shuffle_np_key, tmp_path):
    export_protected(torch.compile(protected), tmp_path, format="pt2")  # the compiled module is never run
    x = torch.rand(2, *SIZE)
    protected.eval()
    with torch.no_grad():
        torch.testing.assert_close(load_exported(tmp_path, shuffle_np_key)(x), protected(x))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_both_formats_of_one_model_share_a_folder_but_another_models_export_is_refused(
        protected, tiny_timm_model, shuffle_np_key, tmp_path):
    pytest.importorskip("onnxscript")
    deploy = tmp_path / "deploy"
    export_protected(protected, deploy, format="onnx")
    export_protected(protected, deploy, format="pt2")  # the same model: one protection.json fits both
    assert {p.name for p in deploy.iterdir()} == {"model.onnx", "model.pt2", "protection.json"}

    other = tmp_path / "other"
    export_protected(protected, other, format="onnx")
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    another_key = SecretKey.generate_like(shuffle_np_key)
    with pytest.raises(ConfigurationError, match=r"already holds model\.onnx.*fingerprint.*new folder") as caught:
        export_protected(wrap_model(tiny_timm_model, another_key, input_size=SIZE), other, format="pt2")
    assert another_key._material.hex() not in str(caught.value)
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before  # nothing written, nothing lost
    # onnx over another key's onnx: refused (that model would be lost) unless asked
    with pytest.raises(CheckpointError, match=r"another key.*overwrite=True \(kp export --force\)"):
        export_protected(wrap_model(tiny_timm_model, another_key, input_size=SIZE), other, format="onnx")
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before
    export_protected(wrap_model(tiny_timm_model, another_key, input_size=SIZE), other, format="onnx", overwrite=True)
    assert ProtectionConfig.load(other).fingerprint == another_key.fingerprint
    # the same key's model with other weights in the other format: two models under one protection.json
    retrained = wrap_model(copy.deepcopy(tiny_timm_model), another_key, input_size=SIZE)
    with torch.no_grad():
        next(retrained.parameters()).add_(1.0)
    with pytest.raises(ConfigurationError, match="weights_digest differs"):
        export_protected(retrained, other, format="pt2")
    export_protected(retrained, other, format="onnx")  # this key's own export is replaced, as a save is


def test_an_opset_the_exporter_cannot_write_is_an_error_not_another_file(protected, tmp_path):
    # The dynamo exporter fell back to its own opset (18) with a warning for
    # opset_version=17 or 999, and the file claimed to be what was asked.
    pytest.importorskip("onnxscript")
    with pytest.raises(ConfigurationError, match="not the 999 asked for"):
        export_protected(protected, tmp_path / "far", format="onnx", opset_version=999)
    assert not (tmp_path / "far" / "model.onnx").exists()


def test_exporting_into_the_checkpoint_folder_itself_is_refused(protected, tmp_path):
    # Its protection.json (with the weights' digest) was replaced by the
    # export's, turning the checkpoint's consistency check off.
    save_protected(protected, tmp_path)
    before = (tmp_path / "protection.json").read_bytes()
    with pytest.raises(ConfigurationError, match="another folder"):
        export_protected(protected, tmp_path, format="pt2")
    assert (tmp_path / "protection.json").read_bytes() == before


def test_every_feature_map_of_a_features_only_model_is_exported(shuffle_np_key, tmp_path):
    # Only the first feature map was exported, under the name "logits".
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    timm = pytest.importorskip("timm")
    base = timm.create_model("test_resnet", features_only=True, out_indices=(1, 2))
    model = wrap_model(base, shuffle_np_key, input_size=SIZE).eval()
    x = torch.rand(2, *SIZE)
    with torch.no_grad():
        expected = model(x)
    path = export_protected(model, tmp_path / "onnx", format="onnx")
    session = ort.InferenceSession(str(path))
    assert [o.name for o in session.get_outputs()] == ["output_0", "output_1"]
    assert ProtectionConfig.load(tmp_path / "onnx").extra["output_names"] == ["output_0", "output_1"]
    outputs = session.run(None, {"pixel_values": load_keyed_input(tmp_path / "onnx", shuffle_np_key)(x).numpy()})
    assert len(outputs) == len(expected) == 2
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)
    export_protected(model, tmp_path / "pt2", format="pt2")
    loaded = load_exported(tmp_path / "pt2", shuffle_np_key)(x)
    assert len(loaded) == 2
    for got, want in zip(loaded, expected):
        torch.testing.assert_close(got, want)


def test_a_vit_made_for_another_size_exports_before_its_first_call(tmp_path):
    # Recorded at timm's stale 224, the export failed with advice to fix
    # the batch size.
    timm = pytest.importorskip("timm")
    key = SecretKey(bytes(range(32)), block_size=8, scheme="shuffle+np")
    base = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3,
                             num_classes=3)
    model = wrap_model(base, key).eval()
    export_protected(model, tmp_path, format="pt2")
    assert ProtectionConfig.load(tmp_path).input_size == [3, 32, 32]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(tmp_path, key)(x), model(x))


def test_a_size_the_model_cannot_take_is_named_before_exporting(shuffle_np_key, tmp_path):
    # It surfaced from inside the exporter, with advice to fix the batch size.
    too_small = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 5), torch.nn.Conv2d(4, 4, 5), torch.nn.Flatten())
    model = wrap_model(too_small, shuffle_np_key, mean=0.5, std=0.5, input_size=(3, 4, 4))
    with pytest.raises(ConfigurationError, match="fails on 4x4 images") as info:
        export_protected(model, tmp_path, format="pt2")
    assert "batch_size" not in str(info.value)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_folder_mixing_two_exports_is_refused_on_loading(protected, tiny_timm_model, shuffle_np_key, tmp_path):
    pytest.importorskip("onnxscript")
    deploy, other = tmp_path / "deploy", tmp_path / "other"
    export_protected(protected, deploy, format="pt2")
    export_protected(protected, deploy, format="onnx")  # the pt2's digest is kept beside the onnx's
    load_exported(deploy, shuffle_np_key)
    load_keyed_input(deploy, shuffle_np_key)
    another_key = SecretKey.generate_like(shuffle_np_key)
    retrained = wrap_model(copy.deepcopy(tiny_timm_model), another_key, input_size=SIZE)
    with torch.no_grad():
        next(retrained.parameters()).add_(1.0)
    export_protected(retrained, other, format="pt2")
    export_protected(retrained, other, format="onnx")
    # An export interrupted between its renames: the new model file beside the
    # old protection.json (another key's transform, served without an error).
    for name in ("model.pt2", "model.onnx"):
        mixed = tmp_path / f"mixed-{name}"
        mixed.mkdir()
        (mixed / "protection.json").write_bytes((deploy / "protection.json").read_bytes())
        (mixed / name).write_bytes((other / name).read_bytes())
        with pytest.raises(CheckpointError, match=rf"{name} is not the file protection.json .*export the model again"):
            load_keyed_input(mixed, shuffle_np_key)
        if name == "model.pt2":
            with pytest.raises(CheckpointError, match="mixes two exports"):
                load_exported(mixed, shuffle_np_key)
    # a file the protection.json does not describe at all
    (deploy / "model.pt2").unlink()
    export_protected(protected, deploy, format="onnx")
    (deploy / "model.pt2").write_bytes((other / "model.pt2").read_bytes())
    with pytest.raises(CheckpointError, match="not recorded there"):
        load_exported(deploy, shuffle_np_key)


_FAILING_WRITE = """
import resource, sys, torch, timm
from kp_plugin import SecretKey, wrap_model
from kp_plugin.errors import CheckpointWriteError
from kp_plugin.export import export_protected
torch.manual_seed(0)
model = wrap_model(timm.create_model("test_resnet", num_classes=3), SecretKey.generate(block_size=4),
                   input_size=(3, 16, 16))
# Writes past 100 kB fail with EFBIG, as on a full disk (Python ignores SIGXFSZ).
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
for case in sys.argv[1:]:  # folder|format|batch size
    folder, fmt, batch_size = case.split("|")
    try:
        export_protected(model, folder, format=fmt, overwrite=True, batch_size=eval(batch_size))
        print(case, "=> no error")
    except CheckpointWriteError as exc:
        print(case, "=> CheckpointWriteError:", exc)
"""


def test_a_failed_write_during_export_is_a_write_error_and_keeps_the_previous_export(protected, tmp_path):
    # Before: "pass batch_size=N" for a full disk, a bare OSError with a fixed
    # batch size, and for pt2 torch's archive writer aborted the process.
    # One process for the four cases (it imports torch, timm and the exporters).
    import subprocess
    import sys

    formats = ["pt2"] + (["onnx"] if importlib.util.find_spec("onnxscript") else [])
    cases, before = [], {}
    for fmt in formats:
        for batch_size in (None, 2):
            deploy = tmp_path / f"deploy-{fmt}-{batch_size}"
            export_protected(protected, deploy, format=fmt)
            before[deploy] = {p.name: p.read_bytes() for p in deploy.iterdir()}
            cases.append(f"{deploy}|{fmt}|{batch_size}")
    done = subprocess.run([sys.executable, "-c", _FAILING_WRITE, *cases], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = dict(line.split(" => ", 1) for line in done.stdout.splitlines() if " => " in line)
    assert sorted(results) == sorted(cases)
    for case, said in results.items():
        assert said.startswith("CheckpointWriteError: cannot write the export into"), (case, said)
        assert "free some space" in said and "batch_size" not in said, (case, said)
    for deploy, files in before.items():
        assert {p.name: p.read_bytes() for p in deploy.iterdir()} == files  # unchanged, no scratch folder left


def test_an_exports_digests_edited_to_fit_another_file_are_refused(protected, tiny_timm_model, shuffle_np_key,
                                                                    tmp_path):
    # Whoever swaps model.pt2 could rewrite its SHA-256 in protection.json too;
    # the mac, keyed with the key, covers the digests.
    import hashlib
    import json

    export_protected(protected, tmp_path / "deploy", format="pt2")
    retrained = wrap_model(copy.deepcopy(tiny_timm_model), shuffle_np_key, input_size=SIZE)
    with torch.no_grad():
        next(retrained.parameters()).add_(1.0)
    export_protected(retrained, tmp_path / "other", format="pt2")
    swapped = (tmp_path / "other" / "model.pt2").read_bytes()
    (tmp_path / "deploy" / "model.pt2").write_bytes(swapped)
    path = tmp_path / "deploy" / "protection.json"
    data = json.loads(path.read_text())
    data["extra"]["exported_sha256"]["model.pt2"] = hashlib.sha256(swapped).hexdigest()
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="changed after it was written"):
        load_exported(tmp_path / "deploy", shuffle_np_key)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_headless_transformers_model_exports_each_of_its_outputs_by_name(shuffle_np_key, tmp_path):
    # Before: "cannot find logits in a model output of type
    # BaseModelOutputWithPooling", with no way to export a feature model.
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    transformers = pytest.importorskip("transformers")
    from kp_plugin.hf import wrap_hf_model

    torch.manual_seed(0)
    vit = transformers.ViTModel(transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=16,
                                                       num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=32)).eval()
    protected = wrap_hf_model(vit, shuffle_np_key, mean=0.5, std=0.5)
    x = torch.rand(3, *SIZE)
    with torch.no_grad():
        expected = protected(x)
    path = export_protected(protected, tmp_path / "onnx", format="onnx")
    assert ProtectionConfig.load(path.parent).extra["output_names"] == ["last_hidden_state", "pooler_output"]
    session = ort.InferenceSession(str(path))
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state", "pooler_output"]
    hidden, pooled = session.run(None, {"pixel_values": load_keyed_input(path.parent, shuffle_np_key)(x).numpy()})
    torch.testing.assert_close(torch.from_numpy(hidden), expected.last_hidden_state, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(pooled), expected.pooler_output, rtol=1e-4, atol=1e-5)
    export_protected(protected, tmp_path / "pt2", format="pt2")
    with torch.no_grad():
        hidden, pooled = load_exported(tmp_path / "pt2", shuffle_np_key)(x)
    torch.testing.assert_close(hidden, expected.last_hidden_state)
    torch.testing.assert_close(pooled, expected.pooler_output)


def test_a_failure_between_the_exports_renames_does_not_claim_the_old_export_is_unchanged(protected, tmp_path,
                                                                                           monkeypatch):
    # Its message said "the export there before, if any, is unchanged" when
    # the model file had already been replaced (the folder then mixes two
    # exports, which loading refuses).
    import kp_plugin.export as export

    deploy = tmp_path / "deploy"
    export_protected(protected, deploy, format="pt2")
    real_replace, calls = os.replace, []

    def second_fails(src, dst):  # the second file moved into the folder itself (not the staging's own writes)
        if os.path.dirname(os.fspath(dst)) == os.fspath(deploy):
            calls.append(dst)
            if len(calls) == 2:
                raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(export.os, "replace", second_fails)
    with torch.no_grad():
        next(protected.parameters()).add_(1.0)
    with pytest.raises(CheckpointWriteError, match="mixes two exports.*export again") as caught:
        export_protected(protected, deploy, format="pt2")
    assert "unchanged" not in str(caught.value)


def test_files_no_export_records_are_not_replaced_without_overwrite(protected, tmp_path):
    # A model.onnx made by other means, or a protection.json that cannot be
    # read, was replaced silently (exit 0): only a readable export of
    # another key was refused.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.pt2").write_bytes(b"a model made by other means")
    with pytest.raises(CheckpointError, match="not an export that .* records.*overwrite=True"):
        export_protected(protected, mine, format="pt2")
    assert (mine / "model.pt2").read_bytes() == b"a model made by other means"

    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "protection.json").write_text('{"hello": 1}')
    with pytest.raises(CheckpointError, match="cannot be read.*overwrite=True"):
        export_protected(protected, unreadable, format="pt2")
    assert (unreadable / "protection.json").read_text() == '{"hello": 1}'
    assert sorted(p.name for p in unreadable.iterdir()) == ["protection.json"]

    export_protected(protected, mine, format="pt2", overwrite=True)
    export_protected(protected, mine, format="pt2")  # its own export: replaced as before
    load_exported(mine, protected.key)


def test_a_failed_export_leaves_no_new_folder_and_a_killed_ones_scratch_is_removed(protected, tmp_path):
    # An opset the exporter cannot write left an empty deploy/ behind; a
    # killed export left its scratch folder (a whole staged model) for good.
    pytest.importorskip("onnxscript")
    with pytest.raises(ConfigurationError):
        export_protected(protected, tmp_path / "new" / "deploy", format="onnx", opset_version=999)
    assert not (tmp_path / "new" / "deploy").exists()

    deploy = tmp_path / "deploy"
    deploy.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = deploy / f".export.{dead.pid}.abcd1234.tmp"
    stale.mkdir()
    (stale / "model.pt2").write_bytes(b"staged")
    live = deploy / f".export.{os.getppid()}.abcd1234.tmp"
    live.mkdir()
    export_protected(protected, deploy, format="pt2")
    assert not stale.exists() and live.is_dir()
    assert sorted(p.name for p in deploy.iterdir()) == [live.name, "model.pt2", "protection.json"]


def test_an_opset_for_a_pt2_export_is_refused(protected, tmp_path):
    with pytest.raises(ConfigurationError, match="opset_version is an ONNX setting"):
        export_protected(protected, tmp_path / "deploy", format="pt2", opset_version=17)
    assert not (tmp_path / "deploy").exists()


def test_the_keyed_input_of_an_export_gives_what_the_exported_model_takes(protected, shuffle_np_key, tmp_path):
    # A half export took float16 but load_keyed_input gave float32 (float64
    # images passed through as float64): onnxruntime's INVALID_ARGUMENT on the
    # documented serving line. One image (C, H, W) passed, for "Invalid rank".
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    half = copy.deepcopy(protected).half().eval()
    path = export_protected(half, tmp_path / "half", format="onnx")
    keyed = load_keyed_input(tmp_path / "half", shuffle_np_key)
    session = ort.InferenceSession(str(path))
    for images in (torch.rand(2, *SIZE), torch.rand(2, *SIZE, dtype=torch.float64),
                   (torch.rand(2, *SIZE) * 255).to(torch.uint8)):
        assert keyed(images).dtype == torch.float16
        session.run(None, {"pixel_values": keyed(images).numpy()})
    export_protected(protected, tmp_path / "float", format="onnx")
    assert load_keyed_input(tmp_path / "float", shuffle_np_key)(torch.rand(2, *SIZE, dtype=torch.float64)).dtype == \
        torch.float32
    with pytest.raises(BlockSizeError, match="unsqueeze"):
        keyed(torch.rand(*SIZE))


def test_a_fixed_batch_export_names_its_batch_size(protected, shuffle_np_key, tmp_path):
    # torch's bare "AssertionError: Guard failed: pixel_values.size()[0] == 3".
    export_protected(protected, tmp_path, format="pt2", batch_size=3)
    loaded = load_exported(tmp_path, shuffle_np_key)
    loaded(torch.rand(3, *SIZE))
    for keyed in (loaded, load_keyed_input(tmp_path, shuffle_np_key)):
        with pytest.raises(BlockSizeError, match="batches of exactly 3 images.*got 1"):
            keyed(torch.rand(1, *SIZE))


def test_an_export_beside_a_key_file_or_with_bad_metadata_writes_nothing(protected, shuffle_np_key, tmp_path):
    # export_protected wrote model.pt2 and protection.json beside the owner's
    # key file without a word (kp export refused it); another key's file was
    # found only after writing. Metadata JSON cannot hold: a bare TypeError.
    for key in (shuffle_np_key, SecretKey.generate_like(shuffle_np_key)):
        folder = tmp_path / key.fingerprint
        key.save(folder / "some.key")
        with pytest.raises(KeyLeakError, match="some.key.*nothing was written"):
            export_protected(protected, folder, format="pt2")
        assert [p.name for p in folder.iterdir()] == ["some.key"]
    for bad in ({"x": object()}, {"x": float("nan")}):
        with pytest.raises(ConfigurationError, match="metadata.*nothing was written"):
            export_protected(protected, tmp_path / "meta", format="pt2", metadata=bad)
        assert not (tmp_path / "meta").exists()


def test_loading_a_checkpoint_or_a_damaged_export_as_an_export_names_the_right_remedy(protected, shuffle_np_key,
                                                                                      tmp_path):
    # "model.pt2 is missing (this directory holds a None export)"; a corrupt
    # export's protection.json: "save the model again with save_protected".
    save_protected(protected, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="holds a protected checkpoint.*load_protected"):
        load_exported(tmp_path / "ckpt", shuffle_np_key)
    export_protected(protected, tmp_path / "deploy", format="pt2")
    (tmp_path / "deploy" / "protection.json").write_text("{")
    for load in (load_exported, load_keyed_input):
        with pytest.raises(CheckpointError, match="export the model again") as info:
            load(tmp_path / "deploy", shuffle_np_key)
        assert "save_protected" not in str(info.value)
