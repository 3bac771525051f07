"""torch.distributed for ``torchrun``: process group, rank-sharded global batches, DDP, synchronised BatchNorm.

``torchrun --nproc-per-node N -m anomap fit ...`` starts N copies of the same command; each finds its
rank in the environment (RANK, WORLD_SIZE, LOCAL_RANK, set by torchrun), joins the process group
(gloo on CPU, nccl on CUDA with one GPU per process: ``cuda:LOCAL_RANK``) and trains one shard of
every step's batch. The rules (docs/scale.md):

* The global batch is the config's batch size, whatever N is; each rank takes its contiguous
  ``batch_size / N`` slice of the step's batch (N must divide it). The learning rate is unchanged.
* Every rank builds the whole global batch with the same numpy Generator (so corruption draws, and
  the Generator state stored in checkpoints, are those of one process) and keeps its slice.
* The torch RNG (MAE masks, dropout inside ``training_step``) is seeded per rank: rank 0 with the
  seed, rank r > 0 with :func:`rank_seed`; checkpoints store every rank's state.
* DDP averages gradients over ranks; each rank's loss is a mean over its own equal-sized shard, so the
  average equals the global-batch mean. BatchNorm layers use the global batch's statistics
  (:func:`sync_batchnorm`), so a run with N processes follows the one-process run up to float rounding.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from anomap.errors import AnomapError, ConfigError

if TYPE_CHECKING:
    from anomap.train.trainable import Trainable

log = logging.getLogger(__name__)

TIMEOUT_ENV = "ANOMAP_DIST_TIMEOUT_S"  # seconds a collective may wait (default: torch's, 30 min)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a torchrun job (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        """More than one process: collectives are needed."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs, progress bars and the model, and calibrates."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """Local rank 0 builds the node's image cache."""
        return self.local_rank == 0


SINGLE = DistContext()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer.",
                          fix="start multi-process runs with torchrun, which sets it") from None


def env_context() -> DistContext:
    """The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); none -> one process."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} does not fit WORLD_SIZE={world}.", fix="start the job with torchrun")
    local_world = _env_int("LOCAL_WORLD_SIZE", max(1, world))
    return DistContext(rank, world, _env_int("LOCAL_RANK", 0), max(1, local_world))


def _device(name: str, ctx: DistContext) -> torch.device:
    """The device of this rank: cpu, or ``cuda:LOCAL_RANK`` for cuda/auto (one GPU per process)."""
    from anomap.train.runtime import resolve_device

    dev = resolve_device(name)
    if dev.type == "cuda":
        if ctx.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {ctx.local_rank} has no GPU ({torch.cuda.device_count()} visible).",
                              fix="start at most one process per GPU (--nproc-per-node)")
        if dev.index not in (None, ctx.local_rank):
            log.warning("device=%s ignored: with torchrun each process uses cuda:LOCAL_RANK", name)
        return torch.device("cuda", ctx.local_rank)
    if dev.type != "cpu":
        raise ConfigError(f"device={name!r} cannot be used with several processes.", fix="use cpu or cuda")
    return dev


@contextlib.contextmanager
def session(device: str) -> Iterator[tuple[DistContext, torch.device]]:
    """Join the torchrun job described by the environment, if any; leave it on exit, errors included.

    Yields (context, device). Without torchrun (or with one process) nothing is initialised. A
    process group the caller initialised already is used and left alone. On an error the group is
    destroyed without a barrier: the other ranks may be dead or stuck, and torchrun stops them.
    """
    ctx = env_context()
    if not ctx.enabled:
        from anomap.train.runtime import resolve_device

        yield ctx, resolve_device(device)
        return
    dev = _device(device, ctx)
    if dist.is_initialized():
        if dist.get_world_size() != ctx.world_size or dist.get_rank() != ctx.rank:
            raise ConfigError("the initialised process group does not match RANK/WORLD_SIZE.")
        yield ctx, dev
        return
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    timeout = os.environ.get(TIMEOUT_ENV)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                            timeout=timedelta(seconds=float(timeout)) if timeout else None)
    if ctx.is_main:
        log.info("distributed: %d processes, backend %s", ctx.world_size, dist.get_backend())
    try:
        yield ctx, dev
    finally:
        dist.destroy_process_group()


def threads_per_process(num_threads: int, ctx: DistContext) -> int:
    """torch threads for this process: ``num_threads`` if set, else the usable cores shared by the node's ranks."""
    if num_threads > 0:
        return num_threads
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(16, cores // ctx.local_world_size))


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op for one process)."""
    if ctx.enabled:
        dist.barrier()


# --- global batches ------------------------------------------------------------------------------


def shard(batch_size: int, ctx: DistContext) -> slice:
    """This rank's contiguous slice of a global batch of ``batch_size``.

    Raises:
        ConfigError: the number of processes does not divide the batch size.
    """
    if batch_size % ctx.world_size:
        raise ConfigError(f"batch size {batch_size} cannot be split over {ctx.world_size} processes.",
                          fix="use a batch size divisible by the number of processes (the global batch "
                              "is the config's batch size)")
    per = batch_size // ctx.world_size
    return slice(ctx.rank * per, (ctx.rank + 1) * per)


def shard_batch(batch: dict[str, Any], batch_size: int, ctx: DistContext) -> dict[str, Any]:
    """Keep this rank's rows of every tensor whose first dimension is the global batch."""
    if not ctx.enabled:
        return batch
    sl = shard(batch_size, ctx)
    return {k: v[sl] if isinstance(v, Tensor) and v.ndim and v.shape[0] == batch_size else v
            for k, v in batch.items()}


def rank_seed(seed: int, rank: int) -> int:
    """torch seed of a rank: ``seed`` on rank 0 (= the one-process run), a derived 63-bit seed elsewhere."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# --- collectives on small values --------------------------------------------------------------------


def mean_scalars(values: dict[str, float], ctx: DistContext, device: torch.device) -> dict[str, float]:
    """Average a dict of floats over ranks (same keys in the same order on every rank)."""
    if not ctx.enabled or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / ctx.world_size).tolist(), strict=True))


def any_rank(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (all ranks must call it)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def run_on_main(fn: Callable[[], Any], ctx: DistContext) -> Any:
    """Run ``fn`` on rank 0 only and give every rank its result; an AnomapError it raises is raised everywhere."""
    if not ctx.enabled:
        return fn()
    box: list[Any] = [None]
    if ctx.is_main:
        try:
            box[0] = ("ok", fn())
        except AnomapError as e:
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


# --- the model ---------------------------------------------------------------------------------------


class _TrainingStep(nn.Module):
    """Makes ``method.training_step`` the ``forward`` that DDP runs (its hooks need a forward call)."""

    method: Trainable  # an nn.Module: registered as this module's child, so DDP sees its parameters

    def __init__(self, method: Trainable):
        super().__init__()
        self.method = method

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        return self.method.training_step(batch, step)


@contextlib.contextmanager
def data_parallel(method: Trainable, optimizer: torch.optim.Optimizer, ctx: DistContext,
                  device: torch.device) -> Iterator[Callable[[dict[str, Tensor], int], dict[str, Tensor]]]:
    """A ``training_step`` whose gradients are averaged over ranks, for one stage.

    Only the parameters the stage's optimizer updates take part: any other parameter that still
    requires a gradient (a frozen teacher, isstad's encoder in stage 2) is set to ``requires_grad=False``
    while the stage runs, so DDP neither waits for nor reduces its gradient. DDP is built anew for each
    stage (after ``set_stage``) and dropped at its end, its autograd hooks with it.
    """
    if not ctx.enabled:
        yield method.training_step
        return
    from torch.nn.parallel import DistributedDataParallel

    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    frozen = [p for p in method.parameters() if p.requires_grad and id(p) not in trained]
    for p in frozen:
        p.requires_grad_(False)
    ddp = None
    try:
        ddp = DistributedDataParallel(_TrainingStep(method), device_ids=[device.index] if device.type == "cuda"
                                      else None, forward_sync_buffers=False)
        yield ddp
    finally:
        del ddp
        gc.collect()  # release the reducer (and its hooks on the parameters) before the next stage
        for p in frozen:
            p.requires_grad_(True)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients over ranks (each rank's loss depends on all inputs)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


class _GlobalBatchNorm:
    """Mixin forward for BatchNorm1d/2d/3d: statistics over the global batch when training distributed.

    Two reductions (mean, then the centred second moment; summed in float64 on CPU) keep the
    precision of the one-process layer; running statistics are updated as ``nn.BatchNorm`` does. In eval
    mode, or outside a process group, it is the plain layer.
    """

    def forward(self, x: Tensor) -> Tensor:
        bn: Any = self
        if not (bn.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)  # type: ignore[misc]
        dims = [0, *range(2, x.ndim)]
        count = x.numel() // x.shape[1] * dist.get_world_size()
        shape = [1, -1] + [1] * (x.ndim - 2)
        acc = torch.float64 if x.device.type == "cpu" else torch.float32  # what the native kernels accumulate in
        mean = (_AllReduceSum.apply(x.sum(dims, dtype=acc)) / count).to(x.dtype)
        centred = x - mean.view(shape)
        var = (_AllReduceSum.apply(centred.pow(2).sum(dims, dtype=acc)) / count).to(x.dtype)
        if bn.track_running_stats:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                m = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
                bn.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                bn.running_var.mul_(1 - m).add_(var.detach() * (count / max(1, count - 1)), alpha=m)
        y = centred * torch.rsqrt(var + bn.eps).view(shape)
        if bn.affine:
            y = y * bn.weight.view(shape) + bn.bias.view(shape)
        return y


_GLOBAL_BN: dict[type[nn.Module], type[nn.Module]] = {
    cls: type(f"Global{cls.__name__}", (_GlobalBatchNorm, cls), {})
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
}


@contextlib.contextmanager
def sync_batchnorm(module: nn.Module | Trainable, ctx: DistContext) -> Iterator[int]:
    """Make the BatchNorm layers of ``module`` normalise with global-batch statistics while inside.

    The layers keep their parameters, buffers and state_dict keys (only their class is swapped to a
    subclass and back), so optimizers, checkpoints and saved models are unaffected. Yields the number
    of layers changed. torch's ``SyncBatchNorm`` is not used because it refuses CPU tensors.
    """
    changed: list[tuple[nn.Module, type]] = []
    if ctx.enabled:
        for m in module.modules():
            if type(m) in _GLOBAL_BN:
                changed.append((m, type(m)))
                m.__class__ = _GLOBAL_BN[type(m)]
    try:
        yield len(changed)
    finally:
        for m, cls in changed:
            m.__class__ = cls
