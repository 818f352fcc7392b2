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


def teardown(env: DistEnv, finished: bool = False) -> None:
    """Destroy the process group. After a run that `finished` on this process, every rank first
    waits at a barrier, so none destroys its group (closing its gloo connections) while a peer
    is still between its last collective and its own teardown: PyTorch's shutdown guidance is a
    collective destroy once communication is over. A rank that failed skips the barrier (its
    peers may never reach it; torchrun stops them)."""
    global _BN_GROUP
    if env.enabled and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
    _BN_GROUP = None  # destroyed with the rest; a later run in this process makes a new one


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
    plain model). Mean and variance come from all-reduced per-channel sums (differentiable
    all-reduce on a process group of its own, so gradients flow through the global statistics
    as in SyncBatchNorm); running statistics use the unbiased global variance.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        xf = x.float()
        c = x.shape[1]
        # Two passes (mean, then the mean squared deviation), not E[x^2] - mean^2: the
        # pre-activation residual stream has a large mean relative to its spread, where the
        # one-pass formula loses most of its digits to cancellation.
        n_local = torch.tensor([float(x.numel() // c)], device=x.device)
        first = _AllReduceSum.apply(torch.cat([xf.sum(dim=(0, 2, 3)), n_local]))
        n = first[-1]
        mean = first[:c] / n
        var = _AllReduceSum.apply(((xf - mean[None, :, None, None]) ** 2).sum(dim=(0, 2, 3))) / n
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


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes, differentiable: the gradient of a sum is the sum of the gradients
    each process holds for it (every process's loss depends on every process's inputs)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, group=_bn_group())
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=_bn_group())
        return grad


_BN_GROUP = None


def _bn_group():
    """A process group of its own for BN statistics.

    The backward all-reduces run in the middle of autograd, while DDP's gradient-bucket
    all-reduces are in flight on the default group; sharing one gloo group lets the two
    streams of collectives pair up wrongly across ranks (measured: gradients off by ~3%).
    """
    global _BN_GROUP
    if _BN_GROUP is None:
        _BN_GROUP = dist.new_group(backend=dist.get_backend())
    return _BN_GROUP


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm2d by a synchronised one (torch's on CUDA, ours elsewhere).

    Call it on every process at the same point (it creates the BN process group).
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        _bn_group()
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
