"""Process-group setup for torchrun (DDP: gloo on CPU, nccl on CUDA) and BatchNorm sync.

Single node: `torchrun --nproc_per_node=N -m s4l.cli train ...`; multi node: the usual
`--nnodes/--node_rank/--rdzv_endpoint` (or MASTER_ADDR/MASTER_PORT); everything is read from the
environment variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK). Without them the run is a
single process and nothing here touches torch.distributed.

The loss must be the same function of the global batch whatever the number of processes
(S4L_REFERENCE.md section 5): every process holds an equal share of the global batch, the
objectives return means over their local batch, and DDP averages gradients, so the update
equals the single-process update on the whole batch when BN statistics agree (ghost BN with a
fixed per-device BN batch, or synchronised BN). torch's SyncBatchNorm only runs on CUDA/XPU;
`GlobalBatchNorm2d` below is the same computation with autograd-aware all-reduces that also
works on CPU (gloo), so CPU tests can check multi-process equivalence.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None) -> DistEnv:
    """Initialise the process group from torchrun's environment (or a single-process env).

    device: "cuda", "cpu" or None (CUDA when available). With CUDA each process takes the GPU
    `LOCAL_RANK` and uses nccl; on CPU gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if want_cuda else "gloo"
        dist.init_process_group(
            backend=backend, timeout=datetime.timedelta(minutes=30),
            **({"device_id": dev} if want_cuda else {}),
        )
        log.info("process group: backend=%s rank=%d/%d local_rank=%d", backend, rank, world,
                 local_rank)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def teardown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def broadcast_module(module: nn.Module, env: DistEnv) -> None:
    """Make every process start from rank 0's parameters and buffers."""
    if not env.enabled:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def broadcast_buffers(module: nn.Module, env: DistEnv) -> None:
    """Give every process rank 0's BN running statistics (each process updates its own)."""
    if not env.enabled:
        return
    with torch.no_grad():
        for b in module.buffers():
            dist.broadcast(b.data, src=0)


def all_reduce_mean(values: dict[str, torch.Tensor], env: DistEnv) -> dict[str, torch.Tensor]:
    """Mean of 0-d metric tensors over processes (one collective for all of them)."""
    if not env.enabled or not values:
        return values
    keys = sorted(values)
    stacked = torch.stack([values[k].float().reshape(()) for k in keys])
    dist.all_reduce(stacked)
    stacked /= env.world_size
    return {k: stacked[i] for i, k in enumerate(keys)}


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        dist.all_reduce(t)
    return t


# ----------------------------------------------------------------------------- BatchNorm sync


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are over the batch of ALL processes.

    Same parameters, buffers and state-dict keys as nn.BatchNorm2d (checkpoints load into a
    plain model). Mean and variance come from all-reduced per-channel sums (autograd-aware
    `torch.distributed.nn.functional.all_reduce`, so gradients flow through the global
    statistics as in SyncBatchNorm); running statistics use the unbiased global variance.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        xf = x.float()
        n_local = torch.tensor([float(x.numel() // x.shape[1])], device=x.device)
        stats = torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)), n_local])
        stats = all_reduce(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * n / (n - 1).clamp_min(1)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm2d by a synchronised one (torch's on CUDA, ours elsewhere)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_global(module)


def _convert_global(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlobalBatchNorm2d):
        out = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        out.load_state_dict(module.state_dict())
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert_global(child))
    return out


__all__ = [
    "DistEnv",
    "GlobalBatchNorm2d",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "broadcast_buffers",
    "broadcast_module",
    "convert_sync_batchnorm",
    "setup",
    "teardown",
]
