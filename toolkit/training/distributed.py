"""Where training runs: the torch device, and this process's place in a torchrun job."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from toolkit.core.errors import ToolkitError


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when usable, else CPU; `cuda` without a usable GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ToolkitError("cuda was asked for but no CUDA GPU is usable here; use `device` cpu", option="device")
    if device not in ("cpu", "cuda"):
        raise ToolkitError(f"unknown device {device!r}; choose from auto, cpu, cuda")
    return torch.device(device)


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
