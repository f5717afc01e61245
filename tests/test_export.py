import json
import os
import shutil
import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from tests.conftest import run_cli
from toolkit.core.export_dir import Export
from toolkit.core.fileio import sha256_file
from toolkit.export.publish import export_verified, replacing, staged_directory
from toolkit.export.verify import ArtifactIntegrityError, ParityError, ToleranceError, verify_export
from toolkit.export.writers import ExportOptions
from toolkit.models.checkpoint import load_checkpoint, save_checkpoint

ARTIFACTS = ("model.onnx", "model.ts", "model.pt2", "model.int8.onnx", "model.fp16.onnx", "model.pt",
             "triton/lenet/config.pbtxt", "triton/lenet/labels.txt", "triton/lenet/1/model.onnx")


def _snapshot(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_every_artifact_is_listed_with_its_hash(export_dir):
    manifest = json.loads((export_dir / "manifest.json").read_text())
    for name in ARTIFACTS:
        assert manifest["artifacts"][name]["sha256"] == sha256_file(export_dir / name), name
        assert manifest["artifacts"][name]["bytes"] == (export_dir / name).stat().st_size
    assert manifest["command"].startswith("toolkit export")
    assert manifest["onnx_opset"] >= 18
    assert manifest["metadata"]["arch"] == "lenet"
    assert manifest["parity"]["passed"] is True
    assert manifest["parity"]["report_sha256"] == sha256_file(export_dir / "parity.json")  # the evidence, hashed
    parity = json.loads((export_dir / "parity.json").read_text())
    assert parity["artifacts"] == {name: entry["sha256"] for name, entry in manifest["artifacts"].items()}


def test_parity_report_meets_the_targets(export_dir):
    parity = json.loads((export_dir / "parity.json").read_text())
    assert parity["passed"] is True
    assert (parity["atol"], parity["rtol"]) == (1e-5, 1e-4)
    assert parity["samples"] > 10_000
    backends = parity["backends"]
    assert {"onnxruntime-cpu", "torchscript", "torch-export", "onnxruntime-cpu-int8",
            "onnxruntime-cpu-fp16"} <= set(backends)
    for name in ("onnxruntime-cpu", "torchscript", "torch-export"):
        assert backends[name]["max_abs_diff"] <= 1e-5
        assert backends[name]["top1_agreement"] == 1.0
    for result in backends.values():
        for key in ("accuracy", "top1_agreement"):
            assert 0.0 <= result[key] <= 1.0
    assert parity["reference_accuracy"] - backends["onnxruntime-cpu-int8"]["accuracy"] <= 0.003


def test_metadata_round_trips_through_every_format(export_dir):
    checkpoint = load_checkpoint(export_dir / "model.pt")
    props = {p.key: json.loads(p.value) for p in onnx.load(str(export_dir / "model.onnx")).metadata_props}
    assert props["arch"] == "lenet" and props["dataset"] == "mnist"
    assert props["class_names"] == [str(d) for d in range(10)]
    assert props["normalization_baked_in"] == checkpoint["normalization"]
    assert props["framing"] == checkpoint["framing"]
    assert props["framing"] == {"box": 20, "centre": "mass", "stroke": pytest.approx(1.83, abs=0.05)}  # MNIST's
    assert {"toolkit", "torch", "onnx"} <= set(props["versions"])
    assert props["test_accuracy"] == checkpoint["metrics"]["test_acc"]
    extra = {"metadata.json": ""}
    torch.jit.load(str(export_dir / "model.ts"), _extra_files=extra)
    assert json.loads(extra["metadata.json"]) == props
    pt2_extra = {"metadata.json": ""}
    torch.export.load(str(export_dir / "model.pt2"), extra_files=pt2_extra)
    assert json.loads(pt2_extra["metadata.json"]) == props


@pytest.mark.parametrize("batch", [1, 300])
def test_batch_size_is_dynamic(export_dir, batch):
    images = np.random.default_rng(batch).random((batch, 1, 28, 28), dtype=np.float32)
    session = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    logits, probs = session.run(["logits", "probabilities"], {"image": images})
    assert logits.shape == probs.shape == (batch, 10)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    scripted = torch.jit.load(str(export_dir / "model.ts"))
    ts_logits, _ = scripted(torch.from_numpy(images))
    np.testing.assert_allclose(ts_logits.detach().numpy(), logits, atol=1e-5, rtol=1e-4)


def test_predictor_runs_big_batches_in_chunks_with_the_same_results(export_dir, mnist_dir):
    from toolkit.data.datasets import load_split
    from toolkit.runtime.predictor import CPU_CHUNK, Predictor

    images = load_split("mnist", mnist_dir, train=False).pixels()[: 3 * CPU_CHUNK + 7].numpy()
    predictor = Predictor(export_dir, provider="cpu")
    logits, probs = predictor.run(images)
    whole_logits, whole_probs = predictor.session.run(None, {"image": images})
    assert logits.shape == probs.shape == (len(images), 10)
    np.testing.assert_allclose(logits, whole_logits, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(probs, whole_probs, atol=1e-6)
    assert (logits.argmax(1) == whole_logits.argmax(1)).all()


def test_the_triton_repository_is_a_valid_model_config_matching_the_onnx_model(quick_export):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    model_dir = quick_export / "triton" / "lenet"  # named like the export, as `toolkit serve` names it
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "lenet" and config.platform == "onnxruntime_onnx" and config.max_batch_size >= 64
    graph = onnx.load(str(model_dir / "1" / "model.onnx")).graph
    assert (model_dir / "1" / "model.onnx").read_bytes() == (quick_export / "model.onnx").read_bytes()

    def signature(values):  # Triton leaves the batch axis out of dims
        return [(v.name, v.type.tensor_type.elem_type, [d.dim_value for d in v.type.tensor_type.shape.dim[1:]])
                for v in values]

    fp32 = {model_config_pb2.TYPE_FP32: onnx.TensorProto.FLOAT}
    assert [(i.name, fp32[i.data_type], list(i.dims)) for i in config.input] == signature(graph.input)
    assert [(o.name, fp32[o.data_type], list(o.dims)) for o in config.output] == signature(graph.output)
    labels = (model_dir / config.output[1].label_filename).read_text().splitlines()
    metadata = {p.key: p.value for p in onnx.load(str(quick_export / "model.onnx")).metadata_props}
    assert config.output[1].name == "probabilities" and labels == json.loads(metadata["class_names"])
    assert list(config.dynamic_batching.preferred_batch_size) == [64]
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_AUTO]


def test_a_perturbed_onnx_weight_fails_verification_by_name(export_dir, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(export_dir, tampered)
    model = onnx.load(str(tampered / "model.onnx"))
    weight = next(t for t in model.graph.initializer if numpy_helper.to_array(t).ndim == 4)
    values = numpy_helper.to_array(weight).copy()
    values.flat[0] += 0.05
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    onnx.save(model, str(tampered / "model.onnx"))
    result = run_cli("verify", tampered)
    assert result.returncode != 0
    assert "onnxruntime-cpu: logits: sample" in result.stderr and "differs by" in result.stderr
    assert "Traceback" not in result.stderr
    parity = json.loads((tampered / "parity.json").read_text())
    assert parity["passed"] is False
    assert parity["backends"]["onnxruntime-cpu"]["max_abs_diff"] > 1e-5
    assert parity["backends"]["torchscript"]["max_abs_diff"] <= 1e-5


def test_the_parity_table_in_a_log_keeps_every_column(export_dir, tmp_path):
    """Piped to a file with no $COLUMNS, rich would cut the table to 80 columns ("artifa…")."""
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    result = run_cli("verify", copy, columns=None)
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if "backend" in line)
    for column in ("artifact", "accuracy", "max abs diff", "max rel diff", "top-1 agree", "verdict"):
        assert column in header, header
    assert "onnxruntime-cpu-int8" in result.stdout


def test_an_export_that_fails_its_parity_check_replaces_nothing(export_dir, trained_run, tmp_path):
    target = tmp_path / "exports" / "lenet"
    shutil.copytree(export_dir, target)
    before = _snapshot(target)
    # No tolerance at all: ONNX Runtime's float arithmetic differs from PyTorch's in the last bits.
    result = run_cli("export", trained_run, "--out", target, "--atol", "0", "--rtol", "0")
    assert result.returncode == 1
    assert "parity check failed, nothing was replaced in" in result.stderr and "onnxruntime-cpu" in result.stderr
    assert "FAIL" in result.stdout  # the parity table is shown before the error
    assert _snapshot(target) == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["lenet"]


def test_a_failed_export_leaves_the_previous_one_untouched(export_dir, tmp_path):
    target = tmp_path / "exports" / "lenet"
    shutil.copytree(export_dir, target)
    before = _snapshot(target)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    unknown = tmp_path / "unknown.pt"
    save_checkpoint(unknown, {**load_checkpoint(export_dir / "model.pt"), "arch": "resnet9000"})
    for args, message in (
        ([corrupt], "not a readable PyTorch checkpoint"),
        ([unknown], "unknown model 'resnet9000'"),
        ([export_dir / "model.pt", "--opset", "99"], "unsupported --opset 99"),
    ):
        result = run_cli("export", *args, "--out", target)
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert _snapshot(target) == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["lenet"]  # no staging left behind


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "export dir not found"),
        ("no-manifest", "has no manifest.json"),
        ("corrupt-onnx", "onnxruntime cannot load"),
    ],
)
def test_verify_bad_export_dirs_are_clear_errors(export_dir, tmp_path, setup, message):
    target = tmp_path / "export"
    if setup != "missing":
        shutil.copytree(export_dir, target)
    if setup == "no-manifest":
        (target / "manifest.json").unlink()
    if setup == "corrupt-onnx":
        (target / "model.onnx").write_bytes(b"\x08\x07garbage")
    result = run_cli("verify", target)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_export_through_a_symbolic_link_replaces_the_folder_and_keeps_the_link(export_dir, trained_run, tmp_path):
    real = tmp_path / "v1"
    shutil.copytree(export_dir, real, ignore=shutil.ignore_patterns("parity.json"))
    link = tmp_path / "current"
    link.symlink_to(real, target_is_directory=True)
    result = run_cli("export", trained_run / "best.pt", "--out", link, "--no-verify")
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "v1"]  # no .current.old-PID left
    assert json.loads((real / "manifest.json").read_text())["command"].endswith("--no-verify")


def test_failed_checks_raise_typed_errors_that_carry_the_report(export_dir, trained_run, tmp_path, mnist_dir):
    """As Optimum's ShapeError/AtolError: a caller can tell what failed and read the figures."""
    target = tmp_path / "export"
    with pytest.raises(ToleranceError) as failed:
        export_verified(trained_run, target, ExportOptions(data_dir=mnist_dir), atol=0.0, rtol=0.0)
    assert isinstance(failed.value, ParityError) and not failed.value.report.passed
    assert failed.value.report.backends["onnxruntime-cpu"].failure == "tolerance"
    assert not target.exists()

    tampered = tmp_path / "tampered"
    shutil.copytree(export_dir, tampered)
    (tampered / "model.fp16.onnx").unlink()
    report = verify_export(tampered, data_dir=mnist_dir)
    assert "model.fp16.onnx" in report.integrity
    with pytest.raises(ArtifactIntegrityError):
        report.raise_for_failure()
    assert json.loads((tampered / "parity.json").read_text())["parity_version"] == 2


def test_verify_export_keeps_the_manifest_parity_in_step(quick_run, tmp_path, mnist_dir):
    """A library caller of `verify_export` gets parity.json and the manifest's summary of it
    together, whether the check passes or fails: never a new report beside a stale manifest."""
    export = tmp_path / "lenet"
    export_verified(quick_run / "best.pt", export, ExportOptions(data_dir=mnist_dir), verify=False)
    for atol, rtol in ((0.0, 0.0), (1e-5, 1e-4)):
        report = verify_export(export, data_dir=mnist_dir, atol=atol, rtol=rtol)
        parity = json.loads((export / "manifest.json").read_text())["parity"]
        assert parity["report_sha256"] == sha256_file(export / "parity.json")
        assert (parity["passed"], parity["atol"], parity["rtol"]) == (report.passed, atol, rtol)
    manifest = Export(export).manifest()
    assert report.passed and Export(export).parity_problem(manifest) is None  # what promote's gate reads


def test_out_dot_exports_into_the_folder_it_names_and_others_can_read_it(quick_run, tmp_path):
    here = tmp_path / "here"
    here.mkdir()
    result = run_cli("export", quick_run / "best.pt", "--out", ".", "--no-verify", cwd=here)
    assert result.returncode == 0, result.stderr
    assert (here / "manifest.json").is_file() and (here / "model.onnx").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert here.stat().st_mode & 0o777 == 0o777 & ~umask  # mkdtemp's 0700 would lock out a Triton container
    assert (here / "model.onnx").stat().st_mode & 0o777 == 0o666 & ~umask


def test_every_format_of_the_table_has_a_writer_and_exports_on_its_own(quick_run, tmp_path):
    """A format is one entry in toolkit/core/formats.py plus its write_<name> in export.py; each can be
    asked for alone, and brings what it is made from."""
    from toolkit.core.formats import ALL, FORMATS, resolve_formats
    from toolkit.export import writers as export

    assert all(callable(getattr(export, fmt.writer, None)) for fmt in FORMATS.values())
    assert [f.name for f in resolve_formats(("all",))] == list(ALL)
    assert [f.name for f in resolve_formats(("triton",))] == ["onnx", "triton"]
    out = tmp_path / "program"
    assert run_cli("export", quick_run, "--format", "torch-export", "--out", out, "--no-verify").returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.pt", "model.pt2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["program"]


def test_an_export_waits_for_the_promotion_that_holds_its_folder(tmp_path):
    """`export --out` swaps under the lock a promotion or rollback of that folder holds."""
    target, swapped = tmp_path / "lenet", threading.Event()

    def export():
        with staged_directory(target) as stage:
            (stage / "model.onnx").write_text("new")
        swapped.set()

    with replacing(target, wait=False):  # as `toolkit promote --serving TARGET` holds it while it scores
        exporting = threading.Thread(target=export)
        exporting.start()
        assert not swapped.wait(1.0) and not target.exists()  # built, and waiting to swap
    exporting.join(30)
    assert swapped.is_set() and (target / "model.onnx").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet"]  # no lock file or stage left behind
