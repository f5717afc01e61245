"""`toolkit compare`: train several models the same way and set them side by side."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from toolkit.core.errors import ToolkitError
from toolkit.core.fileio import write_json
from toolkit.core.plots import plot_comparison
from toolkit.models import count_parameters, create_model
from toolkit.models.checkpoint import build_model, load_checkpoint
from toolkit.training.config import make_config
from toolkit.training.train import ProgressFactory, train


def median_latency_us(model: torch.nn.Module, batch_size: int = 1, repeats: int = 200) -> float:
    """Median wall time of one eager forward pass, in microseconds (after warm-up)."""
    x = torch.rand(batch_size, 1, 28, 28)
    times = []
    with torch.no_grad():
        for index in range(repeats + 20):
            start = time.perf_counter()
            model(x)
            if index >= 20:
                times.append(time.perf_counter() - start)
    return 1e6 * sorted(times)[len(times) // 2]


def compare(
    archs: list[str],
    *,
    epochs: int | None = None,
    recipe: str = "default",
    dataset: str = "mnist",
    data_dir: str | Path | None = None,
    limit_train: int | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    device: str = "auto",
    progress: ProgressFactory | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Path, list[dict[str, Any]]]:
    """Train each arch with the same data and seed; write compare.json and compare.png."""
    repeated = sorted({arch for arch in archs if archs.count(arch) > 1})
    if repeated:
        raise ToolkitError(f"each model is compared once; named more than once: {', '.join(repeated)}")
    # Every config first: a typo or a bad number fails before any training starts.
    configs = {arch: make_config(arch, recipe, dataset, epochs=epochs, limit_train=limit_train, seed=seed)
               for arch in archs}
    out_dir = Path(out_dir or Path("reports") / f"compare-{datetime.now():%Y%m%d-%H%M%S}")
    rows, histories = [], {}
    for arch, config in configs.items():
        log(f"training {arch}")
        result = train(config, data_dir=data_dir, runs_dir=out_dir / "runs", name=arch, device=device,
                       progress=progress, log=log)
        model = build_model(load_checkpoint(result.run_dir / "best.pt"))
        histories[arch] = result.history
        rows.append({
            "arch": arch,
            "parameters": count_parameters(create_model(arch)),
            "epochs": config.epochs,
            "best_test_acc": result.best_test_acc,
            "final_test_acc": result.history[-1]["test_acc"],
            "train_seconds": result.train_seconds,
            "latency_us_batch1": median_latency_us(model),
            "run_dir": str(result.run_dir),
        })
    plot_comparison(histories, out_dir / "compare.png")
    write_json(out_dir / "compare.json", {"dataset": dataset, "recipe": recipe, "seed": seed, "models": rows})
    return out_dir, rows
