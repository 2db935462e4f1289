"""Optimizers and learning-rate schedules of the papers' recipes.

`make_optimizer(config.train)` builds one optax chain from the config fields

  optimizer       'adam' | 'adamw' | 'nesterov' | 'sgd' | 'adadelta'
  learning_rate   peak (or constant) learning rate; for 'rsqrt' a multiplier
  schedule        'rsqrt' | 'cosine' | 'constant' | 'plateau'
  warmup_steps    linear warm-up length (required > 0 for 'rsqrt')
  steps           total optimizer steps (the end of the cosine)
  b1, b2, eps     Adam moments and epsilon (eps is also Adadelta's epsilon)
  rho             Adadelta's decay of its running averages
  momentum        Nesterov / SGD momentum
  weight_decay    decoupled weight decay (only with 'adamw')
  clip_grad_norm  clip the gradient to this global norm; 0 = off
  plateau_factor, plateau_patience   the 'plateau' decay (see PlateauScheduler)

Fields that are absent take the values in `DEFAULTS`. `RECIPES` holds the
three papers' settings, ready for `config.train.update(RECIPES['transformer'])`,
and the recipe the bundled CPU experiments share:

  transformer  Vaswani et al. 2017, sec. 5.3: Adam(0.9, 0.98, 1e-9) and
               lrate = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5).
  convs2s      Gehring et al. 2017, sec. 5.1: Nesterov momentum 0.99, lr 0.25,
               gradients renormalised to norm 0.1, lr divided by 10 whenever
               the validation perplexity stops improving.
  rnnsearch    Bahdanau et al. 2014, A.2.2: Adadelta (eps 1e-6, rho 0.95),
               gradients clipped to norm 1.
  transformer_cosine  the Transformer's Adam with a 200-step linear warm-up to
               3e-3 and a half cosine to 0 over `steps`: the inverse square
               root keeps the rate too high to settle in a few thousand steps.

Schedules are functions of the optimizer's update count `c` (0 for the first
update, as in optax); they evaluate the papers' formulas at the 1-based step
`s = c + 1`, so the first update is never taken with a zero learning rate.

Gradient accumulation is not an optimizer transformation (no
`optax.MultiSteps`): the train step does it (`attnx.training.steps`,
`accumulate_gradients`), so one call of the step stays one optimizer update
and `make_optimizer` does not read `grad_accum_steps`. Checkpoint averaging
is in `attnx.training.checkpoint_averaging`.

The optimizer always works on float32 parameters (`config.train.dtype` =
'bfloat16' changes only the models' compute dtype); `init` rejects other
floating parameter dtypes.
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

Schedule = Callable[[jax.Array | int], jax.Array]

OPTIMIZERS = ("adam", "adamw", "nesterov", "sgd", "adadelta")
SCHEDULES = ("rsqrt", "cosine", "constant", "plateau")

# Values of the config.train fields a config leaves out.
# fmt: off
DEFAULTS: dict[str, Any] = {
    "schedule": "constant", "warmup_steps": 0, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
    "rho": 0.95, "momentum": 0.9, "weight_decay": 0.0, "clip_grad_norm": 0.0,
    "plateau_factor": 0.1, "plateau_patience": 0, "rsqrt_scale": 0.0,
}

RECIPES: dict[str, dict[str, Any]] = {
    "transformer": {
        "optimizer": "adam", "b1": 0.9, "b2": 0.98, "eps": 1e-9, "learning_rate": 1.0,
        "schedule": "rsqrt", "warmup_steps": 4000, "clip_grad_norm": 0.0,
    },
    "convs2s": {
        "optimizer": "nesterov", "momentum": 0.99, "learning_rate": 0.25, "clip_grad_norm": 0.1,
        "schedule": "plateau", "plateau_factor": 0.1, "plateau_patience": 0, "warmup_steps": 0,
    },
    "rnnsearch": {
        "optimizer": "adadelta", "eps": 1e-6, "rho": 0.95, "learning_rate": 1.0,
        "schedule": "constant", "warmup_steps": 0, "clip_grad_norm": 1.0,
    },
}
RECIPES["transformer_cosine"] = {
    **RECIPES["transformer"], "schedule": "cosine", "learning_rate": 3e-3, "warmup_steps": 200,
}
# fmt: on


def _field(train_config: Mapping[str, Any], key: str) -> Any:
    """config.train.KEY, or its default; an error names the key if neither exists."""
    if key in train_config and train_config[key] is not None:
        return train_config[key]
    if key in DEFAULTS:
        return DEFAULTS[key]
    raise ValueError(f"config.train.{key} is required by make_optimizer but is not set.")


def _check(condition: bool, key: str, value: Any, requirement: str) -> None:
    if not condition:
        raise ValueError(f"config.train.{key}={value!r} is invalid: it must be {requirement}.")


# --------------------------------------------------------------------------- schedules


def _warmup_factor(step: jax.Array, warmup_steps: int) -> jax.Array:
    """min(1, s / warmup) for the 1-based step s; 1 when there is no warm-up."""
    if warmup_steps == 0:
        return jnp.ones_like(step)
    return jnp.minimum(1.0, step / warmup_steps)


def rsqrt_schedule(learning_rate: float, scale: float, warmup_steps: int) -> Schedule:
    """Vaswani et al. (2017) eq. 3, times `learning_rate`.

    lr(c) = learning_rate * scale * min(s^-0.5, s * warmup^-1.5), s = c + 1,
    with scale = d_model^-0.5 in the paper (learning_rate = 1).
    """

    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + 1.0
        return learning_rate * scale * jnp.minimum(step**-0.5, step * warmup_steps**-1.5)

    return schedule


def cosine_schedule(learning_rate: float, warmup_steps: int, total_steps: int) -> Schedule:
    """Linear warm-up to `learning_rate`, then a half cosine down to 0 at `total_steps`."""

    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + 1.0
        progress = jnp.clip((step - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
        cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return learning_rate * _warmup_factor(step, warmup_steps) * cosine

    return schedule


def constant_schedule(learning_rate: float, warmup_steps: int) -> Schedule:
    """`learning_rate` after a linear warm-up (none when warmup_steps = 0)."""

    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + 1.0
        return learning_rate * _warmup_factor(step, warmup_steps)

    return schedule


# --------------------------------------------------------------------------- plateau decay


class LrScaleState(NamedTuple):
    """State of `scale_by_lr_scale`: the multiplier the training loop sets."""

    lr_scale: jax.Array  # float32 scalar


def scale_by_lr_scale() -> optax.GradientTransformation:
    """Multiplies the updates by a factor held in the optimizer state.

    The factor starts at 1; the training loop changes it between steps with
    `set_lr_scale` (from a `PlateauScheduler`). Keeping it in the state keeps
    the train step a pure function and puts the factor in every checkpoint.
    """

    def init_fn(params):
        del params
        return LrScaleState(lr_scale=jnp.ones([], jnp.float32))

    def update_fn(updates, state, params=None):
        del params
        updates = jax.tree.map(lambda u: u * state.lr_scale.astype(u.dtype), updates)
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def set_lr_scale(opt_state: Any, lr_scale: float) -> Any:
    """Returns `opt_state` with the plateau multiplier set to `lr_scale`.

    Raises ValueError when the optimizer has no multiplier (schedule != 'plateau').
    """
    if optax.tree_utils.tree_get(opt_state, "lr_scale") is None:
        raise ValueError(
            "set_lr_scale: the optimizer state has no lr_scale; it exists only when "
            "config.train.schedule='plateau'."
        )
    return optax.tree_utils.tree_set(opt_state, lr_scale=jnp.asarray(lr_scale, jnp.float32))


def get_lr_scale(opt_state: Any) -> float:
    """The plateau multiplier in `opt_state`; 1.0 when the optimizer has none."""
    value = optax.tree_utils.tree_get(opt_state, "lr_scale")
    return 1.0 if value is None else float(value)


class PlateauScheduler:
    """Host-side plateau decay: lr_scale *= factor when a metric stops improving.

    The loop calls `update(metric)` after every evaluation and writes the
    returned scale into the optimizer state with `set_lr_scale`. An evaluation
    improves when the metric beats the best so far (lower for mode 'min', e.g.
    validation perplexity as in Gehring et al.; higher for 'max'). After more
    than `patience` evaluations in a row without improvement the scale is
    multiplied by `factor` and the count restarts (PyTorch's ReduceLROnPlateau
    semantics; patience 0 decays at the first evaluation that does not improve).
    A NaN metric never improves. `state_dict()` / `load_state_dict()` give a
    small JSON-able dict for checkpoints.
    """

    def __init__(self, factor: float, patience: int, mode: str = "min"):
        if not 0.0 < factor < 1.0:
            raise ValueError(f"config.train.plateau_factor={factor!r} must be in (0, 1).")
        if int(patience) != patience or patience < 0:
            raise ValueError(f"config.train.plateau_patience={patience!r} must be an int >= 0.")
        if mode not in ("min", "max"):
            raise ValueError(f"PlateauScheduler mode={mode!r} must be 'min' or 'max'.")
        self.factor = float(factor)
        self.patience = int(patience)
        self.mode = mode
        self.scale = 1.0
        self.best: float | None = None
        self.bad_evals = 0

    @classmethod
    def from_config(cls, train_config: Mapping[str, Any], mode: str = "min") -> "PlateauScheduler":
        """A scheduler from config.train.plateau_factor and plateau_patience."""
        return cls(
            _field(train_config, "plateau_factor"), _field(train_config, "plateau_patience"), mode
        )

    def _improves(self, metric: float) -> bool:
        if np.isnan(metric):
            return False
        if self.best is None:
            return True
        return metric < self.best if self.mode == "min" else metric > self.best

    def update(self, metric: float) -> float:
        """Records one evaluation's metric; returns the (possibly decayed) lr scale."""
        metric = float(metric)
        if self._improves(metric):
            self.best = metric
            self.bad_evals = 0
        else:
            self.bad_evals += 1
            if self.bad_evals > self.patience:
                self.scale *= self.factor
                self.bad_evals = 0
        return self.scale

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.best = None if state["best"] is None else float(state["best"])
        self.bad_evals = int(state["bad_evals"])


# --------------------------------------------------------------------------- optimizer


def require_float32_params() -> optax.GradientTransformation:
    """An identity transform whose `init` rejects non-float32 floating parameters."""

    def init_fn(params):
        for path, leaf in jax.tree_util.tree_leaves_with_path(params):
            dtype = jnp.result_type(leaf)
            if jnp.issubdtype(dtype, jnp.floating) and dtype != jnp.float32:
                raise ValueError(
                    f"Parameter {jax.tree_util.keystr(path)} has dtype {dtype}; the optimizer "
                    "keeps float32 parameters (config.train.dtype sets the compute dtype only)."
                )
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def _make_schedule(train_config: Mapping[str, Any], model_dim: int | None) -> Schedule:
    name = _field(train_config, "schedule")
    learning_rate = _field(train_config, "learning_rate")
    warmup_steps = _field(train_config, "warmup_steps")
    _check(name in SCHEDULES, "schedule", name, f"one of {SCHEDULES}")
    _check(learning_rate > 0, "learning_rate", learning_rate, "> 0")
    _check(int(warmup_steps) == warmup_steps >= 0, "warmup_steps", warmup_steps, "an int >= 0")
    warmup_steps = int(warmup_steps)
    if name == "rsqrt":
        _check(warmup_steps > 0, "warmup_steps", warmup_steps, "> 0 for schedule='rsqrt'")
        scale = _field(train_config, "rsqrt_scale")
        _check(scale >= 0, "rsqrt_scale", scale, ">= 0 (0 = use d_model^-0.5)")
        if not scale:
            if not model_dim:
                raise ValueError(
                    "schedule='rsqrt' needs the model's width: pass make_optimizer(..., model_dim=) "
                    "or set config.train.rsqrt_scale."
                )
            scale = model_dim**-0.5
        return rsqrt_schedule(learning_rate, scale, warmup_steps)
    if name == "cosine":
        total_steps = _field(train_config, "steps")
        need = f"> config.train.warmup_steps={warmup_steps} for schedule='cosine'"
        _check(total_steps > warmup_steps, "steps", total_steps, need)
        return cosine_schedule(learning_rate, warmup_steps, int(total_steps))
    # 'constant' and 'plateau' share the schedule; 'plateau' adds the multiplier.
    return constant_schedule(learning_rate, warmup_steps)


def _decay_mask(params: Any) -> Any:
    """Weight decay applies to matrices and embeddings, not to biases or norm scales."""
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(
    train_config: Mapping[str, Any], *, model_dim: int | None = None
) -> tuple[optax.GradientTransformation, Schedule]:
    """Builds the optimizer of `config.train` (fields in the module docstring).

    Args:
      train_config: `config.train` (a ConfigDict or any mapping).
      model_dim: d_model, used by schedule 'rsqrt' as the factor d_model^-0.5
        unless config.train.rsqrt_scale is set (> 0), which then wins.

    Returns:
      (tx, schedule_fn): the optax transformation, and the schedule as a
      function of the update count (for logging the learning rate). With
      schedule 'plateau', the applied rate is schedule_fn(count) times the
      multiplier in the state (`get_lr_scale`).
    """
    name = _field(train_config, "optimizer")
    _check(name in OPTIMIZERS, "optimizer", name, f"one of {OPTIMIZERS}")
    schedule = _make_schedule(train_config, model_dim)
    clip = _field(train_config, "clip_grad_norm")
    _check(clip >= 0, "clip_grad_norm", clip, ">= 0 (0 = off)")
    weight_decay = _field(train_config, "weight_decay")
    _check(weight_decay >= 0, "weight_decay", weight_decay, ">= 0")
    if weight_decay and name != "adamw":
        raise ValueError(
            f"config.train.weight_decay={weight_decay!r} applies only to optimizer='adamw' "
            f"(decoupled decay); got config.train.optimizer={name!r}."
        )

    if name in ("adam", "adamw"):
        b1, b2, eps = (_field(train_config, k) for k in ("b1", "b2", "eps"))
        _check(0 <= b1 < 1, "b1", b1, "in [0, 1)")
        _check(0 <= b2 < 1, "b2", b2, "in [0, 1)")
        _check(eps > 0, "eps", eps, "> 0")
        if name == "adam":
            core = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
        else:
            core = optax.adamw(
                schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask
            )
    elif name in ("nesterov", "sgd"):
        momentum = _field(train_config, "momentum")
        if name == "nesterov":
            _check(0 < momentum < 1, "momentum", momentum, "in (0, 1) for optimizer='nesterov'")
        else:
            _check(0 <= momentum < 1, "momentum", momentum, "in [0, 1) (0 = plain SGD)")
        core = optax.sgd(schedule, momentum=momentum or None, nesterov=name == "nesterov")
    else:  # adadelta
        rho, eps = _field(train_config, "rho"), _field(train_config, "eps")
        _check(0 < rho < 1, "rho", rho, "in (0, 1)")
        _check(eps > 0, "eps", eps, "> 0")
        core = optax.adadelta(schedule, rho=rho, eps=eps)

    parts = [require_float32_params()]
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    parts.append(core)
    if _field(train_config, "schedule") == "plateau":
        parts.append(scale_by_lr_scale())
    return optax.chain(*parts), schedule
