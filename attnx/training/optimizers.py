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
three papers' settings, ready for `config.train.update(RECIPES['transformer'])`:

  transformer  Vaswani et al. 2017, sec. 5.3: Adam(0.9, 0.98, 1e-9) and
               lrate = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5).
  convs2s      Gehring et al. 2017, sec. 5.1: Nesterov momentum 0.99, lr 0.25,
               gradients renormalised to norm 0.1, lr divided by 10 whenever
               the validation perplexity stops improving.
  rnnsearch    Bahdanau et al. 2014, A.2.2: Adadelta (eps 1e-6, rho 0.95),
               gradients clipped to norm 1.

Schedules are functions of the optimizer's update count `c` (0 for the first
update, as in optax); they evaluate the papers' formulas at the 1-based step
`s = c + 1`, so the first update is never taken with a zero learning rate.

Gradient accumulation is explicit, inside the jitted train step
(`accumulate_gradients`), not `optax.MultiSteps`: the step receives the whole
global batch, scans over `grad_accum_steps` micro-batches summing the gradients
of the *summed* token loss, and divides once by the total token weight. That
is the gradient of the large batch up to float summation order, even when the
micro-batches hold different numbers of real tokens (a mean of per-micro-batch
means is not), and one call of the step stays one optimizer update, so the
step counter, the schedule and checkpoints mean the same with or without
accumulation. `make_optimizer` therefore does not read `grad_accum_steps`.

The optimizer always works on float32 parameters (`config.train.dtype` =
'bfloat16' changes only the models' compute dtype); `init` rejects other
floating parameter dtypes.
"""

from collections.abc import Callable, Mapping, Sequence
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
                    "schedule='rsqrt' needs d_model: pass make_optimizer(..., model_dim=) "
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


# --------------------------------------------------------------------------- accumulation


def split_micro_batches(batch: Any, num_micro_batches: int) -> Any:
    """Reshapes every leaf [B, ...] of `batch` to [k, B/k, ...]; micro-batch i = rows i::k.

    Strided rather than contiguous: when the batch axis is sharded over devices,
    each device's contiguous block of rows then holds rows of every micro-batch,
    so no micro-batch lives on a subset of the devices.
    """
    k = num_micro_batches
    if int(k) != k or k < 1:
        raise ValueError(f"config.train.grad_accum_steps={k!r} must be an int >= 1.")
    leaves = jax.tree.leaves(batch)
    sizes = {leaf.shape[0] for leaf in leaves}
    if len(sizes) != 1:
        raise ValueError(f"Batch leaves have different leading (batch) sizes {sorted(sizes)}.")
    (size,) = sizes
    if size % k:
        raise ValueError(
            f"Batch size {size} is not divisible by config.train.grad_accum_steps={k}."
        )
    return jax.tree.map(lambda x: x.reshape(size // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def accumulate_gradients(
    loss_fn: Callable[..., tuple[jax.Array, tuple[jax.Array, Any]]],
    params: Any,
    batch: Any,
    num_micro_batches: int,
    rng: jax.Array | None = None,
) -> tuple[tuple[jax.Array, jax.Array, Any], Any]:
    """Gradient of the token-mean loss of `batch`, over `num_micro_batches` passes.

    Args:
      loss_fn: `loss_fn(params, micro_batch, rng) -> (loss_sum, (weight_sum, aux))`
        where loss_sum is the *summed* (not averaged) loss, weight_sum the number
        (weight) of the tokens it sums over, and aux a pytree of sums (e.g.
        metric (sum, count) pairs) that is added across micro-batches.
      params: the float32 parameters (any pytree, e.g. an nnx.State).
      batch: pytree of arrays with a common leading batch axis B.
      num_micro_batches: k (config.train.grad_accum_steps); B % k == 0.
      rng: optional key; micro-batch i gets fold_in(rng, i) (the key itself when k = 1).

    Returns:
      ((loss_sum, weight_sum, aux_sum), grads) with grads = d loss_sum / d params
      divided by the total weight_sum (zero when there is no weight). Within
      float summation order this equals the gradient of one pass over `batch`.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro_batches == 1:
        (loss_sum, (weight_sum, aux)), grads = grad_fn(params, batch, rng)
    else:
        micro_batches = split_micro_batches(batch, num_micro_batches)
        first = jax.tree.map(lambda x: x[0], micro_batches)
        out_shapes = jax.eval_shape(loss_fn, params, first, rng)

        def zeros_like_shape(s):
            return jnp.zeros(s.shape, s.dtype)

        init = (
            jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params),
            jnp.zeros([], jnp.float32),
            jnp.zeros([], jnp.float32),
            jax.tree.map(zeros_like_shape, out_shapes[1][1]),
        )

        def body(carry, inputs):
            grad_sum, loss_acc, weight_acc, aux_acc = carry
            index, micro_batch = inputs
            micro_rng = None if rng is None else jax.random.fold_in(rng, index)
            (loss, (weight, aux)), grads = grad_fn(params, micro_batch, micro_rng)
            carry = (
                jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads),
                loss_acc + loss,
                weight_acc + weight,
                jax.tree.map(jnp.add, aux_acc, aux),
            )
            return carry, None

        indices = jnp.arange(num_micro_batches)
        (grads, loss_sum, weight_sum, aux), _ = jax.lax.scan(body, init, (indices, micro_batches))
    denominator = jnp.where(weight_sum > 0, weight_sum, 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grads)
    return (loss_sum, weight_sum, aux), grads


# --------------------------------------------------------------------------- averaging


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
