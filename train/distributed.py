"""Multi-process support: ``torchrun --nproc_per_node N -m train ...``.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; we then join a
process group (gloo on CPU, nccl on CUDA), wrap the model in DistributedDataParallel, shard
the data with DistributedSampler, reduce metrics across ranks and let rank 0 alone write the
run folder.  Without those variables everything runs in one process with the same code path
(world size 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def restart_count(self) -> int:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init(device_kind: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join the process group when launched by torchrun (or any env:// launcher)."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() and device_kind != "cpu"
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        # Our own store, namespaced by torchrun's restart count: a restarted worker group must
        # not read the connection keys that the previous (dead) group left in the agent's store.
        use_agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=(rank == 0 and not use_agent_store), timeout=timeout)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or "0"
        store = dist.PrefixStore(f"ffebm_train/attempt_{restart}", store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return DistContext(rank=rank, world=world, local_rank=local_rank, backend=backend)


def is_peer_failure(e: BaseException) -> bool:
    """Whether an exception from a collective means another process died or hung up."""
    text = str(e)
    return any(k in text for k in ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                                   "connectFullMesh", "NCCL communicator was aborted", "timed out"))


def shutdown():
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 -- best effort at exit
            pass


def all_reduce_(t: torch.Tensor, ctx: DistContext, op=None) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def reduce_values(values: List[float], ctx: DistContext, device) -> List[float]:
    """Sum a list of floats over all ranks (float64)."""
    if not ctx.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_flag(flag: float, ctx: DistContext, device) -> float:
    """Max of a per-rank flag over all ranks (0 = all clear)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([float(flag)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext):
    if ctx.enabled:
        dist.barrier()


def all_gather_object(obj: Any, ctx: DistContext) -> List[Any]:
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def wrap_ddp(model: torch.nn.Module, device: torch.device, ignore: set) -> torch.nn.Module:
    """``DistributedDataParallel(model)``, leaving the parameters whose ids are in ``ignore``
    out of the gradient all-reduce (e.g. pulsed analog weights, gathered by their own plug-in)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    DDP._set_params_and_buffers_to_ignore_for_model(model, [n for n, q in model.named_parameters() if id(q) in ignore])
    return DDP(model, **({"device_ids": [device.index]} if device.type == "cuda" else {}))
