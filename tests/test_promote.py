"""`toolkit promote`: a candidate replaces the served export only when it is better, the previous
one is kept and comes back with --rollback, and a running demo switches without a restart."""

import fcntl
import json
import shutil
import time

import httpx
import pytest
from gradio_client import Client, handle_file

from tests.conftest import run_cli
from toolkit.app import launch
from toolkit.inference import classify
from toolkit.launch import free_port, toolkit_server
from toolkit.runtime import Predictor
from toolkit.styled import write_styled_digits

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
    assert result.returncode == 1 and "refusing to replace it" in result.stderr
    assert _files(serving) == before and (kept / "notes.txt").read_text() == "mine"


def test_promotions_of_one_export_do_not_race(setting, tmp_path, mnist_dir):
    serving = _serving(setting, tmp_path)
    with open(serving.with_name(".lenet.promote.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a promotion in progress holds it
        result = _promote(setting / "exports" / "tuned", serving, setting, tmp_path, mnist_dir)
        rollback = run_cli("promote", "--rollback", "--serving", serving)
    assert result.returncode == 1 and "another promotion or rollback" in result.stderr
    assert rollback.returncode == 1 and "another promotion or rollback" in rollback.stderr
