"""What an attention trace keeps of a search's weights, chosen inside the compiled search.

`TraceSelection` says which maps (layers, kinds, heads) and how much of each
(every weight, or only the `top_k` largest weights of each query with their
key indices) a search carries; `select_weights` applies it to one step's
weights dict inside `jax.jit`, so only the selection leaves the device (a
4,096-token source traced at top_k=8 moves 8 weights a query, not 4,096);
`skip_unselected_layers` lets the layers it leaves out keep their fast kernel
(`chunked`, `splash`, `cudnn` never materialise the weights). `SearchTraces`
holds what a search carried (`decoding.DecodeResult.traces`);
`attnx.interpret.traces` turns it into typed records.
"""

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

ATTENTION_KINDS = ("encoder-self", "decoder-self", "cross", "multi-step", "spatial", "global")

# Weights-dict keys of the attnx models -> record kind (the layer is the number in the key).
# Extras that a map's recorded mask is computed from (`attnx.interpret.traces`):
# Luong local-p's predicted window centres p_t, `[b, t]`. A few bytes a step.
MASK_EXTRAS = ("decoder/attention_center",)

_KEY_KINDS = (
    (re.compile(r"encoder/layer_(\d+)/self_attention"), "encoder-self"),
    (re.compile(r"decoder/layer_(\d+)/self_attention"), "decoder-self"),
    (re.compile(r"decoder/layer_(\d+)/cross_attention"), "cross"),
    (re.compile(r"decoder/layer_(\d+)/attention"), "multi-step"),
    (re.compile(r"decoder/spatial_attention"), "spatial"),
    (re.compile(r"decoder/attention"), "global"),
)


@dataclasses.dataclass(frozen=True)
class TraceSelection:
    """Which attention maps a trace keeps, and how much of each leaves the device.

    Attributes:
      layers: layer indices to keep (None = all). Single-layer mechanisms
        (RNN, captioner) are layer 0.
      kinds: record kinds to keep (None = all), from `ATTENTION_KINDS`.
      heads: head indices to keep in multi-head maps (None = all).
      top_k: None keeps whole maps; k keeps, per query (and head), only the k
        largest weights and their key indices, chosen on the device.
      extras: also keep the weights-dict entries that are no attention map
        (e.g. the captioner's 'gate'); 'alignment' (an average of the maps)
        is never kept.
    """

    layers: tuple[int, ...] | None = None
    kinds: tuple[str, ...] | None = None
    heads: tuple[int, ...] | None = None
    top_k: int | None = None
    extras: bool = True

    def __post_init__(self):
        for name in ("layers", "kinds", "heads"):
            value = getattr(self, name)
            if value is None:
                continue
            value = (value,) if isinstance(value, int | str) else tuple(value)
            object.__setattr__(self, name, value)  # lists in, hashable tuples kept
            if name == "kinds":
                unknown = [k for k in value if k not in ATTENTION_KINDS]
                if unknown:
                    raise ValueError(
                        f"TraceSelection: unknown kinds {unknown}; choose from {ATTENTION_KINDS}"
                    )
            elif not all(isinstance(i, int) and i >= 0 for i in value):
                raise ValueError(f"TraceSelection: {name} must be ints >= 0, got {value!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(
                f"TraceSelection: top_k must be None or an int >= 1, got {self.top_k!r}"
            )

    def selects(self, kind: str, layer: int) -> bool:
        """Whether a map of this kind and layer is kept."""
        return (self.kinds is None or kind in self.kinds) and (
            self.layers is None or layer in self.layers
        )


def attention_kind(key: str, model: Any = None) -> tuple[str, int] | None:
    """The record kind and layer of a weights-dict key; None for entries that are no map.

    'decoder/attention' (the RNN decoder's one attention) is 'global', or
    'cross' when `model.config.mechanism` is local (Luong's local-m / local-p).
    """
    for pattern, kind in _KEY_KINDS:
        match = pattern.fullmatch(key)
        if match:
            if kind == "global" and _is_local(model):
                kind = "cross"
            return kind, int(match.group(1)) if match.groups() else 0
    return None


def _is_local(model: Any) -> bool:
    mechanism = getattr(getattr(model, "config", None), "mechanism", None)
    return bool(getattr(mechanism, "is_local", False))


def select_weights(
    weights: Mapping[str, Array], selection: TraceSelection, model: Any, *, step: bool
) -> dict[str, dict[str, Array]]:
    """The selected entries of a model's weights dict, traced inside the caller's `jit`.

    Args:
      weights: from `decode`/`encode` (`[b, heads, t, keys]` or `[b, t, keys]`
        maps, `[b, t, ...]` extras) or from `decode_step` (the same with t = 1).
      selection: what to keep.
      model: the model (for `attention_kind`).
      step: the weights are one decode step's: the t axis is dropped.

    Returns:
      `{key: {'weights': float32 maps (heads selected), 'indices': int32}}`;
      'indices' (key indices of the top-k weights, largest first) only with
      `selection.top_k`, then the last axis has min(top_k, keys) entries.
    """
    selected = {}
    for key, value in weights.items():
        if key == "alignment" or value is None:
            continue
        found = attention_kind(key, model)
        if found is None:
            # Extras are `[b, t, ...]` (t = 1 at a step); anything else has no query axis to trace.
            # A map's mask may need one (local-p's centres): those come whenever maps do.
            wanted = selection.extras or key in MASK_EXTRAS
            if wanted and value.ndim >= 2 and (not step or value.shape[1] == 1):
                selected[key] = {"weights": value[:, 0] if step else value}
            continue
        if not selection.selects(*found):
            continue
        multi_head = value.ndim == 4
        if step:
            value = value[:, :, 0] if multi_head else value[:, 0]
        if multi_head and selection.heads is not None:
            if max(selection.heads) >= value.shape[1]:
                raise ValueError(
                    f"TraceSelection: heads {selection.heads} for {key!r}, which has "
                    f"{value.shape[1]} heads"
                )
            value = value[:, np.asarray(selection.heads)]
        value = value.astype(jnp.float32)
        if selection.top_k is None:
            selected[key] = {"weights": value}
        else:
            top, index = jax.lax.top_k(value, min(selection.top_k, value.shape[-1]))
            selected[key] = {"weights": top, "indices": index.astype(jnp.int32)}
    return selected


def skip_unselected_layers(
    model: nnx.Module, selection: TraceSelection, *, stacks: tuple[str, ...] | None = None
) -> None:
    """Sets `skip_weights` on every layer whose map `selection` does not keep.

    Such a layer keeps its own kernel (e.g. 'chunked') when the model is asked
    for its weights, and returns a placeholder that the trace drops. A layer
    is found by its graph path (`encoder_layers/{i}/self_attention` holds the
    map 'encoder/layer_{i}/self_attention'); call it on a copy of the model.
    `stacks` limits the switch to those stacks (e.g. ('encoder',)); None = all.
    """
    found = []
    for path, node in nnx.iter_graph(model):
        if not hasattr(node, "skip_weights") or len(path) != 3:
            continue
        stack, index, name = path
        if not (isinstance(stack, str) and stack.endswith("_layers") and isinstance(index, int)):
            continue
        stack = stack.removesuffix("_layers")
        if stacks is not None and stack not in stacks:
            continue
        kind = attention_kind(f"{stack}/layer_{index}/{name}", model)
        if kind is not None and not selection.selects(*kind):
            found.append(node)
    for node in found:
        node.skip_weights = True


@flax.struct.dataclass
class SearchTraces:
    """The attention weights a search carried (`trace=TraceSelection(...)`), on device.

    Each entry is `{'weights': float32, 'indices': int32 (top_k only)}` as
    `select_weights` gives it.

    Attributes:
      steps: per weights-dict key of `decode_step`, every generated token's
        entry: `[..., L, heads, keys]` (multi-head maps), `[..., L, keys]`
        (single maps) or `[..., L, ...]` (extras), where `...` is `[b]`
        (greedy, sampling) or `[b, num_return]` (beam search) and keys the
        source, or the whole cache buffer for decoder self-attention (only
        keys 0..k are valid at step k); zero after a hypothesis ends.
      source: the encoder's maps, once per source: `[b, heads, s, s]`
        (or `[b, heads, s, k]` with top_k); empty for encoders without attention.
    """

    steps: dict[str, dict[str, Array]]
    source: dict[str, dict[str, Array]]
