"""Checkpoint averaging: the float32 mean of parameter trees, with one-line errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from attnx.training.checkpoint_averaging import average_checkpoints


def test_average_checkpoints_is_the_float32_mean():
    rng = np.random.default_rng(1)
    trees = [
        {
            "w": jnp.asarray(rng.normal(size=(2, 3)), jnp.bfloat16 if i == 0 else jnp.float32),
            "count": jnp.asarray(i, jnp.int32),
        }
        for i in range(3)
    ]
    averaged = average_checkpoints(trees)
    expected = np.mean([np.asarray(t["w"], np.float64) for t in trees], axis=0)
    assert averaged["w"].dtype == jnp.float32
    np.testing.assert_allclose(averaged["w"], expected, rtol=1e-6)
    assert int(averaged["count"]) == 2  # non-floating leaves come from the last tree
    with pytest.raises(ValueError, match="at least one"):
        average_checkpoints([])
    with pytest.raises(ValueError, match=r"\['w'\] has shape \(3,\) in tree 1"):
        average_checkpoints([{"w": jnp.zeros(2)}, {"w": jnp.zeros(3)}])
    with pytest.raises(ValueError, match="structure"):
        average_checkpoints([{"w": jnp.zeros(2)}, {"v": jnp.zeros(2)}])
