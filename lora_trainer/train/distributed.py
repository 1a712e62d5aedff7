"""Data-parallel training across processes (`accelerate launch`, `torchrun`): the few questions the loop asks.

The loop only asks: which process am I, is it the main one (it alone writes files, logs and samples), sum these
gradients / values over all processes, wait for the others. `ProcessGroup` answers for one process (every call a
no-op), so the loop never branches on the process count; `TorchProcessGroup` answers through `torch.distributed`.

Launchers set `WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`; `join_process_group` reads
them (the `env://` rendezvous), so `accelerate launch --multi_gpu --num_processes N`, `torchrun --nproc_per_node N`
and a plain `python -m lora_trainer train` (one process) all run the same code. CUDA processes use NCCL, CPU
processes gloo. (`accelerate launch --cpu` alone starts one process; `--multi_gpu` is its multi-process launcher,
and with `--device cpu` or without CUDA the processes join over gloo.) The WebUI never joins a group.

What N processes compute (kohya's meaning of the keys):
- `train_batch_size` is per process: a step trains on N x train_batch_size images. The epoch is planned in global
  batches of N x train_batch_size from one bucket (`TrainDataset.processes`); each process takes its contiguous
  share (`process_share`). So an epoch has about 1/N of the steps, `max_train_steps` still counts optimizer steps,
  and N processes at batch B run exactly the steps of one process at batch N x B. (kohya's data loader gives each
  process whole batches, possibly from different buckets; ours splits one batch so the two runs are the same.)
- Each process weights its loss by its share of the global batch and the gradients are summed, so the step is
  the one-process step of the whole batch. Noise and timesteps are drawn for the whole global batch from a
  generator seeded by (seed, epoch, batch), captions likewise, so every sample sees the same randomness in any
  process count. Differences left: float rounding (sums in another order; Adam magnifies it in near-zero
  gradients), the VAE's latent sample when `cache_latents` is off (each process encodes its own share), and
  network/rank/module dropout masks (drawn per process).
- Only the main process writes LoRA files, resume states, logs and samples; the others wait at a barrier. A
  state records its steps per epoch and process count, so it resumes under another process count at the same
  point of its epoch (exactly the same run when the total batch is the same).
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Launch:
    """What the launcher told this process.

    Attributes:
        rank (int): this process's number, 0 is the main process.
        world_size (int): how many processes train together.
        local_rank (int): this process's number on its machine (its CUDA device index).
    """

    rank: int
    world_size: int
    local_rank: int


def launched() -> Launch | None:
    """The launcher's environment, or None when this process runs alone.

    Returns:
        Launch | None: rank, world size and local rank when `WORLD_SIZE` > 1.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    rank = int(os.environ.get("RANK", "0") or 0)
    return Launch(rank, world, int(os.environ.get("LOCAL_RANK", str(rank)) or 0))


def process_share(count: int, rank: int, world_size: int) -> slice:
    """The contiguous part of `count` samples one process takes: as even as possible, earlier ranks take the
    remainder (a part may be empty when `count` < `world_size`).

    Args:
        count (int): samples in the global batch.
        rank (int): the process.
        world_size (int): the number of processes.

    Returns:
        slice: positions in the global batch.
    """
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


class ProcessGroup:
    """One process training alone: it is the main process and every collective returns its input."""

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        """This process writes files, logs and samples."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process gets here."""

    def sum_values(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `values` over all processes (a new tensor)."""
        return values.clone()

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace every gradient by its sum over all processes (a missing gradient counts as zeros)."""

    def any(self, flag: bool) -> bool:
        """True when `flag` is true in any process (a stop asked for in one process stops all)."""
        return bool(flag)

    @contextmanager
    def main_first(self):
        """Run the block in the main process first, then in the others (shared folders and caches)."""
        yield

    def close(self) -> None:
        """Leave the group."""


class TorchProcessGroup(ProcessGroup):
    """Processes joined through `torch.distributed` (already initialised).

    Args:
        device (torch.device | str): where this process trains (collectives run there: NCCL needs CUDA tensors).
    """

    def __init__(self, device):
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = torch.device(device)

    def barrier(self) -> None:
        self._dist.barrier()

    def sum_values(self, values: torch.Tensor) -> torch.Tensor:
        summed = values.detach().to(self.device, torch.float32).clone()
        self._dist.all_reduce(summed, op=self._dist.ReduceOp.SUM)
        return summed.to(values.device)

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        # one flat buffer: one collective per step instead of one per LoRA module
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.detach().reshape(-1).to(self.device, torch.float32) for g in grads])
        self._dist.all_reduce(flat, op=self._dist.ReduceOp.SUM)
        offset = 0
        for param, grad in zip(params, grads):
            size = grad.numel()
            param.grad = flat[offset:offset + size].view_as(grad).to(grad.dtype).to(param.device)
            offset += size

    def any(self, flag: bool) -> bool:
        return bool(self.sum_values(torch.tensor([1.0 if flag else 0.0])).item() > 0)

    @contextmanager
    def main_first(self):
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


def process_device(device: str | None, launch: Launch | None) -> str | None:
    """The device of this process: with several processes on CUDA, each takes `cuda:<local rank>`.

    Args:
        device (str, optional): the device asked for ("cuda", "cpu", "cuda:1"); None = CUDA when available.
        launch (Launch, optional): from `launched()`.

    Returns:
        str | None: the device to train on (unchanged for one process or an explicit "cuda:N" / "cpu").
    """
    if launch is None:
        return device
    if device in (None, "cuda") and torch.cuda.is_available():
        return f"cuda:{launch.local_rank}"
    return device or "cpu"


def join_process_group(device: str | None) -> ProcessGroup:
    """Join the launcher's process group (gloo on the CPU, NCCL on CUDA), or stand alone.

    Args:
        device (str, optional): this process's device, from `process_device`.

    Returns:
        ProcessGroup: `TorchProcessGroup` under a launcher with more than one process, else `ProcessGroup()`.
    """
    launch = launched()
    if launch is None:
        return ProcessGroup()
    import torch.distributed as dist

    on_cuda = device is not None and str(device).startswith("cuda")
    if on_cuda:
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if on_cuda else "gloo", init_method="env://")
    group = TorchProcessGroup(device or "cpu")
    logger.info("process %d of %d (%s, %s)", group.rank + 1, group.world_size, dist.get_backend(), device or "cpu")
    return group
