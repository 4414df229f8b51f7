"""Every code block of README.md, as written: Python blocks run, command lines parse, and the
``ringlab plan`` example prints what the README shows."""

import pathlib
import re
import shlex

import pytest
import reliability_workers as rw

from ringlab import cli, run
from ringlab.engine.launch import launch
from ringlab.workbench.sweep import notebook_parameters

ROOT = pathlib.Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)


def command_lines(block: str, prompt: str = ""):
    """The commands of a shell block (continuations joined, comments dropped) as argv lists."""
    text = block.replace("\\\n", " ")
    for line in text.splitlines():
        if line.startswith(prompt) and line.strip():
            yield shlex.split(line[len(prompt):], comments=True)


@pytest.mark.distributed
def test_python_blocks_run_as_written():
    blocks = [b for lang, b in BLOCKS if lang == "python"]
    assert len(blocks) >= 4
    scope = {}
    for block in blocks:
        if "dist.get_rank()" in block:  # the process-group example: on 2 gloo ranks
            for out, single in launch(rw.readme_distributed_block, 2, args=(block,), timeout=300):
                assert (out - single).abs().max() < 1e-5
        else:
            exec(compile(block, "README.md", "exec"), scope)
    assert scope["events"] and scope["tr"].work_per_rank()


def test_command_lines_parse():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    seen = set()
    for lang, block in BLOCKS:
        if lang != "sh":
            continue
        for argv in command_lines(block):
            if argv[0] == "make":
                target = next(a for a in argv[1:] if "=" not in a)
                assert target in targets, f"README runs 'make {target}', which the Makefile lacks"
            elif "ringlab.run" in argv:
                run.parse_args(argv[argv.index("ringlab.run") + 1:])
            elif argv[0].endswith("ringlab"):
                args = cli.build_parser().parse_args(argv[1:])
                if args.command == "sweep" and args.notebook:
                    known = notebook_parameters(ROOT / args.notebook)
                    assert all(name in known for name, *_ in args.param)
            else:
                pytest.fail(f"README command {argv} is not checked by this test")
            seen.add(argv[0].rsplit("/", 1)[-1])
    assert {"make", "torchrun", "ringlab"} <= seen


@pytest.mark.parametrize("which", [0, 1], ids=["dilated-billion", "strategies"])
def test_plan_examples_print_what_the_readme_shows(capsys, which):
    blocks = [b for lang, b in BLOCKS if b.startswith("$ ringlab plan")]
    assert len(blocks) == 2
    block = blocks[which]
    argv = next(command_lines(block, prompt="$ "))
    shown = block.split("\n", block.count("\\\n") + 1)[-1]
    assert cli.main(argv[1:]) == 0
    printed = capsys.readouterr().out
    assert printed == shown, "README's 'ringlab plan' output is stale: rerun the command and paste its output"
