"""Compute resource: device, mixed precision and worker counts for training/inference steps.

GPU admission is not decided here but by the instance: every GPU job carries the run tag
``psqa/gpu=true`` (limited by ``tag_concurrency_limits`` in ``dagster.yaml``) and GPU assets
declare ``pool="gpu"`` (limited by ``concurrency.pools``). See ``GPU_RUN_TAGS``/``GPU_POOL``.
"""

import os
from dataclasses import dataclass

import dagster as dg
from pydantic import Field

GPU_RUN_TAGS = {"psqa/gpu": "true"}
GPU_POOL = "gpu"


@dataclass(frozen=True)
class ComputePlan:
    device: str  # cpu | cuda | cuda:N
    amp_dtype: str  # off | bf16 | fp16
    num_workers: int
    cuda_available: bool
    device_name: str


class ComputeResource(dg.ConfigurableResource):
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    amp: str = Field(default="auto", description="auto (bf16 on GPUs that support it) | bf16 | fp16 | off")
    num_workers: int = Field(default=-1, description="data-loader workers; -1 = cores - 1 (at most 8)")

    def plan(self) -> ComputePlan:
        import torch

        cuda = torch.cuda.is_available()
        if self.device == "auto":
            device = "cuda" if cuda else "cpu"
        else:
            device = self.device
            if device.startswith("cuda") and not cuda:
                raise dg.Failure(f"device={device!r} requested but no CUDA device is visible")
        if self.amp == "auto":
            amp = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "off"
        else:
            amp = self.amp
        if amp not in ("off", "bf16", "fp16"):
            raise dg.Failure(f"amp must be off|bf16|fp16|auto, got {amp!r}")
        workers = self.num_workers if self.num_workers >= 0 else max(0, min((os.cpu_count() or 1) - 1, 8))
        name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
        return ComputePlan(device=device, amp_dtype=amp, num_workers=workers, cuda_available=cuda, device_name=name)
