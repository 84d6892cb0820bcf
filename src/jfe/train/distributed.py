"""Distributed data parallel helpers (torchrun; gloo on CPU, NCCL on GPU).

JFE does not wrap the model in ``DistributedDataParallel``: phases switch ``requires_grad`` mid-run and
GradCache backpropagates in chunks, both of which DDP's bucketed hooks dislike. Instead every rank
computes the *global* contrastive loss over embeddings gathered from all ranks, with only its own shard
carrying gradient (:func:`gather_with_grad`), and the parameter gradients are then summed across ranks
(:meth:`DistContext.sum_gradients`). The sum of the shard-wise gradients is exactly the gradient of the
global loss, so a 2-process run takes the same steps as one process on the same global batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    """Where this process sits in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialised_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum_gradients(self, params: Iterable[torch.nn.Parameter], average: bool = False) -> None:
        """All-reduce ``.grad`` of ``params`` (sum, or mean with ``average``). Params without a grad on
        every rank are skipped consistently because ``requires_grad`` is identical on all ranks."""
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        # One flat buffer: a single collective instead of one per tensor.
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if average:
            flat /= self.world_size
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Make every rank start from rank 0's weights (random inits may differ per process)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src=0)

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shutdown(self) -> None:
        if self.initialised_here and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: str | None = None) -> DistContext:
    """Read torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and join the process group.

    Without those variables this is a single-process context. ``device`` forces a device type
    ("cpu"/"cuda"); by default CUDA is used where present (one GPU per local rank, NCCL), else gloo.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        requested = torch.device(device).index if device else None
        # torchrun: one GPU per process on each node; alone: the requested GPU or the first
        index = local_rank if world_size > 1 else (requested or 0)
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    ctx = DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        ctx.initialised_here = True
    return ctx


def gather_with_grad(local: torch.Tensor, ctx: DistContext | None) -> torch.Tensor:
    """Concatenate ``local`` from every rank in rank order; only the local slice keeps its graph.

    The other ranks' rows are constants here; their gradients are computed on their own ranks and
    combined by :meth:`DistContext.sum_gradients`.
    """
    if ctx is None or not ctx.enabled:
        return local
    parts = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(parts, local.detach().contiguous())
    parts[ctx.rank] = local
    return torch.cat(parts, dim=0)

