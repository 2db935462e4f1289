"""One example's attention maps, named and labelled, from an attnx model's weights dict.

The models return their weights under keys that say where each map comes
from; this turns one example's dict into labelled `html_page.AttentionMap`s
(one per head, plus the mean over heads) trimmed to the real tokens, for the
report's page and figures:

  'encoder/layer_{i}/self_attention'   [h, s, s]  'encoder-self'  (Transformer)
  'decoder/layer_{i}/self_attention'   [h, t, t]  'decoder-self'  (Transformer)
  'decoder/layer_{i}/cross_attention'  [h, t, s]  'cross'         (Transformer)
  'decoder/layer_{i}/attention'        [t, s]     'multi-step'    (ConvS2S)
  'decoder/attention'                  [t, s]     'global'        (RNN: Bahdanau, Luong)
  'decoder/spatial_attention'          [t, L]     'spatial'       (captioner)

Other entries ('alignment', an aggregate of the above; the captioner's
'gate', 'location', 'sampled') are not maps of their own.

Queries of the decoder's maps are the target tokens being predicted (the
last is eos); keys of its self-attention are the decoder's inputs (bos, then
the targets shifted by one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from attnx.decoding_traces import attention_kind
from attnx.interpret.html_page import AttentionMap


def kind_of(key: str) -> tuple[str, int] | None:
    """(kind, layer) of a weights-dict key, None for entries that are not maps.

    The trace records' own table (`attnx.decoding_traces.attention_kind`),
    without a model: the RNN's one attention is 'global'.
    """
    return attention_kind(key)


def example_maps(
    weights: Mapping[str, np.ndarray],
    source_labels: Sequence[str],
    target_labels: Sequence[str],
    *,
    heads: bool = True,
) -> list[AttentionMap]:
    """Every map of one example (no batch axis), trimmed to its labelled tokens.

    Args:
      weights: one example's weights dict (the model's dict indexed at one row).
      source_labels: the source tokens (eos included) or the captioner's grid cells.
      target_labels: the target tokens being predicted (eos included).
      heads: one map per head besides their mean (the mean alone otherwise).

    Returns:
      The maps in key order, layer by layer: per head, then 'mean'.
    """
    s, t = len(source_labels), len(target_labels)
    decoder_inputs = ["<s>", *target_labels[:-1]]
    maps: list[AttentionMap] = []
    for key in sorted(weights, key=_order):
        found = kind_of(key)
        if found is None:
            continue
        kind, layer = found
        array = np.asarray(weights[key], np.float32)
        queries, keys = {
            "encoder-self": (source_labels, source_labels),
            "decoder-self": (target_labels, decoder_inputs),
        }.get(kind, (target_labels, source_labels))
        if array.ndim == 2:
            array = array[None]
            head_names: list[int | str] = []
        else:
            head_names = list(range(array.shape[0])) if heads else []
        array = array[:, : len(queries), : len(keys)]
        if array.shape[1:] != (len(queries), len(keys)):
            raise ValueError(
                f"{key}: map {array.shape[1:]} is smaller than its labels "
                f"({len(queries)} x {len(keys)}); s={s}, t={t}"
            )
        for head in [*head_names, "mean"]:
            values = array.mean(axis=0) if head == "mean" else array[head]
            maps.append(
                AttentionMap(
                    name=key,
                    layer=layer,
                    kind=kind,
                    head=head,
                    query_labels=list(queries),
                    key_labels=list(keys),
                    weights=values,
                )
            )
    return maps


def _order(key: str) -> tuple[int, int, str]:
    """Encoder before decoder, layers in order (layer_10 after layer_9)."""
    found = kind_of(key)
    side = 0 if key.startswith("encoder") else 1
    return side, found[1] if found else -1, key
