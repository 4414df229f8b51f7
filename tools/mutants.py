"""Mutation check: plant known bugs in a copy of ringlab and require the test suite to fail.

Each entry of MUTANTS is one small textual change (file, old text, new text) and the tests
that must catch it (a test file and a -k expression). The package and tests are copied to a
temporary folder; first every selected test must pass there unmutated (so that a failure
below means the bug was caught, not that the copy is broken); then, for each mutant, the
change is applied, its tests run against the copy, and the file is restored. The mutant is
caught when pytest reports a failing test (exit code 1). The working tree is never modified.

A pattern that does not occur exactly once in its file is an error, not a skipped mutant: when
code moves, re-point the pattern at the new code (keep the bug the same).

    python tools/mutants.py            # every mutant; exit code 1 if one survives
    python tools/mutants.py --list     # names only
    python tools/mutants.py merge-max  # some of them, by name
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parent.parent
COPIED = ("ringlab", "tests", "pyproject.toml", "benchmarks/results")  # results: measured GPU peaks


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str           # relative to the repository root
    old: str            # must occur exactly once in the file
    new: str
    test_file: str      # relative to the repository root
    select: str         # pytest -k expression: the tests in test_file that must catch it


MUTANTS = (
    # The three bugs of issue 16 that the suite once missed.
    Mutant("ring-ignores-scale", "ringlab/engine/config.py",
           "        scale = resolve_scale(scale, q.shape[-1])",
           "        scale = resolve_scale(None, q.shape[-1])",
           "tests/test_ring.py", "simulated_ring_scale"),
    Mutant("dilated-ignores-scale", "ringlab/engine/dilated.py",
           "return segs, rates, resolve_scale(scale, q.shape[-1])",
           "return segs, rates, resolve_scale(None, q.shape[-1])",
           "tests/test_dilated.py", "test_scale"),
    Mutant("nn-swaps-k-and-v-projections", "ringlab/engine/nn.py",
           "split(self.k_proj(key), self.num_kv_heads), split(self.v_proj(value), self.num_kv_heads)",
           "split(self.v_proj(key), self.num_kv_heads), split(self.k_proj(value), self.num_kv_heads)",
           "tests/test_nn.py", "multihead_against_einsum"),
    Mutant("math-dq-off-by-5e-6", "ringlab/engine/kernels.py",
           'dq[:, r] = torch.einsum("bhqk,bkhd->bqhd", ds, kf) * scale',
           'dq[:, r] = torch.einsum("bhqk,bkhd->bqhd", ds, kf) * scale * (1 + 5e-6)',
           "tests/test_attention.py", "math_path"),
    # Where a bug would hurt most.
    Mutant("merge-max-instead-of-logaddexp", "ringlab/engine/merge.py",
           "torch.logaddexp(lse, block_lse, out=lse)",
           "torch.maximum(lse, block_lse, out=lse)",
           "tests/test_ring.py", "simulated_ring_scale"),
    Mutant("merge-nan-weight-for-empty-rows", "ringlab/engine/merge.py",
           "w = torch.sub(block_lse, lse).sigmoid_().nan_to_num_(0.0)",
           "w = torch.sub(block_lse, lse).sigmoid_()",
           "tests/test_attention.py", "merge"),
    Mutant("striped-causal-tile-sees-own-position", "ringlab/engine/layout.py",
           "return Tile(slice(1, n), slice(0, n - 1), True) if n > 1 else None",
           "return Tile(slice(0, n), slice(0, n), True)",
           "tests/test_ring.py", "simulated_ring_scale"),
    # The striped closed form for packed-document balance: a window that wraps past rank P - 1.
    Mutant("striped-work-ignores-the-wrap", "ringlab/engine/layout.py",
           "shift = np.repeat([0, p], len(home))",
           "shift = np.repeat([0, 0], len(home))",
           "tests/test_layout.py", "striped_work"),
    Mutant("zigzag-second-chunk-index", "ringlab/engine/layout.py",
           "return rank, 2 * world_size - 1 - rank",
           "return rank, 2 * world_size - 2 - rank",
           "tests/test_ring_dilated.py", "simulated_scale"),
    Mutant("dkdv-handoff-keeps-the-held-accumulator", "ringlab/engine/ring.py",
           "return dq, dkv_incoming[0], dkv_incoming[1]",
           "return dq, dkv[0], dkv[1]",
           "tests/test_ring.py", "together_give_what_each_rank_gives"),  # the generators against the together form
    Mutant("grouped-offset-floor-instead-of-ceil", "ringlab/engine/dilation.py",
           "    size = math.ceil(num_heads / rate)\n",
           "    size = max(1, num_heads // rate)\n",
           "tests/test_dilated.py", "test_scale"),
    Mutant("interleaved-offset-shifted", "ringlab/engine/dilation.py",
           "first = seg * w + o\n",
           "first = seg * w + (o + 1) % r\n",
           "tests/test_dilated.py", "test_scale"),
    Mutant("lse-fold-sign-fused", "ringlab/engine/kernels.py",
           "widen(dout, -dlse.transpose(1, 2).to(dout.dtype))",
           "widen(dout, dlse.transpose(1, 2).to(dout.dtype))",
           "tests/test_attention.py", "test_scale"),
    Mutant("lse-fold-sign-math", "ringlab/engine/kernels.py",
           "delta = delta - dlse.to(acc)",
           "delta = delta + dlse.to(acc)",
           "tests/test_attention.py", "backends_and_lse_gradient"),
    Mutant("memory-model-drops-kv-receive-buffer", "ringlab/planning/memory_model.py",
           '"K/V receive buffer": kv if p > 1 else 0}',
           '"K/V receive buffer": 0}',
           "tests/test_memory.py", "model_matches_measurement and simulated_ring"),
    Mutant("p2p-group-rank-used-as-global-rank", "ringlab/engine/comm.py",
           "dist.P2POp(dist.isend, t.contiguous(), dist.get_global_rank(self.group, p), self.group, tag)",
           "dist.P2POp(dist.isend, t.contiguous(), p, self.group, tag)",
           "tests/test_nn.py", "subgroup"),
    # Grouped-query attention: dk and dv must sum over every query head of a K/V head.
    Mutant("gqa-dk-keeps-the-last-query-group", "ringlab/engine/kernels.py",
           "        dk += gk\n        dv += gv\n",
           "        dk.copy_(gk)\n        dv += gv\n",
           "tests/test_gqa.py", "matches_repeated_kv and attention"),
    # Ulysses: the received pieces must join in rank order, and a chunk's heads keep their global index.
    Mutant("ulysses-all-to-all-joins-pieces-reversed", "ringlab/engine/comm.py",
           "joined = torch.cat(self.parts, self.cat)", "joined = torch.cat(self.parts[::-1], self.cat)",
           "tests/test_ulysses.py", "simulated_mesh and 2x2"),
    Mutant("ulysses-head-group-ignores-chunk-start", "ringlab/engine/ulysses.py",
           "start = heads.start + comm.rank * size", "start = comm.rank * size",
           "tests/test_ulysses.py", "head_chunks"),
    # Packed documents: a ring step must not skip a document its ranks share, and a document's
    # dilation segments start at the document's start.
    Mutant("packed-ring-skips-shared-documents", "ringlab/engine/layout.py",
           "for k in theirs.get(d, ())",
           "for k in (theirs.get(d, ()) if src == rank else ())",
           "tests/test_packed.py", "simulated_ring and not dilated"),
    Mutant("packed-dilated-segments-from-sequence-start", "ringlab/engine/dilation.py",
           "yield s, tuple(inside), first",
           "yield 0, tuple((a + s, b + s) for a, b in inside), first",
           "tests/test_packed.py", "test_dilated_attention"),
    # Packed documents on a mesh: the simulated mesh must shard by the documents its ring tiles read.
    Mutant("packed-mesh-shards-ignore-documents", "ringlab/engine/ulysses.py",
           "config.ring.layout, config.ring.documents, ulysses_group",
           "config.ring.layout, (), ulysses_group",
           "tests/test_packed.py", "simulated_mesh"),
    # The native varlen call: its backward must fold in the gradient that reaches lse, and the
    # dilated planner's closed form must count a causal segment's rows from their offset.
    Mutant("packed-varlen-backward-drops-dlse", "ringlab/engine/kernels.py",
           "    if dlse is not None:\n        (dout, q, k, v, out), s = _dlse_folded",
           "    if False:\n        (dout, q, k, v, out), s = _dlse_folded",
           "tests/test_packed.py", "native_varlen_kernel"),
    Mutant("packed-dilated-work-causal-off-by-one", "ringlab/engine/dilation.py",
           "return (t0 + t1 + 2) * count // 2",
           "return (t0 + t1 + 1) * count // 2",
           "tests/test_packed.py", "dilated_compute_per_rank"),
    # The memory model forgetting that GPU dilated calls are cut no finer than the floor.
    Mutant("memory-model-ignores-gpu-call-floor", "ringlab/planning/memory_model.py",
           "    blocks = _blocks(pb, ((0, n),), whole=True)\n",
           "    blocks = _blocks(pb, ((0, n),))\n",
           "tests/test_memory.py", "h200_allocator"),
    # The memory model forgetting the rows a GPU copies to fuse a branch's offset groups.
    Mutant("memory-model-misses-fused-copies", "ringlab/planning/memory_model.py",
           "copied = (pb.batch > 1 and not tiles) or (blk.groups > 1 and blk.q.nseg > 1)",
           "copied = pb.batch > 1 and not tiles",
           "tests/test_memory.py", "fuse_by_copy"),
    # Dilated attention's first branch writing its rows' lse into uninitialized accumulators.
    Mutant("dilated-first-branch-forgets-lse", "ringlab/engine/dilated.py",
           "        lse.copy_(l.view(lse.shape))\n",
           "",
           "tests/test_dilated.py", "first_branch"),
    # The simulated ring's all-ranks form.
    Mutant("together-backward-reads-its-own-block", "ringlab/engine/ring.py",
           "*of_ranks(srcs, b, dk, dv), config.scale)",
           "*of_ranks(ranks, b, dk, dv), config.scale)",
           "tests/test_ring.py", "simulated_ring_f64"),
    Mutant("stacked-shards-view-ignores-the-batch", "ringlab/engine/comm.py",
           "and (b == 1 or step * s[dim] == b * s[0])",
           "and True",
           "tests/test_ring.py", "together"),
    Mutant("stacked-rows-gathered-batch-first", "ringlab/engine/comm.py",
           "(held[:, None, :] + n * torch.arange(b)[None, :, None])",
           "(held[None, :, :] + n * torch.arange(b)[:, None, None])",
           "tests/test_ring.py", "together"),
    # The simulated ring-dilated's all-ranks form, and the per-rank generators it is checked against.
    Mutant("ring-dilated-together-reads-its-own-rows", "ringlab/engine/ring_dilated.py",
           "return of_ranks(slice(sender, sender + ranks.stop - ranks.start), batch, *xs)",
           "return of_ranks(ranks, batch, *xs)",
           "tests/test_ring_dilated.py", "simulated_scale"),
    Mutant("ring-dilated-homecoming-dk-takes-dv", "ringlab/engine/ring_dilated.py",
           "rows_view(dk, part.rows, *part.kv_view_args()).add_(_part_view(buf[0], part))",
           "rows_view(dk, part.rows, *part.kv_view_args()).add_(_part_view(buf[1], part))",
           "tests/test_ring_dilated.py", "together_give_what_each_rank_gives"),
    Mutant("head-chunk-keeps-its-last-gradient", "ringlab/engine/autograd.py",
           "del part, p  #", "del part  #",
           "tests/test_memory.py", "head_chunk_frees"),
    Mutant("lse-fold-overflows-fp16", "ringlab/engine/kernels.py",
           "    if dout.dtype == torch.float16:\n        s = torch.exp2", "    if False:\n        s = torch.exp2",
           "tests/test_backends.py", "loss_scaled"),
    Mutant("loss-scale-not-restored", "ringlab/engine/kernels.py",
           "return grad if s is None else grad.mul_(s)", "return grad",
           "tests/test_backends.py", "loss_scaled"),
    # The Triton merge (run on CPU through triton's interpreter).
    Mutant("fused-merge-nan-weight-for-empty-rows", "ringlab/engine/merge.py",
           'w = tl.where(new == float("-inf"), 0.0, tl.sigmoid(new - old))',
           "w = tl.sigmoid(new - old)",
           "tests/test_fused_merge.py", "equals_the_torch_merge"),
    Mutant("fused-merge-reads-the-block-with-out-strides", "ringlab/engine/merge.py",
           "    b_strides = (0,) * pad + block_out.stride()\n",
           "    b_strides = o_strides\n",
           "tests/test_fused_merge.py", "equals_the_torch_merge"),
    Mutant("fused-merge-max-instead-of-logaddexp", "ringlab/engine/merge.py",
           "both = tl.where(hi == float(\"-inf\"), hi, hi + tl.log(1.0 + tl.exp(-tl.abs(old - new))))",
           "both = hi",
           "tests/test_fused_merge.py", "rings_and_dilated"),
)


class PatternError(RuntimeError):
    pass


def mutated(m: Mutant, root: pathlib.Path = ROOT) -> str:
    """The text of m.path under ``root`` with the mutation applied."""
    text = (root / m.path).read_text()
    found = text.count(m.old)
    if found != 1:
        raise PatternError(f"mutant {m.name!r}: {m.path} contains its pattern {found} times, not once. "
                           f"The code moved: re-point the pattern in tools/mutants.py.\n  pattern: {m.old!r}")
    return text.replace(m.old, m.new)


def pytest(copy: pathlib.Path, env: dict, files, select: str, *, stop_at_first: bool = True):
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "300", *files, "-k", select]
    return subprocess.run(args + ["-x"] * stop_at_first, cwd=copy, env=env, capture_output=True, text=True)


def run(m: Mutant, copy: pathlib.Path, env: dict) -> tuple[str, float, str]:
    """Apply m to the copy, run its tests, restore the file. Returns (verdict, seconds, output)."""
    target = copy / m.path
    original = target.read_text()
    target.write_text(mutated(m, copy))
    t0 = time.monotonic()
    try:
        res = pytest(copy, env, [m.test_file], m.select)
    finally:
        target.write_text(original)
    verdict = {1: "caught", 0: "SURVIVED", 5: "NO TESTS SELECTED"}.get(res.returncode, f"ERROR (pytest exit {res.returncode})")
    return verdict, time.monotonic() - t0, res.stdout + res.stderr


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutants: {sorted(unknown)}")
    if args.list:
        print("\n".join(f"{m.name:45} {m.path}" for m in chosen))
        return 0
    for m in chosen:  # every pattern is checked before anything runs
        mutated(m)
    with tempfile.TemporaryDirectory(prefix="ringlab-mutants-") as tmp:
        copy = pathlib.Path(tmp)
        for name in COPIED:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(src, copy / name)
        # The copy, not an installed ringlab, is imported; no stale bytecode between mutants.
        env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
        where = subprocess.run([sys.executable, "-c", "import ringlab; print(ringlab.__file__)"], cwd=copy,
                               env=env, capture_output=True, text=True, check=True).stdout.strip()
        if not where.startswith(str(copy)):
            raise RuntimeError(f"the tests would import ringlab from {where}, not from the mutated copy")
        t_all = time.monotonic()
        # The union of the selections (a superset of each) must pass on the unmutated copy.
        baseline = pytest(copy, env, sorted({m.test_file for m in chosen}),
                          " or ".join(f"({m.select})" for m in chosen), stop_at_first=False)
        if baseline.returncode != 0:
            print(baseline.stdout[-5000:] + baseline.stderr[-2000:])
            raise RuntimeError(f"the selected tests fail (pytest exit {baseline.returncode}) without any mutation")
        print(f"unmutated: the selected tests pass ({time.monotonic() - t_all:.0f} s)", flush=True)
        failed = []
        for m in chosen:
            verdict, seconds, output = run(m, copy, env)
            print(f"{verdict:10} {seconds:6.1f} s  {m.name}  ({m.path}; {m.test_file} -k {m.select!r})", flush=True)
            if verdict != "caught":
                failed.append(m.name)
                print(output[-3000:])
    print(f"{len(chosen) - len(failed)} of {len(chosen)} mutants caught in {time.monotonic() - t_all:.0f} s")
    if failed:
        print(f"not caught: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
