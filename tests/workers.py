"""Functions the multi-rank tests run on every rank through ringlab.launch.

They live in a module (not in the test files) because spawned ranks import them by name.
"""

import torch
import torch.distributed as dist

import ringlab
from ringlab.trace import record_events


def case_inputs(case):
    """The whole-sequence float64 inputs and output cotangent of a case (same on every rank)."""
    g = torch.Generator().manual_seed(case["seed"])
    shape = (case["batch"], case["n"], case["heads"], case["head_dim"])
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(4)]


def call(case, q, k, v, **ring):
    """The ring function of a case on (q, k, v); ``ring`` is group= or ring_size=."""
    kw = dict(causal=case["causal"], layout=case["layout"], return_lse=True, **ring)
    if case["fn"] == "ring":
        return ringlab.ring_attention(q, k, v, **kw)
    return ringlab.ring_dilated_attention(q, k, v, case["segments"], case["rates"],
                                         head_offsets=case.get("head_offsets", "interleaved"), **kw)


def run_cases(cases):
    """Run every case on this rank; return this rank's shards of out, lse, dq, dk, dv, and events."""
    rank, p = dist.get_rank(), dist.get_world_size()
    results = []
    for case in cases:
        dtype = getattr(torch, case["dtype"])
        q, k, v, go = (ringlab.shard(x, rank, p, case["layout"]) for x in case_inputs(case))
        q, k, v = (x.to(dtype).clone().requires_grad_() for x in (q, k, v))
        with record_events() as tr:
            out, lse = call(case, q, k, v, group=dist.group.WORLD)
            (out.double() * go).sum().backward()
        results.append(dict(out=out.detach(), lse=lse, dq=q.grad, dk=k.grad, dv=v.grad,
                            events=tr.events))
    return results


def raise_on(rank):
    if dist.get_rank() == rank:
        raise RuntimeError(f"rank {rank} fails on purpose")
    dist.barrier()


def exit_on(rank):
    import os
    if dist.get_rank() == rank:
        os._exit(3)
    dist.barrier()


def hang_on(rank):
    import time
    if dist.get_rank() == rank:
        time.sleep(3600)
    dist.barrier()


def mismatched_shapes():
    """Rank 1 passes a longer shard; every rank must raise before any K/V moves."""
    rank = dist.get_rank()
    n = 8 if rank == 0 else 12
    q, k, v = (torch.randn(1, n, 2, 4) for _ in range(3))
    with record_events() as tr:
        try:
            ringlab.ring_attention(q, k, v, group=dist.group.WORLD)
        except ValueError as err:
            return str(err), tr.events
    return None, tr.events


def odd_zigzag_shard():
    q, k, v = (torch.randn(1, 3, 2, 4) for _ in range(3))
    try:
        ringlab.ring_attention(q, k, v, group=dist.group.WORLD, layout="zigzag")
    except ValueError as err:
        return str(err)
    return None


def rank_and_size():
    return dist.get_rank(), dist.get_world_size(), torch.get_num_threads()


def train_longnet(steps, seed, layout):
    """A few SGD steps of a float64 LongNetLM on this rank's shard; returns losses and params."""
    from ringlab.nn import LongNetLM, all_reduce_grads

    group = dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None
    rank, p = (dist.get_rank(), dist.get_world_size()) if group is not None else (0, 1)
    torch.manual_seed(seed)
    model = LongNetLM(50, 32, 2, 4, [8, 32], [1, 2], max_seq_len=64, group=group, layout=layout,
                      dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50, (2, 33), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    if group is not None:
        x, y = ringlab.shard(x, rank, p, layout), ringlab.shard(y, rank, p, layout)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model.loss(x, y, total_tokens=2 * 32)
        loss.backward()
        if group is not None:
            all_reduce_grads(model, group)
            dist.all_reduce(loss.detach(), group=group)
        losses.append(loss.item())
        opt.step()
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def memory_peaks(problems):
    """Measured peak bytes of each (problem, mode, backward) on this rank's shard."""
    from ringlab.experiments import measure_peak
    return [measure_peak(pb, mode, backward=backward, group=dist.group.WORLD) for pb, mode, backward in problems]
