"""Functions the multi-rank tests run on every rank through ringlab.engine.launch.

They live in a module (not in the test files) because spawned ranks import them by name.
"""

import torch
import torch.distributed as dist

import ringlab
from ringlab.engine.trace import record_events


def case_inputs(case):
    """The whole-sequence float64 q, k, v, output cotangent (B, N, H, D; k and v with the
    case's kv_heads) and lse cotangent (B, H, N) of a case (same on every rank)."""
    g = torch.Generator().manual_seed(case["seed"])
    shape = (case["batch"], case["n"], case["heads"], case["head_dim"])
    kv_shape = (*shape[:2], case.get("kv_heads", case["heads"]), shape[3])
    qkvo = [torch.randn(*s, generator=g, dtype=torch.float64) for s in (shape, kv_shape, kv_shape, shape)]
    return [*qkvo, torch.randn(shape[0], shape[2], shape[1], generator=g, dtype=torch.float64)]


def loss(case, out, lse, go, gl):
    """<out, go>, plus <lse, gl> (rows that see nothing left out) when the case has ``dlse``."""
    total = (out.double() * go).sum()
    if case.get("dlse"):
        total = total + (lse.double().masked_fill(torch.isinf(lse), 0) * gl).sum()
    return total


def cu_seqlens(case):
    """The case's packed documents as a tensor, or None."""
    return torch.tensor(case["cu_seqlens"]) if "cu_seqlens" in case else None


def call(case, q, k, v, **ring):
    """The ring function of a case on (q, k, v); ``ring`` is group= or ring_size= (a mesh case's:
    ulysses_group= and ring_group=, or ulysses_size= and ring_size=)."""
    kw = dict(causal=case["causal"], layout=case["layout"], scale=case.get("scale"), return_lse=True,
              cu_seqlens=cu_seqlens(case), **ring)
    if "mesh" in case:
        dense, dilated = ringlab.ulysses_attention, ringlab.ulysses_dilated_attention
    else:
        dense, dilated = ringlab.ring_attention, ringlab.ring_dilated_attention
    if case["fn"] == "ring":
        return dense(q, k, v, **kw)
    return dilated(q, k, v, case["segments"], case["rates"], head_offsets=case.get("head_offsets", "interleaved"),
                   **kw)


def simulated(case, p):
    """The simulated-run keywords of a case on p ranks."""
    if "mesh" in case:
        return dict(ulysses_size=case["mesh"][0], ring_size=case["mesh"][1])
    return dict(ring_size=p)


_MESHES: dict = {}


def _groups(case, group):
    """The keywords that run a case on this rank: its ring group, or (a mesh case) its mesh's
    groups, made once per mesh shape (every rank runs the cases in one order)."""
    if "mesh" not in case:
        return dict(group=group)
    if case["mesh"] not in _MESHES:
        _MESHES[case["mesh"]] = ringlab.mesh_groups(*case["mesh"])
    ulysses_group, ring_group = _MESHES[case["mesh"]]
    return dict(ulysses_group=ulysses_group, ring_group=ring_group)


def shard_case(case, x, rank, p, dim=1):
    """This rank's shard of a case's whole-sequence tensor."""
    if "mesh" in case:
        return ringlab.shard_mesh(x, rank, *case["mesh"], case["layout"], dim, cu_seqlens=cu_seqlens(case))
    return ringlab.shard(x, rank, p, case["layout"], dim=dim, cu_seqlens=cu_seqlens(case))


def run_cases(cases, group=None):
    """Run every case on this rank of ``group`` (default WORLD); return this rank's shards of
    out, lse, dq, dk, dv, and its events."""
    group = group or dist.group.WORLD
    rank, p = dist.get_rank(group), dist.get_world_size(group)
    results = []
    for case in cases:
        dtype = getattr(torch, case["dtype"])
        q, k, v, go, gl = case_inputs(case)
        q, k, v, go = (shard_case(case, x, rank, p) for x in (q, k, v, go))
        gl = shard_case(case, gl, rank, p, dim=2)
        q, k, v = (x.to(dtype).clone().requires_grad_() for x in (q, k, v))
        with record_events() as tr:
            out, lse = call(case, q, k, v, **_groups(case, group))
            loss(case, out, lse, go, gl).backward()
        results.append(dict(out=out.detach(), lse=lse.detach(), dq=q.grad, dk=k.grad, dv=v.grad,
                            events=tr.events))
    return results


def nn_inputs(layout, rank, p):
    """This rank's shards of the float64 inputs of :func:`nn_modules`, and the seed of its parameters."""
    g = torch.Generator().manual_seed(5)
    qkv = [torch.randn(2, 24, 6, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    x = torch.randn(2, 24, 24, generator=g, dtype=torch.float64)
    return [ringlab.shard(t, rank, p, layout) for t in (*qkv, x)]


def nn_modules(group, layout, scale):
    """The nn modules sequence parallel over ``group``: this rank's output shards (causal)."""
    from ringlab.engine.nn import DilatedAttention, MultiheadDilatedAttention, RingAttention
    q, k, v, x = nn_inputs(layout, dist.get_rank(group), dist.get_world_size(group))
    torch.manual_seed(0)
    mha = MultiheadDilatedAttention(24, 6, [8, 24], [1, 3], group=group, layout=layout, dtype=torch.float64)
    return dict(
        ring=RingAttention(group=group, layout=layout, softmax_scale=scale)(q, k, v, is_causal=True),
        dilated=DilatedAttention([8, 24], [1, 3], softmax_scale=scale, head_offsets="grouped", group=group,
                                 layout=layout)(q, k, v, is_causal=True),
        multihead=mha(x, is_causal=True)[0].detach())


def on_subgroup(ranks, cases, layout, scale):
    """Run ``cases`` and :func:`nn_modules` on the sub-group of the global ``ranks`` (not WORLD,
    so group ranks differ from global ones); ranks outside it return None."""
    group = dist.new_group(ranks)
    if dist.get_rank() not in ranks:
        return None
    return run_cases(cases, group), nn_modules(group, layout, scale)


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
    """Rank 1 passes a longer shard; every rank must raise before any K/V moves, also after an
    earlier call agreed on other shapes (and was remembered)."""
    ringlab.ring_attention(*(torch.randn(1, 4, 2, 4) for _ in range(3)), group=dist.group.WORLD)
    rank = dist.get_rank()
    n = 8 if rank == 0 else 12
    q, k, v = (torch.randn(1, n, 2, 4) for _ in range(3))
    with record_events() as tr:
        try:
            ringlab.ring_attention(q, k, v, group=dist.group.WORLD)
        except ValueError as err:
            return str(err), tr.events
    return None, tr.events


def diverged_shapes():
    """Both ranks agree on one call; then rank 0 repeats it and rank 1 alone passes a longer
    shard: rank 1 must raise, naming its shapes, instead of waiting for ever."""
    from ringlab.engine import comm

    comm.AGREE_TIMEOUT_S = 2.0
    group = dist.group.WORLD
    ringlab.ring_attention(*(torch.randn(1, 4, 2, 4) for _ in range(3)), group=group)
    n = 4 if dist.get_rank() == 0 else 6
    ringlab.ring_attention(*(torch.randn(1, n, 2, 4) for _ in range(3)), group=group)


def odd_zigzag_shard():
    q, k, v = (torch.randn(1, 3, 2, 4) for _ in range(3))
    try:
        ringlab.ring_attention(q, k, v, group=dist.group.WORLD, layout="zigzag")
    except ValueError as err:
        return str(err)
    return None


def rank_and_size():
    return dist.get_rank(), dist.get_world_size(), torch.get_num_threads()


def train_longnet(steps, seed, layout, packed=False):
    """A few SGD steps of a float64 LongNetLM on this rank's shard (``packed``: one sequence of
    three documents); returns losses and params."""
    from ringlab.engine.nn import LongNetLM, all_reduce_grads

    group = dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None
    rank, p = (dist.get_rank(), dist.get_world_size()) if group is not None else (0, 1)
    torch.manual_seed(seed)
    model = LongNetLM(50, 32, 2, 4, [8, 32], [1, 2], max_seq_len=64, group=group, layout=layout,
                      dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50, (1, 65) if packed else (2, 33), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    cu = torch.tensor([0, 8, 40, 64]) if packed else None
    if group is not None:
        x, y = (ringlab.shard(t, rank, p, layout, cu_seqlens=cu) for t in (x, y))
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model.loss(x, y, total_tokens=64, cu_seqlens=cu)
        loss.backward()
        if group is not None:
            all_reduce_grads(model, group)
            dist.all_reduce(loss.detach(), group=group)
        losses.append(loss.item())
        opt.step()
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def memory_peaks(problems):
    """Measured peak bytes of each (problem, mode, backward) on this rank's shard."""
    from ringlab.workbench.experiments import measure_peak
    return [measure_peak(pb, mode, backward=backward, group=dist.group.WORLD) for pb, mode, backward in problems]


def strided_matches_contiguous(_=None):
    """Shards given with odd strides (head_dim stride 2, an expanded batch) give the same
    output and gradients as contiguous copies, on this rank of WORLD."""
    rank, p = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(3)
    wide = [torch.randn(1, 32, 2, 16, generator=g, dtype=torch.float64) for _ in range(3)]
    shards = [ringlab.shard(x, rank, p, layout="zigzag") for x in wide]
    odd = [shards[0][..., ::2], shards[1][..., 1::2], shards[2][..., ::2].expand(2, -1, -1, -1)]
    results = []
    for qkv in (odd, [x.contiguous() for x in odd]):
        leaves = [x.detach().clone().requires_grad_() for x in qkv]
        ins = [leaves[0].expand(2, -1, -1, -1), leaves[1].expand(2, -1, -1, -1), leaves[2]]
        out = ringlab.ring_attention(*ins, group=dist.group.WORLD, causal=True, layout="zigzag")
        out.sum().backward()  # an expanded, all-zero-stride output gradient too
        results.append([out.detach(), *(x.grad for x in leaves)])
    return max((a - b).abs().max().item() for a, b in zip(*results))


def hf_ring(config, segments, rates, packed_cases):
    """The worked example (examples/hf_llama_ring.py) on this rank: 3 steps of "ringlab" and 2
    of "ringlab_dilated" (branches from sequence_parallel), one step of each (attn, layout,
    document lengths) of ``packed_cases``, then the errors of calls a ring refuses, by name."""
    import hf_llama_ring as example

    import ringlab.hf

    branches = dict(segment_lengths=segments, dilation_rates=rates)
    ring = example.train(config, "ringlab")
    dilated = example.train(config, "ringlab_dilated", steps=2, parallel=branches)
    packed = [example.train(config, attn, steps=1, layout=layout, lengths=lengths,
                            parallel=branches if attn == "ringlab_dilated" else None)
              for attn, layout, lengths in packed_cases]
    rank, p = dist.get_rank(), dist.get_world_size()
    ids, _, positions = (ringlab.shard(x, rank, p, layout="zigzag") for x in example.batch())
    n = ids.shape[1]
    model = example.build(config, "ringlab")
    cu = example.packed_batch(packed_cases[0][2])[3]
    calls = dict(padding=(None, dict(attention_mask=torch.ones_like(ids).index_fill(1, torch.tensor([0]), 0))),
                 positions=(None, dict(position_ids=torch.arange(n)[None])),
                 **{"4D mask": (None, dict(attention_mask=torch.ones(1, 1, n, n, dtype=torch.bool).tril())),
                    "packed, global positions": (cu, {})})
    errors = {}
    for name, (documents, kwargs) in calls.items():
        with ringlab.hf.sequence_parallel(dist.group.WORLD, layout="zigzag", cu_seqlens=documents):
            try:
                model(input_ids=ids, **({"position_ids": positions} | kwargs))
            except ValueError as err:
                errors[name] = str(err)
    return ring, dilated, packed, errors
