"""Run ring or ring-dilated attention on every rank of a torchrun job and report per rank.

    torchrun --nproc-per-node 8 -m ringlab.run --seq-len 131072 --heads 16 --head-dim 128 \\
             --dtype bfloat16 --causal --layout zigzag [--segments 4096,16384 --rates 1,4]
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
             -m ringlab.run --seq-len 1048576 --segments 4096,65536,1048576 --rates 1,4,16

Each rank builds its shard of random q, k, v on its device (CUDA with NCCL when available,
else CPU with gloo), runs forward (+ backward with --backward) ``--iters`` times, and rank 0
prints time per iteration, tokens/s and measured peak memory for every rank. With --check the
inputs are the same seeded whole-sequence tensors on every rank (each rank keeps its shard),
and rank 0 compares the gathered output with ringlab's single-device function (``attention``
or ``dilated_attention``) run in float32 on the same device. Without torchrun it runs as a
group of one.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import ringlab
from ringlab.planning import memory
from ringlab.engine.checks import DTYPE_ALIASES, DTYPE_NAMES, dtype_name
from ringlab.engine.layout import LAYOUTS


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ringlab.run", description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=16384, help="whole sequence length N")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES + tuple(DTYPE_ALIASES),
                   help="float32 (default), bfloat16, float16, float64, or bf16, fp16, fp32, fp64")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--layout", default="contiguous", choices=list(LAYOUTS))
    p.add_argument("--segments", default="", help="comma-separated segment lengths: ring-dilated")
    p.add_argument("--rates", default="", help="comma-separated dilation rates")
    p.add_argument("--head-offsets", default="interleaved", choices=["interleaved", "grouped"])
    p.add_argument("--iters", type=int, default=3, help="timed iterations (>= 1)")
    p.add_argument("--backward", action="store_true", help="also run the backward")
    p.add_argument("--check", action="store_true",
                   help="after timing, compare the forward output (gathered on rank 0) with ringlab's "
                        "single-device attention / dilated_attention on the whole sequence, computed in "
                        "float32 on the same device from the same inputs rounded to --dtype; prints the "
                        "max abs error. Needs the whole sequence's q, k, v and output on every rank's device")
    args = p.parse_args(argv)
    args.dtype = dtype_name(args.dtype)
    for name in ("seq_len", "batch", "heads", "head_dim", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        args.segments = [int(x) for x in args.segments.split(",") if x]
        args.rates = [int(x) for x in args.rates.split(",") if x]
    except ValueError:
        p.error(f"--segments and --rates must be comma-separated ints, like 4096,65536; got "
                f"{args.segments!r} and {args.rates!r}")
    if len(args.segments) != len(args.rates):
        p.error("--segments and --rates need one rate per segment")
    return args


def _init():
    if dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
    else:
        from .engine.launch import free_port
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1)


def attend(args, q, k, v, **ring):
    kw = dict(causal=args.causal, layout=args.layout, **ring)
    if args.segments:
        return ringlab.ring_dilated_attention(q, k, v, args.segments, args.rates,
                                              head_offsets=args.head_offsets, **kw)
    return ringlab.ring_attention(q, k, v, **kw)


def reference(args, q, k, v):
    """The single-device function on whole-sequence (q, k, v), in float32 (float64 stays)."""
    q, k, v = (x.float() if x.dtype != torch.float64 else x for x in (q, k, v))
    if args.segments:
        return ringlab.dilated_attention(q, k, v, args.segments, args.rates, causal=args.causal,
                                         head_offsets=args.head_offsets)
    return ringlab.attention(q, k, v, causal=args.causal)


def _say(rank, text):
    if rank == 0:
        print(text, flush=True)


def main(argv=None):
    args = parse_args(argv)
    _init()
    rank, p = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    full = None
    if args.check:
        _say(rank, f"check: building the whole-sequence inputs on {device.type} (same seed on every rank)")
        g = torch.Generator(device).manual_seed(0)  # on the device: no CPU copy of the whole sequence
        full = [torch.randn(args.batch, args.seq_len, args.heads, args.head_dim, generator=g, device=device,
                            dtype=dtype) for _ in range(3)]
        q, k, v = (ringlab.shard(x, rank, p, args.layout).clone() for x in full)
    else:
        shape = (args.batch, args.seq_len // p, args.heads, args.head_dim)
        torch.manual_seed(rank)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    q, k, v = (x.requires_grad_(args.backward) for x in (q, k, v))
    group = dist.group.WORLD
    attend(args, q, k, v, group=group)  # warm-up
    times = []
    with memory.track(device) as mem:
        for _ in range(args.iters):
            dist.barrier()
            t0 = time.perf_counter()
            out = attend(args, q, k, v, group=group)
            if args.backward:
                out.sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    stats = dict(rank=rank, seconds=min(times), peak_mib=mem.peak / 2**20)
    everyone = [None] * p
    dist.all_gather_object(everyone, stats)
    if args.check:
        outs = [torch.empty_like(out) for _ in range(p)]
        dist.all_gather(outs, out.detach().contiguous())
    if rank == 0:
        kind = f"ring-dilated {args.segments}/{args.rates}" if args.segments else "ring"
        print(f"{kind} attention, N={args.seq_len}, P={p}, {args.layout}, causal={args.causal}, "
              f"{args.dtype}, {'forward+backward' if args.backward else 'forward'} on {device.type}")
        print(f"{'rank':>5} {'s/iter':>10} {'tokens/s':>12} {'peak MiB':>10}")
        for s in everyone:
            print(f"{s['rank']:>5} {s['seconds']:>10.4f} {args.seq_len * args.batch / s['seconds']:>12,.0f} "
                  f"{s['peak_mib']:>10.1f}")
        if args.check:
            print(f"check: single-device {'dilated_attention' if args.segments else 'attention'} in float32 on "
                  f"{device.type}, whole sequence ...", flush=True)
            t0 = time.perf_counter()
            with torch.no_grad():
                ref = reference(args, *full)
            whole = ringlab.unshard(outs, args.layout)
            err = (whole.to(ref.dtype) - ref).abs().max().item()
            print(f"max abs error vs single-device float32 ({time.perf_counter() - t0:.1f} s): {err:.3g}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
