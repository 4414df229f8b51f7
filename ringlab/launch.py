"""Run a function on P ranks of a fresh torch.distributed group, from Python or a notebook.

    results = ringlab.launch(my_module.my_fn, world_size=4, args=(cfg,))

Each rank is a spawned process that joins a group (gloo on CPU; NCCL when there is a GPU for
every rank), calls ``fn(*args, **kwargs)`` and sends back its return value. ``launch`` returns
the list of values in rank order. If a rank raises, dies, or the group does not finish within
``timeout`` seconds, every process is stopped and :class:`RankError` names the rank(s), with
the failing rank's traceback. Nothing is left running.

For multi-GPU and multi-node runs use torchrun, not this (see ``python -m ringlab.run``).
"""

from __future__ import annotations

import datetime
import importlib
import os
import socket
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankError(RuntimeError):
    """A rank failed or did not finish; ``ranks`` lists which."""

    def __init__(self, message: str, ranks: list[int]):
        super().__init__(message)
        self.ranks = ranks


def free_port() -> int:
    """A TCP port nobody is listening on now (bind port 0, SPEC §6)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend(world_size: int) -> str:
    """NCCL if there is a CUDA device for every rank, else gloo."""
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"


def _check_importable(fn) -> None:
    mod = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", "")
    # A script's or ``python -m``'s __main__ is re-imported by the spawned ranks; an
    # interactive one (notebook, REPL) has no file and cannot be.
    ok = mod is not None and "<" not in name and (mod != "__main__" or hasattr(sys.modules["__main__"], "__file__"))
    if ok:
        try:
            obj = importlib.import_module(mod)
            for part in name.split("."):
                obj = getattr(obj, part)
            ok = obj is fn
        except (ImportError, AttributeError):
            ok = False
    if not ok:
        raise TypeError(f"launch needs a function importable by name (defined at the top level of "
                        f"a module), got {fn!r} from module {mod!r}. Functions defined in a "
                        "notebook or in __main__ cannot be sent to the spawned ranks: move it into "
                        "a .py module and import it")


def _worker(rank, world_size, port, backend, fn, args, kwargs, outdir, timeout):
    def fail():
        # Written before this process closes its connections, so the root cause is the
        # oldest error file: the peers only report the connection it closed.
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)

    try:
        if backend == "gloo":
            torch.set_num_threads(1)  # P ranks share the cores (SPEC §6)
        else:
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        open(os.path.join(outdir, f"rank{rank}.joined"), "w").close()
        result = fn(*args, **kwargs)
        dist.destroy_process_group()
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        fail()


def launch(fn, world_size: int, *, args=(), kwargs=None, backend: str | None = None,
           timeout: float = 300.0) -> list:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks and return their results in rank order.

    Raises:
        TypeError: ``fn`` is not importable by name (e.g. defined in a notebook).
        RankError: a rank raised or exited (its traceback is in the message), or the group
            did not finish within ``timeout`` seconds (the unfinished ranks are named).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not timeout or timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    _check_importable(fn)
    backend = backend or default_backend(world_size)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="ringlab-launch-") as outdir:
        port = free_port()
        procs = [ctx.Process(target=_worker, daemon=True,
                             args=(r, world_size, port, backend, fn, tuple(args), dict(kwargs or {}),
                                   outdir, timeout))
                 for r in range(world_size)]
        try:
            for p in procs:
                p.start()
            _wait(procs, outdir, timeout)
            return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False)
                    for r in range(world_size)]
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                if p.pid is not None:
                    p.join()


def _wait(procs, outdir, timeout) -> None:
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.exitcode for p in procs]
        if any(c not in (None, 0) for c in codes):
            # Let the other ranks fail too, then name first the rank whose error came first:
            # its peers only report the connection it closed.
            time.sleep(0.5)
            codes = [p.exitcode for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            err = lambda r: os.path.join(outdir, f"rank{r}.err")  # noqa: E731
            failed.sort(key=lambda r: os.stat(err(r)).st_mtime_ns if os.path.exists(err(r)) else 0)
            errors = [f"--- rank {r} ---\n" + (open(err(r)).read() if os.path.exists(err(r))
                                                else f"exit code {codes[r]} (killed or crashed)") for r in failed]
            raise RankError(f"rank {failed[0]} failed" + (f" (and ranks {failed[1:]})" if failed[1:] else "")
                            + "\n" + "\n".join(errors), failed)
        if all(c == 0 for c in codes):
            return
        if time.monotonic() > deadline:
            late = [r for r, c in enumerate(codes) if c is None]
            state = "; ".join(
                f"rank {r} " + ("joined the group" if os.path.exists(os.path.join(outdir, f"rank{r}.joined"))
                                else "never joined the group") for r in late)
            raise RankError(f"ranks {late} did not finish within {timeout:.0f} s ({state}); a rank "
                            "hung or waited on one that did. All ranks were stopped", late)
        time.sleep(0.02)
