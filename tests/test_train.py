import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from tests.conftest import run_cli
from toolkit.core.errors import ToolkitError
from toolkit.models.checkpoint import load_checkpoint, save_checkpoint
from toolkit.training.train import make_config, train


def test_default_lenet_run_writes_a_trustworthy_run_dir(trained_run):
    for name in ("best.pt", "last.pt", "metrics.json", "config.json", "curves.png"):
        assert (trained_run / name).is_file(), name
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds"} <= set(
        metrics["history"][0])
    assert 0.0 <= metrics["best_test_acc"] <= 1.0
    # LeNet-5's published figure is 99.05%; the default recipe must get close on any CPU.
    assert metrics["best_test_acc"] >= 0.985
    assert metrics["train_seconds"] > 0
    assert Image.open(trained_run / "curves.png").size[0] > 300


def test_checkpoint_is_plain_weights_with_everything_to_rebuild(trained_run):
    raw = torch.load(trained_run / "best.pt", weights_only=True)
    assert raw["arch"] == "lenet" and raw["dataset"] == "mnist"
    assert raw["class_names"] == [str(d) for d in range(10)]
    assert raw["normalization"] == {"mean": 0.1307, "std": 0.3081}
    assert raw["input_shape"] == [1, 28, 28]
    assert {"torch", "toolkit"} <= set(raw["versions"])
    assert "optimizer_state" in torch.load(trained_run / "last.pt", weights_only=True)


def _interrupt_at(epoch_to_stop):
    def progress(epoch, total):
        if epoch == epoch_to_stop:
            raise KeyboardInterrupt
        return None
    return progress


@pytest.mark.slow  # trains for tens of seconds
@pytest.mark.parametrize("scheduler", ["onecycle", "step"])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, mnist_dir, scheduler):
    config = make_config("lenet", epochs=3, limit_train=1500, batch_size=100, scheduler=scheduler)
    whole = train(config, data_dir=mnist_dir, runs_dir=tmp_path, name="whole", device="cpu",
                  log=lambda _: None)
    with pytest.raises(KeyboardInterrupt):
        train(config, data_dir=mnist_dir, runs_dir=tmp_path, name="cut", device="cpu",
              progress=_interrupt_at(3), log=lambda _: None)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 2
    resumed = train(config, data_dir=mnist_dir, resume=tmp_path / "cut", device="cpu",
                    log=lambda _: None)
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(resumed.history) == strip(whole.history)
    a = load_checkpoint(tmp_path / "whole" / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "cut" / "last.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_augmented_training_runs_and_learns(tmp_path, mnist_dir):
    config = make_config("lenet", epochs=1, limit_train=3000, augment=True)
    result = train(config, data_dir=mnist_dir, runs_dir=tmp_path, name="aug", device="cpu",
                   log=lambda _: None)
    assert result.history[0]["test_acc"] > 0.5


def test_recipe_decides_augmentation_unless_the_user_does():
    assert make_config("cnn3x3").augment and not make_config("lenet").augment
    assert not make_config("cnn3x3", augment=False).augment
    assert make_config("lenet", augment=True).augment


@pytest.mark.slow  # trains for tens of seconds
def test_torchrun_trains_with_two_cpu_processes(tmp_path, mnist_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", "29517", "-m", "toolkit", "train", "lenet", "--epochs", "1",
         "--limit-train", "8000", "--runs-dir", str(tmp_path), "--name", "ddp",
         "--data-dir", str(mnist_dir), "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("run directory:") == 1  # only rank 0 talks
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["history"][0]["test_acc"] > 0.5
    assert load_checkpoint(tmp_path / "ddp" / "best.pt")["arch"] == "lenet"


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "toolkit-checkpoint", "payload": Exploit()}, path)
    result = run_cli("train", "lenet", "--resume", path)
    assert result.returncode != 0
    assert "refusing to load" in result.stderr and "system" in result.stderr


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, trained_run):
    target = tmp_path / "best.pt"
    good = load_checkpoint(trained_run / "best.pt")
    save_checkpoint(target, good)
    before = target.read_bytes()
    with pytest.raises((TypeError, AttributeError)):  # a lambda cannot be pickled
        save_checkpoint(target, {**good, "bad": lambda: None})
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_library_errors_name_the_setting_and_the_cli_names_its_flag():
    """An API caller reads the parameter's name, a command-line user the flag that sets it."""
    with pytest.raises(ToolkitError) as caught:
        make_config("lenet", batch_size=0)
    assert str(caught.value) == "batch_size must be positive, got 0"
    assert caught.value.for_command_line() == "--batch-size must be positive, got 0"


def test_resume_takes_the_command_as_run_with_its_own_settings_repeated(tmp_path, mnist_dir):
    from tests.helpers import cli_in_process

    args = ("--epochs", "1", "--limit-train", "600", "--batch-size", "100", "--lr", "0.002",
            "--runs-dir", tmp_path, "--name", "first", "--data-dir", mnist_dir, "--device", "cpu")
    cut = cli_in_process("train", "lenet", *args, "--scheduler", "none")
    assert cut.returncode == 0, cut.stderr
    # People repeat the command they ran and add --resume: the run's own values are accepted...
    again = cli_in_process("train", "lenet", *args, "--scheduler", "none", "--resume", tmp_path / "first",
                           "--epochs", "2")
    assert again.returncode == 0, again.stderr
    assert load_checkpoint(tmp_path / "first" / "last.pt")["epoch"] == 2
    # ...and any other value is refused, naming the option, as before.
    for option, value in (("--lr", "0.003"), ("--name", "other"), ("--runs-dir", tmp_path / "elsewhere"),
                          ("--scheduler", "step")):
        refused = cli_in_process("train", "lenet", "--resume", tmp_path / "first", option, value)
        assert refused.returncode == 1 and f"{option} cannot be changed with --resume" in refused.stderr
