"""Schedules and optimizers of the papers' recipes, against NumPy written from the papers."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from attnx.training import optimizers


def train_config(**fields) -> ml_collections.ConfigDict:
    base = {"steps": 100, "learning_rate": 0.1, "optimizer": "sgd", "schedule": "constant"}
    return ml_collections.ConfigDict({**base, **fields})


def run_updates(tx, params, grads_list):
    """Applies the gradients in turn; returns the list of updates (NumPy)."""
    state = tx.init(params)
    updates_seen = []
    for grads in grads_list:
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        updates_seen.append(jax.tree.map(np.asarray, updates))
    return updates_seen, state


GRADS = [
    {"w": np.array([[0.3, -0.2], [0.05, 0.4]], np.float32), "b": np.array([0.1, -0.6], np.float32)},
    {"w": np.array([[-0.1, 0.5], [0.2, 0.0]], np.float32), "b": np.array([0.3, 0.2], np.float32)},
    {"w": np.array([[0.7, 0.1], [-0.3, 0.2]], np.float32), "b": np.array([-0.2, 0.1], np.float32)},
]
PARAMS = {"w": jnp.ones((2, 2), jnp.float32), "b": jnp.zeros((2,), jnp.float32)}


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(tree["b"]), np.ravel(tree["w"])]).astype(np.float64)


def test_rsqrt_schedule_is_the_papers_formula():
    config = train_config(**optimizers.RECIPES["transformer"])
    _, schedule = optimizers.make_optimizer(config, model_dim=512)
    for step in (1, 10, 3999, 4000, 4001, 100_000):
        expected = 512**-0.5 * min(step**-0.5, step * 4000**-1.5)
        # the schedule takes optax's 0-based count of the update.
        np.testing.assert_allclose(float(schedule(step - 1)), expected, rtol=1e-6)
    config.rsqrt_scale = 0.25  # an explicit scale wins over model_dim
    _, schedule = optimizers.make_optimizer(config, model_dim=512)
    np.testing.assert_allclose(float(schedule(99)), 0.25 * 100 * 4000**-1.5, rtol=1e-6)


def test_cosine_and_constant_schedules():
    _, cosine = optimizers.make_optimizer(
        train_config(schedule="cosine", learning_rate=2.0, warmup_steps=10, steps=110)
    )
    for step, expected in [(5, 1.0), (10, 2.0), (60, 1.0), (110, 0.0), (200, 0.0)]:
        np.testing.assert_allclose(float(cosine(step - 1)), expected, atol=1e-6)
    step = 35
    np.testing.assert_allclose(
        float(cosine(step - 1)), 2.0 * 0.5 * (1 + math.cos(math.pi * 25 / 100)), rtol=1e-6
    )
    _, constant = optimizers.make_optimizer(train_config(learning_rate=0.5, warmup_steps=4))
    assert [float(constant(c)) for c in range(6)] == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]


def numpy_adam(grads_list, lr_fn, b1, b2, eps):
    m = v = 0.0
    out = []
    for t, g in enumerate(grads_list, start=1):
        g = flat(g)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        out.append(-lr_fn(t) * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps))
    return out


def test_transformer_recipe_is_adam_098_with_rsqrt_warmup():
    config = train_config(**{**optimizers.RECIPES["transformer"], "warmup_steps": 2})
    tx, _ = optimizers.make_optimizer(config, model_dim=16)
    updates, _ = run_updates(tx, PARAMS, GRADS)
    expected = numpy_adam(
        GRADS, lambda s: 16**-0.5 * min(s**-0.5, s * 2**-1.5), b1=0.9, b2=0.98, eps=1e-9
    )
    for got, want in zip(updates, expected, strict=True):
        np.testing.assert_allclose(flat(got), want, rtol=1e-5)


def test_convs2s_recipe_is_nesterov_099_with_renormalised_gradients():
    tx, _ = optimizers.make_optimizer(train_config(**optimizers.RECIPES["convs2s"]))
    updates, _ = run_updates(tx, PARAMS, GRADS)
    velocity = 0.0
    for got, grads in zip(updates, GRADS, strict=True):
        g = flat(grads)
        g = g * min(1.0, 0.1 / np.linalg.norm(g))  # renormalise to norm 0.1
        velocity = 0.99 * velocity + g
        np.testing.assert_allclose(flat(got), -0.25 * (g + 0.99 * velocity), rtol=1e-5)


def test_rnnsearch_recipe_is_adadelta_with_clipping():
    tx, _ = optimizers.make_optimizer(train_config(**optimizers.RECIPES["rnnsearch"]))
    big = [jax.tree.map(lambda g: 5.0 * g, grads) for grads in GRADS]
    updates, _ = run_updates(tx, PARAMS, big)
    rho, eps = 0.95, 1e-6
    mean_sq_grad = mean_sq_update = 0.0
    for got, grads in zip(updates, big, strict=True):
        g = flat(grads)
        g = g * min(1.0, 1.0 / np.linalg.norm(g))
        mean_sq_grad = rho * mean_sq_grad + (1 - rho) * g * g
        delta = -np.sqrt(mean_sq_update + eps) / np.sqrt(mean_sq_grad + eps) * g
        mean_sq_update = rho * mean_sq_update + (1 - rho) * delta * delta
        np.testing.assert_allclose(flat(got), delta, rtol=1e-5)


def test_clipping_by_global_norm_and_off():
    grads = {"w": np.full((2, 2), 3.0, np.float32), "b": np.array([4.0, 0.0], np.float32)}
    norm = math.sqrt(4 * 9 + 16)
    for clip, scale in [(1.0, 1.0 / norm), (0.0, 1.0), (100.0, 1.0)]:
        tx, _ = optimizers.make_optimizer(
            train_config(learning_rate=1.0, momentum=0.0, clip_grad_norm=clip)
        )
        (updates,), _ = run_updates(tx, PARAMS, [grads])
        np.testing.assert_allclose(flat(updates), -scale * flat(grads), rtol=1e-6)


def test_adamw_decays_matrices_only():
    tx, _ = optimizers.make_optimizer(
        train_config(optimizer="adamw", learning_rate=0.5, weight_decay=0.1)
    )
    zero = jax.tree.map(np.zeros_like, GRADS[0])
    params = {"w": jnp.full((2, 2), 2.0), "b": jnp.full((2,), 2.0)}
    (updates,), _ = run_updates(tx, params, [zero])
    np.testing.assert_allclose(updates["w"], -0.5 * 0.1 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(updates["b"], 0.0)


def test_plateau_scheduler_decays_after_patience_and_round_trips():
    scheduler = optimizers.PlateauScheduler(factor=0.1, patience=1, mode="min")
    scales = [scheduler.update(m) for m in [5.0, 4.0, 4.5, 4.2, 3.0, 3.0, float("nan"), 2.0]]
    # 4.5: 1 bad (<= patience); 4.2: 2 bad -> decay; 3.0 improves; 3.0, nan: 2 bad -> decay.
    np.testing.assert_allclose(scales, [1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01])
    restored = optimizers.PlateauScheduler(0.1, 1)
    restored.load_state_dict(scheduler.state_dict())
    assert restored.state_dict() == {"scale": scales[-1], "best": 2.0, "bad_evals": 0}
    assert restored.update(2.5) == pytest.approx(0.01) and restored.update(2.5) == pytest.approx(
        1e-3
    )

    eager = optimizers.PlateauScheduler.from_config(train_config(plateau_factor=0.5))
    assert [eager.update(m) for m in [1.0, 1.0, 0.5, 0.7]] == [1.0, 0.5, 0.5, 0.25]
    higher = optimizers.PlateauScheduler(0.5, 0, mode="max")
    assert [higher.update(m) for m in [1.0, 2.0, 1.5]] == [1.0, 1.0, 0.5]


def test_plateau_scale_lives_in_the_optimizer_state():
    tx, schedule = optimizers.make_optimizer(
        train_config(optimizer="sgd", momentum=0.0, learning_rate=0.25, schedule="plateau")
    )
    state = tx.init(PARAMS)
    assert optimizers.get_lr_scale(state) == 1.0
    state = optimizers.set_lr_scale(state, 0.1)
    assert optimizers.get_lr_scale(state) == pytest.approx(0.1)
    updates, state = jax.jit(tx.update)(GRADS[0], state, PARAMS)
    np.testing.assert_allclose(flat(updates), -0.25 * 0.1 * flat(GRADS[0]), rtol=1e-6)
    assert float(schedule(0)) == 0.25

    plain_tx, _ = optimizers.make_optimizer(train_config())
    plain_state = plain_tx.init(PARAMS)
    assert optimizers.get_lr_scale(plain_state) == 1.0
    with pytest.raises(ValueError, match="schedule='plateau'"):
        optimizers.set_lr_scale(plain_state, 0.5)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"optimizer": "lamb"}, r"config.train.optimizer='lamb'"),
        ({"schedule": "step"}, r"config.train.schedule='step'"),
        ({"learning_rate": -1.0}, r"config.train.learning_rate"),
        ({"schedule": "rsqrt", "warmup_steps": 10}, r"model_dim=.*config.train.rsqrt_scale"),
        ({"schedule": "rsqrt", "warmup_steps": 0, "rsqrt_scale": 1.0}, r"warmup_steps"),
        ({"schedule": "cosine", "warmup_steps": 100, "steps": 100}, r"config.train.steps"),
        ({"weight_decay": 0.1}, r"config.train.weight_decay=0.1 applies only"),
        ({"clip_grad_norm": -1.0}, r"config.train.clip_grad_norm"),
        ({"optimizer": "nesterov", "momentum": 0.0}, r"config.train.momentum"),
        ({"optimizer": "adam", "b2": 1.0}, r"config.train.b2"),
        ({"optimizer": "adadelta", "rho": 1.5}, r"config.train.rho"),
    ],
)
def test_bad_config_values_name_the_key(fields, match):
    with pytest.raises(ValueError, match=match):
        optimizers.make_optimizer(train_config(**fields))


def test_missing_required_key_is_named():
    with pytest.raises(ValueError, match="config.train.optimizer is required"):
        optimizers.make_optimizer(ml_collections.ConfigDict({"learning_rate": 1.0}))


def test_optimizer_rejects_low_precision_params():
    tx, _ = optimizers.make_optimizer(train_config())
    with pytest.raises(ValueError, match=r"\['w'\] has dtype bfloat16"):
        tx.init({"w": jnp.ones((2,), jnp.bfloat16)})
