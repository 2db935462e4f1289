"""The alignment lines that decoding prints and writes, hard or soft.

`--mode=decode --config.decode.print_alignment=hard|soft` (standard output,
`A-i` lines, and `WORKDIR/decode/alignments_step_N.{pharaoh,soft}` for the
evaluation split) and `--mode=interpret` (`alignments.pharaoh`) read the
same thing: the cross-attention that beam search carried for a hypothesis
(`DecodeResult.alignments`), cut to the real tokens. Indices count the
tokenizer's tokens without bos and eos, 0-based: for the character tokenizer
they are character positions of the text; for a captioner, grid cells in
row-major order. Rows are the hypothesis's tokens before its eos.

  hard   Pharaoh, source first: 'i-j i-j ...', each target token j linked to
         its most attended real source token i (fairseq's
         `--print-alignment=hard`, with the eos row and column left out).
  soft   one group per target token, space-separated, each the weights over
         the real source tokens joined by commas ('0.010,0.973,... ...'),
         as fairseq's `--print-alignment=soft`. The weights of a row sum to
         less than 1 by the mass the model gave to eos.
"""

from __future__ import annotations

import numpy as np

from attnx.interpret import alignments

KINDS = ("hard", "soft")
# Decimals of a soft weight: enough to tell 0.999 from 1, short enough to read.
SOFT_DECIMALS = 4


def check_kind(kind: str | None, *, key: str = "config.decode.print_alignment") -> None:
    """Raises ValueError naming `key` unless `kind` is None, 'hard' or 'soft'."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"{key}={kind!r}; choose 'hard' or 'soft' (or leave it unset)")


def real_masks(
    sequences: np.ndarray, sources: np.ndarray | None, source_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """The masks of the real tokens of decoded hypotheses and their sources.

    Args:
      sequences: int `[b, t]`, decoded token ids (no bos; eos then padding, or
        whatever follows eos, is not real).
      sources: int `[b, s]` source ids, or None for an image source (every
        one of the `source_length` grid cells is real).
      source_length: s, the width of the attention maps.

    Returns:
      (target_mask `[b, t]`, source_mask `[b, s]`), bool.
    """
    target_mask = alignments.real_token_mask(sequences)
    if sources is None:
        source_mask = np.ones((target_mask.shape[0], source_length), bool)
    else:
        source_mask = alignments.real_token_mask(sources)
    return target_mask, source_mask


def lines(
    kind: str,
    attention: np.ndarray,
    sequences: np.ndarray,
    sources: np.ndarray | None,
) -> list[str]:
    """One alignment line per hypothesis of a batch.

    Args:
      kind: 'hard' or 'soft'.
      attention: `[b, t, s]`, the hypotheses' cross-attention (row t emits
        `sequences[:, t]`).
      sequences: int `[b, t]`.
      sources: int `[b, s]`, or None for image sources.

    Returns:
      b lines without newlines ('' for a hypothesis with no real token).
    """
    check_kind(kind, key="kind")
    attention = np.asarray(attention)
    target_mask, source_mask = real_masks(sequences, sources, attention.shape[-1])
    if kind == "hard":
        return [
            alignments.to_pharaoh(links)
            for links in alignments.argmax_links(attention, source_mask, target_mask)
        ]
    return [
        format_soft(attention[row][target_mask[row]][:, source_mask[row]])
        for row in range(attention.shape[0])
    ]


def format_soft(weights: np.ndarray) -> str:
    """`[n, m]` weights -> 'w,w,...,w w,w,...,w' (n groups of m weights)."""
    return " ".join(
        ",".join(f"{w:.{SOFT_DECIMALS}f}" for w in row) for row in np.asarray(weights, np.float64)
    )


def parse_soft(line: str) -> np.ndarray:
    """The inverse of `format_soft`: `[n, m]` float64 ([0, 0] for an empty line).

    Raises:
      ValueError: groups of different lengths or a field that is not a number.
    """
    groups = [group.split(",") for group in line.split()]
    if not groups:
        return np.zeros((0, 0))
    if len({len(group) for group in groups}) != 1:
        raise ValueError(f"soft alignment line has groups of different lengths: {line[:80]!r}")
    return np.array([[float(w) for w in group] for group in groups])
