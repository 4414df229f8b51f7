"""Single-device engine vs PyTorch SDPA, side by side (issue: foundation).

    python -m benchmarks.single_device [--quick]

Prints attention/SDPA time (forward; forward+backward), packed-document attention (cu_seqlens)
against the per-document calls it replaces, dilated_attention/dense SDPA time
against the ideal ratio of score pairs, and the measured peak live tensor bytes of each next
to the size of q+k+v+out.
"""

from __future__ import annotations

import torch

import ringlab
from ringlab.workbench.baselines import sdpa
from ringlab.engine.dilation import score_pairs

from .common import cli, peak_bytes, ratio, section, side_by_side

LONGNET = dict(segments=[2048, 4096, 8192, 16384], rates=[1, 2, 4, 8])


def fwd_bwd(fn):
    def run():
        out = fn()
        out.backward(torch.ones_like(out))
    return run


def compare(name, ours, theirs, q, k, v, *, repeats, ideal=None, causal=False):
    """Rows for forward and forward+backward of ours vs theirs on (q, k, v)."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    io_bytes = 4 * q.numel() * q.element_size()
    rows = []
    for mode in ("forward", "forward+backward"):
        if mode == "forward":
            a = lambda: ours(q, k, v)
            b = lambda: theirs(q, k, v)
        else:
            a = fwd_bwd(lambda: ours(*leaves))
            b = fwd_bwd(lambda: theirs(*leaves))
        with torch.no_grad() if mode == "forward" else torch.enable_grad():
            t = side_by_side({"ours": a, "theirs": b}, repeats=repeats)
            peak_a, peak_b = peak_bytes(a), peak_bytes(b)
        r = ratio(t, "ours", "theirs")
        row = dict(case=name, mode=mode, shape=tuple(q.shape), causal=causal,
                   ours_s=min(t["ours"]), sdpa_s=min(t["theirs"]), ratio=r,
                   peak_ours_MiB=peak_a / 2**20, peak_sdpa_MiB=peak_b / 2**20,
                   qkvo_MiB=io_bytes / 2**20)
        if ideal is not None:
            row.update(ideal=ideal, ratio_over_ideal=r / ideal)
        rows.append(row)
    return rows


def run(quick: bool = False) -> dict:
    n1, n2, repeats = (1024, 2048, 1) if quick else (8192, 16384, 3)
    torch.manual_seed(0)
    rows = []
    q, k, v = (torch.randn(1, n1, 8, 64) for _ in range(3))
    for causal in (False, True):
        rows += compare("attention vs SDPA", lambda a, b, c: ringlab.attention(a, b, c, causal=causal),
                        lambda a, b, c: sdpa(a, b, c, causal=causal), q, k, v, repeats=repeats, causal=causal)
    # Packed documents (one long, 16 short): one cu_seqlens call vs the per-document calls it replaces.
    docs = [0, n1 // 2, *range(n1 // 2 + n1 // 32, n1 + 1, n1 // 32)]
    spans = [slice(a, b) for a, b in zip(docs, docs[1:])]
    rows += compare("attention, packed documents vs per-document attention calls",
                    lambda a, b, c: ringlab.attention(a, b, c, causal=True, cu_seqlens=torch.tensor(docs)),
                    lambda a, b, c: torch.cat([ringlab.attention(a[:, d], b[:, d], c[:, d], causal=True)
                                               for d in spans], 1), q, k, v, repeats=repeats, causal=True)
    q, k, v = (torch.randn(1, n2, 8, 64) for _ in range(3))
    segs = [min(s, n2) for s in LONGNET["segments"]]
    segs = [s * n2 // 16384 for s in LONGNET["segments"]] if quick else segs
    ideal = score_pairs(n2, 8, segs, LONGNET["rates"]) / (8 * n2 * n2)
    rows += compare(f"dilated {segs}/{LONGNET['rates']} vs dense SDPA",
                    lambda a, b, c: ringlab.dilated_attention(a, b, c, segs, LONGNET["rates"]),
                    sdpa, q, k, v, repeats=repeats, ideal=ideal)
    notes = ("Targets: attention/SDPA <= 1.15 forward, <= 1.3 forward+backward; "
             "dilated/SDPA <= 1.5 x ideal (ideal = score pairs computed / dense pairs). "
             "In the packed-documents rows the sdpa_s column times the per-document ringlab.attention calls. "
             "Times are the best of the rounds; ratio is the median of per-round ratios, "
             "contestants interleaved. Peaks: measured live tensor bytes (ringlab.planning.memory).")
    return section("single_device", rows,
           ["case", "mode", "causal", "ours_s", "sdpa_s", "ratio", "ideal", "ratio_over_ideal",
            "peak_ours_MiB", "peak_sdpa_MiB", "qkvo_MiB"], notes=notes)


def main(argv=None):
    return cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
