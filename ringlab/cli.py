"""The ``ringlab`` command.

    ringlab plan --tokens 1G --heads 32 --head-dim 128 [--kv-heads 8] --dtype bf16 --gpu h100 [--gpus N]
                 [--segments 4096,65536,1G --rates 1,8,64] [--dry-run] [--json]
    ringlab plan --tokens 1M --heads 32 --kv-heads 8 --head-dim 128 --gpus 32
                 --strategy ring|ulysses|hybrid|best [--gpus-per-node 8] [--documents exp:4096] [--json]
    ringlab sweep NOTEBOOK -p name v1 v2 ... [-p other ...] [--jobs 2] [--gpus-per-run K] [--sweep-id ID]
                  [--slurm --partition P --time T [--gpus-per-task G] [--nodes-per-task N]]
    ringlab sweep --collect SWEEP_ID
    ringlab figures [NOTEBOOK ...] [--notebooks DIR] [--out DIR] [--index]
                                           # the main job: execute every notebook, write figures/
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

from .engine.checks import check_positive_number
from .engine.layout import LAYOUTS

def _ints(text: str, what: str) -> list[int]:
    from .planning.planner import parse_tokens
    try:
        values = [parse_tokens(x) for x in text.replace(" ", ",").split(",") if x]
    except ValueError:
        values = []
    if not values:
        raise ValueError(f"{what} must be comma-separated positive numbers (K/M/G suffixes allowed), got {text!r}")
    return values


def _documents(text: str | None):
    """--documents: comma-separated lengths, or a distribution like exp:4096 (passed on as is)."""
    if text is None or ":" in text:
        return text
    return _ints(text, "--documents")


def _plan(args) -> int:
    from .planning.memory_model import Problem
    from .planning.planner import devices, plan

    profiles = devices(args.devices) if args.devices else None
    if args.strategy:
        return _strategies(args, profiles)
    p = plan(args.tokens, heads=args.heads, head_dim=args.head_dim,
             dtype=args.dtype,
             segments=_ints(args.segments, "--segments") if args.segments else (),
             rates=_ints(args.rates, "--rates") if args.rates else (), gpu=args.gpu, gpus=args.gpus,
             batch=args.batch, causal=not args.no_causal, layout=args.layout, head_offsets=args.head_offsets,
             backward=not args.forward_only, device_profiles=profiles, kv_heads=args.kv_heads,
             documents=_documents(args.documents))
    dry = None
    if args.dry_run:
        from .planning.dryrun import dry_run
        dry = dry_run(Problem(**p.problem), backward=not args.forward_only)
    if args.json:  # only here: a million packed documents make the dict slow to build
        json.dump(p.to_dict() | ({"dry_run": dry} if dry else {}), sys.stdout, indent=1, default=str)
        print()
        return 0
    print(p.table())
    if dry:
        print(f"\ndry run of rank 0's engine code on meta tensors: peak {dry['measured'] / 2**30:,.2f} GiB "
              f"measured vs {dry['model'] / 2**30:,.2f} GiB modelled (ratio {dry['ratio']:.4f}; kernel scratch "
              "excluded: meta kernels allocate none)")
    return 0


def _sweep(args) -> int:
    from .workbench.sweep import collect_sweep, run_sweep
    from .workbench.slurm import SlurmOptions

    if args.collect:
        if args.notebook or args.param:
            raise ValueError("--collect takes a sweep id and nothing else: ringlab sweep --collect SWEEP_ID")
        report = collect_sweep(args.collect, root=args.runs)
    else:
        if not args.notebook:
            raise ValueError("give a notebook and its grid (ringlab sweep NOTEBOOK -p NAME V1 V2 ...), "
                             "or --collect SWEEP_ID")
        slurm_only = [f"--{k.replace('_', '-')}" for k in ("partition", "time", "gpus_per_task", "nodes_per_task",
                                                           "sbatch") if getattr(args, k) is not None]
        if slurm_only and not args.slurm:
            raise ValueError(f"{', '.join(slurm_only)} only apply with --slurm")
        given = lambda value, default: default if value is None else value  # noqa: E731
        slurm = SlurmOptions(args.partition, args.time, given(args.gpus_per_task, 0), given(args.nodes_per_task, 1),
                             tuple(args.sbatch or ())) if args.slurm else None
        report = run_sweep(args.notebook, [(name, values) for name, *values in args.param], jobs=args.jobs,
                           sweep_id=args.sweep_id, root=args.runs, timeout=args.timeout,
                           gpus_per_run=args.gpus_per_run, slurm=slurm)
    print(report.summary())
    return 1 if report.failed else 0


def _figures(args) -> int:
    from .workbench.notebooks import run_notebooks
    from .workbench.notebooks import FIGURES, NOTEBOOKS
    if args.notebooks and not pathlib.Path(args.notebooks).is_dir():
        raise ValueError(f"--notebooks {args.notebooks} is not a folder")
    check_positive_number("--timeout", args.timeout, " of seconds")
    out = pathlib.Path(args.out or FIGURES)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot write the figures folder {out}: {err.strerror or err}; choose one with --out") from None
    if args.index:
        from .workbench.gallery import write_index
        from .workbench.notebooks import notebook_names
        folder = args.notebooks or NOTEBOOKS
        print(f"index of the figures: {write_index(args.out or FIGURES, folder, order=notebook_names(folder))}")
        return 0
    return run_notebooks(only=[*args.paths, *(args.only or [])], folder=args.notebooks or NOTEBOOKS,
                         out_dir=args.out or FIGURES, timeout=args.timeout)


def _strategies(args, profiles) -> int:
    """``plan --strategy``: the ring, Ulysses and the hybrid compared on --gpus GPUs."""
    from .planning.strategies import STRATEGIES, compare

    if args.gpus is None:
        raise ValueError("--strategy compares strategies on a given number of GPUs: pass --gpus")
    if args.dry_run:
        raise ValueError("--strategy takes no --dry-run: dry-run the ring with a plain plan")
    report = compare(args.tokens, heads=args.heads, head_dim=args.head_dim, gpus=args.gpus, kv_heads=args.kv_heads,
                     dtype=args.dtype, gpu=args.gpu, gpus_per_node=args.gpus_per_node,
                     batch=args.batch, causal=not args.no_causal, layout=args.layout,
                     backward=not args.forward_only, device_profiles=profiles,
                     strategies=STRATEGIES if args.strategy == "best" else (args.strategy,),
                     segments=_ints(args.segments, "--segments") if args.segments else (),
                     rates=_ints(args.rates, "--rates") if args.rates else (), head_offsets=args.head_offsets,
                     documents=_documents(args.documents))
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=1, default=str)
        print()
    else:
        print(report.table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringlab", description="ring and dilated attention workbench")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="what an N-token run needs per GPU")
    p.add_argument("--tokens", required=True, help="sequence length: 65536, 512K, 1G (=2**30), 1e9")
    p.add_argument("--heads", type=int, required=True, help="query heads")
    p.add_argument("--head-dim", type=int, required=True, help="dimension of each head (D)")
    p.add_argument("--kv-heads", type=int, default=None,
                   help="K/V heads, a divisor of --heads (grouped-query attention; default: --heads)")
    p.add_argument("--dtype", default="bf16", help="bf16, fp16, fp32, fp64 (default bf16)")
    p.add_argument("--segments", default="", help="comma-separated segment lengths (ring-dilated)")
    p.add_argument("--rates", default="", help="comma-separated dilation rates, one per segment")
    p.add_argument("--gpu", default="h100", help="device profile: h100, h200, a100 (see ringlab/planning/devices.json)")
    p.add_argument("--gpus", type=int, default=None, help="number of GPUs (default: the fewest that fit)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    p.add_argument("--no-causal", action="store_true", help="bidirectional attention (default: causal)")
    p.add_argument("--layout", default="zigzag", choices=list(LAYOUTS),
                   help="how the sequence is sharded (default zigzag)")
    p.add_argument("--head-offsets", default="interleaved", choices=["interleaved", "grouped"],
                   help="which heads take which dilation offset (default interleaved)")
    p.add_argument("--forward-only", action="store_true", help="inference: no backward")
    p.add_argument("--devices", default=None, help="a JSON file of device profiles to use instead")
    p.add_argument("--dry-run", action="store_true", help="also run rank 0's engine on meta tensors")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--strategy", default=None, choices=["ring", "ulysses", "hybrid", "best"],
                   help="compare context-parallel strategies on --gpus GPUs: one, or best of all")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node for --strategy (default: the device profile's)")
    p.add_argument("--documents", default=None,
                   help="packed documents: comma-separated lengths adding up to --tokens, or exp:MEAN "
                        "(exponentially distributed lengths); with --segments each document has its own "
                        "segments; reports the compute of every rank")
    p.set_defaults(run=_plan)

    s = sub.add_parser("sweep", help="execute a notebook over a parameter grid with papermill")
    s.add_argument("notebook", nargs="?")
    s.add_argument("-p", "--param", nargs="+", action="append", default=[], metavar=("NAME", "VALUE"),
                   help="a parameter and its values; repeat for a grid")
    s.add_argument("--jobs", type=int, default=None,
                   help="runs at once (default 1, or one per GPU group; with --slurm: array tasks at once)")
    s.add_argument("--gpus-per-run", type=int, default=None, metavar="K",
                   help="give each run K GPUs of its own (CUDA_VISIBLE_DEVICES), K dividing the visible GPUs "
                        "(default: every run sees every GPU)")
    s.add_argument("--sweep-id", default=None, help="resume this sweep (default: from the grid)")
    s.add_argument("--runs", default="runs", help="folder for sweeps (default runs/)")
    s.add_argument("--timeout", type=float, default=1800, help="seconds per notebook cell")
    s.add_argument("--collect", default=None, metavar="SWEEP_ID",
                   help="gather the results of a sweep (e.g. one submitted with --slurm) and report its failed runs")
    c = s.add_argument_group("SLURM", "submit the unfinished runs as a job array (runs/<sweep-id>/slurm/)")
    c.add_argument("--slurm", action="store_true", help="submit to SLURM with sbatch instead of running here")
    c.add_argument("--partition", default=None, help="the partition (needed)")
    c.add_argument("--time", default=None, help="each task's time limit: minutes, HH:MM:SS, D-HH:MM:SS (needed)")
    c.add_argument("--gpus-per-task", type=int, default=None, help="GPUs on each node of a task (default 0)")
    c.add_argument("--nodes-per-task", type=int, default=None,
                   help="nodes per task (default 1); above 1 torchrun starts one rank per GPU on each")
    c.add_argument("--sbatch", action="append", default=None, metavar="OPTION",
                   help="another sbatch option for every task, e.g. --sbatch=--account=proj (repeatable)")
    s.set_defaults(run=_sweep)

    f = sub.add_parser("figures", help="execute every notebook and rewrite figures/ (the main job)")
    f.add_argument("paths", nargs="*", help="notebooks (.ipynb paths, or names in --notebooks; default: all)")
    f.add_argument("--only", nargs="*", default=None, help="notebook names in --notebooks")
    f.add_argument("--notebooks", default=None, help="folder of notebooks (default: the checkout's notebooks/)")
    f.add_argument("--out", default=None, help="folder for the figures (default: the checkout's figures/)")
    f.add_argument("--timeout", type=float, default=1800, help="seconds per notebook cell")
    f.add_argument("--index", action="store_true", help="only rewrite index.html from the figures there")
    f.set_defaults(run=_figures)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as err:
        parser.exit(2, f"ringlab {args.command}: error: {err}\n")
    except BrokenPipeError:  # the output went to a reader that stopped early (| head); not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit fails quietly
        return 0


if __name__ == "__main__":
    sys.exit(main())
