"""Run ring or ring-dilated attention on every rank of a torchrun job and report per rank.

    torchrun --nproc-per-node 8 -m ringlab.run --seq-len 131072 --heads 16 --head-dim 128 \\
             --dtype bfloat16 --causal --layout zigzag [--segments 4096,16384 --rates 1,4]
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
             -m ringlab.run --seq-len 1048576 --segments 4096,65536,1048576 --rates 1,4,16

Each rank builds its shard of random q, k, v on its device (CUDA with NCCL when available,
else CPU with gloo), runs forward (+ backward with --backward) ``--iters`` times, and rank 0
prints time per iteration, tokens/s and measured peak memory for every rank. With --check
(small sequences only) rank 0 also compares the gathered output with the single-device
function. Without torchrun it runs as a group of one.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import ringlab
from ringlab import memory


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ringlab.run", description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=16384, help="whole sequence length N")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float64", "float32", "bfloat16", "float16"])
    p.add_argument("--causal", action="store_true")
    p.add_argument("--layout", default="contiguous", choices=["contiguous", "zigzag", "striped"])
    p.add_argument("--segments", default="", help="comma-separated segment lengths: ring-dilated")
    p.add_argument("--rates", default="", help="comma-separated dilation rates")
    p.add_argument("--head-offsets", default="interleaved", choices=["interleaved", "grouped"])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--backward", action="store_true", help="also run the backward")
    p.add_argument("--check", action="store_true", help="compare with the single-device function")
    args = p.parse_args(argv)
    args.segments = [int(x) for x in args.segments.split(",") if x]
    args.rates = [int(x) for x in args.rates.split(",") if x]
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
        from .launch import free_port
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1)


def attend(args, q, k, v, **ring):
    kw = dict(causal=args.causal, layout=args.layout, **ring)
    if args.segments:
        return ringlab.ring_dilated_attention(q, k, v, args.segments, args.rates,
                                              head_offsets=args.head_offsets, **kw)
    return ringlab.ring_attention(q, k, v, **kw)


def main(argv=None):
    args = parse_args(argv)
    _init()
    rank, p = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(args.batch, args.seq_len, args.heads, args.head_dim, generator=g) for _ in range(3)] \
        if args.check else None
    if full is not None:
        q, k, v = (ringlab.shard(x, rank, p, args.layout).to(device, dtype) for x in full)
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
            whole = ringlab.unshard([o.cpu() for o in outs], args.layout).double()
            ref = attend(args, *(x.to(dtype).double() for x in full), ring_size=1)
            print(f"max abs error vs single device: {(whole - ref).abs().max().item():.3g}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
