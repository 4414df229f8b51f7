"""Measured memory: the peak of live tensor bytes inside a region, on this process (= rank).

    with ringlab.planning.memory.track() as m:
        out = ringlab.attention(q, k, v)
    m.peak   # bytes above what was allocated when the region began

On CUDA this is the caching allocator's own count (``max_memory_allocated`` after
``reset_peak_memory_stats``). On CPU it is exact too: the PyTorch profiler reports every
allocation and free of the CPU allocator, kernel scratch included, and we replay them in time
order. (RSS would count the Python heap, freed-but-cached pages and shared libraries.)

One region at a time per process: a nested region (or one opened by another thread while a
region is open) would reset the outer region's count, so it raises instead. On CPU the region
counts the allocations of the thread that opened it (the profiler is per thread); tensors that
other threads allocate are not counted. On CUDA the allocator counts every thread.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass

import torch


@dataclass
class MemoryReport:
    device: str = "cpu"
    peak: int = 0  # max over the region of (allocated - freed) since it began, bytes
    end: int = 0   # (allocated - freed) when it ended, bytes

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20


@contextlib.contextmanager
def _stderr_silenced():
    """The profiler's C++ side prints two lines on start and stop; keep notebooks clean."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)
        os.close(devnull)


class _CPUProfile:
    def __enter__(self):
        self.prof = torch.autograd.profiler.profile(profile_memory=True, use_kineto=True,
                                                    record_shapes=False)
        with _stderr_silenced():
            self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        with _stderr_silenced():
            self.prof.__exit__(*exc)

    def replay(self) -> tuple[int, int]:
        """(peak, end) net bytes from the recorded allocator events, in time order."""
        events = sorted((e.start_ns(), e.nbytes()) for e in self.prof.kineto_results.events()
                        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        return peak, live


_open = threading.Lock()  # held while a region is open: regions cannot nest or overlap


@contextlib.contextmanager
def track(device=None):
    """Measure the peak of live tensor bytes in the ``with`` block on ``device`` (default: CUDA
    if it is in use, else CPU). Yields a :class:`MemoryReport` filled in when the block ends.

    Raises RuntimeError if another region is open in this process (nested, or in another thread).
    """
    if not _open.acquire(blocking=False):
        raise RuntimeError("memory.track() regions cannot nest or overlap: one is already open in this "
                           "process (in this thread or another). Opening a second one would reset the "
                           "first one's count. Measure the regions one after the other, or read the "
                           "outer region's peak only")
    try:
        with _track(device) as report:
            yield report
    finally:
        _open.release()


@contextlib.contextmanager
def _track(device):
    device = torch.device(device if device is not None else
                          ("cuda" if torch.cuda.is_available() and torch.cuda.is_initialized() else "cpu"))
    report = MemoryReport(device=str(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        try:
            yield report
        finally:
            torch.cuda.synchronize(device)
            report.peak = torch.cuda.max_memory_allocated(device) - start
            report.end = torch.cuda.memory_allocated(device) - start
        return
    if device.type != "cpu":
        raise ValueError(f"memory.track measures cpu or cuda devices, got {device}")
    with _CPUProfile() as prof:
        yield report
    report.peak, report.end = prof.replay()
