"""Which mesh axes split an activation axis, from the logical-axis rules in context.

Parameters are placed by the training code's rule table
(`attnx.training.sharding`); a layer that must say how one of its
activations is laid out (a kernel under `shard_map`, or a constraint that
keeps XLA's partitioner on a layout it compiles correctly) asks here, with
the same logical names ('batch', 'heads', ...) and the same rules, which
`attnx.training.sharding.activate` puts in context while steps are traced.
Outside a mesh everything here is the identity.
"""

import math

import jax
from flax.core import spmd

Array = jax.Array
P = jax.sharding.PartitionSpec


def mesh_axes(mesh, logical: str, size: int) -> tuple[str, ...] | None:
    """The mesh axes that split an axis of `size` named `logical`, or None.

    From the logical-axis rules in context; without rules, 'batch' takes every
    mesh axis and the rest none. Axes of size 1 are dropped; if the others do
    not divide `size`, the axis stays whole (as in attnx's sharding rules).
    """
    rules = dict(spmd.get_logical_axis_rules() or ())
    if rules:
        axes = rules.get(logical)
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    else:
        axes = tuple(mesh.axis_names) if logical == "batch" else ()
    axes = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or size % math.prod(mesh.shape[a] for a in axes):
        return None
    return axes


def split_over_batch_only(x: Array) -> Array:
    """`x` `[batch, ...]` constrained to rows split over the 'batch' mesh axes, the rest whole.

    The identity outside a mesh (`jax.set_mesh`) or when no mesh axis splits the batch.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = mesh_axes(mesh, "batch", x.shape[0])
    if axes is None:
        return x
    return jax.lax.with_sharding_constraint(x, P(axes))
