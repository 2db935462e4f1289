"""Every architecture scales the same way: one device and a data x fsdp x tensor mesh agree.

For the Transformer, the RNN (Bahdanau attention), ConvS2S and the
captioner, each at its `tiny` size and in this process (no `attnx.main`
subprocess; the end-to-end runs of `test_train.py` cover the Transformer
through the whole loop), the state is built as `Run.build` builds it
(`build_model_parts`, `init_state` jitted under the mesh, so the parameters
take the shardings `state_shardings` gives them under the default rules),
and the train step of `steps.make_train_step` is jitted with the state's
shardings exactly as `train.py` jits it, then compiled once per mesh. Two
steps on one fake batch run on 1 device and on 8 devices (data = fsdp =
tensor = 2), and

* the losses, gradient norms, Adam moments and parameters agree, within
  rounding from another reduction order (tolerances below, measured);
* the compiled 8-device step keeps each architecture's largest matrices
  split over `tensor` (and over `fsdp` where their 'embed' axis allows it)
  in its input and output shardings and in the updated arrays' device
  shards, and nearly all parameters are split over `tensor`;
* Adam's moments are split like their parameters, so that each device holds
  a fraction of the whole state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from attnx.training import run as run_lib
from attnx.training import sharding, steps
from attnx.training.config import base_config
from attnx.training.config_overrides import set_model

ARCHITECTURES = ("transformer", "rnn", "convs2s", "captioner")
# An even vocabulary (what a tokenizer would report), so that the 'vocab' axis of
# the embeddings and output projections divides tensor=2; the presets' own 11
# would leave every vocabulary axis whole.
VOCAB = 16
# 8 rows: 2 for each of the data x fsdp = 4 batch shards.
BATCH, SOURCE_LENGTH, TARGET_LENGTH = 8, 10, 8
# The captioner's tiny preset reads 16 x 16 grey images (two conv blocks -> 4 x 4 grid).
IMAGE_SHAPE = (16, 16, 1)
STEPS = 2
SEED = 0
# The CPU backend compiles the partitioned programs without LLVM's optimisations
# and their expensive passes. What this file tests is the partitioned program,
# which XLA's HLO passes (SPMD partitioning among them) make the same either
# way; the compilations, most of this file's time, take about half as long.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
PAD, EOS = 0, 2

# Tolerances between 1 device and 8 devices. Only the order of reductions
# differs (which partial sums are formed on which device, then added), so the
# differences are float32 rounding; measured over seeds 0-4 (initialisation and
# batch) of each of the four architectures, compiled with and without
# COMPILER_OPTIONS: 40 pairs of runs. A bug is far larger: dropping one of the
# 8 rows moved the step-1 loss by 3.1e-4 to 5.3e-2, and the XLA miscompile of
# ConvS2S's convolution that this file found (see `WeightNormConv.__call__`)
# moved the step-2 loss by 1.2e-4 to 2.1e-4, the gradient norm by 3e-3, Adam's
# moments by 70% and the parameters by 4e-3.
#
# The losses: step 1 is a forward pass over identical parameters, step 2 follows
# one Adam update; worst rounding 2.3e-7 relative. 20x that, 25x under the
# ConvS2S bug and 60x under a dropped row.
LOSS_RTOL = 5e-6
# The gradient norm of both steps (all gradients in one number): worst 2.0e-7.
GRAD_NORM_RTOL = 5e-6
# Adam's first moment after two steps, 0.1 (0.9 g1 + g2), so the gradients
# themselves, leaf by leaf, relative to the leaf's largest entry: worst 4.8e-6.
MOMENT_RTOL = 5e-5
# The parameters after two steps: worst 4.1e-6 absolute (a step moves an entry
# by up to lr = 1e-3; Adam's normalised update enlarges the rounding of small
# gradients). Not the Transformer's key biases: their gradient is zero in exact
# arithmetic (adding one number to every score of a query leaves its softmax
# unchanged), so float32 leaves rounding noise, which Adam's first update,
# lr g / (|g| + eps), turns into steps of up to lr in either direction
# (measured up to 1.5e-4 apart); the moment check above covers them.
PARAM_ATOL = 5e-5

# Of each architecture's parameter elements, the share split over tensor
# (measured: Transformer 0.96, RNN 1.00, ConvS2S 0.93, captioner 0.93; what is
# left is LayerNorm and position tables, the captioner's readout).
MIN_TENSOR_SHARE = 0.9
# The compiled 8-device step's arguments (state and batch) per device, over
# the 1-device step's. With Adam's moments placed like the parameters (tried by
# constraining them in `init_state`): Transformer 0.27, RNN 0.42, ConvS2S 0.28,
# captioner 0.43; the RNN and the captioner keep their recurrent kernels whole
# across fsdp (no 'embed' axis). As it is, with the moments replicated: 0.75 to 0.80.
MAX_DEVICE_SHARE = 0.5


@dataclasses.dataclass(frozen=True)
class Split:
    """A parameter whose 8-device placement is checked, and the spec the rules give it."""

    path: str
    spec: P


# Per architecture (tiny size, VOCAB = 16): its largest matrices, and one of each
# other kind (embedding, attention, CNN), with the specs the default rules give
# them on the data=fsdp=tensor=2 mesh.
SPLIT_PARAMETERS: dict[str, tuple[Split, ...]] = {
    "transformer": (
        # ('embed', None, 'heads', 'kv'): keys and values of 2 heads, one per tensor shard.
        Split("encoder_layers/0/self_attention/key_value_kernel", P("fsdp", None, "tensor", None)),
        # ('embed', 'mlp') and ('mlp', 'embed'): Megatron's column- and row-split FFN.
        Split("decoder_layers/1/feed_forward/inner/kernel", P("fsdp", "tensor")),
        Split("decoder_layers/1/feed_forward/outer/kernel", P("tensor", "fsdp")),
        # ('vocab', 'embed'): the shared token table.
        Split("source_embedding/embedding", P("tensor", "fsdp")),
    ),
    "rnn": (
        # (None, None, 'rnn_hidden'): the decoder GRU's [s; c] -> 3 gates, the largest matrix.
        Split("decoder/cell/recurrent_kernel", P(None, None, "tensor")),
        # ('embed', None, 'rnn_hidden'): a bidirectional encoder direction's input kernel.
        Split("encoder/layers/0/0/input_kernel", P("fsdp", None, "tensor")),
        # (None, 'mlp'): the deep output before the maxout.
        Split("decoder/readout_kernel", P(None, "tensor")),
        # ('rnn_hidden', 'heads', 'kv'): Bahdanau's U_a over the annotations.
        Split("decoder/attention/key_kernel", P("tensor", None, None)),
        Split("encoder/embedding", P("tensor", "fsdp")),
    ),
    "convs2s": (
        # ('conv_width', 'embed', 'channels'): every GLU block's convolution.
        Split("encoder_blocks/0/conv/direction", P(None, "fsdp", "tensor")),
        Split("decoder_blocks/1/conv/direction", P(None, "fsdp", "tensor")),
        # ('channels', 'embed'): a decoder attention's projection of h into embedding space.
        Split("decoder_blocks/0/attention/query_kernel", P("tensor", "fsdp")),
        # ('embed', 'vocab'): the output projection.
        Split("output_projection/direction", P("fsdp", "tensor")),
    ),
    "captioner": (
        # (None, None, 'rnn_hidden'): the LSTM's [h; z] -> 4 gates, the largest matrix.
        Split("recurrent_kernel", P(None, None, "tensor")),
        # ('embed', None, 'rnn_hidden'): the word embedding's share of the gates.
        Split("input_kernel", P("fsdp", None, "tensor")),
        # ('channels', 'mlp'): f_att's projection of the annotation vectors.
        Split("attention/feature_kernel", P("tensor", None)),
        # (None, 'conv_width', None, 'channels'): the CNN's output channels.
        Split("encoder/layers/1/kernel", P(None, None, None, "tensor")),
    ),
}


# Fields set over the tiny presets: the RNN is the Bahdanau variant (its default) by name.
PRESET_FIELDS: dict[str, dict[str, Any]] = {"rnn": {"variant": "bahdanau"}}


def experiment_config(name: str, seed: int = SEED) -> ml_collections.ConfigDict:
    """An experiment config with architecture `name` at its `tiny` preset (default Adam)."""
    config = base_config()
    set_model(config, name, "tiny", **PRESET_FIELDS.get(name, {}))
    config.train.seed = seed
    return config


def fake_batch(name: str, seed: int = SEED) -> dict[str, np.ndarray]:
    """A global batch as `attnx.data.pipeline` hands it to the step (its module docstring).

    int32 token rows ending with eos and padded with 0, of several lengths, so
    the masks matter; the captioner reads float32 images in [0, 1] instead of tokens.
    """
    rng = np.random.default_rng(seed)

    def rows(length: int) -> np.ndarray:
        tokens = rng.integers(EOS + 1, VOCAB, (BATCH, length)).astype(np.int32)
        for row, size in enumerate(rng.integers(2, length + 1, BATCH)):
            tokens[row, size - 1] = EOS
            tokens[row, size:] = PAD
        return tokens

    batch = {"targets": rows(TARGET_LENGTH)}
    if name == "captioner":
        batch["image"] = rng.random((BATCH, *IMAGE_SHAPE), dtype=np.float32)
    else:
        batch["inputs"] = rows(SOURCE_LENGTH)
    return batch


def flatten(tree: Any) -> dict[str, Any]:
    """'a/0/b' -> leaf, for the leaves of an NNX state or a TrainState (of arrays or shardings)."""

    def name(entry: Any) -> str:
        for attribute in ("key", "idx", "name"):
            if hasattr(entry, attribute):
                return str(getattr(entry, attribute))
        return str(entry)

    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, NamedSharding)
    )[0]
    flat = {}
    for path, leaf in leaves:
        parts = [name(entry) for entry in path]
        if parts and parts[-1] == "value":  # an nnx.Variable's array
            parts = parts[:-1]
        flat["/".join(parts)] = leaf
    return flat


@dataclasses.dataclass
class Trained:
    """What one mesh's run leaves for the assertions.

    Attributes:
      mesh: the mesh it ran on.
      compiled: the compiled train step (`jax.jit(...).lower(...).compile()`).
      state: the state after the steps, on the mesh.
      losses / grad_norms: the step's token loss and gradient norm, one per step.
      params / moments: the parameters and Adam's first moments after the steps,
        on the host, flattened (`flatten`).
    """

    mesh: Mesh
    compiled: Any
    state: steps.TrainState
    losses: list[float]
    grad_norms: list[float]
    params: dict[str, np.ndarray]
    moments: dict[str, np.ndarray]


def adam_moments(opt_state: Any) -> dict[str, Any]:
    """Adam's first moments (mu) by parameter path, from wherever optax keeps them.

    Works on the state's arrays and on a compiled step's shardings of it alike.
    """
    moments = {}
    for path, value in flatten(opt_state).items():
        head, found, tail = path.partition("mu/")
        if found and (not head or head.endswith("/")):
            moments[tail] = value
    return moments


def initial_state(
    name: str, mesh: Mesh, seed: int = SEED
) -> tuple[run_lib.ModelParts, steps.TrainState]:
    """`(parts, state)` as `Run.build` makes them: `init_state` jitted under the mesh."""
    config = experiment_config(name, seed)
    parts = run_lib.build_model_parts(config, VOCAB, mesh, sharding.DEFAULT_RULES)
    with jax.set_mesh(mesh):
        state = jax.jit(parts.init_state).lower().compile(COMPILER_OPTIONS)()
    return parts, state


def train(
    name: str,
    mesh: Mesh,
    parts: run_lib.ModelParts,
    state: steps.TrainState,
    seed: int = SEED,
) -> Trained:
    """Compiles `train.py`'s jitted train step for `mesh` once and runs STEPS steps of it."""
    config = experiment_config(name, seed)
    rules = sharding.DEFAULT_RULES
    with jax.set_mesh(mesh):
        rest = jax.jit(parts.init_rest)()
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    data_sharding = sharding.batch_sharding(mesh, rules)
    train_step = jax.jit(
        steps.make_train_step(
            parts.graphdef,
            rest,
            parts.optimizer,
            label_smoothing=float(config.train.label_smoothing),
            grad_accum_steps=config.train.grad_accum_steps,
            loss_terms=parts.loss_terms,
        ),
        in_shardings=(state_shardings, data_sharding),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
    batch = jax.device_put(fake_batch(name, seed), data_sharding)
    losses, grad_norms = [], []
    with sharding.activate(mesh, rules):
        compiled = train_step.lower(state, batch).compile(COMPILER_OPTIONS)
        for _ in range(STEPS):
            state, sums = compiled(state, batch)
            loss_sum, count = sums["loss"]
            losses.append(float(loss_sum / count))
            grad_norms.append(float(sums["grad_norm"][0]))
    return Trained(
        mesh=mesh,
        compiled=compiled,
        state=state,
        losses=losses,
        grad_norms=grad_norms,
        params={k: np.asarray(v) for k, v in flatten(state.params).items()},
        moments={k: np.asarray(v) for k, v in adam_moments(state.opt_state).items()},
    )


def one_device_mesh() -> Mesh:
    """The `(data, fsdp, tensor)` mesh of one device: nothing split."""
    return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def sharded_mesh() -> Mesh:
    """The 8-device mesh of the issue: every axis of size 2."""
    return sharding.make_mesh(data=2, fsdp=2, tensor=2)


def train_on_both(name: str, seed: int = SEED) -> tuple[Trained, Trained]:
    """(1 device, 8 devices) runs of `name` from the same initial state.

    The state is initialised once, on the 8-device mesh (the path training
    takes there), and a host copy of it is placed on the single device, as a
    checkpoint from one mesh restores on another. That saves a compilation of
    the initialiser, and both runs start from bit-identical values, so any
    difference is the step's own.
    """
    mesh = sharded_mesh()
    parts, state = initial_state(name, mesh, seed)
    one = one_device_mesh()
    one_parts = run_lib.build_model_parts(
        experiment_config(name, seed), VOCAB, one, sharding.DEFAULT_RULES
    )
    placed = jax.device_put(jax.device_get(state), NamedSharding(one, P()))
    single = train(name, one, one_parts, placed, seed)
    sharded = train(name, mesh, parts, state, seed)
    return single, sharded


@pytest.fixture(scope="module", params=ARCHITECTURES)
def runs(request) -> tuple[str, Trained, Trained]:
    """(name, 1-device run, 8-device run) of each architecture, shared by the tests."""
    single, sharded = train_on_both(request.param)
    return request.param, single, sharded


def test_one_device_and_a_sharded_mesh_train_alike(runs):
    name, single, sharded = runs
    np.testing.assert_allclose(sharded.losses, single.losses, rtol=LOSS_RTOL, err_msg=name)
    np.testing.assert_allclose(
        sharded.grad_norms, single.grad_norms, rtol=GRAD_NORM_RTOL, err_msg=name
    )
    assert sharded.moments.keys() == single.params.keys()
    for path, moment in single.moments.items():
        scale = float(np.max(np.abs(moment))) or 1.0
        np.testing.assert_allclose(
            sharded.moments[path], moment, atol=MOMENT_RTOL * scale, err_msg=f"{name} {path}"
        )
    for path, value in single.params.items():
        got = sharded.params[path]
        if path.endswith("key_value_bias"):  # [key bias, value bias]: see PARAM_ATOL
            got, value = got[1], value[1]
        np.testing.assert_allclose(got, value, atol=PARAM_ATOL, err_msg=f"{name} {path}")


def mesh_axes(spec: P) -> set[str]:
    """The mesh axes a PartitionSpec splits over."""
    axes = set()
    for entry in spec:
        axes.update((entry,) if isinstance(entry, str) else entry or ())
    return axes


def test_the_compiled_step_splits_the_largest_matrices_over_tensor(runs):
    name, _, sharded = runs
    mesh = sharded.mesh
    (state_in, _), _ = sharded.compiled.input_shardings
    state_out, _ = sharded.compiled.output_shardings
    compiled_in, compiled_out = flatten(state_in.params), flatten(state_out.params)
    arrays = flatten(sharded.state.params)
    for split in SPLIT_PARAMETERS[name]:
        assert "tensor" in mesh_axes(split.spec), split
        array = arrays[split.path]
        want = NamedSharding(mesh, split.spec)
        placements = {
            "the compiled step's input": compiled_in[split.path],
            "the compiled step's output": compiled_out[split.path],
            "the updated array": array.sharding,
        }
        for where, got in placements.items():
            assert got.is_equivalent_to(want, array.ndim), (
                f"{name} {split.path} {array.shape}: {where} is {got}, not {split.spec}"
            )
        # Every device holds its block of the matrix, not a replica of all of it.
        local = want.shard_shape(array.shape)
        assert {shard.data.shape for shard in array.addressable_shards} == {local}, split.path
    # Beyond the matrices named: nearly every parameter is split over tensor.
    sizes = {path: sharded.params[path].size for path in compiled_out}
    over_tensor = sum(
        size for path, size in sizes.items() if "tensor" in mesh_axes(compiled_out[path].spec)
    )
    assert over_tensor / sum(sizes.values()) >= MIN_TENSOR_SHARE, name


def test_the_optimizer_state_is_split_like_the_parameters(runs):
    name, single, sharded = runs
    # Per device: parameters, Adam's two moments and the batch rows (memory_analysis
    # sizes the per-device program of an SPMD executable).
    whole = single.compiled.memory_analysis().argument_size_in_bytes
    per_device = sharded.compiled.memory_analysis().argument_size_in_bytes
    assert per_device <= MAX_DEVICE_SHARE * whole, (name, per_device / whole)
    state_out, _ = sharded.compiled.output_shardings
    params, moments = flatten(state_out.params), adam_moments(state_out.opt_state)
    for split in SPLIT_PARAMETERS[name]:
        ndim = sharded.params[split.path].ndim
        assert moments[split.path].is_equivalent_to(params[split.path], ndim), split.path
