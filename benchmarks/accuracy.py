"""Gradient accuracy on real gloo ranks: ringlab's ring vs ring-attention-pytorch, both vs float64.

    python -m benchmarks.accuracy [--quick]

Both run on the same float32 shards (contiguous layout) with the same upstream gradient; the
gathered out, dq, dk and dv are compared with the dense float64 reference. Reported: the max
abs error per quantity (float32 tolerance, docs/design.md §7: 2e-5 on out, 5e-5 on gradients) and the
relative error max|x - ref| / max|ref| of dk and dv, where a wrong ring backward shows first
(docs/design.md §7).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import ringlab
from ringlab.engine.launch import launch
from ringlab.reference import ABS_TOL, dense_attention

from .common import cli, section
from .peers import peer_ring_attention

QUANTITIES = ("out", "dq", "dk", "dv")


def problem(n, heads, dim):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, n, heads, dim, generator=g, dtype=torch.float64) for _ in range(4)]  # q, k, v, dout


def rank_grads(n, heads, dim, causal, peer):
    """On every rank: out and grads of this rank's shard, for ringlab and (if installed) the peer."""
    rank, p = dist.get_rank(), dist.get_world_size()
    q, k, v, dout = (ringlab.shard(x, rank, p).float() for x in problem(n, heads, dim))
    fns = {"ringlab": lambda a, b, c: ringlab.ring_attention(a, b, c, group=dist.group.WORLD, causal=causal)}
    if peer:
        fns["ring-attention-pytorch"] = lambda a, b, c: peer_ring_attention(a, b, c, causal=causal)
    result = {}
    for name, fn in fns.items():
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        out.backward(dout)
        result[name] = [out.detach(), *(x.grad for x in leaves)]
    return result


def rows_for(p, n, heads, dim, causal, peer) -> list[dict]:
    per_rank = launch(rank_grads, p, args=(n, heads, dim, causal, peer), timeout=900)
    q, k, v, dout = (x.requires_grad_(i < 3) for i, x in enumerate(problem(n, heads, dim)))
    ref_out, _ = dense_attention(q, k, v, causal=causal)
    ref_out.backward(dout)
    refs = [ref_out.detach(), q.grad, k.grad, v.grad]
    rows = []
    for impl in per_rank[0]:
        row = dict(impl=impl, P=p, N=n, causal=causal)
        for i, name in enumerate(QUANTITIES):
            got = ringlab.unshard([r[impl][i] for r in per_rank]).double()
            err = (got - refs[i]).abs().max().item()
            row[f"{name}_abs_err"] = err
            if name in ("dk", "dv"):
                row[f"{name}_rel_err"] = err / refs[i].abs().max().item()
        out_tol, grad_tol = ABS_TOL[torch.float32]
        row["within_tolerance"] = all(row[f"{q}_abs_err"] <= (out_tol if q == "out" else grad_tol) for q in QUANTITIES)
        rows.append(row)
    return rows


def run(quick: bool = False) -> dict:
    peer = peer_ring_attention.available
    cases = [(2, 512, False)] if quick else [(p, 2048, c) for p in (2, 4) for c in (False, True)]
    rows = [r for p, n, causal in cases for r in rows_for(p, n, 4, 32, causal, peer)]
    notes = ("Errors against the dense float64 reference; float32 inputs of shape (1, N, 4, 32), contiguous "
             "layout, one upstream gradient shared by both. abs_err: max |x - ref| (docs/design.md §7 float32: 2e-5 on out, "
             "5e-5 on gradients); rel_err: max |x - ref| / max |ref|. "
             + ("" if peer else "ring-attention-pytorch is not installed (pip install ring-attention-pytorch): "
                "only ringlab's rows."))
    return section("accuracy", rows,
           ["impl", "P", "N", "causal", *(f"{q}_abs_err" for q in QUANTITIES), "dk_rel_err", "dv_rel_err",
            "within_tolerance"], notes=notes)


def main(argv=None):
    return cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
