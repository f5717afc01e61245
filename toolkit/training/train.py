"""The training loop, in the shape of pytorch/examples' mnist/main.py: `train_one_epoch` and
`measure_test_set` (its `test`) per epoch, with in-memory batches, checkpoints, resume, and a run
dir that is claimed before any work and never left half-made."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from toolkit import library_versions
from toolkit.core.errors import ToolkitError
from toolkit.core.fileio import sha256_file, write_json
from toolkit.data.augment import random_affine_elastic
from toolkit.data.datasets import Split, get_dataset, load_split, shuffled_batches
from toolkit.imaging.framing import Framing, measure_framing
from toolkit.models import create_model
from toolkit.models.checkpoint import load_checkpoint, save_checkpoint
from toolkit.training.config import TrainConfig, continued_config, load_resume_state, make_config
from toolkit.training.distributed import Distributed, resolve_device

__all__ = ["RunResult", "TrainConfig", "TrainingInterrupted", "make_config", "measure_test_set", "train",
           "train_one_epoch"]


def build_optimizer(config: TrainConfig, params: Any) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    if config.optimizer == "adadelta":
        return torch.optim.Adadelta(params, lr=config.lr, weight_decay=config.weight_decay)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    # The fused kernel updates all parameters in one pass: ~7% of a LeNet step on CPU.
    return cls(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)


def build_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Stepped once per batch."""
    if config.scheduler == "onecycle":
        # A quarter of the steps warm up, but more than one: OneCycleLR divides by zero when the
        # warm-up ends on step 1 (four steps in all).
        total = config.epochs * steps_per_epoch
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
            pct_start=min(0.75, max(0.25, 1.5 / total)),
        )
    if config.scheduler == "step":
        # pytorch/examples' MNIST recipe: decay by 0.7 after every epoch.
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=steps_per_epoch, gamma=0.7)
    return None


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    seconds: float
    lr: float


@torch.no_grad()
def predict_logits(
    model: nn.Module, pixels: torch.Tensor, mean: float, std: float, batch_size: int = 2000
) -> torch.Tensor:
    """Logits for [N,1,28,28] pixels in [0, 1], in eval mode, batched."""
    was_training = model.training
    model.eval()
    out = torch.cat([model((chunk - mean) / std) for chunk in pixels.split(batch_size)])
    model.train(was_training)
    return out


ProgressFactory = Callable[[int, int], Any]


@dataclass
class RunResult:
    run_dir: Path
    is_main: bool
    history: list[dict[str, Any]]
    best_test_acc: float
    train_seconds: float


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, raised once the run dir is tidied; its text says what was kept."""


def train_one_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    images: torch.Tensor, labels: torch.Tensor, batches: Iterable[torch.Tensor], config: TrainConfig,
    augment_generator: torch.Generator, update: Callable[[float, float], None] | None = None,
) -> tuple[float, float, float]:
    """One pass over `batches` (index tensors into `images` and `labels`): forward, loss,
    backward, step. Returns the summed loss, the number right and the number seen."""
    model.train()
    loss_sum = correct = seen = 0.0
    for index in batches:
        index = index.to(images.device)
        x, y = images[index], labels[index]
        if config.augment:
            x = random_affine_elastic(x, augment_generator)
        logits = model((x - config.mean) / config.std)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        batch_correct = (logits.argmax(1) == y).sum().item()
        loss_sum += loss.item() * len(y)
        correct += batch_correct
        seen += len(y)
        if update:
            update(loss.item(), batch_correct / len(y))
    return loss_sum, correct, seen


def measure_test_set(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     config: TrainConfig) -> tuple[float, float]:
    """Test loss and accuracy over `images` [N,1,28,28] in [0, 1], in eval mode."""
    logits = predict_logits(model, images, config.mean, config.std)
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def train(
    config: TrainConfig | None = None,
    *,
    data_dir: str | Path | None = None,
    runs_dir: str | Path = "runs",
    name: str | None = None,
    device: str = "auto",
    resume: str | Path | None = None,
    progress: ProgressFactory | None = None,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Train `config` and write the run directory; returns where it went and what it reached.

    With `resume` (a run dir or its last.pt) the run continues with its own config; `config`
    may be omitted, or be the run's own with another `epochs` (see `config.resume_config`).
    `progress(epoch, total_batches)` may return a callable `update(batch_loss, batch_acc)`
    used as a live progress bar.
    """
    resume_checkpoint = None
    if resume is not None:
        run_dir, resume_checkpoint, saved = load_resume_state(resume)
        config = continued_config(saved, config)
    elif config is None:
        raise ToolkitError("train() needs a config (make_config) or a run to resume")
    else:
        if name and (Path(name).name != name or name in (".", "..") or not name.isprintable()
                     or len(name.encode()) > MAX_NAME_BYTES):
            raise ToolkitError(f"must be a plain folder name (no '/' or '..', printable, at most {MAX_NAME_BYTES} "
                               f"bytes), got {name[:80]!r}", option="name")
        run_dir = Path(runs_dir) / (name or f"{config.arch}-{datetime.now():%Y%m%d-%H%M%S}")
    config.validate()
    torch_device = resolve_device(device)
    ddp = Distributed(torch_device)
    if ddp.enabled and torch_device.type == "cuda":
        torch_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(torch_device)
    made_dir = False
    if ddp.is_main and resume is None:
        made_dir = _claim_run_dir(run_dir, config)
    try:
        return _run(config, run_dir, data_dir, torch_device, ddp, resume_checkpoint, progress, log)
    except BaseException as exc:
        if not ddp.is_main:
            raise
        kept = _keep_finished_epochs(run_dir, config, new_run=resume is None, made_dir=made_dir)
        if isinstance(exc, KeyboardInterrupt):
            message = f"training interrupted; {kept}" if kept else (
                "training interrupted before its first epoch finished; nothing was kept")
            raise TrainingInterrupted(message) from None
        if isinstance(exc, ToolkitError) and kept and not isinstance(exc, InputsChanged):  # resuming cannot help
            raise ToolkitError(f"{exc}; {kept}") from exc
        raise
    finally:
        ddp.close()


MAX_NAME_BYTES = 255  # what a folder name may take on common file systems
RUN_FILES = ("config.json", "best.pt", "last.pt", "metrics.json", "curves.png")


def _claim_run_dir(run_dir: Path, config: TrainConfig) -> bool:
    """Make `run_dir` this run's alone before any work, by creating its config.json exclusively:
    of two runs started with the same name, one gets it and the other is refused. Returns whether
    the folder was made here (rather than found empty)."""
    taken = ToolkitError(f"run dir {run_dir} already exists; pass another `name` or `resume` {run_dir}")
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise taken
    made = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / "config.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise taken from None
    except OSError as exc:
        raise ToolkitError(f"cannot write to {run_dir}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "w") as fh:
        json.dump(dataclasses.asdict(config), fh, indent=2)
        fh.write("\n")
    return made


def _keep_finished_epochs(run_dir: Path, config: TrainConfig, *, new_run: bool, made_dir: bool) -> str | None:
    """After a failed or interrupted run: a run whose last.pt holds finished epochs is kept to be
    resumed (its curves drawn; returns what it holds and how to go on), a new run with none is
    removed so its name can be used again (returns None)."""
    last = run_dir / "last.pt"
    if not last.exists():
        if new_run:  # every file in the folder is this run's: it was claimed empty
            for name in RUN_FILES:
                (run_dir / name).unlink(missing_ok=True)
            if made_dir:
                with contextlib.suppress(OSError):
                    run_dir.rmdir()
        return None
    history = load_checkpoint(last)["metrics"]["history"]
    with contextlib.suppress(ToolkitError, OSError):  # the curves are a convenience; the run is what matters
        _draw_curves(run_dir, config, history)
    return (f"{last} holds epoch {history[-1]['epoch']}/{config.epochs} "
            f"(best test accuracy {max(h['test_acc'] for h in history):.2%}); "
            f"continue with: toolkit train {config.arch} --resume {run_dir}")


@dataclass
class _Data:
    """A run's tensors on its device, and the framing measured on its training images."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    framing: Framing


def _load_data(config: TrainConfig, data_dir: str | Path | None, device: torch.device,
               log: Callable[[str], None]) -> _Data:
    train_split = load_split(config.dataset, data_dir, train=True)
    test_split = load_split(config.dataset, data_dir, train=False)
    framing = measure_framing(train_split.images.numpy())
    if config.limit_train is not None:
        train_split.images = train_split.images[: config.limit_train]
        train_split.labels = train_split.labels[: config.limit_train]
    if config.extra_data is not None:
        extra = _extra_images(config, framing, log)
        train_split.images = torch.cat([train_split.images, extra.images.repeat(config.extra_weight, 1, 1)])
        train_split.labels = torch.cat([train_split.labels, extra.labels.repeat(config.extra_weight)])
    return _Data(train_split.pixels(device), train_split.labels.to(device), test_split.pixels(device),
                 test_split.labels.to(device), framing)


class InputsChanged(ToolkitError):
    """A fine-tuning run's starting checkpoint or extra data is not what its config recorded."""


def _extra_images(config: TrainConfig, framing: Framing, log: Callable[[str], None]) -> Split:
    """The run's extra ImageFolder, framed as the demo frames drawings for this model; it must
    still be the data the run's config recorded."""
    from toolkit.data.imagefolder import read_image_folder

    assert config.extra_data is not None
    extra = read_image_folder(config.extra_data, list(get_dataset(config.dataset).class_names), framing)
    if config.extra_data_sha256 is not None and extra.sha256 != config.extra_data_sha256:
        raise InputsChanged(f"{config.extra_data} changed since this run began (its files' sha256 differs from "
                            "the run's config); train a new run on it")
    for problem in extra.problems:
        log(problem)
    log(f"extra data: {len(extra)} images from {config.extra_data}, each {config.extra_weight}x per epoch")
    return Split(torch.from_numpy(extra.pixels), torch.from_numpy(extra.labels))


def _initial_weights(config: TrainConfig) -> dict[str, torch.Tensor]:
    """The weights a fine-tuning run starts from, as its config recorded them."""
    assert config.init_from is not None
    if config.init_from_sha256 is not None and sha256_file(config.init_from) != config.init_from_sha256:
        raise InputsChanged(f"{config.init_from} changed since this run was configured (its sha256 differs); "
                            "train a new run from it")
    return load_checkpoint(config.init_from)["state_dict"]


def checkpoint_payload(
    config: TrainConfig, model: nn.Module, epoch: int, history: list[dict[str, Any]],
    class_names: tuple[str, ...], framing: Framing,
) -> dict[str, Any]:
    """A training run's checkpoint after `epoch`: everything `models.checkpoint.REQUIRED_KEYS` asks, and more."""
    return {
        "arch": config.arch,
        "model_kwargs": dict(config.model_kwargs),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "dataset": config.dataset,
        "class_names": list(class_names),
        "normalization": {"mean": config.mean, "std": config.std},
        "framing": framing.to_dict(),  # how preprocessing must frame new images for this model
        "input_shape": [1, 28, 28],
        "epoch": epoch,
        "metrics": {
            "history": history,
            "test_acc": history[-1]["test_acc"],
            "best_test_acc": max(h["test_acc"] for h in history),
        },
        "config": dataclasses.asdict(config),
        "versions": library_versions("torchvision"),
    }


def _run(
    config: TrainConfig, run_dir: Path, data_dir: str | Path | None, device: torch.device, ddp: Distributed,
    resume_checkpoint: dict[str, Any] | None, progress: ProgressFactory | None, log: Callable[[str], None],
) -> RunResult:
    data = _load_data(config, data_dir, device, log if ddp.is_main else lambda _: None)
    torch.manual_seed(config.seed)
    model = create_model(config.arch, **config.model_kwargs).to(device)
    if config.init_from is not None and resume_checkpoint is None:
        model.load_state_dict(_initial_weights(config))
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        # oneDNN's NHWC kernels are ~1.3x faster for these small convs and pools on CPU.
        model = model.to(memory_format=torch.channels_last)
        data.train_x = data.train_x.contiguous(memory_format=torch.channels_last)
    if resume_checkpoint is not None:
        model.load_state_dict(resume_checkpoint["state_dict"])
    train_model = nn.parallel.DistributedDataParallel(model) if ddp.enabled else model
    optimizer = build_optimizer(config, train_model.parameters())
    per_rank_batch = max(1, config.batch_size // ddp.world_size)
    steps_per_epoch = -(-(len(data.train_y) // ddp.world_size) // per_rank_batch)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch)
    history: list[dict[str, Any]] = []
    if resume_checkpoint is not None:
        try:
            optimizer.load_state_dict(resume_checkpoint["optimizer_state"])
            if scheduler is not None and resume_checkpoint.get("scheduler_state"):
                scheduler.load_state_dict(resume_checkpoint["scheduler_state"])
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:  # what torch raises for a foreign state
            raise ToolkitError(f"cannot resume: the saved optimizer or schedule does not fit this run "
                               f"({type(exc).__name__}: {str(exc)[:120]})") from None
        history = list(resume_checkpoint["metrics"]["history"])
    start_epoch = int(resume_checkpoint["epoch"]) if resume_checkpoint is not None else 0
    class_names = get_dataset(config.dataset).class_names

    best_acc = max((h["test_acc"] for h in history), default=-1.0)
    for epoch in range(start_epoch + 1, config.epochs + 1):
        started = time.perf_counter()
        # Data order and augmentation depend only on (seed, epoch): resuming replays them exactly.
        order = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        augment = torch.Generator(device=device).manual_seed(config.seed * 100_019 + epoch)
        batches = shuffled_batches(len(data.train_y), per_rank_batch, order, rank=ddp.rank, world_size=ddp.world_size)
        update = progress(epoch, steps_per_epoch) if progress and ddp.is_main else None
        sums = train_one_epoch(train_model, optimizer, scheduler, data.train_x, data.train_y, batches, config,
                               augment, update)
        loss_sum, correct, seen = ddp.sum(list(sums), device)
        test_loss, test_acc = measure_test_set(model, data.test_x, data.test_y, config)
        stats = EpochStats(epoch=epoch, train_loss=loss_sum / seen, train_acc=correct / seen, test_loss=test_loss,
                           test_acc=test_acc, seconds=time.perf_counter() - started,
                           lr=optimizer.param_groups[0]["lr"])
        diverged = [loss for loss in (stats.train_loss, stats.test_loss) if not math.isfinite(loss)]
        if diverged:
            raise ToolkitError(f"training diverged in epoch {epoch} (the loss became {diverged[0]}); "
                               "try a lower learning rate")
        history.append(dataclasses.asdict(stats))
        if not ddp.is_main:
            continue
        log(
            f"epoch {epoch:>3}/{config.epochs}  train loss {stats.train_loss:.4f} "
            f"acc {stats.train_acc:.2%}  test loss {stats.test_loss:.4f} acc {stats.test_acc:.2%}  "
            f"{stats.seconds:.1f}s"
        )
        payload = checkpoint_payload(config, model, epoch, history, class_names, data.framing)
        if stats.test_acc > best_acc:
            best_acc = stats.test_acc
            save_checkpoint(run_dir / "best.pt", payload)
        payload["optimizer_state"] = optimizer.state_dict()
        payload["scheduler_state"] = scheduler.state_dict() if scheduler is not None else {}
        save_checkpoint(run_dir / "last.pt", payload)
        _write_metrics(run_dir, history)

    if ddp.is_main:
        _draw_curves(run_dir, config, history)
    return RunResult(
        run_dir=run_dir,
        is_main=ddp.is_main,
        history=history,
        best_test_acc=max(h["test_acc"] for h in history),
        train_seconds=sum(h["seconds"] for h in history),
    )


def _draw_curves(run_dir: Path, config: TrainConfig, history: list[dict[str, Any]]) -> None:
    from toolkit.core.plots import plot_training_curves  # matplotlib only once there is something to draw

    plot_training_curves(history, run_dir / "curves.png", title=f"{config.arch} on {config.dataset}")


def _write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    write_json(run_dir / "metrics.json", {
        "history": history,
        "best_test_acc": max(h["test_acc"] for h in history),
        "best_epoch": max(history, key=lambda h: h["test_acc"])["epoch"],
        "final_test_acc": history[-1]["test_acc"],
        "train_seconds": sum(h["seconds"] for h in history),
    })
