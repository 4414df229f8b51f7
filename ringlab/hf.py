"""ringlab as a Hugging Face transformers attention backend (the ``hf`` extra, transformers >= 5).

    import ringlab.hf
    ringlab.hf.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="ringlab")

``register()`` adds two attention implementations to transformers' ``AttentionInterface``:

* ``"ringlab"``: exact softmax attention (:func:`ringlab.attention`). Inside
  ``with sequence_parallel(group, layout="zigzag"):`` it is the ring (:func:`ringlab.ring_attention`)
  over that process group: each rank passes its shard of ``input_ids`` and the matching global
  ``position_ids``, both from :func:`ringlab.shard` with the same layout, and gets the logits
  of its shard. Sum the parameter gradients over the group after the backward
  (``ringlab.engine.nn.all_reduce_grads``).
* ``"ringlab_dilated"``: LongNet dilated attention (:func:`ringlab.dilated_attention`; in a
  ``sequence_parallel`` block :func:`ringlab.ring_dilated_attention`). Its branches come from
  ``sequence_parallel(..., segment_lengths=, dilation_rates=, head_offsets=)`` when given there,
  else from the model config's attributes ``ringlab_segment_lengths``, ``ringlab_dilation_rates``
  and (optional, default "interleaved") ``ringlab_head_offsets``, e.g.
  ``LlamaConfig(..., ringlab_segment_lengths=[512, 2048], ringlab_dilation_rates=[1, 2])``.

Both take what the attention interface passes: query (B, H, N, D), key and value (B, H_kv, N, D)
with H % H_kv == 0 (grouped-query attention; K/V are passed on with their own H_kv heads,
never repeated), ``scaling``, and causal or non-causal modules (``module.is_causal``, or an
``is_causal`` keyword). Only masks that they compute exactly are accepted: causal or full
attention, without padding. Anything else raises a ValueError before any communication:
padding (a 0 in ``attention_mask``), packed sequences, sliding windows and other mask overlays,
a 4D mask that is not exactly causal or full (and any 4D mask in a ring), attention dropout,
soft-capping, attention sinks, and position ids that are not this rank's shard. Both ranks of a
ring must fail alike: a rank that raises while the others go on leaves them waiting.

Single device, "ringlab" also works with a KV cache (generation): queries then see every
cached key and the new keys causally. The ring and "ringlab_dilated" need the whole sequence in
one call (no cached keys). Call ``backward()`` inside the ``sequence_parallel`` block as well:
gradient checkpointing recomputes the attention during the backward.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
import torch.distributed as dist

try:
    import transformers
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, bidirectional_mask_function, causal_mask_function
except ImportError as err:
    raise ModuleNotFoundError(
        'ringlab.hf needs transformers >= 5, which is not installed. Install the hf extra: pip install '
        '"ringlab[hf]" (the rest of ringlab needs no transformers)', name="transformers") from err

from .engine.attention import attention
from .engine.checks import HEAD_OFFSETS, check_branches, check_choice
from .engine.dilated import dilated_attention
from .engine.layout import check_split, get as get_layout, shard_positions, with_pieces
from .engine.ring import ring_attention
from .engine.ring_dilated import ring_dilated_attention

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"ringlab.hf needs transformers >= 5, found {transformers.__version__}: "
                      'pip install "ringlab[hf]"')

NAMES = ("ringlab", "ringlab_dilated")
# Model config attributes read by "ringlab_dilated" (sequence_parallel's arguments take precedence).
CONFIG_ATTRIBUTES = ("ringlab_segment_lengths", "ringlab_dilation_rates", "ringlab_head_offsets")
# Keyword arguments some models pass that change the attention in ways ringlab does not compute.
_UNSUPPORTED = {"softcap": "soft-capped scores", "s_aux": "attention sinks", "sinks": "attention sinks",
                "position_bias": "a position bias", "cu_seq_lens_q": "packed sequences (cu_seq_lens)",
                "cu_seq_lens_k": "packed sequences (cu_seq_lens)"}


@dataclass(frozen=True)
class _Parallel:
    group: object
    layout: str
    segment_lengths: tuple | None
    dilation_rates: tuple | None
    head_offsets: str | None


_ACTIVE: contextvars.ContextVar[_Parallel | None] = contextvars.ContextVar("ringlab_hf_parallel", default=None)


@contextlib.contextmanager
def sequence_parallel(group, layout: str = "zigzag", *, segment_lengths=None, dilation_rates=None,
                      head_offsets: str | None = None):
    """Within this block the "ringlab" and "ringlab_dilated" implementations run as rings over
    ``group`` (a torch.distributed ProcessGroup). Every rank of the group runs the model on its
    ``layout`` shard of the sequence with the global ``position_ids`` of that shard:

        ids = ringlab.shard(input_ids, rank, P, layout="zigzag")
        pos = ringlab.shard(torch.arange(N)[None], rank, P, layout="zigzag")

    ``segment_lengths``, ``dilation_rates`` (both or neither) and ``head_offsets`` set the
    branches of "ringlab_dilated", overriding the config attributes; ring-dilated needs a layout
    whose ranks hold whole chunks (contiguous or zigzag).
    """
    get_layout(layout)
    if (segment_lengths is None) != (dilation_rates is None):
        raise ValueError("pass segment_lengths and dilation_rates together (one rate per segment), or neither")
    if segment_lengths is not None:
        segment_lengths, dilation_rates = check_branches(segment_lengths, dilation_rates)
        check_choice("layout", layout, with_pieces())
    if head_offsets is not None:
        check_choice("head_offsets", head_offsets, HEAD_OFFSETS)
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup (e.g. dist.group.WORLD), "
                        f"got {type(group).__name__}")
    token = _ACTIVE.set(_Parallel(group, layout, segment_lengths, dilation_rates, head_offsets))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def register() -> None:
    """Register "ringlab" and "ringlab_dilated" with transformers (attention and mask
    interfaces, for every model). Calling it again changes nothing."""
    for name, fn in zip(NAMES, (attention_forward, dilated_attention_forward)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, _mask)


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The "ringlab" implementation. query (B, H, N, D), key and value (B, H_kv, N_k, D);
    returns (out (B, N, H, D), None), as transformers' attention functions do."""
    return _forward(module, query, key, value, attention_mask, scaling, dropout, kwargs, dilated=False)


def dilated_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The "ringlab_dilated" implementation; shapes as :func:`attention_forward` with N_k == N."""
    return _forward(module, query, key, value, attention_mask, scaling, dropout, kwargs, dilated=True)


def _mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
          attention_mask=None, **kwargs):
    """transformers' mask hook for both implementations. Registering it makes transformers hand
    over the padding mask instead of dropping it. Returns None: the attention functions apply
    the causal or full pattern themselves. Raises for any other mask."""
    par = _ACTIVE.get()
    if attention_mask is not None and not bool(attention_mask.all()):
        where = " inside a ring" if par is not None else ""
        raise ValueError(f"attention_mask has padding (zeros){where}: ringlab computes causal or full attention "
                         "over every token and cannot skip padded ones. Pass sequences of equal length "
                         "without padding (or attention_mask=None)")
    # In a ring transformers reads the shard's position ids as packed sequences and wraps the
    # causal function; the attention functions check those ids against the layout instead.
    if par is None and mask_function not in (causal_mask_function, bidirectional_mask_function):
        raise ValueError("this model call needs a mask other than causal or full attention (packed sequences "
                         "detected from position_ids, a sliding window, or another mask overlay of the model); "
                         "ringlab computes exact causal or full attention only")
    return None


def _forward(module, query, key, value, attention_mask, scaling, dropout, kwargs, *, dilated: bool):
    par = _ACTIVE.get()
    # transformers passes (B, H, N, D); ringlab takes (B, N, H, D). Views, no copies.
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    kw = dict(causal=_checked_causality(module, q, k, attention_mask, dropout, kwargs, par), scale=scaling)
    if dilated:
        segs, rates, offsets = _branches(getattr(module, "config", None), par)
        if par is not None:
            return ring_dilated_attention(q, k, v, segs, rates, group=par.group, layout=par.layout,
                                          head_offsets=offsets, **kw), None
        if q.shape[1] != k.shape[1]:
            raise ValueError(f"ringlab_dilated needs the whole sequence in one call, got {q.shape[1]} queries "
                             f"and {k.shape[1]} keys (a KV cache): run without a cache (use_cache=False)")
        return dilated_attention(q, k, v, segs, rates, head_offsets=offsets, **kw), None
    if par is not None:
        return ring_attention(q, k, v, group=par.group, layout=par.layout, **kw), None
    if kw["causal"] and k.shape[1] > q.shape[1]:
        return _attention_after_cache(q, k, v, scaling), None
    return attention(q, k, v, **kw), None


def _checked_causality(module, q, k, mask, dropout, kwargs, par: _Parallel | None) -> bool:
    """Whether the call is causal; a ValueError for anything ringlab would not compute exactly."""
    if dropout:
        raise ValueError(f"attention dropout {dropout}: ringlab computes exact attention without dropout; "
                         "set the config's attention_dropout to 0.0")
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}={kwargs[name]!r}: this model asks for {what}, which ringlab does not compute")
    window = kwargs.get("sliding_window")
    n_keys = k.shape[1] * (1 if par is None else dist.get_world_size(par.group))
    if window is not None and window < n_keys:
        raise ValueError(f"sliding_window={window} is shorter than the {n_keys} keys: ringlab computes full "
                         "causal attention, not a sliding window")
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    if par is not None:
        _check_shard(par, mask, q.shape[1], k.shape[1], kwargs.get("position_ids"))
        return causal
    _check_consecutive(kwargs.get("position_ids"))
    return _single_device_pattern(mask, causal, q.shape[1], k.shape[1])


def _single_device_pattern(mask, causal: bool, n_q: int, n_k: int) -> bool:
    """Whether to compute causally, given a 4D mask that transformers passed on as the caller
    gave it (2D padding masks were checked by ``_mask``). Raises unless the mask is exactly
    causal or full."""
    if n_q > n_k:
        raise ValueError(f"{n_q} queries but only {n_k} keys: ringlab needs at least as many keys as queries")
    if mask is None or mask.dim() != 4:
        return causal
    # A float mask adds 0 (visible) or a huge negative number (hidden); anything else is a bias.
    visible = mask if mask.dtype == torch.bool else mask == 0
    no_bias = mask.dtype == torch.bool or bool((visible | (mask <= torch.finfo(mask.dtype).min / 2)).all())
    # Queries are the last n_q positions of the n_k keys (a KV cache holds the first ones).
    keys, queries = torch.arange(n_k, device=mask.device), torch.arange(n_k - n_q, n_k, device=mask.device)
    if mask.shape[-2:] == (n_q, n_k) and no_bias:
        if bool(visible.all()):
            return False
        if bool((visible == (keys[None, :] <= queries[:, None])).all()):
            return True
    raise ValueError(f"a custom 4D attention mask of shape {tuple(mask.shape)} that is neither causal nor full "
                     "attention (or holds a bias): ringlab cannot apply it")


def _check_consecutive(position_ids) -> None:
    if position_ids is not None and position_ids.shape[-1] > 1 and not bool((position_ids.diff(dim=-1) == 1).all()):
        raise ValueError("position_ids are not consecutive: packed sequences need a mask ringlab cannot apply, and "
                         "a shard of a sequence must run inside ringlab.hf.sequence_parallel(group, layout=...)")


def _check_shard(par: _Parallel, mask, n_q: int, n_k: int, position_ids) -> None:
    """This rank's call must be its shard of one whole sequence, with the global positions."""
    if mask is not None:
        raise ValueError(f"a custom attention mask of shape {tuple(mask.shape)} inside a ring: ringlab computes "
                         "causal or full attention over the whole sequence and cannot apply it")
    if n_q != n_k:
        raise ValueError(f"{n_q} queries but {n_k} keys inside a ring: a ring needs this rank's shard of the whole "
                         "sequence in one call, without a KV cache (use_cache=False)")
    rank, p = dist.get_rank(par.group), dist.get_world_size(par.group)
    check_split(par.layout, n_q * p, p, what="sequence length (shard length x ranks)")
    if position_ids is None:
        return
    expected = shard_positions(n_q * p, rank, p, par.layout).to(position_ids.device)
    if position_ids.shape[-1] != n_q or not bool((position_ids == expected).all()):
        shown = position_ids.reshape(-1)[:8].tolist()
        raise ValueError(f"rank {rank}: position_ids {shown}... are not the global positions of "
                         f"this rank's {par.layout!r} shard of a {n_q * p}-token sequence; pass position_ids="
                         f"ringlab.shard(torch.arange({n_q * p})[None], rank, {p}, layout={par.layout!r})")


def _branches(config, par: _Parallel | None):
    """(segment_lengths, dilation_rates, head_offsets) for "ringlab_dilated"."""
    segs, rates = (par.segment_lengths, par.dilation_rates) if par is not None else (None, None)
    if segs is None:
        segs, rates = (getattr(config, name, None) for name in CONFIG_ATTRIBUTES[:2])
    if segs is None or rates is None:
        raise ValueError("ringlab_dilated needs its branches: set the model config's ringlab_segment_lengths and "
                         "ringlab_dilation_rates, or pass segment_lengths= and dilation_rates= to "
                         "ringlab.hf.sequence_parallel")
    offsets = (par.head_offsets if par is not None else None) or getattr(config, CONFIG_ATTRIBUTES[2], None)
    return segs, rates, offsets or "interleaved"


def _attention_after_cache(q, k, v, scale):
    """Causal attention of the n_q newest positions over n_k > n_q keys, the first n_k - n_q of
    them cached: every query sees all cached keys, and the new keys causally. Two exact calls
    merged through their log-sum-exps (docs/design.md §2)."""
    past = k.shape[1] - q.shape[1]
    out1, lse1 = attention(q, k[:, :past], v[:, :past], scale=scale, return_lse=True)
    out2, lse2 = attention(q, k[:, past:], v[:, past:], causal=True, scale=scale, return_lse=True)
    lse = torch.logaddexp(lse1, lse2)
    weight = lambda part: torch.exp(part - lse).transpose(1, 2)[..., None]  # noqa: E731  (B, N, H, 1)
    return (out1 * weight(lse1) + out2 * weight(lse2)).to(q.dtype)
