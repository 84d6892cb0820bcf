"""Distributed data parallel helpers (torchrun; gloo on CPU, NCCL on GPU).

JFE does not wrap the model in ``DistributedDataParallel``: phases switch ``requires_grad`` mid-run and
GradCache backpropagates in chunks, both of which DDP's bucketed hooks dislike. Instead every rank
computes the *global* contrastive loss over embeddings gathered from all ranks, with only its own shard
carrying gradient (:func:`gather_with_grad`), and the parameter gradients are then summed across ranks
(:meth:`DistContext.sum_gradients`). The sum of the shard-wise gradients is exactly the gradient of the
global loss, so a 2-process run takes the same steps as one process on the same global batch.

Launchers: ``torchrun`` or ``accelerate launch`` (which runs torchrun underneath and sets the same
variables); ``configs/accelerate/ddp.yaml`` and ``fsdp.yaml`` are ready-made. Under an FSDP config
(``ACCELERATE_USE_FSDP=true``) :meth:`DistContext.shard` applies torch's ``fully_shard`` (FSDP2) to every
transformer block and to the root: the frozen base weights are sharded across ranks and gathered block by
block for each forward, while the trainable LoRA weights (parameters named ``lora_*``) are left whole on
every rank (``ignored_params``), so their gradients are still summed by :meth:`DistContext.sum_gradients`
and the step is the same as without FSDP.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
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
    fsdp: FSDPOptions | None = None
    """Set when launched with an FSDP config (``accelerate launch --config_file configs/accelerate/fsdp.yaml``)."""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """True when the model's weights are split across ranks: every rank must then run every forward
        (validation included), because each one gathers weights from all ranks."""
        return self.enabled and self.fsdp is not None

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """Apply FSDP2 to ``model`` in place when this run is an FSDP run; otherwise return it unchanged."""
        if not self.sharded or self.fsdp is None:  # sharded implies fsdp; the None check narrows its type
            return model
        return shard_frozen_weights(model, self.fsdp, self.device)

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


@dataclass
class FSDPOptions:
    """The FSDP settings JFE honours, read from the variables ``accelerate launch`` sets."""

    block_classes: list[str] = field(default_factory=list)
    """Class names to shard one by one; empty: every class a submodule lists in ``_no_split_modules``."""
    reshard_after_forward: bool = True
    offload_params: bool = False

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> FSDPOptions | None:
        env = dict(os.environ) if env is None else env
        if env.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
            return None
        if env.get("FSDP_VERSION", "2") != "2":
            from jfe.errors import ConfigError

            raise ConfigError("JFE shards with FSDP2 (torch fully_shard): set fsdp_version: 2 in the accelerate "
                              "config (configs/accelerate/fsdp.yaml)")
        names = [n.strip() for n in env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if n.strip()]

        def flag(key: str, default: str) -> bool:
            return env.get(key, default).lower() == "true"

        return cls(block_classes=names, reshard_after_forward=flag("FSDP_RESHARD_AFTER_FORWARD", "true"),
                   offload_params=flag("FSDP_OFFLOAD_PARAMS", "false"))


def shard_frozen_weights(model: torch.nn.Module, options: FSDPOptions,
                         device: torch.device | None = None) -> torch.nn.Module:
    """``fully_shard`` each transformer block, then the root, leaving ``lora_*`` parameters unsharded.

    Build the model on CPU first (the trainer does under FSDP): ``fully_shard`` moves each rank's shard to
    the device, so no GPU ever holds the whole model; the unsharded LoRA weights are moved to ``device``.

    Only frozen weights may be sharded here: a sharded trainable weight would get FSDP's averaged,
    reduce-scattered gradient, not the summed gradient of the global loss that every other parameter
    gets, so a model without LoRA adapters is refused (train it with LoRA, or with ddp.yaml).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    from jfe.errors import ConfigError

    kept = {p for n, p in model.named_parameters() if "lora_" in n}
    if not kept:
        raise ConfigError("FSDP in JFE shards the frozen base model and keeps LoRA adapters whole; this model "
                          "has no LoRA parameters (set model_overrides.lora_r > 0, or use the DDP config)")
    names = set(options.block_classes)
    if not names:
        for module in model.modules():
            names.update(getattr(module, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(f"FSDP: no submodule of class {sorted(names) or '(none listed)'} to shard; set "
                          f"fsdp_transformer_layer_cls_to_wrap in the accelerate config")
    kwargs: dict[str, Any] = {"reshard_after_forward": options.reshard_after_forward,
                              "offload_policy": CPUOffloadPolicy() if options.offload_params else OffloadPolicy()}
    for block in blocks:
        fully_shard(block, ignored_params={p for p in block.parameters() if p in kept} or None, **kwargs)
    # The root must be the module whose forward is called (FSDP gathers the root's own weights in a forward
    # hook); JFE encoders call self.backbone(...) from embed(), not self(...).
    backbone = getattr(model, "backbone", None)
    root = backbone if isinstance(backbone, torch.nn.Module) else model
    fully_shard(root, ignored_params={p for p in root.parameters() if p in kept}, **kwargs)
    if device is not None:
        with torch.no_grad():
            for param in kept:
                param.data = param.data.to(device)
    return model


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
    ctx = DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev,
                      fsdp=FSDPOptions.from_env() if world_size > 1 else None)
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

