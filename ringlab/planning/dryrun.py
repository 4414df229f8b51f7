"""Run one rank's real engine code at any scale without the memory: the dry run.

    report = ringlab.planning.dryrun.dry_run(Problem(2**30, heads=32, head_dim=128, dtype="bfloat16",
                                            world_size=256, causal=True, layout="zigzag"))

One rank's forward and backward generators (the same code a real rank runs) execute on
``meta`` tensors, with a communicator whose transfers complete at once. Meta tensors carry
shapes and dtypes but no data, so a billion-token call runs in seconds. A dispatch-mode
tracker records every tensor the engine allocates and when it dies, giving the peak the rank
would reach.

Kernels: on ``meta`` the engine dispatches as on CUDA (cuDNN for 16-bit dtypes up to head_dim
128, flash above, else the efficient kernel), and torch's meta registrations of those ops give output shapes. Their
internal workspace is not allocated on meta; the report adds the CUDA kernel-scratch term of
:mod:`ringlab.planning.memory_model` to compare with the planner.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..engine.autograd import exact_attention
from ..engine.comm import RingComm, run_rank
from ..engine.config import rank_functions
from . import memory
from .memory_model import Problem, estimate


def _written_argument(op):
    """The name of the one argument a pointwise op writes in place and returns (``self`` of
    mul_, ``out`` of logaddexp.out), or None. Such an op allocates nothing and changes no
    shape, yet torch's meta version of it checks broadcasting in Python: the dry run's
    largest cost. The CPU tests run the same ops for real."""
    schema = op._schema
    if len(schema.returns) != 1 or not (torch.Tag.pointwise in op.tags or schema.name in _FILLS):
        return None
    written = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    return written[0].name if len(written) == 1 else None


_FILLS = ("aten::copy_", "aten::zero_", "aten::fill_")


class _WrittenArguments(dict):
    """op overload -> :func:`_written_argument`, remembered."""

    def __missing__(self, op):
        self[op] = _written_argument(op)
        return self[op]


_WRITTEN = _WrittenArguments()


class AllocationTracker(TorchDispatchMode):
    """Live bytes of the tensor storages created inside the mode, and their peak."""

    def __init__(self, existing=()):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        # Tensors made before the region (inputs) and their views are not allocations.
        self.existing = {t.untyped_storage()._cdata for t in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        written = _WRITTEN[func]
        if written is not None:  # nothing to allocate or check: return what it writes
            return kwargs[written] if kwargs and written in kwargs else args[0]
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._see(t)
        return out

    def _see(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live or key in self.existing or st.nbytes() == 0:
            return
        self.live[key] = st.nbytes()
        self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


class InstantComm(RingComm):
    """A rank whose transfers complete at once: receive buffers keep whatever they hold. A
    sent tensor stays referenced until its wait, as a real send's buffer does (its memory
    counts until then)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def _post(self, sends, recvs, tag, pending) -> None:
        pending.works = [_Sent(tuple(t for _, t in sends))]


@dataclasses.dataclass(frozen=True)
class _Sent:
    """A completed send that holds its tensors until waited on."""
    tensors: tuple

    def wait(self) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class _OneRank:
    """One rank's generators as an algorithm for ringlab.engine.autograd, which runs them per head
    chunk exactly as a real call does."""
    forward_rank: object
    backward_rank: object
    comm: RingComm

    def forward(self, q, k, v, heads, into):
        return run_rank(self.forward_rank(self.comm, q, k, v, heads=heads))

    def backward(self, dout, q, k, v, out, lse, dlse, heads, into):
        return run_rank(self.backward_rank(self.comm, dout, q, k, v, out, lse, dlse, heads=heads))


def run_one_rank(pb: Problem, rank: int = 0, *, backward: bool = True, device="meta") -> int:
    """Run ``rank``'s forward (and backward) on ``device`` with instant transfers and return
    the peak bytes the call allocated (inputs and output gradient exist before it starts, as
    in ringlab.planning.memory measurements). On meta the AllocationTracker counts; on a real device
    ringlab.planning.memory.track does."""
    algorithm = _OneRank(*rank_functions(pb.ring_config()), InstantComm(rank, pb.world_size))
    return _peak(pb, pb.local, algorithm, pb.ring_config().model(simulated=False), backward, device)


def run_one_mesh_rank(pb: Problem, ulysses: int, ring: int, rank: int = 0, *, backward: bool = True,
                      device="cpu") -> int:
    """:func:`run_one_rank` for a Ulysses or hybrid call on a ``ulysses`` x ``ring`` mesh
    (ringlab.engine.ulysses): mesh rank ``rank``'s generators, all-to-alls and ring hops
    completing at once; the peak bytes the call allocated on this rank."""
    from ..engine.ulysses import Mesh, MeshConfig, backward_rank, forward_rank

    config = MeshConfig(dataclasses.replace(pb, world_size=ring).ring_config(), ulysses)
    r, u = divmod(rank, ulysses)
    algorithm = _OneRank(functools.partial(forward_rank, config=config),
                         functools.partial(backward_rank, config=config),
                         Mesh(InstantComm(u, ulysses), InstantComm(r, ring)))
    return _peak(pb, pb.seq_len // (ulysses * ring), algorithm, config.model(), backward, device, kv_unit=ulysses)


def _peak(pb: Problem, rows: int, algorithm, model, backward: bool, device, kv_unit: int = 1) -> int:
    """Peak bytes of one call of ``algorithm`` on this rank's ``rows`` tokens of q, k, v, made
    (with the output gradient) before the measured region."""
    dtype = getattr(torch, pb.dtype)
    q, k, v, dout = (torch.empty(pb.batch, rows, h, pb.head_dim, dtype=dtype, device=device)
                     .requires_grad_(backward) for h in (pb.heads, pb.kv_heads, pb.kv_heads, pb.heads))
    meta = torch.device(device).type == "meta"
    tracker = AllocationTracker(existing=(q, k, v, dout)) if meta else memory.track(device)
    with tracker as report, torch.enable_grad():
        out, lse = exact_attention(q, k, v, algorithm, model, kv_unit=kv_unit)
        if backward:
            out.backward(dout.detach())
        del out, lse
    return report.peak


def dry_run(pb: Problem, *, backward: bool = True, rank: int = 0) -> dict:
    """One rank's engine code on meta tensors at full scale, next to the planner's model.

    Returns the peak bytes the tracker measured, the model's peak without the kernel scratch
    the meta kernels do not allocate, their ratio, and the planner's peak and total (with
    scratch and resident inputs) for the same rank.
    """
    pb_cuda = dataclasses.replace(pb, device="cuda")
    measured = run_one_rank(pb_cuda, rank, backward=backward, device="meta")
    mode, _ = pb.ring_config().model(simulated=False)
    est = estimate(dataclasses.replace(pb_cuda, scratch=False), mode, backward=backward, rank=rank)
    planned = estimate(pb_cuda, mode, backward=backward, rank=rank)
    return dict(problem=dataclasses.asdict(pb_cuda), rank=rank, backward=backward, measured=measured,
                model=est.peak, ratio=est.peak / measured if measured else float("nan"), terms=est.terms,
                resident=est.resident, planned_peak=planned.peak, planned_total=planned.total)
