"""The checks every attnx model repeats, in one place.

Token arrays (what `encode`, `decode` and `decode_step` take) and the ranges
of config fields and method arguments. Every failure is a ValueError that
starts with its owner (`'Transformer.decode'`, `'RNNConfig'`) and names the
argument or field, with the value it got:

    TransformerConfig: d_model must be >= 1, got 0
    RNNEncoderDecoder.decode_step: tokens must be integers [batch=3, 1], got int32[2, 1]
"""

import jax
import jax.numpy as jnp

Array = jax.Array


def check_tokens(
    owner: str,
    tokens: Array,
    *,
    batch: int | None = None,
    length: int | None = None,
    name: str = "tokens",
) -> Array:
    """`tokens` as an integer array `[batch, length]`; ValueError naming `owner` and `name`.

    Args:
      owner: who checks, e.g. 'Transformer.decode' (the message's prefix).
      tokens: anything `jnp.asarray` takes.
      batch: the batch size the tokens must have (e.g. the encoded batch); None = any.
      length: the length they must have (1 in `decode_step`); None = any.
      name: the argument's name in the message.
    """
    tokens = jnp.asarray(tokens)
    if (
        tokens.ndim != 2
        or not jnp.issubdtype(tokens.dtype, jnp.integer)
        or (batch is not None and tokens.shape[0] != batch)
        or (length is not None and tokens.shape[1] != length)
    ):
        want_batch = "batch" if batch is None else f"batch={batch}"
        want_length = "length" if length is None else str(length)
        raise ValueError(
            f"{owner}: {name} must be integers [{want_batch}, {want_length}], got "
            f"{tokens.dtype}{list(tokens.shape)}"
        )
    return tokens


def check_at_least(owner: str, /, *, minimum: int = 1, **values: int) -> None:
    """Every `name=value` is >= `minimum` (1 unless given); ValueError naming the first that is not.

    e.g. `check_at_least('RNNConfig', embed_dim=cfg.embed_dim, hidden_dim=cfg.hidden_dim)`.
    """
    for name, value in values.items():
        if value < minimum:
            raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}")


def check_none_or_at_least(owner: str, /, **values: int | None) -> None:
    """Every `name=value` is None or >= 1; ValueError naming the first that is not."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{owner}: {name} must be None or >= 1, got {value}")


def check_rate(owner: str, /, **values: float) -> None:
    """Every `name=value` (a dropout rate, label smoothing) is in [0, 1); ValueError naming it."""
    for name, value in values.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{owner}: {name} must be in [0, 1), got {value}")


def check_probability(owner: str, /, **values: float) -> None:
    """Every `name=value` is a probability, in [0, 1]; ValueError naming the first that is not."""
    for name, value in values.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{owner}: {name} must be in [0, 1], got {value}")
