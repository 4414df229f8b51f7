"""Optional peers for side-by-side comparisons. None is a dependency of ringlab; each wrapper
has ``available`` (False when the package is missing) and takes ringlab's (B, N, H, D) layout.

    pip install ring-attention-pytorch        # lucidrains' ring attention (CPU/gloo capable)
"""

from __future__ import annotations

import importlib.util


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def peer_ring_attention(q, k, v, *, causal: bool = False):
    """ring-attention-pytorch's ring_flash_attn on this rank's shards of the default group."""
    import torch.distributed as dist
    from ring_attention_pytorch import ring_flash_attn

    return ring_flash_attn(q, k, v, causal=causal, ring_reduce_col=True,
                           ring_size=dist.get_world_size())


peer_ring_attention.available = _has("ring_attention_pytorch")
