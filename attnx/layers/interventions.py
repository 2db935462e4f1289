"""Interventions on attention weights: edit, differentiate or record every attention map.

Every attnx layer that produces normalised attention weights hands them to
`apply(weights, mask, layer)` right after normalisation and before dropout:
the functional core's materialising path (`attnx.layers.attention`, hence
`MultiHeadAttention`), `AdditiveAttention`, `LuongAttention`,
`LocalAttention`, `MultiStepAttention` and `SpatialAttention`. With no edit
active, `apply` returns its argument untouched: it adds no operation to a
traced program, so outputs are bit-identical and jitted code pays nothing.

Inside `with attention_edit(edit):` every such site instead returns
`edit(weights, mask, site)`; what the edit returns is what the layer uses
for its context and hands back with `return_weights`. An edit sees the
canonical layout

  weights `[batch, heads, q_length, kv_length]`, mask broadcastable to it
  (True = may attend) or None (every key may be attended),

whatever the layer's own layout (layers without a heads or query axis get
size-1 axes for the call). `site` is a `Site`: `index` counts the sites in
the order they run inside the `with` block (0, 1, ...), `layer` names the
kind of layer. The order is deterministic for a given program, so a
per-site argument (e.g. one delta per site for `add_deltas`) lines up with
the sites of a `Recorder` run of the same program.

The edit is read when the program is traced (a `contextvars.ContextVar`),
so enter the `with` block inside the function you `jax.jit`, `jax.grad` or
`jax.vmap`: a function jitted and traced outside the block keeps the program
it was traced with. While an edit is active the functional core uses its
materialising 'reference' implementation whatever was asked: 'xla',
'cudnn', 'chunked' and 'splash' never form the weights, so they cannot be
edited.

A site inside `jax.lax.scan` (the RNN decoders and the captioner in teacher
forcing) is traced once for all steps: an edit that acts per call (uniform,
permutation) applies at every step, but a `Recorder` or a delta cannot tell
the steps apart, and recorded values cannot leave the scan. Run such models
step by step through `init_cache` / `decode_step` to see one site per step
(`attnx.interpret.attribution.attention_relevance` scans over decode steps
with each step's deltas as the scan's inputs and its maps as its outputs).

Edits provided:
  `uniform`: every valid key gets 1 / (number of valid keys), the baseline of
    Jain & Wallace (2019) and Wiegreffe & Pinter (2019).
  `permute(key)`: the weights of each query row shuffled among its valid keys
    (Jain & Wallace 2019, sec. 4.2).
  `add_deltas(deltas)`: weights + deltas[site.index]; with zero deltas the
    program computes the same values, and `jax.grad` with respect to the
    deltas is the gradient with respect to the attention weights (Chefer et
    al. 2021 weigh the maps by it).
  `Recorder`: keeps every site's weights and mask and changes nothing.
  `chain(*edits)`: applies edits in order at every site.
"""

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Site:
    """One call of an attention layer inside an `attention_edit` block.

    Attributes:
      index: the call's position among the sites of the block, from 0.
      layer: the kind of layer: 'attention' (the functional core, e.g. inside
        `MultiHeadAttention`), 'additive', 'luong', 'local', 'multi_step' or 'spatial'.
    """

    index: int
    layer: str


# (weights [b, h, q, k], mask broadcastable or None, site) -> new weights, same shape.
Edit = Callable[[Array, Array | None, Site], Array]


@dataclasses.dataclass
class _Active:
    edit: Edit
    calls: int = 0


_ACTIVE: ContextVar[_Active | None] = ContextVar("attnx_attention_edit", default=None)


def active() -> bool:
    """Whether an `attention_edit` block is open (read at trace time)."""
    return _ACTIVE.get() is not None


@contextlib.contextmanager
def attention_edit(edit: Edit) -> Iterator[None]:
    """Every attention site traced inside the block returns `edit(weights, mask, site)`.

    Blocks nest: the innermost edit replaces the outer one until it exits,
    and site indices restart from 0 in every block.
    """
    token = _ACTIVE.set(_Active(edit))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def apply(
    weights: Array,
    mask: Array | None,
    layer: str,
    *,
    missing_axes: tuple[int, ...] = (),
) -> Array:
    """The hook every attention layer calls right after normalising its weights.

    Args:
      weights: the normalised weights, in the canonical `[batch, heads,
        q_length, kv_length]` layout or that layout without `missing_axes`.
      mask: True = may attend, broadcastable to `weights` (same rank), or None.
      layer: the layer's kind (`Site.layer`).
      missing_axes: axes of the canonical layout that `weights` and `mask`
        lack, e.g. `(1,)` for `[batch, q, kv]` or `(1, 2)` for `[batch, kv]`.

    Returns:
      `weights` itself when no edit is active, else the edit's result in
      `weights`' own layout and dtype.
    """
    state = _ACTIVE.get()
    if state is None:
        return weights
    site = Site(state.calls, layer)
    state.calls += 1
    canonical = jnp.expand_dims(weights, missing_axes) if missing_axes else weights
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        if missing_axes:
            mask = jnp.expand_dims(mask, missing_axes)
    edited = state.edit(canonical, mask, site)
    if edited.shape != canonical.shape:
        raise ValueError(
            f"attention_edit: the edit returned shape {edited.shape} at site {site.index} "
            f"({site.layer}); the weights are {canonical.shape}"
        )
    if missing_axes:
        edited = jnp.squeeze(edited, missing_axes)
    return edited.astype(weights.dtype)


def _valid(weights: Array, mask: Array | None) -> Array:
    """The mask broadcast to the weights' shape (all True without one)."""
    if mask is None:
        return jnp.ones(weights.shape, bool)
    return jnp.broadcast_to(mask, weights.shape)


def uniform(weights: Array, mask: Array | None, site: Site) -> Array:
    """1 / n on each of a query row's n valid keys, 0 elsewhere (a row with none stays 0).

    The context becomes the plain average of the valid values: the baseline
    against which Jain & Wallace (2019) and Wiegreffe & Pinter (2019) test
    whether the learned weights matter.
    """
    del site
    valid = _valid(weights, mask)
    count = jnp.sum(valid, axis=-1, keepdims=True)
    return jnp.where(valid, 1.0 / jnp.maximum(count, 1), 0.0).astype(weights.dtype)


def permute(key: Array) -> Edit:
    """Shuffles each query row's weights among its valid keys (Jain & Wallace 2019).

    Every row (batch, head, query) gets its own uniformly random permutation
    of its valid positions, drawn from `jax.random.fold_in(key, site.index)`;
    masked positions keep weight 0, so each row keeps its multiset of weights.
    """

    def edit(weights: Array, mask: Array | None, site: Site) -> Array:
        valid = _valid(weights, mask)
        noise = jax.random.uniform(jax.random.fold_in(key, site.index), weights.shape)
        positions = jnp.arange(weights.shape[-1])
        # Both orders list the valid positions first (one by index, one at
        # random), then the masked ones: pairing them maps valid to valid.
        by_index = jnp.argsort(jnp.where(valid, positions, weights.shape[-1] + positions), axis=-1)
        at_random = jnp.argsort(jnp.where(valid, noise, 2.0 + noise), axis=-1)
        sources = jnp.take_along_axis(weights, by_index, axis=-1)
        # Position at_random[i] receives sources[i]: gather with the inverse permutation.
        return jnp.take_along_axis(sources, jnp.argsort(at_random, axis=-1), axis=-1)

    return edit


def add_deltas(deltas: Sequence[Array]) -> Edit:
    """weights + deltas[site.index], each delta broadcastable to its site's canonical weights.

    With zero deltas nothing changes numerically, and `jax.grad` of any
    output with respect to `deltas[i]` is its gradient with respect to the
    weights of site i.
    """

    def edit(weights: Array, mask: Array | None, site: Site) -> Array:
        del mask
        if site.index >= len(deltas):
            raise ValueError(
                f"add_deltas: site {site.index} ({site.layer}) has no delta; "
                f"{len(deltas)} were given (record the program first to count its sites)"
            )
        return weights + deltas[site.index]

    return edit


@dataclasses.dataclass(frozen=True)
class SiteRecord:
    """What a `Recorder` keeps of one site: canonical weights `[b, h, q, k]` and mask."""

    site: Site
    weights: Array
    mask: Array | None


class Recorder:
    """An edit that changes nothing and keeps every site's weights, in site order.

    Return `recorder.weights` (or the records) from the traced function to
    get them out of `jit`, `grad` (as an auxiliary output) or `eval_shape`.
    """

    def __init__(self) -> None:
        self.records: list[SiteRecord] = []

    def __call__(self, weights: Array, mask: Array | None, site: Site) -> Array:
        self.records.append(SiteRecord(site, weights, mask))
        return weights

    @property
    def weights(self) -> list[Array]:
        return [record.weights for record in self.records]


def chain(*edits: Edit) -> Edit:
    """One edit applying `edits` in order at every site (e.g. a delta, then a `Recorder`)."""

    def edit(weights: Array, mask: Array | None, site: Site) -> Array:
        for each in edits:
            weights = each(weights, mask, site)
        return weights

    return edit
