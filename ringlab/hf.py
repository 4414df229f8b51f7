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
attention without padding, and packed documents. Anything else raises a ValueError before any
communication: padding (a 0 in ``attention_mask``), sliding windows, chunked attention and
other mask overlays (also on top of packed documents), a 4D mask that is not exactly causal or
full (and any 4D mask in a ring or with packed documents), attention dropout, soft-capping,
attention sinks, and position ids that are not this rank's shard. Both ranks of a ring must
fail alike: a rank that raises while the others go on leaves them waiting.

Packed documents (batch 1, several documents in one row; each attends only within itself, and
under dilation each is its own LongNet sequence) come as transformers marks them: either
``position_ids`` that restart at 0 in every document (0..len-1 each; a document starts where
a position is not the one before plus 1, transformers' rule), or the ``cu_seq_lens_q`` and
``cu_seq_lens_k`` keywords of ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``
(equal, and agreeing with the position ids); call the model with ``use_cache=False``. The
result equals running every document alone. The mask hook accepts transformers'
packed-sequence mask only when it is exactly causal or full attention AND-ed with the
same-document function (recognised by the code objects of transformers' closures, so an
unknown composition is refused); the attention functions then take the documents from
``position_ids`` (which transformers' Llama-style models pass on, as its flash-attention path
needs) or the ``cu_seq_lens`` keywords. In a ring, pass the whole sequence's boundaries as
``sequence_parallel(group, layout, cu_seqlens=...)`` and each rank's
``position_ids=ringlab.shard(positions, rank, P, layout, cu_seqlens=...)`` of the per-document
positions ("doc_zigzag" balances the work of every document).

Single device, "ringlab" also works with a KV cache (generation) of one sequence per row:
queries then see every cached key and the new keys causally. The ring and "ringlab_dilated"
need the whole sequence in one call (no cached keys). Call ``backward()`` inside the
``sequence_parallel`` block as well: gradient checkpointing recomputes the attention during
the backward.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
import torch.distributed as dist

try:
    import transformers
    from transformers import AttentionInterface, masking_utils
    from transformers.masking_utils import AttentionMaskInterface, bidirectional_mask_function, causal_mask_function
except ImportError as err:
    raise ModuleNotFoundError(
        'ringlab.hf needs transformers >= 5, which is not installed. Install the hf extra: pip install '
        '"ringlab[hf]" (the rest of ringlab needs no transformers)', name="transformers") from err

from .engine.attention import attention
from .engine.checks import HEAD_OFFSETS, check_branches, check_choice, check_cu_seqlens
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
                "position_bias": "a position bias"}


def _closure_code(name: str, *args):
    """The code object of the closures ``masking_utils.<name>(*args)`` makes; None if this
    transformers lacks the function (then nothing matches it: packed calls are refused)."""
    factory = getattr(masking_utils, name, None)
    return None if factory is None else factory(*args).__code__


# transformers (5.x) composes its packed-sequence mask as
#   and_masks(remap_positions_for_packed_sequence(causal_mask_function, position_ids),
#             packed_sequence_mask_function(document ids))
# Closures share their code object with every closure their factory makes, so these identify
# the parts whatever their names. Without the remap (the plain function AND-ed) the mask is the
# same: within a document the positions are the indices plus a constant.
_IDS = torch.zeros(1, 1, dtype=torch.long)
_AND = _closure_code("and_masks", causal_mask_function)
_REMAP = _closure_code("remap_positions_for_packed_sequence", causal_mask_function, _IDS)
_SAME_DOCUMENT = _closure_code("packed_sequence_mask_function", _IDS)


@dataclass(frozen=True)
class _Parallel:
    group: object
    layout: str
    segment_lengths: tuple | None
    dilation_rates: tuple | None
    head_offsets: str | None
    documents: tuple | None  # cu_seqlens of the whole sequence

    @property
    def cu_seqlens(self) -> torch.Tensor | None:
        return None if self.documents is None else torch.tensor(self.documents)


_ACTIVE: contextvars.ContextVar[_Parallel | None] = contextvars.ContextVar("ringlab_hf_parallel", default=None)
# Whether the last mask the hook accepted was transformers' packed-documents mask: an attention
# call that then gets neither position_ids nor cu_seq_lens cannot see the documents.
_PACKED_MASK: contextvars.ContextVar[bool] = contextvars.ContextVar("ringlab_hf_packed_mask", default=False)


@contextlib.contextmanager
def sequence_parallel(group, layout: str = "zigzag", *, cu_seqlens=None, segment_lengths=None,
                      dilation_rates=None, head_offsets: str | None = None):
    """Within this block the "ringlab" and "ringlab_dilated" implementations run as rings over
    ``group`` (a torch.distributed ProcessGroup). Every rank of the group runs the model on its
    ``layout`` shard of the sequence with the global ``position_ids`` of that shard:

        ids = ringlab.shard(input_ids, rank, P, layout="zigzag")
        pos = ringlab.shard(torch.arange(N)[None], rank, P, layout="zigzag")

    ``cu_seqlens``: packed documents, the boundaries 0 = c_0 < ... < c_D = N of the whole
    sequence (a 1-D int tensor, the same on every rank; batch 1). The position ids are then
    this rank's shard of the per-document positions, restarting at 0 in every document:

        pos = torch.cat([torch.arange(b - a) for a, b in zip(cu[:-1], cu[1:])])[None]
        pos = ringlab.shard(pos, rank, P, layout="doc_zigzag", cu_seqlens=cu)

    ``segment_lengths``, ``dilation_rates`` (both or neither) and ``head_offsets`` set the
    branches of "ringlab_dilated", overriding the config attributes; ring-dilated needs a layout
    whose ranks hold whole chunks (contiguous, zigzag, or doc_zigzag with cu_seqlens).
    """
    get_layout(layout)
    if (segment_lengths is None) != (dilation_rates is None):
        raise ValueError("pass segment_lengths and dilation_rates together (one rate per segment), or neither")
    if segment_lengths is not None:
        segment_lengths, dilation_rates = check_branches(segment_lengths, dilation_rates)
        check_choice("layout", layout, with_pieces())
    if head_offsets is not None:
        check_choice("head_offsets", head_offsets, HEAD_OFFSETS)
    documents = None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, None, None)
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup (e.g. dist.group.WORLD), "
                        f"got {type(group).__name__}")
    token = _ACTIVE.set(_Parallel(group, layout, segment_lengths, dilation_rates, head_offsets, documents))
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
    the causal or full pattern, and the packed documents, themselves. Raises for any other mask."""
    par = _ACTIVE.get()
    if attention_mask is not None and not bool(attention_mask.all()):
        where = " inside a ring" if par is not None else ""
        raise ValueError(f"attention_mask has padding (zeros){where}: ringlab computes causal or full attention "
                         "over every token and cannot skip padded ones. Pass sequences of equal length "
                         "without padding (or attention_mask=None)")
    # Packed documents: the attention functions find them in position_ids or cu_seq_lens. In a
    # ring transformers also reads the jumps of a shard's positions as documents; the attention
    # functions check those ids against the layout instead.
    plain = mask_function in (causal_mask_function, bidirectional_mask_function)
    packed = not plain and _packed(mask_function)
    _PACKED_MASK.set(packed)
    if not plain and not packed:
        raise ValueError("this model call needs a mask other than causal or full attention, alone or within packed "
                         "documents (a sliding window, chunked attention, or another mask overlay of the model); "
                         "ringlab computes exact causal or full attention only")
    return None


def _packed(mask_function) -> bool:
    """Whether ``mask_function`` is transformers' packed-sequence mask: causal or full attention
    (on the position ids or on the indices, which agree within a document) AND-ed with nothing
    but the same-document function."""
    parts = (_closure(mask_function, _AND) or {}).get("mask_functions", ())
    if len(parts) != 2 or _closure(parts[1], _SAME_DOCUMENT) is None:
        return False
    base = (_closure(parts[0], _REMAP) or {"mask_function": parts[0]})["mask_function"]
    return base in (causal_mask_function, bidirectional_mask_function)


def _closure(fn, code) -> dict | None:
    """The captured variables of ``fn`` by name if it is a closure made with ``code``, else None."""
    if code is None or getattr(fn, "__code__", None) is not code:
        return None
    return dict(zip(code.co_freevars, (cell.cell_contents for cell in fn.__closure__)))


def _forward(module, query, key, value, attention_mask, scaling, dropout, kwargs, *, dilated: bool):
    par = _ACTIVE.get()
    # transformers passes (B, H, N, D); ringlab takes (B, N, H, D). Views, no copies.
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    kw = dict(_checked(module, q, k, attention_mask, dropout, kwargs, par), scale=scaling)
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
    if kw["causal"] and k.shape[1] > q.shape[1]:  # never packed: _checked refuses packed documents with a cache
        return _attention_after_cache(q, k, v, scaling), None
    return attention(q, k, v, **kw), None


def _checked(module, q, k, mask, dropout, kwargs, par: _Parallel | None) -> dict:
    """The call's ``causal`` and ``cu_seqlens`` (packed documents or None); a ValueError for
    anything ringlab would not compute exactly."""
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
        _check_shard(par, mask, q.shape[1], k.shape[1], kwargs)
        return dict(causal=causal, cu_seqlens=par.cu_seqlens)
    cu_seqlens = _single_device_documents(mask, q.shape[0], q.shape[1], k.shape[1], kwargs)
    return dict(causal=_single_device_pattern(mask, causal, q.shape[1], k.shape[1]), cu_seqlens=cu_seqlens)


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


def _single_device_documents(mask, batch: int, n_q: int, n_k: int, kwargs) -> torch.Tensor | None:
    """cu_seqlens of the packed documents of a call on one device, from ``cu_seq_lens_q/k`` and
    from ``position_ids`` that restart (both must agree), or None for one sequence per row."""
    documents = _flash_documents(kwargs, n_q)
    positions = kwargs.get("position_ids")
    if documents is None and positions is None and _PACKED_MASK.get():
        raise ValueError("transformers built a packed-documents mask (position ids that restart), but this attention "
                         "call received neither position_ids nor cu_seq_lens_q/k, so ringlab cannot see the "
                         "documents: this model does not pass position_ids to its attention; pass the flattening "
                         "collator's cu_seq_lens_q/k (DataCollatorWithFlattening(return_flash_attn_kwargs=True))")
    if positions is not None and positions.shape[-1] > 1:
        from_positions = _position_documents(positions, batch)
        if documents is not None and documents != from_positions:
            raise ValueError(f"cu_seq_lens_q {list(documents)} disagrees with the documents of position_ids "
                             f"{list(from_positions)} (a document starts where a position is not the one before "
                             "plus 1): pass position ids that restart at 0 in every document of cu_seq_lens")
        documents = from_positions
    if documents is None or len(documents) == 2:
        return None
    if batch != 1:
        raise ValueError(f"packed documents (cu_seq_lens) need batch 1, got batch {batch}: flatten the batch into "
                         "one row (DataCollatorWithFlattening)")
    if n_k != n_q or kwargs.get("use_cache"):
        raise ValueError("packed documents with a KV cache: the cache would mix the documents; pass "
                         "use_cache=False (training, or a forward without generation)")
    if mask is not None:
        raise ValueError(f"a custom attention mask of shape {tuple(mask.shape)} with packed documents: ringlab "
                         "computes causal or full attention within each document and cannot apply it")
    return torch.tensor(documents)


def _flash_documents(kwargs, seq_len: int) -> tuple | None:
    """The documents that ``cu_seq_lens_q`` and ``cu_seq_lens_k`` give (transformers' flash
    keywords, e.g. from DataCollatorWithFlattening(return_flash_attn_kwargs=True)) as a tuple
    0 = c_0 < ... < c_D = seq_len; None without them. Queries and keys must have the same."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        return None
    documents = [None if cu is None else check_cu_seqlens(cu, seq_len, None) for cu in (cu_q, cu_k)]
    if documents[0] != documents[1]:
        raise ValueError(f"cu_seq_lens_q={documents[0]} and cu_seq_lens_k={documents[1]} differ: ringlab computes "
                         "self-attention over packed documents, the same ones for queries and keys")
    return documents[0]


def _position_documents(positions: torch.Tensor, batch: int) -> tuple:
    """The documents of (1, N) ``positions`` as cu_seqlens (a tuple): one starts where the
    position is not the one before plus 1, the rule of transformers' find_packed_sequence_indices,
    which makes the packed mask. Each must hold positions 0..len-1, as if it ran alone."""
    rows = positions.reshape(-1, positions.shape[-1])
    n = rows.shape[-1]
    starts = rows[:, 1:] != rows[:, :-1] + 1
    if not bool(starts.any()):
        return (0, n)
    if rows.shape[0] != 1 or batch != 1:
        raise ValueError(f"packed documents (position_ids that restart) need batch 1, got position_ids of shape "
                         f"{tuple(positions.shape)} for batch {batch}: pack every sequence into one row")
    documents = (0, *(starts[0].nonzero().flatten() + 1).tolist(), n)
    firsts = rows[0, list(documents[:-1])]
    if bool((firsts != 0).any()):
        i = int((firsts != 0).nonzero()[0])
        raise ValueError(f"position_ids jump at token {documents[i]} to {int(firsts[i])}: packed documents need "
                         "positions that restart at 0 in every document (0, 1, ..., length - 1), and a shard of "
                         "one sequence must run inside ringlab.hf.sequence_parallel(group, layout=...)")
    return documents


def _check_shard(par: _Parallel, mask, n_q: int, n_k: int, kwargs) -> None:
    """This rank's call must be its shard of one whole sequence, with the global positions (the
    per-document positions of sequence_parallel's packed documents)."""
    if mask is not None:
        raise ValueError(f"a custom attention mask of shape {tuple(mask.shape)} inside a ring: ringlab computes "
                         "causal or full attention over the whole sequence and cannot apply it")
    if n_q != n_k:
        raise ValueError(f"{n_q} queries but {n_k} keys inside a ring: a ring needs this rank's shard of the whole "
                         "sequence in one call, without a KV cache (use_cache=False)")
    rank, p = dist.get_rank(par.group), dist.get_world_size(par.group)
    n = n_q * p
    if par.documents is not None and par.documents[-1] != n:
        raise ValueError(f"sequence_parallel's cu_seqlens end at {par.documents[-1]}, but the {p} ranks hold {n} "
                         f"tokens ({n_q} each): cu_seqlens gives the documents of the whole sequence")
    check_split(par.layout, n, p, what="sequence length (shard length x ranks)", documents=par.documents)
    given = _flash_documents(kwargs, n)
    if given is not None and given != (par.documents or (0, n)):
        raise ValueError(f"cu_seq_lens_q {list(given)} inside a ring differs from the documents of sequence_parallel "
                         f"({par.documents}): pass the whole sequence's boundaries as sequence_parallel(..., "
                         "cu_seqlens=)")
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        return
    expected = shard_positions(n, rank, p, par.layout, par.documents)
    if par.documents is not None:  # each document's positions start at 0
        starts = torch.tensor(par.documents[:-1])
        expected = expected - starts[torch.searchsorted(starts, expected, right=True) - 1]
    if position_ids.shape[-1] != n_q or not bool((position_ids == expected.to(position_ids.device)).all()):
        shown = position_ids.reshape(-1)[:8].tolist()
        which, positions, packed = "global", f"torch.arange({n})[None]", ""
        if par.documents is not None:
            which, positions, packed = "per-document", "positions (0..len-1 in every document)", ", cu_seqlens=cu"
        raise ValueError(f"rank {rank}: position_ids {shown}... are not the {which} positions of "
                         f"this rank's {par.layout!r} shard of a {n}-token sequence; pass position_ids="
                         f"ringlab.shard({positions}, rank, {p}, layout={par.layout!r}{packed})")


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
