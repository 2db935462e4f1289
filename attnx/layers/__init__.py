"""attnx.layers: attention building blocks, a pure-JAX core with NNX modules over it.

Functional core (any JAX code can call these):
  attention, masks (padding_mask, causal_mask, segment_mask, local_window_mask,
  combine_masks, mask_to_bias; MaskSpec, a mask described rather than built),
  normalizers (softmax, sparsemax, entmax15), scores (dot, scaled dot, general,
  additive, location).

NNX modules (parameters with logical axis names; `sow_weights=True` sows
attention weights into `nnx.Intermediate`, collected with `nnx.capture`):
  MultiHeadAttention (Transformer), AdditiveAttention (Bahdanau),
  LuongAttention and LocalAttention (Luong), MultiStepAttention (ConvS2S),
  SpatialAttention (Show, Attend and Tell); positions: SinusoidalPositions,
  LearnedPositions, RelativePositionBias, apply_rotary.

Linen adapters of every module live in `attnx.linen`.
"""

from attnx.layers.attention import IMPLEMENTATIONS, attention, select_implementation
from attnx.layers.attention_memory import AttentionMemory
from attnx.layers.luong_attention import LocalAttention, LuongAttention
from attnx.layers.masks import (
    MaskSpec,
    causal_mask,
    combine_masks,
    local_window_mask,
    mask_to_bias,
    padding_mask,
    segment_mask,
)
from attnx.layers.multi_head import MultiHeadAttention
from attnx.layers.multi_step import MultiStepAttention
from attnx.layers.normalizers import entmax15, get_normalizer, softmax, sparsemax
from attnx.layers.positions import (
    LearnedPositions,
    RelativePositionBias,
    SinusoidalPositions,
    apply_rotary,
    relative_position_bucket,
    sinusoidal_positions,
)
from attnx.layers.recurrent_attention import AdditiveAttention
from attnx.layers.scores import (
    additive_scores,
    dot_scores,
    general_scores,
    location_scores,
    scaled_dot_scores,
)
from attnx.layers.source_cache import SourceCache
from attnx.layers.spatial import SpatialAttention, SpatialMemory, sample_location

# The NNX modules that attnx.linen adapts.
PUBLIC_MODULES = (
    MultiHeadAttention,
    AdditiveAttention,
    LuongAttention,
    LocalAttention,
    MultiStepAttention,
    SpatialAttention,
    SinusoidalPositions,
    LearnedPositions,
    RelativePositionBias,
)
