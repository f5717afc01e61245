"""The training loop: recipes, in-memory batches, metrics history, checkpoints, resume, DDP."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from toolkit import library_versions
from toolkit.augment import random_affine_elastic
from toolkit.checkpoint import load_checkpoint, save_checkpoint
from toolkit.data import get_dataset, load_split, shuffled_batches
from toolkit.errors import ToolkitError
from toolkit.fileio import write_json
from toolkit.models import Recipe, create_model, get_entry
from toolkit.preprocess import Framing, measure_framing

OPTIMIZERS = ("adam", "adamw", "sgd", "adadelta")
SCHEDULERS = ("onecycle", "step", "none")
RECIPES = ("default", "notebook")
MAX_SEED = 2**32 - 1  # seeds are mixed with epoch numbers and must stay within torch's 64-bit range


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as `config.json` and in checkpoints."""

    arch: str
    dataset: str = "mnist"
    epochs: int = 6
    batch_size: int = 128
    lr: float = 3e-3
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: str = "onecycle"
    mean: float = 0.1307
    std: float = 0.3081
    seed: int = 0
    augment: bool = False
    limit_train: int | None = None
    recipe: str = "default"
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        get_entry(self.arch)
        get_dataset(self.dataset)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) <= 0:
                raise ToolkitError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ToolkitError(f"--lr must be positive and finite, got {self.lr}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ToolkitError(f"--seed must be between 0 and {MAX_SEED}, got {self.seed}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ToolkitError(f"weight decay must be a number >= 0, got {self.weight_decay}")
        if self.limit_train is not None and self.limit_train <= 0:
            raise ToolkitError(f"--limit-train must be positive, got {self.limit_train}")
        if self.optimizer not in OPTIMIZERS:
            raise ToolkitError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if self.scheduler not in SCHEDULERS:
            raise ToolkitError(f"unknown scheduler {self.scheduler!r}; choose from {', '.join(SCHEDULERS)}")
        if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std > 0):
            raise ToolkitError(f"normalization needs a finite mean and a positive std, got {self.mean}, {self.std}")
        if not 0 <= self.momentum < 1:
            raise ToolkitError(f"--momentum must be in [0, 1), got {self.momentum}")


def make_config(arch: str, recipe: str = "default", dataset: str = "mnist", **overrides: Any) -> TrainConfig:
    """A config from the model's recipe, with any non-None `overrides` applied on top."""
    if recipe not in RECIPES:
        raise ToolkitError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    entry = get_entry(arch)
    spec = get_dataset(dataset)
    chosen: Recipe = entry.default_recipe if recipe == "default" else entry.notebook_recipe
    mean, std = chosen.normalization or (spec.mean, spec.std)
    config = TrainConfig(
        arch=arch, dataset=dataset, epochs=chosen.epochs, batch_size=chosen.batch_size,
        lr=chosen.lr, optimizer=chosen.optimizer, momentum=chosen.momentum,
        weight_decay=chosen.weight_decay, scheduler=chosen.scheduler, mean=mean, std=std,
        augment=chosen.augment, recipe=recipe,
    )
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if overrides.get("momentum") is not None and config.optimizer != "sgd":
        raise ToolkitError(f"--momentum applies to --optimizer sgd only, this run uses {config.optimizer}")
    config.validate()
    return config


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when usable, else CPU; `cuda` without a usable GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ToolkitError("--device cuda was asked for but no CUDA GPU is usable here; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise ToolkitError(f"unknown device {device!r}; choose from auto, cpu, cuda")
    return torch.device(device)


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


class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    def __init__(self, device: torch.device) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.enabled = self.world_size > 1
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


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


def _checkpoint_payload(
    config: TrainConfig, model: nn.Module, epoch: int, history: list[dict[str, Any]],
    class_names: tuple[str, ...], framing: Framing,
) -> dict[str, Any]:
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


def load_resume_state(run_dir: str | Path) -> tuple[Path, dict[str, Any], TrainConfig]:
    """Read `last.pt` of a run to continue; the run dir or the file itself may be given."""
    path = Path(run_dir)
    last = path / "last.pt" if path.is_dir() else path
    checkpoint = load_checkpoint(last)
    if "optimizer_state" not in checkpoint or "config" not in checkpoint:
        raise ToolkitError(f"{last} holds no training state to resume from (pass a run's last.pt)")
    try:
        config = TrainConfig(**checkpoint["config"])
    except TypeError as exc:
        raise ToolkitError(f"{last} has a config this toolkit cannot read: {exc}") from exc
    return last.parent, checkpoint, config


def train(
    config: TrainConfig,
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

    `progress(epoch, total_batches)` may return a callable `update(batch_loss, batch_acc)`
    used as a live progress bar.
    """
    start_epoch, history, resume_checkpoint = 0, [], None
    if resume is not None:
        run_dir, resume_checkpoint, saved = load_resume_state(resume)
        if config.epochs != saved.epochs and saved.scheduler == "onecycle":
            raise ToolkitError(
                f"this run's OneCycle schedule was fixed for {saved.epochs} epochs; "
                f"resume without --epochs or train a new run"
            )
        config = dataclasses.replace(saved, epochs=config.epochs)
        start_epoch = int(resume_checkpoint["epoch"])
        history = list(resume_checkpoint["metrics"]["history"])
    else:
        if name and (Path(name).name != name or name in (".", "..")):
            raise ToolkitError(f"--name must be a plain folder name (no '/' or '..'), got {name!r}")
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
        return _run(config, run_dir, data_dir, torch_device, ddp, start_epoch, history,
                    resume_checkpoint, progress, log)
    except BaseException as exc:
        if not ddp.is_main:
            raise
        kept = _keep_finished_epochs(run_dir, config, new_run=resume is None, made_dir=made_dir)
        if isinstance(exc, KeyboardInterrupt):
            message = f"training interrupted; {kept}" if kept else (
                "training interrupted before its first epoch finished; nothing was kept")
            raise TrainingInterrupted(message) from None
        if isinstance(exc, ToolkitError) and kept:
            raise ToolkitError(f"{exc}; {kept}") from exc
        raise
    finally:
        ddp.close()


RUN_FILES = ("config.json", "best.pt", "last.pt", "metrics.json", "curves.png")


def _claim_run_dir(run_dir: Path, config: TrainConfig) -> bool:
    """Make `run_dir` this run's alone before any work, by creating its config.json exclusively:
    of two runs started with the same name, one gets it and the other is refused. Returns whether
    the folder was made here (rather than found empty)."""
    taken = ToolkitError(f"run dir {run_dir} already exists; pass another --name or --resume {run_dir}")
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


def _run(
    config: TrainConfig, run_dir: Path, data_dir: str | Path | None, device: torch.device,
    ddp: Distributed, start_epoch: int, history: list[dict[str, Any]],
    resume_checkpoint: dict[str, Any] | None, progress: ProgressFactory | None,
    log: Callable[[str], None],
) -> RunResult:
    spec = get_dataset(config.dataset)
    train_split = load_split(config.dataset, data_dir, train=True)
    test_split = load_split(config.dataset, data_dir, train=False)
    framing = measure_framing(train_split.images.numpy())
    if config.limit_train is not None:
        train_split.images = train_split.images[: config.limit_train]
        train_split.labels = train_split.labels[: config.limit_train]
    train_x, train_y = train_split.pixels(device), train_split.labels.to(device)
    test_x, test_y = test_split.pixels(device), test_split.labels.to(device)

    torch.manual_seed(config.seed)
    model = create_model(config.arch, **config.model_kwargs).to(device)
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        # oneDNN's NHWC kernels are ~1.3x faster for these small convs and pools on CPU.
        model = model.to(memory_format=torch.channels_last)
        train_x = train_x.contiguous(memory_format=torch.channels_last)
    if resume_checkpoint is not None:
        model.load_state_dict(resume_checkpoint["state_dict"])
    train_model: nn.Module = model
    if ddp.enabled:
        train_model = nn.parallel.DistributedDataParallel(model)
    optimizer = build_optimizer(config, train_model.parameters())
    per_rank_batch = max(1, config.batch_size // ddp.world_size)
    shard = len(train_y) // ddp.world_size
    steps_per_epoch = -(-shard // per_rank_batch)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch)
    if resume_checkpoint is not None:
        optimizer.load_state_dict(resume_checkpoint["optimizer_state"])
        if scheduler is not None and resume_checkpoint.get("scheduler_state"):
            scheduler.load_state_dict(resume_checkpoint["scheduler_state"])

    best_acc = max((h["test_acc"] for h in history), default=-1.0)
    for epoch in range(start_epoch + 1, config.epochs + 1):
        started = time.perf_counter()
        # Data order and augmentation depend only on (seed, epoch): resuming replays them exactly.
        order_gen = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        aug_gen = torch.Generator(device=device).manual_seed(config.seed * 100_019 + epoch)
        update = progress(epoch, steps_per_epoch) if progress and ddp.is_main else None
        train_model.train()
        loss_sum = correct = seen = 0.0
        for index in shuffled_batches(len(train_y), per_rank_batch, order_gen,
                                      rank=ddp.rank, world_size=ddp.world_size):
            index = index.to(device)
            x, y = train_x[index], train_y[index]
            if config.augment:
                x = random_affine_elastic(x, aug_gen)
            logits = train_model((x - config.mean) / config.std)
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
        loss_sum, correct, seen = ddp.sum([loss_sum, correct, seen], device)
        test_logits = predict_logits(model, test_x, config.mean, config.std)
        stats = EpochStats(
            epoch=epoch,
            train_loss=loss_sum / seen,
            train_acc=correct / seen,
            test_loss=F.cross_entropy(test_logits, test_y).item(),
            test_acc=(test_logits.argmax(1) == test_y).float().mean().item(),
            seconds=time.perf_counter() - started,
            lr=optimizer.param_groups[0]["lr"],
        )
        if not math.isfinite(stats.train_loss):
            raise ToolkitError(f"training diverged in epoch {epoch} (the loss became {stats.train_loss}); "
                               "try a lower learning rate")
        history.append(dataclasses.asdict(stats))
        if not ddp.is_main:
            continue
        log(
            f"epoch {epoch:>3}/{config.epochs}  train loss {stats.train_loss:.4f} "
            f"acc {stats.train_acc:.2%}  test loss {stats.test_loss:.4f} acc {stats.test_acc:.2%}  "
            f"{stats.seconds:.1f}s"
        )
        payload = _checkpoint_payload(config, model, epoch, history, spec.class_names, framing)
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
    from toolkit.plots import plot_training_curves  # matplotlib only once there is something to draw

    plot_training_curves(history, run_dir / "curves.png", title=f"{config.arch} on {config.dataset}")


def _write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    write_json(run_dir / "metrics.json", {
        "history": history,
        "best_test_acc": max(h["test_acc"] for h in history),
        "best_epoch": max(history, key=lambda h: h["test_acc"])["epoch"],
        "final_test_acc": history[-1]["test_acc"],
        "train_seconds": sum(h["seconds"] for h in history),
    })
