"""Every benchmark in one run: ``python -m benchmarks.run [--quick] [--only NAME ...]``.

Sections, each a script that also runs alone (``python -m benchmarks.<name>``):

- single_device: ``attention`` and ``dilated_attention`` vs PyTorch SDPA, forward and backward
- ring: gloo ring vs one process and vs ring-attention-pytorch; overlap; causal balance; simulated ring vs SDPA
- ring_dilated: ring-dilated time, bytes on the wire per branch vs the plain ring, peak per rank
- accuracy: ring gradients vs float64, ours and ring-attention-pytorch's
- low_precision: bf16 and fp16 errors over random cases, each call vs torch's SDPA on the same inputs
- hardware: achieved FLOP/s of each call / this machine's measured matmul FLOP/s
- scaling: time and peak memory vs N and vs P, with fitted exponents
- host_overhead: aten ops, kernels and time per call at tiny shapes (the host work a GPU waits on)

Writes benchmarks/results/<machine>-<date>.{md,json} after every section, so a run that fails
part-way keeps what it measured; a failed section is reported and the exit status is 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from tqdm.auto import tqdm

from .common import record, section, section_markdown

SECTIONS = ["single_device", "ring", "ring_dilated", "accuracy", "low_precision", "hardware", "scaling",
            "host_overhead"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (smoke test)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=SECTIONS, metavar="NAME",
                        help=f"run only these sections ({', '.join(SECTIONS)})")
    parser.add_argument("--out-dir", default=None, help="where to write results (default benchmarks/results)")
    args = parser.parse_args(argv)
    done, failed = [], []
    for name in (bar := tqdm(args.only, desc="benchmarks", unit="section")):
        bar.set_postfix_str(name)
        try:
            done.append(importlib.import_module(f"benchmarks.{name}").run(args.quick))
        except Exception:  # noqa: BLE001 - keep the other sections; the failure is reported below
            failed.append(name)
            done.append(section(name, [], [], notes="FAILED:\n\n```\n" + traceback.format_exc() + "```"))
        tqdm.write(section_markdown(done[-1]))
        path = record(done, "quick" if args.quick else None, out_dir=args.out_dir, echo=False)
    print(f"results: {path}.md and .json" + (f"; FAILED sections: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
