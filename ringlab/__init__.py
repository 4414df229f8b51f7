"""ringlab: exact ring attention and LongNet dilated attention for PyTorch.

Layout everywhere: q, k, v, out (batch, seq, heads, head_dim); lse (batch, heads, seq).
"""

from .attention import attention
from .dilated import dilated_attention
from .layout import shard, unshard
from .ring import ring_attention
from .ring_dilated import ring_dilated_attention

__all__ = ["attention", "dilated_attention", "ring_attention", "ring_dilated_attention", "shard", "unshard"]
__version__ = "0.1.0"
