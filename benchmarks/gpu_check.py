"""One script for a 15-minute GPU lease (one H100 or H200): CUDA correctness, then speed and memory.

    python -m benchmarks.gpu_check              # on the GPU machine (about 5 minutes on an H100)
    python -m benchmarks.gpu_check --dry-run    # the same steps on CPU at toy sizes (CI runs this)

1. correctness: every public function on CUDA (float32 and bf16, small shapes) against the
   float64 dense reference at the SPEC §5 tolerances: ``attention``, ``dilated_attention``,
   ``ring_attention`` and ``ring_dilated_attention`` simulated for several ring sizes and
   layouts, and ``nn.MultiheadDilatedAttention`` against its own float64 copy.
2. speed: bf16, H = 16, D = 128, N = 32K-128K, causal and not, forward and forward+backward:
   ``attention``, simulated ring (P = 8) and dilated (LongNet config) vs
   ``F.scaled_dot_product_attention`` on the flash backend; achieved TFLOP/s and its fraction of
   the card's measured bf16 matmul rate; peak allocator bytes. Targets: attention and ring
   within 10% of SDPA flash; dilated >= 3x faster than dense at N = 128K.
3. capacity: the largest N (doubling) for which dilated attention forward+backward fits.

Prints one table at the end; writes gpu_check.{json,md} to $OUT when set (else
benchmarks/results/<card>-<date>-gpu_check.*). Every step is guarded: a failure is recorded
and the script goes on, so one bad case cannot cost the lease.
"""

from __future__ import annotations

import argparse
import os
import time
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import ringlab
from ringlab.nn import MultiheadDilatedAttention
from ringlab.reference import dense_attention, dense_dilated_attention, tolerance

from .common import best_time, machine, markdown_table, peak_bytes, record, section
from .hardware import attention_flops, matmul_flops
from .single_device import LONGNET, fwd_bwd

SIZES = dict(
    real=dict(n=1024, speed=[32768, 65536, 131072], heads=16, dim=128, repeats=3, scale=1, capacity=131072),
    dry=dict(n=128, speed=[256, 512], heads=2, dim=16, repeats=1, scale=32, capacity=512),
)


# ----------------------------------------------------------------------------- correctness
def _max_err(a, e):
    return (a.double() - e.double()).abs().max().item()


def _check(name, fn, ref, inputs, dtype, device):
    """Run ``fn`` on ``inputs`` cast to ``dtype`` on ``device`` and ``ref`` in float64 on the
    same rounded values; one row with the worst error / tolerance over out, dq, dk, dv."""
    g = torch.Generator().manual_seed(1)
    rounded = [x.to(dtype).double() for x in inputs]
    dout = torch.randn(inputs[0].shape, generator=g, dtype=torch.float64)
    xs = [x.to(device, dtype).requires_grad_() for x in rounded]
    out = fn(*xs)
    out.backward(dout.to(device, dtype))
    rs = [x.clone().requires_grad_() for x in rounded]
    rout = ref(*rs)
    rout.backward(dout)
    worst = 0.0
    for got, exp, grad in [(out, rout, False)] + [(x.grad, r.grad, True) for x, r in zip(xs, rs)]:
        err = _max_err(got.detach().cpu(), exp.detach())
        worst = max(worst, err / tolerance(dtype, exp.abs().max().item(), grad=grad))
    return dict(check=name, dtype=str(dtype).removeprefix("torch."), err_over_tol=worst, ok=worst <= 1.0)


def correctness_rows(device, n) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(2, n + 3, 4, 64, generator=g, dtype=torch.float64) for _ in range(3)]  # ragged N
    ring_qkv = [x[:, :n] for x in qkv]  # the ring needs N divisible by the ring's blocks
    segs, rates = [n // 8, n // 2], [1, 4]
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for causal in (False, True):
            cases.append((f"attention causal={causal}", qkv, dtype,
                          lambda q, k, v, c=causal: ringlab.attention(q, k, v, causal=c),
                          lambda q, k, v, c=causal: dense_attention(q, k, v, causal=c)[0]))
            cases.append((f"dilated_attention causal={causal}", qkv, dtype,
                          lambda q, k, v, c=causal: ringlab.dilated_attention(q, k, v, segs, rates, causal=c),
                          lambda q, k, v, c=causal: dense_dilated_attention(q, k, v, segs, rates, causal=c)[0]))
    for p in (1, 2, 4):
        for layout in ("contiguous", "zigzag", "striped"):
            cases.append((f"ring_attention P={p} {layout} causal", ring_qkv, torch.float32,
                          lambda q, k, v, p=p, lay=layout: ringlab.ring_attention(q, k, v, ring_size=p, causal=True,
                                                                                   layout=lay),
                          lambda q, k, v: dense_attention(q, k, v, causal=True)[0]))
        for layout in ("contiguous", "zigzag"):
            cases.append((f"ring_dilated_attention P={p} {layout} causal", ring_qkv, torch.float32,
                          lambda q, k, v, p=p, lay=layout: ringlab.ring_dilated_attention(
                              q, k, v, segs, rates, ring_size=p, causal=True, layout=lay),
                          lambda q, k, v: dense_dilated_attention(q, k, v, segs, rates, causal=True)[0]))
    rows = []
    for name, inputs, dtype, fn, ref in cases:
        rows.append(_guard(name, lambda: _check(name, fn, ref, inputs, dtype, device)))
    rows.append(_guard("MultiheadDilatedAttention", lambda: _module_check(device, n, segs, rates)))
    return rows


def _module_check(device, n, segs, rates):
    """The module in float32 on ``device`` vs the same weights in float64 on CPU."""
    torch.manual_seed(0)
    ref = MultiheadDilatedAttention(128, 4, segs, rates, dtype=torch.float64)
    mod = MultiheadDilatedAttention(128, 4, segs, rates).to(device)
    mod.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    g = torch.Generator().manual_seed(2)
    query, key, value = (torch.randn(2, n, 128, generator=g, dtype=torch.float64) for _ in range(3))
    return _check("MultiheadDilatedAttention", lambda q, k, v: mod(q, k, v)[0], lambda q, k, v: ref(q, k, v)[0],
                  [query, key, value], torch.float32, device)


def _guard(name, fn) -> dict:
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - recorded in the table; the lease goes on
        traceback.print_exc()
        return dict(check=name, ok=False, error=f"{type(err).__name__}: {err}"[:200])


# ----------------------------------------------------------------------------- speed
def speed_rows(device, sizes, heads, dim, repeats, scale, peak) -> list[dict]:
    segs = [s // scale for s in LONGNET["segments"]]
    rows = []
    for n in sizes:
        for causal in (False, True):
            for backward in (False, True):
                leaves = [torch.randn(1, n, heads, dim, device=device, dtype=torch.bfloat16).requires_grad_(backward)
                          for _ in range(3)]
                contestants = {
                    "SDPA flash": (lambda q, k, v, c=causal: _sdpa_flash(q, k, v, c), None),
                    "attention": (lambda q, k, v, c=causal: ringlab.attention(q, k, v, causal=c), None),
                    "ring P=8 (simulated)": (lambda q, k, v, c=causal: ringlab.ring_attention(
                        q, k, v, ring_size=8, causal=c, layout="zigzag"), None),
                    "dilated (LongNet)": (lambda q, k, v, c=causal: ringlab.dilated_attention(
                        q, k, v, segs, LONGNET["rates"], causal=c), segs),
                }
                base = None
                for name, (fn, dsegs) in contestants.items():
                    row = dict(N=n, causal=causal, mode="fwd+bwd" if backward else "fwd", call=name)
                    try:
                        once = (lambda f=fn: f(*leaves))
                        run = fwd_bwd(once) if backward else once
                        with torch.enable_grad() if backward else torch.no_grad():
                            seconds = best_time(run, repeats, device)
                            peak_b = peak_bytes(run)
                        flops = attention_flops(leaves[0], dsegs, LONGNET["rates"] if dsegs else None,
                                                causal=causal, backward=backward)
                        base = seconds if name == "SDPA flash" else base
                        row.update(ms=seconds * 1e3, vs_sdpa=seconds / base if base else None,
                                   TFLOPs=flops / seconds / 1e12, of_matmul_peak=flops / seconds / peak,
                                   peak_GiB=peak_b / 2**30)
                    except Exception as err:  # noqa: BLE001 - e.g. out of memory at the largest N
                        row.update(error=f"{type(err).__name__}: {err}"[:120])
                    finally:
                        if torch.device(device).type == "cuda":
                            torch.cuda.empty_cache()
                    rows.append(row)
                    for x in leaves:
                        x.grad = None
    return rows


def _sdpa_flash(q, k, v, causal):
    """PyTorch's flash backend on (B, N, H, D) tensors (it wants (B, H, N, D))."""
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=causal).transpose(1, 2)


def capacity(device, start, heads, dim, scale, budget_s) -> dict:
    """Double N from ``start`` until dilated forward+backward no longer fits (or time runs out)."""
    segs = [s // scale for s in LONGNET["segments"]]
    n, fits, t_end = start, None, time.monotonic() + budget_s
    while time.monotonic() < t_end:
        try:
            leaves = [torch.randn(1, n, heads, dim, device=device, dtype=torch.bfloat16).requires_grad_()
                      for _ in range(3)]
            peak_b = peak_bytes(fwd_bwd(lambda: ringlab.dilated_attention(*leaves, segs, LONGNET["rates"])))
            fits = dict(largest_N=n, peak_GiB=peak_b / 2**30)
            del leaves
            n *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
        if torch.device(device).type == "cpu" and n > start * 4:
            break  # dry run: the loop works; CPU memory is not the question
    return fits or dict(largest_N=None)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="run every step on CPU at toy sizes")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_check.{json,md} (default $OUT)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("CUDA is not available; use --dry-run to exercise the script on CPU")
    device = "cpu" if args.dry_run else "cuda"
    size = SIZES["dry" if args.dry_run else "real"]
    t0 = time.monotonic()
    correct = correctness_rows(device, size["n"])
    print(markdown_table(correct, ["check", "dtype", "err_over_tol", "ok", "error"]), flush=True)
    peak = matmul_flops(device, torch.bfloat16, size=8192 if device == "cuda" else 512)
    speed = speed_rows(device, size["speed"], size["heads"], size["dim"], size["repeats"], size["scale"], peak)
    fit = capacity(device, size["capacity"], size["heads"], size["dim"], size["scale"], budget_s=120)
    largest = max(size["speed"])
    dense = {r["call"]: r.get("ms") for r in speed if r["N"] == largest and not r["causal"] and r["mode"] == "fwd"}
    dilated_speedup = (dense["SDPA flash"] / dense["dilated (LongNet)"]
                       if dense.get("SDPA flash") and dense.get("dilated (LongNet)") else None)
    summary = dict(device=machine()["gpu"] or "cpu (dry run)", matmul_bf16_TFLOPs=peak / 1e12,
                   correctness_ok=all(r["ok"] for r in correct), failed_checks=[r["check"] for r in correct if not r["ok"]],
                   dilated_speedup_vs_dense_at_largest_N=dilated_speedup, capacity=fit,
                   seconds=time.monotonic() - t0, dry_run=args.dry_run)
    sections = [section("correctness (CUDA vs float64)" if device == "cuda" else "correctness (dry run, CPU)",
                        correct, ["check", "dtype", "err_over_tol", "ok", "error"]),
                section("speed, bf16, vs SDPA flash", speed,
                        ["N", "causal", "mode", "call", "ms", "vs_sdpa", "TFLOPs", "of_matmul_peak", "peak_GiB",
                         "error"],
                        notes=f"Measured bf16 matmul: {peak / 1e12:.1f} TFLOP/s. Dilated: LongNet rates "
                              f"{LONGNET['rates']} on segments {[s // size['scale'] for s in LONGNET['segments']]}. "
                              "Targets: attention and ring within 1.10 of SDPA flash; dilated >= 3x faster "
                              "than dense at the largest N."),
                section("summary", [summary], list(summary))]
    record(sections, "gpu_check" if device == "cuda" else "gpu_check-dry-run", out_dir=args.out,
           stem="gpu_check" if args.out else None)
    return summary


if __name__ == "__main__":
    main()
