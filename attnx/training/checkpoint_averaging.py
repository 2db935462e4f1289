"""Checkpoint averaging: the mean of the parameters of the last N checkpoints.

Vaswani et al. 2017, sec. 6.1: the base models are evaluated with the average
of the last 5 checkpoints, the big models with the last 20. The training loop
(`attnx.training.train`) evaluates that average at the end of a run when
`config.checkpoint.average_last` > 1.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp


def average_checkpoints(param_trees: Sequence[Any]) -> Any:
    """The float32 mean of several parameter trees (e.g. the last N checkpoints).

    Floating leaves are averaged in float32; other leaves (integer counters,
    PRNG keys) are taken from the last tree. All trees must have the same
    structure and shapes.
    """
    trees = list(param_trees)
    if not trees:
        raise ValueError("average_checkpoints needs at least one parameter tree.")
    structure = jax.tree.structure(trees[0])
    for i, tree in enumerate(trees[1:], start=1):
        if jax.tree.structure(tree) != structure:
            raise ValueError(f"average_checkpoints: tree {i} differs in structure from tree 0.")
        for (path, a), b in zip(
            jax.tree_util.tree_leaves_with_path(trees[0]), jax.tree.leaves(tree), strict=True
        ):
            if jnp.shape(a) != jnp.shape(b):
                raise ValueError(
                    f"average_checkpoints: {jax.tree_util.keystr(path)} has shape "
                    f"{jnp.shape(b)} in tree {i} but {jnp.shape(a)} in tree 0."
                )

    def mean(*leaves):
        if not jnp.issubdtype(jnp.result_type(leaves[-1]), jnp.floating):
            return leaves[-1]
        total = jnp.asarray(leaves[0], jnp.float32)
        for leaf in leaves[1:]:
            total = total + jnp.asarray(leaf, jnp.float32)
        return total / len(leaves)

    return jax.tree.map(mean, *trees)
