"""`toolkit inspect`: the layer table, FLOPs, first-layer filters and feature maps of a model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from toolkit.core.errors import ToolkitError
from toolkit.core.fileio import files_together, write_json
from toolkit.core.plots import plot_feature_maps, plot_filters
from toolkit.data.datasets import get_dataset, load_split
from toolkit.models import count_parameters, create_model, list_models
from toolkit.models.checkpoint import build_model, checkpoint_file, load_checkpoint

PICTURES = ("filters.png", "feature_maps.png")
ACTIVATIONS = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.LeakyReLU, nn.ELU, nn.SiLU)
GRAPH_NOTE = ("no graph picture: no maintained Python library draws one without a system binary (Graphviz); "
              "the exported model.onnx is the graph: open it in Netron (https://netron.app)")


@dataclass
class LayerRow:
    name: str
    type: str
    output_shape: list[int]
    parameters: int


def layer_table(model: nn.Module) -> list[LayerRow]:
    """Every leaf module with its output shape for one 1x28x28 image, in execution order."""
    rows: list[LayerRow] = []
    hooks = []
    for name, module in model.named_modules():
        if list(module.children()):
            continue
        def record(mod: nn.Module, _inputs: Any, output: torch.Tensor, name: str = name) -> None:
            rows.append(LayerRow(name, type(mod).__name__, list(output.shape[1:]),
                                 sum(p.numel() for p in mod.parameters())))
        hooks.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 1, 28, 28))
    finally:
        for hook in hooks:
            hook.remove()
    return rows


def flops_per_image(model: nn.Module) -> int:
    """Floating-point operations (multiply and add counted separately) for one image."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    return int(counter.get_total_flops())


def first_conv_and_activation(model: nn.Module) -> tuple[nn.Conv2d | None, nn.Module | None]:
    """The first Conv2d and the nonlinearity right after it (if any), in module order."""
    modules = list(model.modules())
    for index, module in enumerate(modules):
        if isinstance(module, nn.Conv2d):
            following = modules[index + 1] if index + 1 < len(modules) else None
            return module, following if isinstance(following, ACTIVATIONS) else None
    return None, None


def one_digit_per_class(dataset: str, data_dir: str | Path | None) -> tuple[np.ndarray, list[str]]:
    test = load_split(dataset, data_dir, train=False)
    names = get_dataset(dataset).class_names
    firsts = [int(np.flatnonzero(test.labels.numpy() == c)[0]) for c in range(len(names))]
    return test.pixels()[firsts].numpy(), list(names)


def inspect_model(
    target: str | Path, out_dir: str | Path | None = None, *, data_dir: str | Path | None = None
) -> tuple[Path, dict[str, Any]]:
    """Inspect a checkpoint, or a freshly initialized zoo model when `target` is a model name."""
    if str(target) in list_models():
        name, trained = str(target), False
        model = create_model(name).eval()
        spec = get_dataset("mnist")
        dataset, mean, std = spec.name, spec.mean, spec.std
    elif Path(target).exists():
        path = checkpoint_file(target)
        checkpoint = load_checkpoint(path)
        name, trained = path.resolve().parent.name, True
        model, dataset = build_model(checkpoint), checkpoint["dataset"]
        mean, std = checkpoint["normalization"]["mean"], checkpoint["normalization"]["std"]
    else:
        raise ToolkitError(f"{target} is neither a checkpoint file nor a model name ({', '.join(list_models())})")
    out_dir = Path(out_dir or Path("reports") / name)
    rows = layer_table(model)
    report: dict[str, Any] = {
        "model": str(target),
        "trained": trained,
        "layers": [row.__dict__ for row in rows],
        "total_parameters": count_parameters(model),
        "flops_per_image": flops_per_image(model),
        "pictures": [],
        "notes": [GRAPH_NOTE],
    }
    conv, activation = first_conv_and_activation(model)
    state = "trained" if trained else "untrained"
    with files_together(out_dir) as stage:  # a failed run leaves an earlier report as it was
        if conv is None:
            report["notes"].append("no convolutional layer: no filters or feature maps to draw")
        else:
            digits, labels = one_digit_per_class(dataset, data_dir)
            plot_filters(conv.weight.detach().numpy(), stage("filters.png"),
                         f"{name}: first conv layer's {conv.out_channels} kernels ({state})")
            captured: list[torch.Tensor] = []
            hook = (activation or conv).register_forward_hook(lambda _m, _i, out: captured.append(out))
            try:
                with torch.no_grad():
                    model((torch.from_numpy(digits) - mean) / std)
            finally:
                hook.remove()
            after = type(activation).__name__ if activation is not None else "no nonlinearity"
            plot_feature_maps(digits[:, 0], captured[0].numpy(), labels, stage("feature_maps.png"),
                              f"{name}: first conv layer's activations (after {after})")
            report["pictures"] += list(PICTURES)
        write_json(stage("inspect.json"), report)
    for stale in sorted(set(PICTURES) - set(report["pictures"])):  # an earlier report's, of another model
        (out_dir / stale).unlink(missing_ok=True)
    return out_dir, report
