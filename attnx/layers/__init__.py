"""attnx.layers: attention building blocks, a pure-JAX core with NNX modules over it.

Functional core (any JAX code can call these):
  attention, masks (padding_mask, causal_mask, segment_mask, local_window_mask,
  combine_masks, mask_to_bias), normalizers (softmax, sparsemax, entmax15),
  scores (dot, scaled dot, general, additive, location).

NNX modules (parameters with logical axis names; `sow_weights=True` sows
attention weights into `nnx.Intermediate`): MultiHeadAttention, ...

Linen adapters of every module live in `attnx.linen`.
"""

from attnx.layers.attention import IMPLEMENTATIONS, MaskSpec, attention, select_implementation
from attnx.layers.masks import (
    causal_mask,
    combine_masks,
    local_window_mask,
    mask_to_bias,
    padding_mask,
    segment_mask,
)
from attnx.layers.multi_head import MultiHeadAttention
from attnx.layers.normalizers import entmax15, get_normalizer, softmax, sparsemax
from attnx.layers.scores import (
    additive_scores,
    dot_scores,
    general_scores,
    location_scores,
    scaled_dot_scores,
)

# The NNX modules that attnx.linen adapts.
PUBLIC_MODULES = (MultiHeadAttention,)
