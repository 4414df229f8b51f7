"""ringlab: exact ring attention and LongNet dilated attention for PyTorch.

Layout everywhere: q, k, v, out (batch, seq, heads, head_dim); lse (batch, heads, seq).
"""

from .engine.attention import attention
from .engine.dilated import dilated_attention
from .engine.layout import shard, unshard
from .engine.ring import ring_attention
from .engine.ring_dilated import ring_dilated_attention
from .engine.ulysses import mesh_groups, shard_mesh, ulysses_attention, ulysses_dilated_attention, unshard_mesh
from .planning import memory_model  # noqa: F401 - lets out-of-memory errors quote the memory model

__all__ = ["attention", "dilated_attention", "mesh_groups", "ring_attention", "ring_dilated_attention", "shard",
           "shard_mesh", "ulysses_attention", "ulysses_dilated_attention", "unshard", "unshard_mesh"]
__version__ = "0.1.0"
