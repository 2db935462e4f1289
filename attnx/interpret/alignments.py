"""Word alignments read off cross-attention weights, and gold alignments in Pharaoh format.

A decoder's cross-attention at target position t is a distribution over the
source positions; read as an alignment it says which source tokens the model
used to emit target token t (Bahdanau et al. 2014, sec. 5.2.2; Luong et al.
2015, sec. 4.4). This module turns the weights dict of an attnx model
(`return_weights=True`) into such alignments:

* `cross_attention` picks one `[batch, t, s]` map (a layer, a head or an
  aggregation over heads), `cross_attention_maps` lists every (layer, head)
  map for sweeps;
* `argmax_links` (each target token to its most attended source token),
  `threshold_links` (every link whose weight reaches a threshold) and
  `soft_alignment` (the weights themselves) make alignments;
* `merge_subwords` and `word_argmax_links` merge sub-word pieces into words;
* `to_pharaoh`, `write_pharaoh` and `read_pharaoh` speak the Pharaoh format
  of fast_align, awesome-align and the gold alignment sets;
* `real_token_mask` and `trim_special_tokens` drop bos, eos and padding.

Conventions. A link is a pair `(source, target)` of 0-based token indices,
source first, as in Pharaoh files ('i-j': source i with target j). In the
weights, row t is the decoder step that emits target token t: the decoder
reads `[bos, y_1, ..., y_n]` and its rows predict `[y_1, ..., y_n, eos]`, so
target index t is the t-th token of the tokenizer's output without bos. attnx
sources carry no bos and end with eos, so source position j is the j-th
token of the tokenizer's output. Masks are boolean, True at real tokens.

Keys of the weights dicts (see the model modules' docstrings):

    Transformer  'decoder/layer_{i}/cross_attention'  [b, h, t, s]
    ConvS2S      'decoder/layer_{i}/attention'        [b, t, s]  (attention layers only)
    RNN          'decoder/attention'                  [b, t, s]
    Captioner    'decoder/spatial_attention'          [b, t, L]  (L = H x W, row-major)

A single-head map counts as head 0, and the RNN's and the captioner's single
attention as layer 0. 'alignment' (a derived summary) and self-attention keys
are ignored.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

# Special token ids shared by every attnx tokenizer (attnx.data.tokenizers);
# repeated here so that interpreting weights does not import the data stack.
PAD_ID = 0
BOS_ID = 1
EOS_ID = 2

Link = tuple[int, int]  # (source index, target index), 0-based

_LAYERED_KEY = re.compile(r"^decoder/layer_(\d+)/(cross_attention|attention)$")
_SINGLE_KEYS = ("decoder/attention", "decoder/spatial_attention")
HEAD_REDUCTIONS = ("mean", "max")


# --------------------------------------------------------------------------
# Choosing a cross-attention map.
# --------------------------------------------------------------------------


def cross_attention_layers(weights: Mapping[str, object]) -> dict[int, np.ndarray]:
    """Every decoder-to-source attention of a weights dict, by layer.

    Args:
      weights: the dict an attnx model returns with `return_weights=True`
        (NumPy or JAX arrays).

    Returns:
      Layer index -> float array `[b, h, t, s]`, in increasing layer order;
      single-head maps `[b, t, s]` get a head axis of size 1. The RNN's and
      the captioner's single attention is layer 0.

    Raises:
      ValueError: if the dict holds no cross-attention (naming its keys), or a
        map is neither 3-D nor 4-D.
    """
    layered = {}
    for key, value in weights.items():
        match = _LAYERED_KEY.match(key)
        if match:
            layered[int(match.group(1))] = (key, value)
    single = [(key, weights[key]) for key in _SINGLE_KEYS if key in weights]
    if layered and single:
        raise ValueError(
            f"weights hold both per-layer attention {sorted(k for k, _ in layered.values())} "
            f"and {[k for k, _ in single]}; cannot tell which is the cross-attention"
        )
    if len(single) > 1:
        raise ValueError(f"weights hold several single attentions {[k for k, _ in single]}")
    if not layered and not single:
        raise ValueError(
            "weights hold no cross-attention (expected 'decoder/layer_{i}/cross_attention', "
            "'decoder/layer_{i}/attention', 'decoder/attention' or "
            f"'decoder/spatial_attention'); keys: {sorted(weights)}"
        )
    entries = layered if layered else {0: single[0]}
    layers = {}
    for index in sorted(entries):
        key, value = entries[index]
        array = np.asarray(value, dtype=np.float64)
        if array.ndim == 3:
            array = array[:, None]  # one head
        if array.ndim != 4:
            raise ValueError(
                f"{key!r} must be [b, t, s] or [b, h, t, s], got shape {np.shape(value)}"
            )
        layers[index] = array
    return layers


def cross_attention(
    weights: Mapping[str, object],
    *,
    layer: int | str | None = None,
    head: int | None = None,
    reduce: str = "mean",
) -> np.ndarray:
    """One cross-attention map `[b, t, s]` of a weights dict.

    Args:
      weights: the dict an attnx model returns with `return_weights=True`.
      layer: a layer index as in the keys ('decoder/layer_{i}/...'); None for
        the last layer; 'all' for the mean over layers (after choosing or
        reducing heads in each layer).
      head: a head index; None to aggregate the heads with `reduce`.
      reduce: 'mean' (a distribution again) or 'max' (the strongest head's
        weight at each (t, s); rows no longer sum to 1). Unused when `head`
        is given.

    Returns:
      float64 `[b, t, s]`.

    Raises:
      ValueError: naming the available layers or heads when `layer` or `head`
        does not exist, or the layers' shapes differ under 'all'.
    """
    layers = cross_attention_layers(weights)
    available = list(layers)
    if layer is None:
        chosen = [available[-1]]
    elif isinstance(layer, str) and layer == "all":
        chosen = available
    elif isinstance(layer, (int, np.integer)) and not isinstance(layer, bool) and layer in layers:
        chosen = [int(layer)]
    else:
        raise ValueError(
            f"layer {layer!r} does not exist; available layers: {available} "
            "(None for the last, 'all' for their mean)"
        )
    if reduce not in HEAD_REDUCTIONS:
        raise ValueError(f"reduce must be one of {HEAD_REDUCTIONS}, got {reduce!r}")
    maps = []
    for index in chosen:
        array = layers[index]
        num_heads = array.shape[1]
        if head is None:
            maps.append(array.mean(axis=1) if reduce == "mean" else array.max(axis=1))
            continue
        if isinstance(head, bool) or not isinstance(head, (int, np.integer)):
            raise ValueError(f"head must be an int or None, got {head!r}")
        if not 0 <= head < num_heads:
            raise ValueError(
                f"head {head} does not exist in layer {index}, which has heads "
                f"{list(range(num_heads))}"
            )
        maps.append(array[:, int(head)])
    shapes = {m.shape for m in maps}
    if len(shapes) > 1:
        raise ValueError(
            f"layers {chosen} have different shapes {[m.shape for m in maps]}; cannot average them"
        )
    return maps[0] if len(maps) == 1 else np.mean(maps, axis=0)


def cross_attention_maps(weights: Mapping[str, object]) -> dict[tuple[int, int], np.ndarray]:
    """Every (layer, head) cross-attention map of a weights dict, for sweeps.

    Returns:
      (layer, head) -> float64 `[b, t, s]`, ordered by layer then head.
    """
    return {
        (index, head): array[:, head]
        for index, array in cross_attention_layers(weights).items()
        for head in range(array.shape[1])
    }


# --------------------------------------------------------------------------
# Masks and special tokens.
# --------------------------------------------------------------------------


def lengths_to_mask(lengths: np.ndarray, length: int) -> np.ndarray:
    """Lengths `[b]` -> bool mask `[b, length]`, True at positions < lengths[i].

    Raises:
      ValueError: if a length is negative or exceeds `length`.
    """
    lengths = np.asarray(lengths)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be [b], got shape {lengths.shape}")
    if np.any(lengths < 0) or np.any(lengths > length):
        raise ValueError(f"lengths {lengths.tolist()} must lie in [0, {length}]")
    return np.arange(length)[None, :] < lengths[:, None]


def real_token_mask(ids: np.ndarray) -> np.ndarray:
    """True at the tokenizer's own tokens: before the first eos, neither pad nor bos.

    Args:
      ids: int token ids `[..., n]` (sources `[x_1..x_m, eos, pad..]`, targets
        `[y_1..y_n, eos, pad..]`, or decoded rows that may go on after eos).

    Returns:
      bool `[..., n]`.
    """
    ids = np.asarray(ids)
    before_eos = np.cumsum(ids == EOS_ID, axis=-1) == 0
    return before_eos & (ids != PAD_ID) & (ids != BOS_ID)


def trim_special_tokens(
    attention: np.ndarray, source_ids: np.ndarray, target_ids: np.ndarray
) -> np.ndarray:
    """Keeps the rows and columns of real tokens of one sentence's map.

    Row t of the map is the step that emits `target_ids[t]` (teacher forcing:
    targets `[y_1..y_n, eos]`); column j reads `source_ids[j]`. The eos row,
    the eos column and padding are dropped, so the indices of the result
    count the tokenizer's tokens without bos/eos.

    Args:
      attention: `[t, s]`.
      source_ids: int `[s]`.
      target_ids: int `[t]`.

    Returns:
      `[n, m]`: n real target tokens, m real source tokens.

    Raises:
      ValueError: naming the shapes if they disagree.
    """
    attention = np.asarray(attention)
    source_ids, target_ids = np.asarray(source_ids), np.asarray(target_ids)
    if attention.ndim != 2 or attention.shape != (target_ids.shape[0], source_ids.shape[0]):
        raise ValueError(
            f"attention {attention.shape} must be [t, s] = [len(target_ids), len(source_ids)] "
            f"= {(target_ids.shape[0], source_ids.shape[0])}"
        )
    if source_ids.ndim != 1 or target_ids.ndim != 1:
        raise ValueError(
            f"source_ids {source_ids.shape} and target_ids {target_ids.shape} must be 1-D"
        )
    return attention[real_token_mask(target_ids)][:, real_token_mask(source_ids)]


def check_batch(
    attention: np.ndarray, source_mask: np.ndarray, target_mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validates a batch of maps and their masks.

    Args:
      attention: `[b, t, s]`.
      source_mask: bool `[b, s]`, True at real source tokens.
      target_mask: bool `[b, t]`, True at the target tokens to align.

    Returns:
      (attention as float64, source_mask as bool, target_mask as bool).

    Raises:
      ValueError: naming the shapes when they disagree (nothing is truncated).
    """
    attention = np.asarray(attention, dtype=np.float64)
    source_mask = np.asarray(source_mask).astype(bool)
    target_mask = np.asarray(target_mask).astype(bool)
    if attention.ndim != 3:
        raise ValueError(f"attention must be [b, t, s], got shape {attention.shape}")
    batch, length, source_length = attention.shape
    if source_mask.shape != (batch, source_length) or target_mask.shape != (batch, length):
        raise ValueError(
            f"attention {attention.shape} = [b, t, s] needs source_mask [b, s] = "
            f"{(batch, source_length)} and target_mask [b, t] = {(batch, length)}; got "
            f"source_mask {source_mask.shape} and target_mask {target_mask.shape}"
        )
    return attention, source_mask, target_mask


# --------------------------------------------------------------------------
# Hard and soft alignments.
# --------------------------------------------------------------------------


def argmax_positions(
    attention: np.ndarray, source_mask: np.ndarray, target_mask: np.ndarray
) -> np.ndarray:
    """The most attended real source position of every target token.

    Args:
      attention: `[b, t, s]`.
      source_mask: bool `[b, s]`.
      target_mask: bool `[b, t]`.

    Returns:
      int `[b, t]`: the argmax over real source positions (the first on a
      tie), -1 where `target_mask` is False.

    Raises:
      ValueError: on shape mismatch, or if an example with a real target
        token has no real source token.
    """
    attention, source_mask, target_mask = check_batch(attention, source_mask, target_mask)
    empty = target_mask.any(axis=1) & ~source_mask.any(axis=1)
    if np.any(empty):
        raise ValueError(f"examples {np.flatnonzero(empty).tolist()} have no real source token")
    scores = np.where(source_mask[:, None, :], attention, -np.inf)
    return np.where(target_mask, np.argmax(scores, axis=-1), -1)


def argmax_links(
    attention: np.ndarray, source_mask: np.ndarray, target_mask: np.ndarray
) -> list[set[Link]]:
    """Hard alignment: each real target token linked to its most attended source token.

    Args:
      attention: `[b, t, s]`.
      source_mask: bool `[b, s]`.
      target_mask: bool `[b, t]`.

    Returns:
      For each example, the set of (source, target) links, one per real target token.
    """
    positions = argmax_positions(attention, source_mask, target_mask)
    return [
        {(int(source), int(target)) for target, source in enumerate(row) if source >= 0}
        for row in positions
    ]


def threshold_links(
    attention: np.ndarray, threshold: float, source_mask: np.ndarray, target_mask: np.ndarray
) -> list[set[Link]]:
    """Hard alignment: every (source, target) link with weight >= `threshold`.

    A target token may get several links or none.

    Args:
      attention: `[b, t, s]`.
      threshold: the smallest weight that makes a link.
      source_mask: bool `[b, s]`.
      target_mask: bool `[b, t]`.

    Returns:
      For each example, the set of (source, target) links between real tokens.
    """
    attention, source_mask, target_mask = check_batch(attention, source_mask, target_mask)
    keep = (attention >= threshold) & source_mask[:, None, :] & target_mask[:, :, None]
    return [
        {(int(source), int(target)) for target, source in zip(*np.nonzero(row), strict=True)}
        for row in keep
    ]


def soft_alignment(
    attention: np.ndarray, source_mask: np.ndarray, target_mask: np.ndarray
) -> np.ndarray:
    """Soft alignment: the weights themselves, zero outside real (target, source) pairs.

    Returns:
      float64 `[b, t, s]`.
    """
    attention, source_mask, target_mask = check_batch(attention, source_mask, target_mask)
    return attention * (source_mask[:, None, :] & target_mask[:, :, None])


# --------------------------------------------------------------------------
# Sub-words to words.
# --------------------------------------------------------------------------


def _word_matrix(word_ids: np.ndarray, name: str) -> np.ndarray:
    """Word ids `[n]` (-1 = no word) -> one-hot membership `[n, num_words]`."""
    word_ids = np.asarray(word_ids)
    if word_ids.ndim != 1 or not np.issubdtype(word_ids.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D int array, got {word_ids.dtype} {word_ids.shape}")
    if np.any(word_ids < -1):
        raise ValueError(f"{name} must be word indices >= 0 or -1 (no word): {word_ids.tolist()}")
    num_words = int(word_ids.max()) + 1 if word_ids.size else 0
    membership = word_ids[:, None] == np.arange(num_words)[None, :]
    missing = np.flatnonzero(~membership.any(axis=0))
    if missing.size:
        raise ValueError(f"{name}: words {missing.tolist()} have no token: {word_ids.tolist()}")
    return membership.astype(np.float64)


def merge_subwords(
    attention: np.ndarray, source_words: np.ndarray, target_words: np.ndarray
) -> np.ndarray:
    """Merges a sub-word map of one sentence into a word map.

    The weight of target word T on source word S is the SUM over S's pieces
    (the probability mass the decoder put on the word) averaged (MEAN) over
    T's pieces (each piece is one decoding step; the word's attention is their
    typical one). So a row that sums to 1 over the pieces still sums to 1
    over the words.

    Args:
      attention: `[t, s]`, one sentence.
      source_words: int `[s]`, the word index of each source piece, 0-based,
        -1 for tokens of no word (eos, padding); every word index from 0 to
        the largest must occur.
      target_words: int `[t]`, likewise for target pieces.

    Returns:
      `[T_words, S_words]`.

    Raises:
      ValueError: naming the shapes if they disagree, or a word without pieces.
    """
    attention = np.asarray(attention, dtype=np.float64)
    source_words, target_words = np.asarray(source_words), np.asarray(target_words)
    if attention.ndim != 2 or attention.shape != (target_words.shape[0], source_words.shape[0]):
        raise ValueError(
            f"attention {attention.shape} must be [t, s] = [len(target_words), "
            f"len(source_words)] = {(target_words.shape[0], source_words.shape[0])}"
        )
    source = _word_matrix(source_words, "source_words")  # [s, S]
    target = _word_matrix(target_words, "target_words")  # [t, T]
    summed = target.T @ attention @ source  # [T, S], summed over both
    return summed / target.sum(axis=0)[:, None]  # mean over target pieces


def word_argmax_links(
    attention: np.ndarray, source_words: np.ndarray, target_words: np.ndarray
) -> set[Link]:
    """Word-level hard alignment of one sentence: `merge_subwords`, then argmax per target word.

    Returns:
      The (source word, target word) links, one per target word.
    """
    merged = merge_subwords(attention, source_words, target_words)
    if merged.shape[1] == 0:
        return set()
    return {(int(source), target) for target, source in enumerate(np.argmax(merged, axis=1))}


def sentencepiece_word_ids(pieces: Sequence[str], marker: str = "\u2581") -> np.ndarray:
    """Word index of each SentencePiece piece: a new word starts at a piece beginning with '▁'.

    The first piece always starts word 0 (a sentence may begin without the
    marker). Specials ('<s>', '</s>', '<pad>') belong to no word (-1).

    Returns:
      int `[len(pieces)]`.
    """
    ids, word = [], -1
    for piece in pieces:
        if piece in ("<s>", "</s>", "<pad>"):
            ids.append(-1)
            continue
        if piece.startswith(marker) or word < 0:
            word += 1
        ids.append(word)
    return np.asarray(ids, dtype=np.int64)


# --------------------------------------------------------------------------
# Pharaoh format.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GoldAlignment:
    """A gold alignment of one sentence pair (Och and Ney 2003).

    Attributes:
      sure: S, the (source, target) links all annotators agree on, 0-based.
      possible: P, the links that are at least possible; always includes S.
    """

    sure: frozenset[Link]
    possible: frozenset[Link]

    def __post_init__(self):
        # Och and Ney's definitions need S ⊆ P; a sure link is also possible.
        object.__setattr__(self, "sure", frozenset(self.sure))
        object.__setattr__(self, "possible", frozenset(self.possible) | self.sure)


# 'i-j' sure, 'i?j' possible, 'i-j-S' sure, 'i-j-P' possible.
_PHARAOH_LINK = re.compile(r"^(\d+)(?:-(\d+)(?:-([SP]))?|\?(\d+))$")


def parse_pharaoh_line(line: str, *, index_base: int, where: str = "<line>") -> GoldAlignment:
    """Parses one line of a Pharaoh alignment file.

    Links are separated by whitespace; each is 'i-j' (sure), 'i?j'
    (possible), or 'i-j-S' / 'i-j-P' (sure / possible, the suffix style of
    some gold sets). i is the source index, j the target index.

    Args:
      line: the text of the line.
      index_base: 0 or 1, the index of the first token in the file.
      where: 'file:line' for error messages.

    Returns:
      The links converted to 0-based indices.

    Raises:
      ValueError: starting with `where`, for a malformed link, or an index 0
        in a file declared 1-based (then the file looks 0-based).
    """
    _check_index_base(index_base)
    sure, possible = set(), set()
    for token in line.split():
        match = _PHARAOH_LINK.match(token)
        if match is None:
            raise ValueError(f"{where}: {token!r} is not i-j, i?j, i-j-S or i-j-P")
        source = int(match.group(1))
        target = int(match.group(2) if match.group(2) is not None else match.group(4))
        if index_base == 1 and (source == 0 or target == 0):
            raise ValueError(
                f"{where}: {token!r} has index 0 but the file was declared 1-based "
                "(index_base=1); the file looks 0-based"
            )
        link = (source - index_base, target - index_base)
        is_possible = match.group(4) is not None or match.group(3) == "P"
        (possible if is_possible else sure).add(link)
    return GoldAlignment(frozenset(sure), frozenset(possible))


def read_pharaoh(path: str | os.PathLike, *, index_base: int) -> list[GoldAlignment]:
    """Reads a Pharaoh alignment file, one sentence pair per line.

    See `parse_pharaoh_line` for the link syntax; an empty line is a pair
    without links.

    Args:
      path: the file.
      index_base: 0 or 1, REQUIRED: gold sets differ (fast_align writes
        0-based, many hand-aligned sets are 1-based), and a wrong guess
        shifts every link silently.

    Returns:
      One `GoldAlignment` per line, with 0-based indices.

    Raises:
      ValueError: 'path:line: ...' for a malformed link, or an index 0 in a
        file declared 1-based.
    """
    _check_index_base(index_base)
    with open(path, encoding="utf-8") as file:
        return [
            parse_pharaoh_line(line, index_base=index_base, where=f"{os.fspath(path)}:{number}")
            for number, line in enumerate(file, start=1)
        ]


def to_pharaoh(links: Iterable[Link], *, possible: Iterable[Link] = ()) -> str:
    """Writes links as one Pharaoh line: 'i-j i-j ...', 0-based, source first.

    Args:
      links: (source, target) pairs, written as sure links 'i-j'.
      possible: further (source, target) pairs written as possible links
        'i?j' (those already in `links` are written once, as sure).

    Returns:
      The line (no newline), links sorted by source then target.
    """
    sure = {_as_link(link) for link in links}
    maybe = {_as_link(link) for link in possible} - sure
    parts = [(link, "-") for link in sure] + [(link, "?") for link in maybe]
    return " ".join(f"{i}{sep}{j}" for (i, j), sep in sorted(parts))


def write_pharaoh(
    path: str | os.PathLike, alignments: Iterable[GoldAlignment | Iterable[Link]]
) -> None:
    """Writes one 0-based Pharaoh line per sentence pair (read it with `index_base=0`).

    Args:
      path: the file to write.
      alignments: per sentence pair, a `GoldAlignment` (sure as 'i-j',
        possible-only as 'i?j') or an iterable of (source, target) links.
    """
    lines = []
    for alignment in alignments:
        if isinstance(alignment, GoldAlignment):
            lines.append(to_pharaoh(alignment.sure, possible=alignment.possible))
        else:
            lines.append(to_pharaoh(alignment))
    with open(path, "w", encoding="utf-8") as file:
        file.write("".join(line + "\n" for line in lines))


def _as_link(link: Sequence[int]) -> Link:
    source, target = link
    if source < 0 or target < 0:
        raise ValueError(f"link {tuple(link)} has a negative index")
    return int(source), int(target)


def _check_index_base(index_base: int) -> None:
    if isinstance(index_base, bool) or index_base not in (0, 1):
        raise ValueError(f"index_base must be 0 or 1, got {index_base!r}")
