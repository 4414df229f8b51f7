"""Modules for real models: attention layers, a LongNet-style block and a small language model.

Each layer runs on one device by default; give it a ``group`` (a torch.distributed
ProcessGroup) and it becomes sequence parallel: inputs are this rank's shard of the sequence in
``layout`` order (see :func:`ringlab.shard`) and outputs are this rank's shard.

``DilatedAttention`` takes the same call as dilated-attention-pytorch's class, so switching is
an import change. The semantics differ on purpose: ringlab computes exact softmax attention
with every head in every branch and the branches merged by their softmax denominators
(docs/design.md §3); dilated-attention-pytorch gives each branch a slice of the heads and normalises
outputs by a sum over the sequence.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from .checks import (HEAD_OFFSETS, check_branches, check_choice, check_cu_seqlens, check_int,
                     check_positive_number)
from .dilated import dilated_attention
from .layout import LAYOUTS, shard_positions, with_pieces
from .ring import ring_attention
from .ring_dilated import ring_dilated_attention


def _no_dropout(p: float, name: str) -> None:
    if p:
        raise ValueError(f"{name}={p}: ringlab computes exact attention and has no attention "
                         "dropout; use dropout outside the attention, or 0.0")


class DilatedAttention(nn.Module):
    """LongNet dilated attention over (B, N, H, D) query, key, value.

    Args:
        segment_lengths, dilation_rates: one (w_i, r_i) per branch.
        softmax_scale: default 1/sqrt(D).
        attention_dropout: must be 0.0 (kept for call compatibility).
        head_offsets: "interleaved" or "grouped" (see ringlab.dilated_attention).
        group, layout: sequence parallel over a process group (inputs are shards).

    ``forward(..., cu_seqlens=)`` takes packed documents (see ringlab.dilated_attention).
    """

    def __init__(self, segment_lengths, dilation_rates, softmax_scale: float | None = None,
                 attention_dropout: float = 0.0, *, head_offsets: str = "interleaved",
                 group=None, layout: str = "contiguous"):
        super().__init__()
        _no_dropout(attention_dropout, "attention_dropout")
        segment_lengths, dilation_rates = check_branches(segment_lengths, dilation_rates)
        check_choice("head_offsets", head_offsets, HEAD_OFFSETS)
        check_choice("layout", layout, with_pieces())  # what ring-dilated attention takes
        self.segment_lengths, self.dilation_rates = list(segment_lengths), list(dilation_rates)
        self.softmax_scale, self.head_offsets = softmax_scale, head_offsets
        self.group, self.layout = group, layout

    def forward(self, query, key, value, is_causal: bool = False, *, cu_seqlens=None):
        kw = dict(causal=is_causal, scale=self.softmax_scale, head_offsets=self.head_offsets, cu_seqlens=cu_seqlens)
        if self.group is None:
            return dilated_attention(query, key, value, self.segment_lengths, self.dilation_rates, **kw)
        return ring_dilated_attention(query, key, value, self.segment_lengths, self.dilation_rates,
                                      group=self.group, layout=self.layout, **kw)

    def extra_repr(self) -> str:
        return (f"segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates}, "
                f"head_offsets={self.head_offsets!r}" + (f", layout={self.layout!r}, sequence parallel"
                                                         if self.group is not None else ""))


class RingAttention(nn.Module):
    """Exact dense attention over (B, N, H, D), sequence parallel over ``group`` (inputs are
    shards), or a simulated ring of ``ring_size`` ranks on one device. ``forward(...,
    cu_seqlens=)`` takes packed documents of the whole sequence (see ringlab.ring_attention)."""

    def __init__(self, *, group=None, ring_size: int | None = None, layout: str = "contiguous",
                 softmax_scale: float | None = None):
        super().__init__()
        check_choice("layout", layout, tuple(LAYOUTS))
        self.group, self.ring_size, self.layout, self.softmax_scale = group, ring_size, layout, softmax_scale

    def forward(self, query, key, value, is_causal: bool = False, *, cu_seqlens=None):
        return ring_attention(query, key, value, group=self.group, ring_size=self.ring_size,
                              causal=is_causal, layout=self.layout, scale=self.softmax_scale, cu_seqlens=cu_seqlens)


class MultiheadDilatedAttention(nn.Module):
    """Projections around :class:`DilatedAttention`, MAGNETO-style (LongNet's architecture):
    q, k, v projections; dilated attention; an optional LayerNorm; the output projection.

    Input (B, N, E) with ``batch_first=True`` (else (N, B, E)). Returns (out, None), like
    torch.nn.MultiheadAttention without weights. ``checkpoint=True`` recomputes the attention
    (and its norm) in the backward instead of keeping its output. ``num_kv_heads`` (a divisor
    of ``num_heads``; default ``num_heads``) gives grouped-query attention: the k and v
    projections produce that many heads of E / num_heads each. ``forward(..., cu_seqlens=)``
    takes packed documents (batch 1), as :class:`DilatedAttention`.
    """

    def __init__(self, embed_dim: int, num_heads: int, segment_lengths, dilation_rates, *,
                 num_kv_heads: int | None = None, dropout: float = 0.0, bias: bool = True, layer_norm: bool = True,
                 layer_norm_eps: float = 1e-5, gamma_init: float = 1.0,
                 head_offsets: str = "interleaved", group=None, layout: str = "contiguous",
                 checkpoint: bool = False, batch_first: bool = True, device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, val in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            check_int(name, val)
        check_positive_number("layer_norm_eps", layer_norm_eps)
        check_positive_number("gamma_init", gamma_init)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        _no_dropout(dropout, "dropout")
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.batch_first, self.checkpoint = batch_first, checkpoint
        kv_dim = embed_dim // num_heads * num_kv_heads
        self.q_proj, self.out_proj = nn.Linear(embed_dim, embed_dim, **kw), nn.Linear(embed_dim, embed_dim, **kw)
        self.k_proj, self.v_proj = nn.Linear(embed_dim, kv_dim, **kw), nn.Linear(embed_dim, kv_dim, **kw)
        self.attention = DilatedAttention(segment_lengths, dilation_rates, head_offsets=head_offsets,
                                          group=group, layout=layout)
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps, device=device, dtype=dtype) if layer_norm else None
        self.gamma_init = gamma_init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # MAGNETO initialisation: the value and output projections take the depth-dependent gain.
        for proj, gain in ((self.q_proj, 1.0), (self.k_proj, 1.0), (self.v_proj, self.gamma_init),
                           (self.out_proj, self.gamma_init)):
            nn.init.xavier_normal_(proj.weight, gain=gain)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def _attend(self, q, k, v, is_causal: bool, cu_seqlens=None):
        x = self.attention(q, k, v, is_causal=is_causal, cu_seqlens=cu_seqlens).flatten(2)
        return self.norm(x) if self.norm is not None else x

    def forward(self, query, key=None, value=None, is_causal: bool = False, *, cu_seqlens=None):
        key = query if key is None else key
        value = key if value is None else value
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        split = lambda x, heads: x.unflatten(-1, (heads, -1))  # noqa: E731
        q = split(self.q_proj(query), self.num_heads)
        k, v = split(self.k_proj(key), self.num_kv_heads), split(self.v_proj(value), self.num_kv_heads)
        if self.checkpoint and torch.is_grad_enabled():
            x = checkpoint(self._attend, q, k, v, is_causal, cu_seqlens, use_reentrant=False)
        else:
            x = self._attend(q, k, v, is_causal, cu_seqlens)
        out = self.out_proj(x)
        return (out if self.batch_first else out.transpose(0, 1)), None


class LongNetBlock(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + MLP(norm(x)); ``cu_seqlens``
    (packed documents) goes to the attention."""

    def __init__(self, embed_dim: int, num_heads: int, segment_lengths, dilation_rates, *,
                 num_kv_heads: int | None = None, mlp_ratio: int = 4, group=None, layout: str = "contiguous",
                 checkpoint: bool = False, gamma_init: float = 1.0, device=None, dtype=None):
        super().__init__()
        check_int("mlp_ratio", mlp_ratio)
        kw = dict(device=device, dtype=dtype)
        self.norm1, self.norm2 = nn.LayerNorm(embed_dim, **kw), nn.LayerNorm(embed_dim, **kw)
        self.attn = MultiheadDilatedAttention(embed_dim, num_heads, segment_lengths, dilation_rates,
                                              num_kv_heads=num_kv_heads, group=group, layout=layout,
                                              checkpoint=checkpoint,
                                              gamma_init=gamma_init, **kw)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, mlp_ratio * embed_dim, **kw), nn.GELU(),
                                 nn.Linear(mlp_ratio * embed_dim, embed_dim, **kw))

    def forward(self, x, is_causal: bool = True, *, cu_seqlens=None):
        x = x + self.attn(self.norm1(x), is_causal=is_causal, cu_seqlens=cu_seqlens)[0]
        return x + self.mlp(self.norm2(x))


class LongNetLM(nn.Module):
    """A small causal language model of LongNet blocks, for the examples and tests.

    ``forward(tokens, cu_seqlens=None)`` takes (B, N) token ids (this rank's shard when ``group``
    is given) and returns logits (B, N, vocab_size). ``cu_seqlens``: packed documents (batch 1;
    the boundaries of the whole sequence, as :func:`ringlab.ring_attention` takes them); each
    document is its own sequence, its positions counting from 0. ``loss(tokens, targets,
    total_tokens, cu_seqlens=None)`` returns the summed cross-entropy of this rank's tokens
    divided by ``total_tokens``, so the losses of the ranks add up to the mean over the whole
    sequence.
    """

    def __init__(self, vocab_size: int, embed_dim: int, depth: int, num_heads: int,
                 segment_lengths, dilation_rates, *, num_kv_heads: int | None = None, max_seq_len: int = 65536,
                 group=None, layout: str = "contiguous", checkpoint: bool = False, device=None, dtype=None):
        super().__init__()
        for name, val in (("vocab_size", vocab_size), ("embed_dim", embed_dim), ("depth", depth),
                          ("max_seq_len", max_seq_len)):
            check_int(name, val)
        kw = dict(device=device, dtype=dtype)
        self.group, self.layout = group, layout
        self.tok = nn.Embedding(vocab_size, embed_dim, **kw)
        self.pos = nn.Embedding(max_seq_len, embed_dim, **kw)
        gain = math.sqrt(math.log(2 * depth))  # MAGNETO's gain for decoder-only models
        self.blocks = nn.ModuleList(
            LongNetBlock(embed_dim, num_heads, segment_lengths, dilation_rates, num_kv_heads=num_kv_heads,
                         group=group, layout=layout, checkpoint=checkpoint, gamma_init=gain, **kw)
            for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, **kw)
        self.head = nn.Linear(embed_dim, vocab_size, bias=False, **kw)

    def positions(self, n_local: int, device, documents: tuple[int, ...] = ()) -> torch.Tensor:
        """Positions of this rank's tokens: global ones, or with packed ``documents``
        (cu_seqlens as a tuple) counted from the start of each token's document."""
        if self.group is None:  # one process holds the whole sequence in order, whatever the layout
            pos = torch.arange(n_local)
        else:
            p = dist.get_world_size(self.group)
            pos = shard_positions(n_local * p, dist.get_rank(self.group), p, self.layout, documents or None)
        if documents:
            starts = torch.tensor(documents[:-1])
            pos = pos - starts[torch.searchsorted(starts, pos, right=True) - 1]
        return pos.to(device)

    def forward(self, tokens, *, cu_seqlens=None):
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point() or \
                tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError("tokens must be a (batch, seq) tensor of integer token ids, got "
                            + (f"{tokens.dtype} of shape {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor)
                               else type(tokens).__name__))
        if tokens.numel():  # an id out of range would be an IndexError on CPU and a device-side assert on CUDA
            low, high = (int(x) for x in torch.aminmax(tokens))
            if low < 0 or high >= self.tok.num_embeddings:
                raise ValueError(f"token ids must lie in [0, {self.tok.num_embeddings}) (vocab_size), got "
                                 f"{low if low < 0 else high}")
        n = tokens.shape[1] * (dist.get_world_size(self.group) if self.group is not None else 1)
        docs = () if cu_seqlens is None else check_cu_seqlens(cu_seqlens, n, tokens.shape[0])
        longest = max(b - a for a, b in zip(docs, docs[1:])) if docs else n
        if longest > self.pos.num_embeddings:
            what = "its longest document has" if docs else "the sequence has"
            raise ValueError(f"{what} {longest} tokens but this model has position embeddings for "
                             f"max_seq_len={self.pos.num_embeddings}; build it with max_seq_len >= {longest}")
        x = self.tok(tokens) + self.pos(self.positions(tokens.shape[1], tokens.device, docs))
        for blk in self.blocks:
            x = blk(x, is_causal=True, cu_seqlens=cu_seqlens)
        return self.head(self.norm(x))

    def loss(self, tokens, targets, total_tokens: int | None = None, *, cu_seqlens=None):
        logits = self(tokens, cu_seqlens=cu_seqlens)
        total = targets.numel() if total_tokens is None else total_tokens
        check_int("total_tokens", total)
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / total


def all_reduce_grads(module: nn.Module, group) -> None:
    """Sum parameter gradients over a sequence-parallel group: each rank's gradients hold the
    part of the whole-sequence gradient that flowed through its own tokens."""
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
