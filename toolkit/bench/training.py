"""Training: the toolkit's loop against the notebook loop, and what fine-tuning on corrections buys."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from toolkit.bench.measure import machine
from toolkit.core.errors import ToolkitError
from toolkit.data.datasets import resolve_data_dir
from toolkit.data.styled import write_styled_digits
from toolkit.insight.evaluate import evaluate
from toolkit.models import create_model
from toolkit.models.checkpoint import checkpoint_file, load_checkpoint
from toolkit.training.config import make_config
from toolkit.training.train import train


def _notebook_loop_images_per_s(data_dir: Path, arch: str, batches: int) -> tuple[float, float]:
    """The classic course loop for `arch`: torchvision MNIST, ToTensor+Normalize, DataLoader batch 64, SGD."""
    import torchvision  # only this loop uses torchvision, and importing it takes seconds
    from torchvision import transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    try:
        dataset = torchvision.datasets.MNIST(str(data_dir), train=True, transform=transform, download=False)
    except RuntimeError as exc:
        raise ToolkitError(f"the notebook loop needs MNIST in torchvision's layout under {data_dir}: {exc}") from exc
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True)
    torch.manual_seed(0)
    model = create_model(arch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    seen, started = 0, time.perf_counter()
    for index, (x, y) in enumerate(loader):
        if index >= batches:
            break
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        seen += len(y)
    seconds = time.perf_counter() - started
    return seen / seconds, seconds


def bench_train(
    arch: str = "lenet", *, data_dir: str | Path | None = None, notebook_batches: int = 300,
    limit_train: int | None = None, target: float = 0.99, log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The toolkit's default-recipe training against the notebook loop, in the same process."""
    if notebook_batches <= 0:
        raise ToolkitError(f"must be positive, got {notebook_batches}", option="notebook_batches")
    if not 0 < target <= 1:
        raise ToolkitError(f"is a test accuracy between 0 and 1 (0.99 for 99%), got {target}", option="target")
    config = make_config(arch, limit_train=limit_train)
    root = resolve_data_dir(data_dir)
    log("notebook loop (DataLoader + transforms, batch 64, SGD)...")
    notebook_ips, notebook_seconds = _notebook_loop_images_per_s(root, arch, notebook_batches)
    log(f"toolkit loop ({arch} default recipe: {config.optimizer}, batch {config.batch_size}, "
        f"{config.epochs} epochs)...")
    with tempfile.TemporaryDirectory() as runs:
        result = train(config, data_dir=root, runs_dir=runs, name="bench", device="cpu", log=log)
    train_images = limit_train or 60_000
    epoch_seconds = [h["seconds"] for h in result.history]
    elapsed, to_target = 0.0, None
    for h in result.history:
        elapsed += h["seconds"]
        if to_target is None and h["test_acc"] >= target:
            to_target = elapsed
    toolkit_ips = train_images * len(epoch_seconds) / sum(epoch_seconds)  # includes per-epoch test pass
    return {
        "kind": "train", "arch": arch, "machine": machine(), "threads": torch.get_num_threads(),
        "toolkit": {"images_per_s": toolkit_ips, "seconds_per_epoch": statistics.median(epoch_seconds),
                    "epochs": config.epochs, "batch_size": config.batch_size, "optimizer": config.optimizer,
                    "best_test_acc": result.best_test_acc, "target_acc": target,
                    "seconds_to_target": to_target, "train_seconds": result.train_seconds},
        "notebook": {"arch": arch, "images_per_s": notebook_ips, "seconds_per_epoch": 60_000 / notebook_ips,
                     "measured_batches": notebook_batches, "measured_seconds": notebook_seconds},
        "speedup_images_per_s": toolkit_ips / notebook_ips,
    }


def bench_finetune(
    base: str | Path, *, data_dir: str | Path | None = None, feedback: int = 200, heldout: int = 200,
    extra_weight: int = 20, seed: int = 0, limit_train: int | None = None, log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """What fine-tuning on corrections buys: `feedback` digits in styles MNIST lacks
    (`toolkit.data.styled`) train `base` further, `heldout` others (another seed) score it before and
    after, with the dataset's test accuracy before and after and the time the run took.
    `limit_train`: fine-tune on the first N dataset images only (smoke runs)."""
    if feedback <= 0 or heldout <= 0:
        raise ToolkitError("`feedback` and `heldout` must be positive")
    base = checkpoint_file(base)
    with tempfile.TemporaryDirectory() as work:
        folders = {"feedback": Path(work, "feedback"), "heldout": Path(work, "heldout")}
        write_styled_digits(folders["feedback"], feedback, seed=2 * seed + 1)
        write_styled_digits(folders["heldout"], heldout, seed=2 * seed + 2)
        trained = load_checkpoint(base)
        config = make_config(trained["arch"], dataset=trained["dataset"], init_from=base,
                             extra_data=folders["feedback"], extra_weight=extra_weight, seed=seed,
                             limit_train=limit_train)

        def scores(model: Path) -> dict[str, float]:
            reports = Path(work, "reports", model.parent.name)
            return {"heldout_acc": evaluate(model, reports / "heldout", images=folders["heldout"],
                                            provider="cpu")[1]["accuracy"],
                    "test_acc": evaluate(model, reports / "test", data_dir=data_dir, provider="cpu")[1]["accuracy"]}

        before = scores(base)
        log(f"{base}: {before['heldout_acc']:.2%} on {heldout} held-out styled digits, {before['test_acc']:.2%} test")
        started = time.perf_counter()
        result = train(config, data_dir=data_dir, runs_dir=Path(work, "runs"), name="finetuned", device="cpu",
                       log=log)
        seconds = time.perf_counter() - started
        after = scores(result.run_dir / "best.pt")
    return {
        "kind": "finetune", "machine": machine(), "base": str(base), "arch": config.arch, "feedback": feedback,
        "heldout": heldout, "styles": "hollow and dot-matrix digits (toolkit.data.styled), not made from MNIST",
        "extra_weight": extra_weight, "limit_train": limit_train, "epochs": config.epochs, "lr": config.lr,
        "seconds": seconds,
        "train_seconds": result.train_seconds, "before": before, "after": after,
        "heldout_gain_points": 100 * (after["heldout_acc"] - before["heldout_acc"]),
        "test_drop_points": 100 * (before["test_acc"] - after["test_acc"]),
    }
