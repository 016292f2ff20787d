"""Multi-process support: DDP, FSDP2 (``fully_shard``) and ``accelerate``.

What the manager does when ``torch.distributed`` is initialised:

* **DDP** (or any replicated data parallelism, ``accelerate`` included): every rank
  holds the full weights, so every rank computes the masks itself. Statistics a metric
  gathered from its own rank's data are summed over all ranks first
  (:meth:`artemis.metrics.ImportanceMetric.all_reduce_`), so every rank scores the
  same numbers and gets the same masks; a cheap check (kept counts per layer compared
  across ranks) raises if they ever diverge.
* **FSDP2** (``torch.distributed.fsdp.fully_shard``): parameters are ``DTensor`` s
  sharded along dim 0. Masks are created, stored and applied on each rank's local
  shard (``param.to_local()``), so the mask memory per rank is its share of the
  weights. The global threshold is found by :func:`artemis.core.masks.global_masks` with a
  :class:`ProcessGroupCollective`: only histograms and per-layer counts cross the
  network; no rank ever gathers the model.
* **FSDP1** (``FullyShardedDataParallel``) is refused at manager creation with a
  :class:`~artemis.core.errors.ModelError`: with ``use_orig_params=False`` the weights do not
  exist as tensors of their own, and with ``use_orig_params=True`` they are flat 1-D
  slices that change shape around every forward. Use ``fully_shard`` (accelerate:
  ``fsdp_version: 2``).

Everything here is a no-op (and costs nothing) in a single process.

Example:
    >>> import torch
    >>> from artemis.core.distributed import local_tensor, world_size
    >>> local_tensor(torch.ones(2)).tolist(), world_size()
    ([1.0, 1.0], 1)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from artemis.core.errors import ModelError

__all__ = [
    "is_distributed",
    "world_size",
    "rank",
    "is_dtensor",
    "local_tensor",
    "ProcessGroupCollective",
    "ShardLayout",
    "inspect_sharding",
    "check_no_fsdp1",
    "all_reduce_sum_",
    "shard_like",
    "local_slice",
]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes (1 when ``torch.distributed`` is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's global rank (0 when ``torch.distributed`` is not initialised)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (an FSDP2/TP parameter)."""
    try:
        from torch.distributed.tensor import DTensor  # here: torch builds without distributed lack it
    except Exception:  # pragma: no cover - builds without distributed
        return False
    return isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (a view sharing its storage), else ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def _collective_device(group: Any) -> torch.device:
    backend = str(dist.get_backend(group))
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class ProcessGroupCollective:
    """:class:`artemis.core.masks.ShardCollective` over a ``torch.distributed`` process group.

    Tensors are moved to the backend's device (CUDA for NCCL) for the collective and
    returned on the CPU; they are a few KiB (radix histograms, per-layer counts).

    Args:
        group: the process group the shards are spread over (None: the default group).
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.device = _collective_device(group)

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        buf = t.to(self.device, copy=True)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        return buf.cpu()

    def all_gather(self, t: Tensor) -> list[Tensor]:
        buf = t.to(self.device).contiguous()
        out = [torch.empty_like(buf) for _ in range(self.size)]
        dist.all_gather(out, buf, group=self.group)
        return [o.cpu() for o in out]


@dataclass
class ShardLayout:
    """How the prunable parameters are sharded (FSDP2), found at manager creation.

    Attributes:
        mesh: the 1-D device mesh every sharded parameter lives on.
        sharded: parameter keys whose parameter is a sharded ``DTensor``.
        collective: the collective over the mesh's process group.
    """

    mesh: Any
    sharded: frozenset[str]
    collective: ProcessGroupCollective

    def is_sharded(self, key: str) -> bool:
        return key in self.sharded


def check_no_fsdp1(model: nn.Module) -> None:
    """Raise :class:`ModelError` when ``model`` is or contains an FSDP1 wrapper."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel  # here: absent without distributed
    except Exception:  # pragma: no cover
        return
    for name, m in model.named_modules():
        if isinstance(m, FullyShardedDataParallel):
            flat = "use_orig_params=False: weights are flattened into one FlatParameter"
            if getattr(m, "_use_orig_params", False):
                flat = "use_orig_params=True: weights are 1-D slices of a FlatParameter that change shape around every forward"
            raise ModelError(
                f"FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel at {repr(name) if name else 'the root'}) is not "
                f"supported by the pruning manager ({flat}); shard the model with FSDP2 instead: "
                "torch.distributed.fsdp.fully_shard (accelerate: fsdp_version: 2), or use DDP"
            )


def inspect_sharding(params: Mapping[str, Tensor]) -> Optional[ShardLayout]:
    """The :class:`ShardLayout` of ``params`` (None when no parameter is a ``DTensor``).

    Raises:
        ModelError: a ``DTensor`` parameter is laid out in a way the manager does not
            support (a mesh of more than one dimension, as in HSDP or FSDP+TP, a
            placement other than ``Shard``/``Replicate``, or parameters on different meshes).
    """
    # here: only reached with DTensors; the module is absent from torch builds without distributed
    from torch.distributed.tensor import Replicate, Shard

    sharded: set[str] = set()
    mesh = None
    for key, p in params.items():
        if not is_dtensor(p):
            continue
        placements = tuple(p.placements)
        if p.device_mesh.ndim != 1:
            raise ModelError(
                f"parameter {key} is a DTensor on a {p.device_mesh.ndim}-D device mesh {placements}; the "
                "pruning manager supports 1-D meshes only (FSDP2 fully_shard on one mesh dimension, not HSDP or TP)"
            )
        (pl,) = placements
        if isinstance(pl, Replicate):
            continue
        if not isinstance(pl, Shard):
            raise ModelError(f"parameter {key} has placement {pl}; supported: Shard(dim) or Replicate()")
        if mesh is None:
            mesh = p.device_mesh
        elif p.device_mesh != mesh:
            raise ModelError(
                f"parameter {key} is sharded over a different device mesh than the others; the pruning "
                "manager needs every sharded prunable weight on one mesh"
            )
        sharded.add(key)
    if mesh is None:
        return None
    return ShardLayout(mesh=mesh, sharded=frozenset(sharded), collective=ProcessGroupCollective(mesh.get_group()))


def all_reduce_sum_(tensors: Iterable[Optional[Tensor]], group: Any = None) -> None:
    """Sum each tensor in place over all ranks (no-op in a single process).

    Metrics call this from :meth:`~artemis.metrics.ImportanceMetric.all_reduce_` for
    statistics each rank gathered from its own data (running sums, counts). Tensors
    are flattened into one buffer per dtype and device: one collective per dtype.
    """
    if not is_distributed():
        return
    buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        if t is None:
            continue
        buckets.setdefault((t.dtype, t.device), []).append(t)
    for (_, device), ts in buckets.items():
        flat = torch.cat([local_tensor(t).reshape(-1) for t in ts])
        target = _collective_device(group)
        buf = flat.to(target)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        flat = buf.to(device)
        offset = 0
        for t in ts:
            lt = local_tensor(t)
            n = lt.numel()
            lt.copy_(flat[offset : offset + n].view_as(lt))
            offset += n


def shard_like(full: Tensor, param: Tensor) -> Tensor:
    """This rank's shard of ``full`` (shaped like the whole ``param``), laid out like
    the ``DTensor`` ``param``; ``full`` itself when ``param`` is not a ``DTensor``.
    Every rank holds ``full``; nothing is communicated."""
    if not is_dtensor(param):
        return full
    # here: only reached with DTensors; the module is absent from torch builds without distributed
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None).to_local()


def local_slice(param: Tensor, dim: int) -> slice:
    """The range of indices along ``dim`` of the whole ``param`` that this rank's local
    shard holds (``slice(None)``: all of them, when ``param`` is not sharded along
    ``dim``). For per-feature statistics that must be cut like the weight.

    Example:
        >>> import torch
        >>> local_slice(torch.zeros(3, 4), 0)
        slice(None, None, None)
    """
    if not is_dtensor(param):
        return slice(None)
    # here: only reached with DTensors; the module is absent from torch builds without distributed
    from torch.distributed.tensor import Shard

    placement = param.placements[0]
    if not (isinstance(placement, Shard) and placement.dim == dim % param.dim()):
        return slice(None)
    # here: only reached with DTensors; the module is absent from torch builds without distributed
    from torch.distributed.tensor import distribute_tensor

    # An index vector sharded the same way (dim-d sharding chunks like a 1-D tensor).
    n = int(param.shape[dim])
    local = distribute_tensor(
        torch.arange(n, device=param.device), param.device_mesh, [Shard(0)], src_data_rank=None
    ).to_local()
    if local.numel() == 0:
        return slice(0, 0)
    return slice(int(local[0]), int(local[-1]) + 1)


def _all_equal(values: Sequence[int], group: Any = None) -> bool:
    """True when the int vector ``values`` is identical on every rank."""
    t = torch.tensor(list(values), dtype=torch.int64, device=_collective_device(group))
    lo, hi = t.clone(), t.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    return bool(torch.equal(lo, hi))
