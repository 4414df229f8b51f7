"""Argument checks shared by the public functions.

Every check runs before any computation or communication and raises a ValueError or
TypeError that names the argument and says how to fix it.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.distributed as dist

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
DTYPE_NAMES = tuple(str(d).removeprefix("torch.") for d in DTYPES)
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                 "float": "float32", "fp64": "float64", "double": "float64"}
HEAD_OFFSETS = ("interleaved", "grouped")
# Beyond these the float32 scores overflow (scale) or index arithmetic reaches int64 limits
# (segment lengths and rates; a segment longer than the sequence is the whole sequence anyway).
MAX_SCALE = 1e6
MAX_BRANCH_VALUE = 2**40


def _type_name(x) -> str:
    """'float', or 'numpy.bool' where the bare name would read like a builtin."""
    t = type(x)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def check_qkv(q, k, v, *, same_length: bool) -> None:
    """q (B, Sq, H, D), k and v (B, Sk, H_kv, D): same dtype, device, batch, head_dim; H a
    multiple of H_kv (grouped-query attention: each K/V head serves H / H_kv query heads)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, seq, heads, head_dim); "
                             f"got {x.dim()} dims {tuple(x.shape)}")
        if x.dtype not in DTYPES:
            raise TypeError(f"{name} has dtype {x.dtype}; use one of float64, float32, "
                            "bfloat16, float16")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}. "
                        "Cast them to one dtype first")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device; got {q.device}, {k.device}, "
                         f"{v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError("q and k must agree on batch and head_dim "
                         f"(dims 0, 3); got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if same_length and q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must have the same sequence length (dim 1) here; got "
                         f"{q.shape[1]} and {k.shape[1]}")
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError(f"sequence length (dim 1) must be >= 1; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if min(q.shape[0], q.shape[2], q.shape[3], k.shape[2]) == 0:
        raise ValueError(f"batch, heads and head_dim must be >= 1; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q has {q.shape[2]} heads and k, v have {k.shape[2]}: q's heads must be a multiple of "
                         "k's and v's (grouped-query attention, each K/V head serving the same number of query "
                         f"heads); got {q.shape[2]} and {k.shape[2]}")


def check_causal(causal) -> None:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool (True or False), got {_type_name(causal)}"
                        + ("; pass bool(causal)" if hasattr(causal, "__bool__") and not isinstance(causal, str) else ""))


def resolve_scale(scale, head_dim: int) -> float:
    """scale, defaulting to 1/sqrt(head_dim); must be a finite positive number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    if scale > MAX_SCALE:
        raise ValueError(f"scale must be <= {MAX_SCALE:g}, got {scale:g}: scale * q.k would overflow the "
                         "float32 scores to inf (and the softmax to NaN). Scale q or k down instead")
    return float(scale)


def _positive_ints(name: str, values) -> tuple[int, ...]:
    if isinstance(values, (int, numbers.Integral)) and not isinstance(values, bool):
        values = (values,)
    try:
        values = tuple(values)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints, got {type(values).__name__}") from None
    if not values:
        raise ValueError(f"{name} must not be empty")
    for x in values:
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise TypeError(f"{name} must hold ints; got {x!r} ({type(x).__name__})")
    return tuple(int(x) for x in values)


def check_branches(segment_lengths, dilation_rates) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validated (segment_lengths, dilation_rates) as tuples of ints."""
    segs = _positive_ints("segment_lengths", segment_lengths)
    rates = _positive_ints("dilation_rates", dilation_rates)
    if len(segs) != len(rates):
        raise ValueError(f"segment_lengths and dilation_rates must have the same length (one "
                         f"rate per segment); got {len(segs)} segments {segs} and {len(rates)} "
                         f"rates {rates}")
    limits = (("segment_lengths", segs, "", "A segment longer than the sequence is the whole sequence: use "
               "the sequence length"),
              ("dilation_rates", rates, " (1 means no dilation)", "A rate at least the segment length selects "
               "one row per segment: use the segment length"))
    for name, values, meaning, too_large in limits:
        for x in values:
            if x < 1:
                raise ValueError(f"{name} must be >= 1{meaning}; got {values}")
            if x > MAX_BRANCH_VALUE:
                raise ValueError(f"{name} must be <= 2**40; got {x}. {too_large}")
    return segs, rates


def check_int(name: str, value, low: int = 1) -> None:
    """``value`` must be an int (not a bool): TypeError otherwise; and >= ``low``: ValueError
    otherwise. Counts of ranks, heads, GPUs, jobs and tokens all go through here."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def check_positive_number(name: str, value, unit: str = "") -> None:
    """``value`` must be a real number (not a bool): TypeError otherwise; finite and > 0:
    ValueError otherwise. ``unit`` follows "number" in the message, e.g. " of seconds"."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number{unit}, got {value!r} ({type(value).__name__})")
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive number{unit}, got {value!r}")


def dtype_name(value) -> str:
    """The torch name of a dtype given by it ("bfloat16", torch.bfloat16) or by a short alias
    ("bf16", see DTYPE_ALIASES); ValueError for any other."""
    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    name = DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value
    check_choice("dtype", name, DTYPE_NAMES + tuple(DTYPE_ALIASES))
    return name


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_ring(group, ring_size) -> None:
    """Exactly one of ``group`` (distributed) or ``ring_size`` (simulated) may be given."""
    if group is not None and ring_size is not None:
        raise ValueError("pass either group= (a torch.distributed ProcessGroup: real ring) or "
                         "ring_size= (simulated ring on one device), not both")
    if ring_size is not None:
        check_int("ring_size", ring_size)
    check_group("group", group)


def check_group(name: str, group) -> None:
    """A process group argument: None or a torch.distributed ProcessGroup."""
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup (dist.group.WORLD, or one from "
                        f"dist.new_group), got {type(group).__name__}")


def check_cu_seqlens(cu_seqlens, seq_len: int | None, batch: int | None) -> tuple[int, ...]:
    """``cu_seqlens`` (packed documents) as a tuple 0 = c_0 < c_1 < ... < c_D = seq_len:
    document i holds the positions [c_i, c_{i+1}) of the one sequence of the batch (``batch``
    must be 1). None skips a check: no batch (shard), any length (a balance report)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a 1-D torch.Tensor of int32 or int64 document boundaries, got "
                        f"{type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must hold int32 or int64 document boundaries, got {cu_seqlens.dtype}; "
                        "pass cu_seqlens.long()")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be 1-D with at least 2 entries (0 and the sequence length), got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.device.type == "meta":
        raise ValueError("cu_seqlens must hold its boundaries' values, got a tensor on the meta device; keep it on "
                         "the CPU, also when q, k, v are meta tensors")
    if batch not in (None, 1):
        raise ValueError(f"cu_seqlens needs batch 1, got batch {batch}: pack the batch's sequences into one "
                         "sequence and list every document's boundaries in cu_seqlens")
    bounds = tuple(cu_seqlens.tolist())
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    if seq_len is not None and bounds[-1] != seq_len:
        raise ValueError(f"cu_seqlens must end at the sequence length {seq_len} (the whole sequence, all ranks "
                         f"together), got {bounds[-1]}")
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        if b <= a:
            raise ValueError(f"cu_seqlens must increase strictly (every document holds a token); got "
                             f"cu_seqlens[{i}] = {a} and cu_seqlens[{i + 1}] = {b}")
    return bounds
