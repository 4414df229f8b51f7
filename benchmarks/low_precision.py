"""bf16 and fp16 errors over random cases, against torch's own SDPA on the same inputs.

    python -m benchmarks.low_precision [--quick]

A low-precision result carries the rounding of its kernel: scores, probabilities and their
gradients pass through bf16 or fp16 inside it, and a ring or dilated call merges several
such results. How large that error gets is a property of the inputs, so this draws random
cases (lengths 4 to 64, causal or not) and reports, per call, the largest error over them in
units of eps x max|reference| (the ulp of docs/design.md §7), against the float64 reference on
the same rounded inputs and rounded output gradient. torch's default SDPA on the same cases
is the baseline: ``vs_sdpa`` is a call's worst case over SDPA's worst case.
"""

from __future__ import annotations

import torch

import ringlab
from ringlab.reference import dense_attention, dense_dilated_attention
from ringlab.workbench.baselines import sdpa

from .common import cli, section

QUANTITIES = ("out", "dq", "dk", "dv")
SEGMENTS, RATES = (8, 16, 32), (1, 2, 4)


CALLS = {  # name: (call, whether the reference is dilated)
    "SDPA (torch)": (lambda q, k, v, causal: sdpa(q, k, v, causal=causal), False),
    "attention": (lambda q, k, v, causal: ringlab.attention(q, k, v, causal=causal), False),
    "ring P=4 zigzag (simulated)": (lambda q, k, v, causal: ringlab.ring_attention(
        q, k, v, ring_size=4, causal=causal, layout="zigzag"), False),
    "dilated": (lambda q, k, v, causal: ringlab.dilated_attention(q, k, v, SEGMENTS, RATES, causal=causal), True),
    "ring-dilated P=2 (simulated)": (lambda q, k, v, causal: ringlab.ring_dilated_attention(
        q, k, v, SEGMENTS, RATES, ring_size=2, causal=causal), True),
}


def _errors(call, inputs, dout, reference, dtype) -> list[float]:
    """Max abs error of out, dq, dk, dv in units of eps x max(1, max|reference|)."""
    leaves = [x.to(dtype).requires_grad_() for x in inputs]
    out = call(*leaves)
    out.backward(dout.to(dtype))
    eps = torch.finfo(dtype).eps
    return [(got.double() - ref).abs().max().item() / (eps * max(1.0, ref.abs().max().item()))
            for got, ref in zip([out, *(x.grad for x in leaves)], reference)]


def _reference(inputs, dout, causal, dilated) -> list[torch.Tensor]:
    leaves = [x.clone().requires_grad_() for x in inputs]
    group = leaves[0].shape[2] // leaves[1].shape[2]
    q, k, v = leaves[0], *(x.repeat_interleave(group, 2) for x in leaves[1:])
    if dilated:
        out, _ = dense_dilated_attention(q, k, v, SEGMENTS, RATES, causal=causal)
    else:
        out, _ = dense_attention(q, k, v, causal=causal)
    out.backward(dout)
    return [out.detach(), *(x.grad for x in leaves)]


def run(quick: bool = False) -> dict:
    cases = 12 if quick else 300
    g = torch.Generator().manual_seed(0)
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        worst = {name: [0.0] * len(QUANTITIES) for name in CALLS}
        for _ in range(cases):
            n = 8 * int(torch.randint(1, 9, (), generator=g)) if torch.rand((), generator=g) < 0.8 else 4
            causal = bool(torch.rand((), generator=g) < 0.5)
            kv_heads = 2 if torch.rand((), generator=g) < 0.5 else 4
            d = 8 if torch.rand((), generator=g) < 0.5 else 32
            # Inputs and the output gradient rounded to dtype first: the reference sees what the call sees.
            inputs = [torch.randn(2, n, h, d, generator=g, dtype=torch.float64).to(dtype).double()
                      for h in (4, kv_heads, kv_heads)]
            dout = torch.randn(2, n, 4, d, generator=g, dtype=torch.float64).to(dtype).double()
            refs = {dilated: _reference(inputs, dout, causal, dilated) for dilated in (False, True)}
            for name, (call, dilated) in CALLS.items():
                if n % 8 and name.startswith("ring"):
                    continue  # zigzag over 4 ranks needs N divisible by 8
                errs = _errors(lambda q, k, v: call(q, k, v, causal), inputs, dout, refs[dilated], dtype)
                worst[name] = [max(a, b) for a, b in zip(worst[name], errs)]
        base = max(worst["SDPA (torch)"])
        for name, errs in worst.items():
            rows.append(dict(call=name, dtype=str(dtype).removeprefix("torch."),
                             **{f"{q}_ulps": e for q, e in zip(QUANTITIES, errs)}, worst_ulps=max(errs),
                             vs_sdpa=max(errs) / base))
    notes = (f"{cases} random cases per dtype: batch 2, H = 4, H_kv = 4 or 2, D = 8 or 32, N from 4 to 64, "
             f"causal or not; dilated segments {list(SEGMENTS)}, rates {list(RATES)}. ulps: max abs error / "
             "(eps x max(1, max|reference|)), the largest over the cases; the reference is float64 on the same "
             "rounded inputs and output gradient "
             "(a dilated call's: dense_dilated_attention). vs_sdpa: a call's worst ulps over SDPA's. The tests hold "
             "their bf16 and fp16 cases to 2 ulps (docs/design.md §7).")
    return section("low_precision", rows, ["call", "dtype", *(f"{q}_ulps" for q in QUANTITIES), "worst_ulps",
                                           "vs_sdpa"], notes=notes)


def main(argv=None):
    return cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
