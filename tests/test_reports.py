import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli
from toolkit.models import count_parameters, create_model


def _is_png(path):
    with Image.open(path) as image:
        image.verify()
        return image.format == "PNG"


@pytest.mark.parametrize("source", ["checkpoint", "run-dir", "export"])
def test_evaluate_reports_agree_with_verify(trained_run, export_dir, tmp_path, source):
    model = {"checkpoint": trained_run / "best.pt", "run-dir": trained_run, "export": export_dir}[source]
    result = run_cli("evaluate", model, "--out", tmp_path / "report", "--provider", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"report directory: {tmp_path / 'report'}"
    report = json.loads((tmp_path / "report" / "evaluation.json").read_text())
    matrix = np.array(report["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 10_000
    assert np.trace(matrix) / matrix.sum() == pytest.approx(report["accuracy"])
    parity = json.loads((export_dir / "parity.json").read_text())
    backend = parity["backends"]["onnxruntime-cpu"]
    expected = backend["accuracy"] if source == "export" else parity["reference_accuracy"]
    assert report["accuracy"] == pytest.approx(expected)
    assert set(report["per_class"]["3"]) == {"precision", "recall", "f1", "support"}
    assert all(_is_png(tmp_path / "report" / name) for name in ("confusion.png", "mistakes.png"))
    mistakes = report["most_confident_mistakes"]
    assert mistakes and all(m["true"] != m["predicted"] for m in mistakes)
    assert [m["probability"] for m in mistakes] == sorted((m["probability"] for m in mistakes), reverse=True)


def test_evaluate_on_fashion_mnist_is_allowed_but_honest(trained_run, tmp_path):
    from tests.conftest import FASHION_DIR

    if not FASHION_DIR.exists():
        pytest.skip("Debian package dataset-fashion-mnist")
    result = run_cli("evaluate", trained_run / "best.pt", "--dataset", "fashion-mnist", "--data-dir", FASHION_DIR,
                     "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert report["dataset"] == "fashion-mnist" and report["accuracy"] < 0.5  # a digit model on clothes


@pytest.mark.parametrize("source", ["checkpoint", "run-dir", "export-dir"])
def test_inspect_checkpoint_draws_filters_and_feature_maps(trained_run, export_dir, tmp_path, source):
    target = {"checkpoint": trained_run / "best.pt", "run-dir": trained_run, "export-dir": export_dir}[source]
    result = run_cli("inspect", target, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "inspect.json").read_text())
    assert report["total_parameters"] == 61_706
    assert sum(layer["parameters"] for layer in report["layers"]) == 61_706
    assert report["layers"][0]["output_shape"] == [6, 28, 28]
    assert report["flops_per_image"] > 500_000
    assert _is_png(tmp_path / "filters.png") and _is_png(tmp_path / "feature_maps.png")
    assert "Netron" in result.stdout


@pytest.mark.parametrize(("arch", "params", "has_conv"), [("mlp", 135_160, False), ("tinycnn", 135_410, True)])
def test_inspect_a_zoo_name_counts_parameters(tmp_path, arch, params, has_conv):
    result = run_cli("inspect", arch, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "inspect.json").read_text())
    assert report["total_parameters"] == params == count_parameters(create_model(arch))
    assert (tmp_path / "filters.png").exists() == has_conv
    if not has_conv:
        assert "no convolutional layer" in result.stdout


@pytest.mark.slow  # trains for tens of seconds
def test_compare_trains_each_model_the_same_way(tmp_path):
    result = run_cli("compare", "mlp", "tinycnn", "--epochs", "1", "--limit-train", "3000", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "compare.json").read_text())
    rows = {row["arch"]: row for row in data["models"]}
    assert rows["mlp"]["parameters"] == 135_160 and rows["tinycnn"]["parameters"] == 135_410
    for row in rows.values():
        assert 0.1 < row["best_test_acc"] <= 1.0 and row["train_seconds"] > 0 and row["latency_us_batch1"] > 0
    assert _is_png(tmp_path / "compare.png")
    assert result.stdout.strip().splitlines()[-1] == f"compare directory: {tmp_path}"


def test_report_commands_reject_bad_input(tmp_path):
    for args, message in (
        (["inspect", "resnet9000"], "neither a checkpoint file nor a model name"),
        (["compare", "mlp", "nope"], "unknown model 'nope'"),
        (["evaluate", tmp_path / "missing.pt"], "checkpoint not found"),
    ):
        result = run_cli(*args)
        assert result.returncode != 0 and message in result.stderr
        assert "Traceback" not in result.stderr


def test_a_report_of_another_model_leaves_no_picture_of_the_last_one(quick_run, tmp_path):
    assert run_cli("inspect", quick_run, "--out", tmp_path).returncode == 0
    assert (tmp_path / "filters.png").is_file()
    assert run_cli("inspect", "mlp", "--out", tmp_path).returncode == 0  # no convolution: no pictures
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inspect.json"]


@pytest.mark.parametrize(("command", "second"), [("inspect", "lenet"), ("evaluate", None)])
def test_a_failed_report_leaves_the_previous_one_whole(trained_run, tmp_path, command, second):
    """The pictures and the JSON of a report appear together or not at all: a second report (of
    an untrained LeNet, whose filters differ) that fails for want of data changes nothing."""
    assert run_cli(command, trained_run, "--out", tmp_path).returncode == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result = run_cli(command, second or trained_run, "--out", tmp_path, "--data-dir", tmp_path / "no-data")
    assert result.returncode == 1 and "not found under" in result.stderr, result.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
