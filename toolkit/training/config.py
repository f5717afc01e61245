"""What defines a training run: `TrainConfig`, built from a model's recipe (`make_config`) or
from a run being resumed (`resume_config`). Importing it is cheap (torch loads when a config is
made or checked), so the CLI builds its choices from the tuples here: the modules that load torch
or PIL (the model zoo, datasets, image folders, checkpoints) are imported inside the functions
that use them, to keep `import toolkit.cli` fast."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolkit.core.errors import ToolkitError
from toolkit.core.fileio import sha256_file

if TYPE_CHECKING:
    from toolkit.models import Recipe

OPTIMIZERS = ("adam", "adamw", "sgd", "adadelta")
SCHEDULERS = ("onecycle", "step", "none")
RECIPES = ("default", "notebook")
MAX_EXTRA_WEIGHT = 1000
# Fine-tuning starts from a trained model: a short run at a lower peak rate, with augmentation,
# so the few extra images teach a new style without unlearning the dataset (docs/benchmarks.md).
FINETUNE_RECIPE = {"epochs": 2, "lr": 1e-3, "augment": True, "scheduler": "onecycle"}
MAX_BATCH_SIZE = 1 << 24  # larger than any dataset here; batch indices must fit in 64 bits
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
    # Fine-tuning: the checkpoint the weights start from, and labelled images (an ImageFolder)
    # mixed into every epoch `extra_weight` times each; both recorded with their sha256.
    init_from: str | None = None
    init_from_sha256: str | None = None
    extra_data: str | None = None
    extra_data_sha256: str | None = None
    extra_weight: int = 1

    def validate(self) -> None:
        from toolkit.data.datasets import get_dataset
        from toolkit.models import get_entry

        get_entry(self.arch)
        get_dataset(self.dataset)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) <= 0:
                raise ToolkitError(f"must be positive, got {getattr(self, name)}", option=name)
        if self.batch_size > MAX_BATCH_SIZE:
            raise ToolkitError(f"must be at most {MAX_BATCH_SIZE:,}, got {self.batch_size}", option="batch_size")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ToolkitError(f"must be positive and finite, got {self.lr}", option="lr")
        if not 0 <= self.seed <= MAX_SEED:
            raise ToolkitError(f"must be between 0 and {MAX_SEED}, got {self.seed}", option="seed")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ToolkitError(f"weight decay must be a number >= 0, got {self.weight_decay}")
        if self.limit_train is not None and self.limit_train <= 0:
            raise ToolkitError(f"must be positive, got {self.limit_train}", option="limit_train")
        if self.optimizer not in OPTIMIZERS:
            raise ToolkitError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if self.scheduler not in SCHEDULERS:
            raise ToolkitError(f"unknown scheduler {self.scheduler!r}; choose from {', '.join(SCHEDULERS)}")
        if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std > 0):
            raise ToolkitError(f"normalization needs a finite mean and a positive std, got {self.mean}, {self.std}")
        if not 0 <= self.momentum < 1:
            raise ToolkitError(f"must be in [0, 1), got {self.momentum}", option="momentum")
        if not (isinstance(self.extra_weight, int) and 1 <= self.extra_weight <= MAX_EXTRA_WEIGHT):
            raise ToolkitError(f"must be a whole number from 1 to {MAX_EXTRA_WEIGHT}, got {self.extra_weight}",
                               option="extra_weight")


def make_config(arch: str, recipe: str = "default", dataset: str = "mnist", *,
                init_from: str | Path | None = None, extra_data: str | Path | None = None,
                **overrides: Any) -> TrainConfig:
    """A config from the model's recipe, with any non-None `overrides` applied on top. With
    `init_from` (a checkpoint, or a run or export dir), a fine-tuning config instead: that
    model's dataset and normalization, FINETUNE_RECIPE, its weights to start from. With
    `extra_data` (an ImageFolder), those images are mixed into training."""
    from toolkit.data.datasets import get_dataset
    from toolkit.models import get_entry

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
    if init_from is not None:
        config = dataclasses.replace(config, **_starting_point(arch, dataset, init_from), **FINETUNE_RECIPE,
                                     recipe="finetune")
    if extra_data is not None:
        config = dataclasses.replace(config, extra_data=str(Path(extra_data).resolve()),
                                     extra_data_sha256=_extra_data_sha256(extra_data, config.dataset))
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if overrides.get("momentum") is not None and config.optimizer != "sgd":
        raise ToolkitError(f"applies to `optimizer` sgd only, this run uses {config.optimizer}",
                           option="momentum")
    config.validate()
    if overrides.get("extra_weight") is not None and extra_data is None:
        raise ToolkitError("applies to `extra_data` only", option="extra_weight")
    return config


def _starting_point(arch: str, dataset: str, init_from: str | Path) -> dict[str, Any]:
    """What a fine-tuning config takes from the checkpoint it starts from."""
    from toolkit.models.checkpoint import checkpoint_file, load_checkpoint

    path = checkpoint_file(init_from)
    checkpoint = load_checkpoint(path)
    if checkpoint["arch"] != arch:
        raise ToolkitError(f"{path} holds a {checkpoint['arch']} model, not {arch}", option="init_from")
    if checkpoint["dataset"] != dataset:
        raise ToolkitError(f"{path} was trained on {checkpoint['dataset']}, not {dataset}: pass `dataset` "
                           f"{checkpoint['dataset']}", option="init_from")
    normalization = checkpoint["normalization"]
    return {"mean": normalization["mean"], "std": normalization["std"],
            "model_kwargs": dict(checkpoint["model_kwargs"]), "init_from": str(path.resolve()),
            "init_from_sha256": sha256_file(path)}


def _extra_data_sha256(folder: str | Path, dataset: str) -> str:
    """The fingerprint of the labelled images in `folder` for training on `dataset`."""
    from toolkit.data.datasets import get_dataset
    from toolkit.data.imagefolder import image_folder_sha256

    return image_folder_sha256(folder, list(get_dataset(dataset).class_names))


# Settings a resumed run keeps (besides those of TrainConfig: where the run lives).
RUN_PLACE = ("runs_dir", "name")


def resume_config(run: str | Path, arch: str | None = None, *, epochs: int | None = None,
                  **given: Any) -> TrainConfig:
    """The config a resumed run continues with: its own, with only `epochs` changed. Another
    `arch`, or a setting given (not None) with a value other than the run's own, is refused
    rather than ignored; the run's own value is accepted, as people repeat the command they ran
    and add `resume`."""
    run_dir, _, config = load_resume_state(run)
    if arch is not None and arch != config.arch:
        raise ToolkitError(f"{run} is a {config.arch} run, not {arch}: "
                           f"resume it with `toolkit train {config.arch} --resume {run}`")
    for name, value in given.items():
        if value is not None and not _is_own_setting(config, run_dir, name, value):
            raise ToolkitError("cannot be changed with `resume`: the run continues with its own settings (only "
                               "`epochs`, `device` and `data_dir` apply)", option=name)
    return continued_config(config, None if epochs is None else dataclasses.replace(config, epochs=epochs))


def continued_config(saved: TrainConfig, config: TrainConfig | None) -> TrainConfig:
    """The resumed run's config: its own, where `config` may change only `epochs`."""
    if config is None:
        return saved
    changed = [f.name for f in dataclasses.fields(TrainConfig)
               if f.name != "epochs" and getattr(config, f.name) != getattr(saved, f.name)]
    if changed:
        raise ToolkitError(f"a resumed run keeps its own {changed[0]} ({getattr(saved, changed[0])!r}); "
                           "only the number of epochs can change")
    if config.epochs != saved.epochs and saved.scheduler == "onecycle":
        raise ToolkitError(
            f"this run's OneCycle schedule was fixed for {saved.epochs} epochs; "
            f"resume without `epochs` or train a new run"
        )
    config.validate()
    return config


def _is_own_setting(config: TrainConfig, run_dir: Path, name: str, value: Any) -> bool:
    """Whether `value`, as the command line gives it, is what the run was started with: paths
    by where they lead, the checkpoint and extra data also by their content now."""
    from toolkit.models.checkpoint import checkpoint_file

    try:
        if name == "runs_dir":
            return Path(value).resolve() == run_dir.resolve().parent
        if name == "name":
            return value == run_dir.resolve().name
        if name == "init_from":
            path = checkpoint_file(value).resolve()
            return str(path) == config.init_from and sha256_file(path) == config.init_from_sha256
        if name == "extra_data":
            return (str(Path(value).resolve()) == config.extra_data
                    and _extra_data_sha256(value, config.dataset) == config.extra_data_sha256)
    except (OSError, ToolkitError):  # a path that does not lead where the run's did
        return False
    return getattr(config, name) == value


def load_resume_state(run_dir: str | Path) -> tuple[Path, dict[str, Any], TrainConfig]:
    """Read `last.pt` of a run to continue; the run dir or the file itself may be given."""
    from toolkit.models.checkpoint import load_checkpoint

    path = Path(run_dir)
    last = path / "last.pt" if path.is_dir() else path
    checkpoint = load_checkpoint(last)
    if "optimizer_state" not in checkpoint or "config" not in checkpoint:
        raise ToolkitError(f"{last} holds no training state to resume from (pass a run's last.pt)")
    try:
        config = TrainConfig(**checkpoint["config"])
        config.validate()
    except TypeError as exc:
        raise ToolkitError(f"{last} has a config this toolkit cannot read: {exc}") from exc
    epoch, history = checkpoint.get("epoch"), checkpoint.get("metrics", {}).get("history")
    optimizer = checkpoint["optimizer_state"]
    if not (isinstance(epoch, int) and 1 <= epoch <= config.epochs and history and history[-1]["epoch"] == epoch
            and isinstance(optimizer.get("state"), dict) and isinstance(optimizer.get("param_groups"), list)):
        raise ToolkitError(f"{last} holds no consistent training state to resume from (its epoch, history or "
                           "optimizer state is missing or does not agree)")
    return last.parent, checkpoint, config
