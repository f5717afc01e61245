"""`toolkit promote`: a candidate replaces the served export only when it is better, the previous
one is kept and comes back with --rollback, and a running demo switches without a restart."""

import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file

from tests.conftest import run_cli
from toolkit.core.fileio import sha256_file
from toolkit.data.styled import write_styled_digits
from toolkit.demo.app import launch
from toolkit.feedback.promote import promote
from toolkit.insight.evaluate import load_scoring_model
from toolkit.runtime.inference import classify
from toolkit.runtime.predictor import Predictor, ReloadingPredictor
from toolkit.serving.launch import free_port, toolkit_server

pytestmark = pytest.mark.slow  # trains and verifies two exports


@pytest.fixture(scope="module")
def setting(tmp_path_factory, quick_run, mnist_dir):
    """A served export (the quick model), the same model exported and verified, and a model
    fine-tuned on styled digits (verified): with held-out styled digits to judge them."""
    root = tmp_path_factory.mktemp("promote")
    write_styled_digits(root / "styled-train", 60, seed=1)
    write_styled_digits(root / "heldout", 60, seed=2)
    assert run_cli("train", "lenet", "--init-from", quick_run, "--extra-data", root / "styled-train",
                   "--extra-weight", "20", "--limit-train", "3000", "--runs-dir", root, "--name", "tuned",
                   "--data-dir", mnist_dir, "--device", "cpu").returncode == 0
    for run, out in ((quick_run, "same"), (root / "tuned", "tuned")):
        result = run_cli("export", run, "--out", root / "exports" / out, "--data-dir", mnist_dir)
        assert result.returncode == 0, result.stderr
    return root


def _serving(setting, tmp_path):
    serving = tmp_path / "exports" / "lenet"
    shutil.copytree(setting / "exports" / "same", serving)
    return serving


def _promote(candidate, serving, setting, tmp_path, mnist_dir, *extra):
    return run_cli("promote", candidate, "--serving", serving, "--heldout", setting / "heldout", "--data-dir",
                   mnist_dir, "--out", tmp_path / "report", *extra)


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_better_candidate_is_promoted_and_rollback_brings_the_old_one_back(setting, tmp_path, mnist_dir):
    serving = _serving(setting, tmp_path)
    before, candidate = _files(serving), setting / "exports" / "tuned"
    result = _promote(candidate, serving, setting, tmp_path, mnist_dir)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report" / "promotion.json").read_text())
    assert report["promoted"] and report["heldout_acc"]["candidate"] > report["heldout_acc"]["serving"]
    assert (tmp_path / "report" / "changed.png").is_file()
    assert _files(serving) == _files(candidate)  # the candidate, file for file
    assert _files(serving.with_name("lenet.previous")) == before
    rolled = run_cli("promote", "--rollback", "--serving", serving)
    assert rolled.returncode == 0, rolled.stderr
    assert _files(serving) == before and _files(serving.with_name("lenet.previous")) == _files(candidate)


def test_rollback_brings_back_only_an_export_it_can_prove(setting, tmp_path):
    """What the last promotion kept may have been changed since: rollback proves it as promote
    proves a candidate, or changes nothing."""
    serving = _serving(setting, tmp_path)
    previous = serving.with_name("lenet.previous")
    shutil.copytree(setting / "exports" / "same", previous)
    shutil.copy(setting / "exports" / "tuned" / "model.onnx", previous / "model.onnx")  # another model
    before = _files(serving)
    rolled = run_cli("promote", "--rollback", "--serving", serving)
    assert rolled.returncode == 1 and "Traceback" not in rolled.stderr, rolled.stderr
    assert "not rolled back" in rolled.stderr and "previous export's files do not match its manifest" in rolled.stderr
    assert _files(serving) == before


def test_a_candidate_no_better_on_the_heldout_images_changes_nothing(setting, tmp_path, mnist_dir):
    serving = _serving(setting, tmp_path)
    before = _files(serving)
    result = _promote(setting / "exports" / "same", serving, setting, tmp_path, mnist_dir)
    assert result.returncode == 1 and "not better on the held-out images" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert _files(serving) == before and not serving.with_name("lenet.previous").exists()
    assert not json.loads((tmp_path / "report" / "promotion.json").read_text())["promoted"]


def test_a_candidate_that_loses_test_accuracy_changes_nothing(setting, tmp_path, mnist_dir):
    served = tmp_path / "exports" / "tuned"
    shutil.copytree(setting / "exports" / "tuned", served)
    before = _files(served)
    result = _promote(setting / "exports" / "same", served, setting, tmp_path, mnist_dir, "--max-acc-drop", "0")
    report = json.loads((tmp_path / "report" / "promotion.json").read_text())
    assert report["test_acc"]["candidate"] < report["test_acc"]["serving"]  # the premise of this test
    assert result.returncode == 1 and "loses" in result.stderr and "points of test accuracy" in result.stderr
    assert _files(served) == before


def test_an_unverified_candidate_is_refused(setting, tmp_path, mnist_dir, quick_export):
    serving = _serving(setting, tmp_path)
    result = _promote(quick_export, serving, setting, tmp_path, mnist_dir)  # exported with --no-verify
    assert result.returncode == 1 and "parity was not verified" in result.stderr


def test_a_running_demo_switches_to_the_promoted_model(setting, tmp_path, mnist_dir):
    serving = _serving(setting, tmp_path)
    old, new = Predictor(serving, provider="cpu"), Predictor(setting / "exports" / "tuned", provider="cpu")
    changed = next(path for path in sorted((setting / "heldout").rglob("*.png"))
                   if classify(old, path).label != classify(new, path).label)
    port = free_port()
    demo = launch(serving, port=port, provider="cpu", block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        answer = client.predict(handle_file(str(changed)), api_name="/predict")[0]["label"]
        assert answer == classify(old, changed).label
        assert _promote(setting / "exports" / "tuned", serving, setting, tmp_path, mnist_dir).returncode == 0
        deadline, label = time.monotonic() + 60, None
        while label != classify(new, changed).label:
            assert time.monotonic() < deadline, "the demo still answers with the old model"
            label = client.predict(handle_file(str(changed)), api_name="/predict")[0]["label"]
    finally:
        demo.close()


def test_a_running_server_switches_to_the_promoted_model(setting, tmp_path, mnist_dir):
    serving = _serving(setting, tmp_path)
    new = Predictor(setting / "exports" / "tuned", provider="cpu")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with toolkit_server(["serve", str(serving), "--port", str(port), "--provider", "cpu"],
                        ready_url=f"{url}/v2/health/ready"):
        def served_checkpoint():
            return httpx.get(f"{url}/v2/models/lenet").json()["parameters"]["checkpoint_sha256"]

        assert served_checkpoint() != new.metadata["source_checkpoint_sha256"]
        assert _promote(setting / "exports" / "tuned", serving, setting, tmp_path, mnist_dir).returncode == 0
        deadline = time.monotonic() + 60
        while served_checkpoint() != new.metadata["source_checkpoint_sha256"]:
            assert time.monotonic() < deadline, "the server still serves the old model"
            time.sleep(0.2)
        report = tmp_path / "endpoint.json"
        checked = run_cli("verify", setting / "exports" / "tuned", "--endpoint", url, "--model", "lenet",
                          "--json", report)
        assert checked.returncode == 0, checked.stdout + checked.stderr  # the promoted model, answer for answer


def test_a_previous_that_is_not_an_export_is_never_overwritten(setting, tmp_path, mnist_dir):
    serving = _serving(setting, tmp_path)
    kept = serving.with_name("lenet.previous")
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    before = _files(serving)
    result = _promote(setting / "exports" / "tuned", serving, setting, tmp_path, mnist_dir)
    assert result.returncode == 1 and "refusing to replace it, move it away" in result.stderr
    assert "--out" not in result.stderr  # nobody chose where SERVED.previous is
    assert _files(serving) == before and (kept / "notes.txt").read_text() == "mine"


def test_a_served_folder_with_added_files_is_refused_at_once_by_its_option(setting, tmp_path, mnist_dir):
    serving = _serving(setting, tmp_path)
    (serving / "notes.txt").write_text("mine")
    before = _files(serving)
    result = _promote(setting / "exports" / "tuned", serving, setting, tmp_path, mnist_dir)
    assert result.returncode == 1 and "choose another --serving" in result.stderr and "--out" not in result.stderr
    assert _files(serving) == before and not (tmp_path / "report").exists()  # refused before any scoring


def test_promotions_of_one_export_do_not_race(setting, tmp_path, mnist_dir):
    serving = _serving(setting, tmp_path)
    candidate = tmp_path / "exports" / "tuned"
    shutil.copytree(setting / "exports" / "tuned", candidate)
    for locked in (serving, candidate):  # as an export, promotion or rollback in progress holds it
        with open(locked.with_name(f".{locked.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            result = _promote(candidate, serving, setting, tmp_path, mnist_dir)
            rollback = run_cli("promote", "--rollback", "--serving", serving)
        assert result.returncode == 1 and f"{locked} is being replaced by another" in result.stderr
        if locked == serving:
            assert rollback.returncode == 1 and "is being replaced by another" in rollback.stderr
    assert not list(serving.parent.glob(".lenet.staging-*"))  # the refused promotions left no snapshot


def test_what_is_served_is_what_was_scored(setting, tmp_path, mnist_dir, monkeypatch):
    """`toolkit export --out CANDIDATE` finishing while the candidate is scored swaps another
    export in with two renames: promote serves the export it scored, not what the path holds."""
    serving = _serving(setting, tmp_path)
    candidate, other = tmp_path / "exports" / "tuned", tmp_path / "exports" / "other"
    shutil.copytree(setting / "exports" / "tuned", candidate)
    shutil.copytree(setting / "exports" / "same", other)  # verified too, and no better than the served model
    scored = _files(candidate)

    def load_then_replace_the_candidate(path, *args, **kwargs):
        model = load_scoring_model(path, *args, **kwargs)
        if Path(path).resolve() != serving.resolve():  # the candidate has been loaded to be scored
            os.replace(candidate, tmp_path / "exports" / ".tuned.old")
            os.replace(other, candidate)
        return model

    monkeypatch.setattr("toolkit.feedback.promote.load_scoring_model", load_then_replace_the_candidate)
    result = promote(candidate, serving, setting / "heldout", data_dir=mnist_dir, report_dir=tmp_path / "report")
    assert result.promoted, result.reason
    assert _files(serving) == scored


def _unproven(setting, target, tampering):
    """The better model's export with its parity evidence tampered with, in one of four ways."""
    shutil.copytree(setting / "exports" / "tuned", target)
    manifest = json.loads((target / "manifest.json").read_text())
    if tampering == "verdict-written-in":  # `export --no-verify`, then "passed": true in the manifest
        (target / "parity.json").unlink()
        manifest["parity"] = {"passed": True}
    if tampering == "report-edited":
        report = json.loads((target / "parity.json").read_text())
        (target / "parity.json").write_text(json.dumps({**report, "atol": 1.0}))
    if tampering == "older-toolkit":  # an export verified before parity.json was hashed
        del manifest["parity"]["report_sha256"]
    if tampering == "other-model":  # files and manifest agree, the report checked another model.onnx
        shutil.copyfile(setting / "exports" / "same" / "model.onnx", target / "model.onnx")
        manifest["artifacts"]["model.onnx"] = {"bytes": (target / "model.onnx").stat().st_size,
                                               "sha256": sha256_file(target / "model.onnx")}
    (target / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(("tampering", "message"), [
    ("verdict-written-in", "parity was not verified"),
    ("report-edited", "parity.json does not match the sha256 in manifest.json"),
    ("older-toolkit", "recorded by an older toolkit"),
    ("other-model", "parity.json checked other files than manifest.json lists"),
])
def test_a_parity_verdict_that_is_not_proven_is_refused(setting, tmp_path, mnist_dir, tampering, message):
    serving = _serving(setting, tmp_path)
    before, candidate = _files(serving), tmp_path / "candidate"
    _unproven(setting, candidate, tampering)
    result = _promote(candidate, serving, setting, tmp_path, mnist_dir)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert "toolkit verify" in result.stderr and _files(serving) == before


def test_a_reload_that_fails_is_tried_again_until_the_copy_is_complete(setting, tmp_path, caplog):
    serving, new = _serving(setting, tmp_path), setting / "exports" / "tuned"
    live = ReloadingPredictor(serving, provider="cpu")
    live.CHECK_EVERY_S = 0
    old = live.current
    shutil.copy2(new / "manifest.json", serving / "manifest.json")  # a copy of the new export has begun
    with caplog.at_level(logging.ERROR, logger="toolkit.runtime.predictor"):
        assert live.current is old and live.current is old  # its model is not there yet
    assert len([r for r in caplog.records if "kept serving the previous model" in r.message]) == 1
    shutil.copytree(new, serving, dirs_exist_ok=True, ignore=shutil.ignore_patterns("manifest.json"))  # it ends
    checkpoint = Predictor(new, provider="cpu").metadata["source_checkpoint_sha256"]
    assert live.current.metadata["source_checkpoint_sha256"] == checkpoint  # the model loaded, not the file
