"""Run a function on P ranks of a fresh torch.distributed group, from Python or a notebook.

    results = launch(my_module.my_fn, world_size=4, args=(cfg,))   # from ringlab.engine.launch

Each rank is a spawned process that joins a group (gloo on CPU; NCCL when there is a GPU for
every rank), calls ``fn(*args, **kwargs)`` and sends back its return value. ``launch`` returns
the list of values in rank order. If a rank raises, dies, or the group does not finish within
``timeout`` seconds, every process is stopped and :class:`RankError` names the rank(s), with
the failing rank's traceback. Nothing is left running: the ranks also die with the calling
process (a parent-death signal on Linux, and a watchdog thread on its pid everywhere), and a
small reaper process removes the temporary folder when the caller is killed (SIGKILL included).

For multi-GPU and multi-node runs use torchrun, not this (see ``python -m ringlab.run``).
"""

from __future__ import annotations

import ast
import ctypes
import datetime
import glob
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .checks import check_int, check_positive_number


class RankError(RuntimeError):
    """A rank failed or did not finish; ``ranks`` lists which."""

    def __init__(self, message: str, ranks: list[int]):
        super().__init__(message)
        self.ranks = ranks


def free_port() -> int:
    """A TCP port nobody is listening on now (bind port 0, docs/design.md §9)."""
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


def _main_guard_missing() -> str | None:
    """Where launch() is called from the top level of the __main__ script outside an
    ``if __name__ == "__main__":`` block ("file:line"), else None. Spawned ranks re-import
    __main__, which would run that call again in every rank and kill it."""
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    if script is None:  # a notebook or REPL: spawn re-imports nothing
        return None
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_globals is main.__dict__ and frame.f_code.co_name == "<module>"):
        frame = frame.f_back
    if frame is None or os.path.abspath(frame.f_code.co_filename) != os.path.abspath(script):
        return None
    path, line = frame.f_code.co_filename, frame.f_lineno
    try:
        with open(path) as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return None
    for node in ast.walk(tree):
        if (isinstance(node, ast.If) and "__name__" in ast.unparse(node.test)
                and "__main__" in ast.unparse(node.test) and node.lineno <= line <= node.end_lineno):
            return None
    return f"{path}:{line}"


def _die_with_parent(parent: int) -> None:
    """End this rank when the launching process ``parent`` dies, however it dies."""
    if sys.platform.startswith("linux"):
        try:  # prctl(PR_SET_PDEATHSIG, SIGKILL): the kernel kills us when the parent exits
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass

    def watch():  # fallback where prctl is missing, and the window before prctl was set
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="ringlab-parent-watchdog").start()


# Run by the reaper process: wait for the launching process to go, then remove its folder.
_REAPER = ("import os, shutil, sys, time\n"
           "parent, folder = int(sys.argv[1]), sys.argv[2]\n"
           "while os.getppid() == parent and os.path.isdir(folder):\n"
           "    time.sleep(0.1)\n"
           "shutil.rmtree(folder, ignore_errors=True)\n")


def _remove_stale_folders() -> None:
    """Remove launch folders left by a caller that no longer exists (pid in the name)."""
    for folder in glob.glob(os.path.join(tempfile.gettempdir(), "ringlab-launch-*-*")):
        try:
            os.kill(int(os.path.basename(folder).split("-")[2]), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            pass


def _worker(rank, world_size, port, backend, fn, args, kwargs, outdir, timeout, parent):
    def fail():
        # Written before this process closes its connections, so the root cause is the
        # oldest error file: the peers only report the connection it closed.
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)

    _die_with_parent(parent)
    try:
        if backend == "gloo":
            torch.set_num_threads(1)  # P ranks share the cores (docs/design.md §9)
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
    # Leave without interpreter finalization: torch's gloo teardown there can abort a rank whose
    # work is done ("terminate called without an active exception", SIGABRT; see pytorch#179291).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(fn, world_size: int, *, args=(), kwargs=None, backend: str | None = None,
           timeout: float = 300.0) -> list:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks and return their results in rank order.

    Raises:
        TypeError: ``fn`` is not importable by name (e.g. defined in a notebook).
        RuntimeError: called at the top level of a script without ``if __name__ == "__main__":``.
        RankError: a rank raised or exited (its traceback is in the message), or the group
            did not finish within ``timeout`` seconds (the unfinished ranks are named).
    """
    check_int("world_size", world_size)
    check_positive_number("timeout", timeout, " of seconds")
    _check_importable(fn)
    where = _main_guard_missing()
    if where:
        raise RuntimeError(f"launch() is called at the top level of the script {where}, outside "
                           "'if __name__ == \"__main__\":'. Each spawned rank re-imports the script and "
                           "would run that code again. Put the script's top-level code under "
                           "'if __name__ == \"__main__\":' (or in a main() called from there)")
    backend = backend or default_backend(world_size)
    ctx = mp.get_context("spawn")
    _remove_stale_folders()
    with tempfile.TemporaryDirectory(prefix=f"ringlab-launch-{os.getpid()}-") as outdir:
        reaper = subprocess.Popen([sys.executable, "-c", _REAPER, str(os.getpid()), outdir],
                                  stdin=subprocess.DEVNULL)
        port = free_port()
        procs = [ctx.Process(target=_worker, daemon=True,
                             args=(r, world_size, port, backend, fn, tuple(args), dict(kwargs or {}),
                                   outdir, timeout, os.getpid()))
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
            reaper.kill()
            reaper.wait()


def _wait(procs, outdir, timeout) -> None:
    deadline = time.monotonic() + timeout
    path = lambda r, ext: os.path.join(outdir, f"rank{r}.{ext}")  # noqa: E731
    # exit code 0 without a result: the function called os._exit(0) (sys.exit raises, so it
    # leaves an error file like any exception)
    quit_early = lambda r, c: c == 0 and not os.path.exists(path(r, "pt"))  # noqa: E731
    while True:
        codes = [p.exitcode for p in procs]
        if any(c not in (None, 0) or quit_early(r, c) for r, c in enumerate(codes)):
            # Let the other ranks fail too, then name first the rank whose error came first:
            # its peers only report the connection it closed.
            time.sleep(0.5)
            codes = [p.exitcode for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0) or quit_early(r, c)]
            failed.sort(key=lambda r: os.stat(path(r, "err")).st_mtime_ns if os.path.exists(path(r, "err")) else 0)

            def why(r):
                if os.path.exists(path(r, "err")):
                    with open(path(r, "err")) as f:
                        return f.read()
                if codes[r] == 0:
                    return ("exit code 0 before returning a result (os._exit() inside the function?): "
                            "return a value, or raise to report a failure")
                return f"exit code {codes[r]} (killed or crashed)"
            raise RankError(f"rank {failed[0]} failed" + (f" (and ranks {failed[1:]})" if failed[1:] else "")
                            + "\n" + "\n".join(f"--- rank {r} ---\n{why(r)}" for r in failed), failed)
        if all(c == 0 for c in codes):
            return
        if time.monotonic() > deadline:
            late = [r for r, c in enumerate(codes) if c is None]
            state = "; ".join(f"rank {r} " + ("joined the group" if os.path.exists(path(r, "joined"))
                                              else "never joined the group") for r in late)
            raise RankError(f"ranks {late} did not finish within {timeout:.0f} s ({state}); a rank "
                            "hung or waited on one that did. All ranks were stopped", late)
        time.sleep(0.02)
