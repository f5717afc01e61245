"""Labelled image folders in, fine-tuned models out: the reader, `train --init-from --extra-data`,
`evaluate --images`, with a real model and real (styled, not MNIST) digits."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_cli
from toolkit.core.classes import DIGITS
from toolkit.data.imagefolder import image_folder_sha256, read_image_folder
from toolkit.data.styled import STYLES, write_styled_digits
from toolkit.models.checkpoint import load_checkpoint
from toolkit.runtime.inference import classify
from toolkit.runtime.predictor import Predictor


@pytest.fixture(scope="module")
def styled(tmp_path_factory):
    root = tmp_path_factory.mktemp("styled")
    write_styled_digits(root / "train", 40, seed=1)
    write_styled_digits(root / "heldout", 30, seed=2)
    return root


def test_styled_digits_are_an_image_folder_of_every_class_and_style(styled):
    files = sorted((styled / "train").rglob("*.png"))
    assert len(files) == 40 and {f.parent.name for f in files} == set(DIGITS)
    assert {f.name.split("-")[0] for f in files} == set(STYLES)
    again = styled / "again"
    write_styled_digits(again, 40, seed=1)  # the same seed writes the same files
    assert image_folder_sha256(again, list(DIGITS)) == image_folder_sha256(styled / "train", list(DIGITS))


def test_the_reader_frames_images_and_reports_what_it_leaves_out(styled, tmp_path):
    root = tmp_path / "mixed"
    shutil.copytree(styled / "train", root)
    (root / "letters").mkdir()
    Image.new("L", (40, 40), 255).save(root / "letters" / "a.png")
    (root / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    Image.new("L", (60, 60), 255).save(root / "5" / "blank.png")
    folder = read_image_folder(root, list(DIGITS))
    assert len(folder) == 40 and folder.pixels.shape == (40, 28, 28) and folder.pixels.dtype == np.uint8
    assert [DIGITS[label] for label in folder.labels] == [f.parent.name for f in folder.files]
    assert len(folder.problems) == 3
    assert any("letters" in p and "not a class" in p for p in folder.problems)
    assert any("broken.png" in p for p in folder.problems) and any("blank.png" in p and "nothing" in p
                                                                    for p in folder.problems)
    assert folder.sha256 != image_folder_sha256(styled / "train", list(DIGITS))  # every file counts


def test_evaluate_on_images_scores_as_predict_does(quick_export, styled, tmp_path):
    out = tmp_path / "report"
    result = run_cli("evaluate", quick_export, "--images", styled / "heldout", "--out", out)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "evaluation.json").read_text())
    predictor = Predictor(quick_export, provider="cpu")
    files = sorted((styled / "heldout").rglob("*.png"))
    right = [classify(predictor, f).label == f.parent.name for f in files]
    assert report["samples"] == len(files) and report["accuracy"] == pytest.approx(np.mean(right))
    assert sum(report["confusion_matrix"][i][i] for i in range(10)) == sum(right)
    assert all(m["file"].endswith(".png") for m in report["most_confident_mistakes"])
    assert (out / "confusion.png").is_file() and (out / "mistakes.png").is_file()


def test_fine_tuning_starts_from_the_model_and_records_what_it_was_built_from(quick_run, styled, tmp_path,
                                                                               mnist_dir):
    # A learning rate too small to move the weights shows where they started.
    result = run_cli("train", "lenet", "--init-from", quick_run, "--extra-data", styled / "train",
                     "--extra-weight", "3", "--epochs", "1", "--lr", "1e-12", "--limit-train", "2000",
                     "--runs-dir", tmp_path, "--name", "tuned", "--data-dir", mnist_dir, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "extra data: 40 images" in result.stdout and "each 3x per epoch" in result.stdout
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert config["recipe"] == "finetune" and config["augment"] and config["extra_weight"] == 3
    assert config["init_from"] == str((quick_run / "best.pt").resolve())
    assert config["extra_data_sha256"] == image_folder_sha256(styled / "train", list(DIGITS))
    tuned, base = (load_checkpoint(path)["state_dict"] for path in (tmp_path / "tuned", quick_run))
    assert all(torch.allclose(tuned[name], base[name], atol=1e-6) for name in base)


def test_a_resumed_fine_tuning_refuses_extra_data_that_changed(quick_run, styled, tmp_path, mnist_dir):
    extra = tmp_path / "extra"
    shutil.copytree(styled / "train", extra)
    args = ("--runs-dir", tmp_path, "--data-dir", mnist_dir, "--device", "cpu")
    assert run_cli("train", "lenet", "--init-from", quick_run, "--extra-data", extra, "--epochs", "1",
                   "--scheduler", "none", "--limit-train", "1000", "--name", "tuned", *args).returncode == 0
    sorted((extra / "7").iterdir())[0].write_bytes(sorted((extra / "1").iterdir())[0].read_bytes())
    resumed = run_cli("train", "lenet", "--resume", tmp_path / "tuned", "--epochs", "2", "--data-dir", mnist_dir,
                      "--device", "cpu")
    assert resumed.returncode == 1 and "changed since this run began" in resumed.stderr
    assert "--resume" not in resumed.stderr  # no hint to do again what cannot work
    refused = run_cli("train", "lenet", "--resume", tmp_path / "tuned", "--extra-data", extra)
    assert refused.returncode == 1 and "--extra-data cannot be changed with --resume" in refused.stderr


@pytest.mark.slow  # fine-tunes for two epochs
def test_bench_finetune_reports_before_and_after(quick_run, tmp_path, mnist_dir):
    out = tmp_path / "finetune.json"
    result = run_cli("bench", "finetune", quick_run, "--feedback", "20", "--heldout", "20", "--data-dir", mnist_dir,
                     "--limit-train", "3000", "--json", out)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    for when in ("before", "after"):
        assert 0 <= data[when]["heldout_acc"] <= 1 and 0.5 < data[when]["test_acc"] <= 1
    assert data["heldout_gain_points"] == pytest.approx(100 * (data["after"]["heldout_acc"]
                                                              - data["before"]["heldout_acc"]))
    assert data["seconds"] > 0 and data["feedback"] == 20 and "not made from MNIST" in data["styles"]
    assert data["limit_train"] == 3000
