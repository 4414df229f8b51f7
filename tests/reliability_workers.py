"""Rank functions of tests/test_reliability.py (spawned ranks import them by name)."""

import os
import time

import torch
import torch.distributed as dist

import ringlab


def hang_in_collective():
    """Rank 0 waits in a barrier that rank 1 (asleep) never joins."""
    if dist.get_rank() == 1:
        time.sleep(3600)
    dist.barrier()


def quit_with_zero_on(rank):
    if dist.get_rank() == rank:
        os._exit(0)
    return dist.get_rank()


def abort_at_interpreter_exit():
    """Return this rank's number, leaving behind an exit handler that aborts the process the way
    torch's gloo teardown sometimes does during interpreter finalization."""
    import atexit
    atexit.register(os.abort)
    return dist.get_rank()


def ring_dilated_error(per_rank_kwargs):
    """Call ring_dilated_attention with this rank's options; return the ValueError's text."""
    kw = dict(segment_lengths=[4], dilation_rates=[1], dtype="float32", scale=None)
    kw.update(per_rank_kwargs[dist.get_rank()])
    q, k, v = (torch.randn(1, 4, 2, 4, dtype=getattr(torch, kw["dtype"])) for _ in range(3))
    try:
        ringlab.ring_dilated_attention(q, k, v, kw["segment_lengths"], kw["dilation_rates"],
                                       group=dist.group.WORLD, scale=kw["scale"])
    except ValueError as err:
        return str(err)
    return None


def readme_distributed_block(block):
    """Run the README's process-group example on this rank, with the tour's q, k, v (small and
    seeded alike on every rank); return its ``out`` and the single-device result."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 64, 2, 8) for _ in range(3))
    scope = dict(torch=torch, ringlab=ringlab, q=q, k=k, v=v)
    exec(compile(block, "README.md", "exec"), scope)
    return scope["out"], ringlab.attention(q, k, v, causal=True)
