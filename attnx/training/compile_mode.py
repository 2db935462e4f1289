"""`--mode=compile`: plan a TPU pod run on a machine without a TPU.

  python -m attnx.main --config=experiments/NAME.py --mode=compile \
      --config.compile.topology=v5e:4x4 [--workdir=DIR]

libtpu (`pip install -e '.[aot]'`) describes a TPU topology it does not
have (`jax.experimental.topologies.get_topology_desc`), and `jax.jit(...)
.lower(...).compile()` runs the real TPU compiler for it on this CPU. This
mode builds the experiment's own steps - the training step (model,
optimizer, gradient accumulation, the shardings of `config.mesh` over the
topology's devices), the evaluation step and beam search at
`config.eval.beam_size` - from abstract values of the config's batch shapes,
compiles them, and prints one JSON line per step: the per-device memory of
the compiled program against the chip's HBM, the FLOPs and bytes of XLA's
cost analysis, and a roofline bound from the chip's published peak
(`tpu_chips.py`).

It reads no data and writes nothing: the vocabulary size is the workdir's
vocabulary if `--workdir` holds one, else `config.task.vocab_size` (or a
placeholder; the JSON says which). A step that does not fit ends the run
with one line naming the bytes needed and available per chip, the largest
items and the config keys that would help, and exit status 1.

XLA's cost analysis counts the body of a loop once (a `scan` over time in
an RNN, over micro-batches, beam search's steps), and Pallas kernels' own
FLOPs not at all; the JSON counts the loops (`while_loops`) and names the
Pallas kernels, so a bound on such a step is a lower bound on its time.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from attnx import decoding
from attnx.errors import RunError
from attnx.models import spec_of
from attnx.training import run as run_lib
from attnx.training import sharding, steps, tpu_chips

STEPS = ("train", "eval", "decode")
INSTALL_HINT = "pip install -e '.[aot]' (jax[tpu]: libtpu, the TPU compiler)"


# --- Topology --------------------------------------------------------------------------------


def topology_devices(topology: str | None) -> list[Any]:
    """The devices of a TPU topology such as 'v5e:4x4', described by libtpu (no TPU needed).

    Raises:
      RunError: no topology given, libtpu missing (naming the install), or a
        name libtpu refuses.
    """
    if not topology:
        raise RunError(
            "--mode=compile needs a TPU topology: --config.compile.topology=v5e:2x2 "
            "(v4:2x2x2, v5p:2x2x1, v6e:4x4, ...)"
        )
    try:
        chip = tpu_chips.chip_of(topology)
    except ValueError as error:
        raise RunError(str(error)) from None
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise RunError(
            f"--mode=compile needs libtpu, which is not installed: {INSTALL_HINT}"
        ) from None
    # libtpu looks for the TPU VM it runs on; naming one silences its start-up warnings.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{chip.name}-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # A topology description opens no TPU, so several processes may compile at once
    # (libtpu otherwise takes a machine-wide lock file, as for a real TPU).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    options = {"chip_config_name": "megacore"} if chip.megacore else {}
    try:
        description = topologies.get_topology_desc(
            topology_name=topology, platform="tpu", **options
        )
    except Exception as error:  # libtpu's own error type: a bad name or shape.
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RunError(
            f"config.compile.topology={topology!r}: libtpu refuses it ({first}); "
            "give GENERATION:SHAPE, e.g. v5e:2x2, v5e:4x4, v4:2x2x2, v5p:2x2x1, v6e:4x4"
        ) from None
    return list(description.devices)


# --- Abstract values -------------------------------------------------------------------------


def batch_specs(
    config: ml_collections.ConfigDict,
    model_config: Any,
    *,
    train: bool,
    sharding_: jax.sharding.Sharding,
) -> dict[str, jax.ShapeDtypeStruct]:
    """The pipeline's batch as shapes (`attnx.data.pipeline`): what the step is compiled for.

    Text: 'inputs' `[B, S]` and 'targets' `[B, T]` int32, with segment ids and
    positions for packed training rows; images: 'image' `[B, H, W, C]`
    float32. Evaluation batches carry 'index' `[B]`.
    """
    size = config.train.batch_size if train else config.eval.batch_size
    target_length = config.task.max_target_length

    def spec(shape, dtype=jnp.int32):
        return jax.ShapeDtypeStruct((size, *shape), dtype, sharding=sharding_)

    batch = {"targets": spec((target_length,))}
    if spec_of(config.model.name).source_kind == "image":
        if not config.task.get("image_size"):
            raise RunError(
                "--mode=compile: set config.task.image_size, the images' [height, width]"
            )
        height, width = config.task.image_size
        channels = getattr(model_config, "image_channels", 3)
        batch["image"] = spec((height, width, channels), jnp.float32)
    else:
        source_length = config.task.get("max_source_length")
        if not source_length:
            raise RunError(
                "--mode=compile: set config.task.max_source_length, the source rows' length"
            )
        batch["inputs"] = spec((source_length,))
        if train and config.task.packing:
            for name, length in (("inputs", source_length), ("targets", target_length)):
                batch[f"{name}_segmentation"] = spec((length,))
                batch[f"{name}_position"] = spec((length,))
    if not train:
        batch["index"] = spec(())
    return batch


def _abstract(values: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), values, shardings
    )


def per_device_bytes(values: Any) -> int:
    """Bytes one device holds of a tree of sharded abstract values (the largest shard)."""
    total = 0
    for value in jax.tree.leaves(values):
        shape = value.sharding.shard_shape(value.shape)
        total += math.prod(shape) * jnp.dtype(value.dtype).itemsize
    return total


# --- Compiling and reporting -----------------------------------------------------------------


def _kernels(hlo: str) -> list[str]:
    """Names of the Pallas (Mosaic) kernels in a compiled TPU module's text."""
    if "tpu_custom_call" not in hlo:
        return []
    return sorted(set(re.findall(r"\b(splash_mha_\w+|flash_attention\w*)", hlo)))


def report(
    compiled: Any,
    *,
    step: str,
    chip: tpu_chips.Chip,
    tokens: int,
    context: Mapping[str, Any],
) -> dict[str, Any]:
    """The JSON line of one compiled step: memory per device, cost, roofline bound."""
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    hlo = compiled.as_text()
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
        + memory.generated_code_size_in_bytes
    )
    flops = float(cost.get("flops", 0.0))
    moved = float(cost.get("bytes accessed", 0.0))
    # Both are per device (the program every device runs), as are the chip's figures.
    compute_s, memory_s = flops / chip.peak_bf16_flops, moved / chip.hbm_bytes_per_s
    bound_s = max(compute_s, memory_s)
    return {
        "step": step,
        **context,
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "generated_code_bytes": memory.generated_code_size_in_bytes,
        "total_bytes": total,
        "hbm_bytes": chip.hbm_bytes,
        "fits": total <= chip.hbm_bytes,
        "flops_per_step": flops,
        "bytes_per_step": moved,
        "tokens_per_step": tokens,
        "roofline_step_s": bound_s,
        "tokens_per_s_bound": tokens / bound_s if bound_s > 0 else None,
        "bound": "compute" if compute_s >= memory_s else "memory",
        "while_loops": len(re.findall(r"\bwhile\(", hlo)),
        "pallas_kernels": _kernels(hlo),
    }


def _compiler_bytes(message: str, what: str) -> int | None:
    """A size the TPU compiler's out-of-memory message gives, e.g. '... temporaries (114.23G)'."""
    match = re.search(rf"{what}[^(]*\(([0-9.]+)([KMGT])\)", message)
    if not match:
        return None
    return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2)))


def out_of_memory(
    message: str,
    arguments: tuple[Any, ...],
    *,
    step: str,
    chip: tpu_chips.Chip,
    context: Mapping[str, Any],
) -> dict[str, Any]:
    """The JSON line of a step the TPU compiler refused for memory (it gives no analysis then).

    The temporaries are the compiler's figure; the arguments are counted from
    their shardings.
    """
    arguments_bytes = per_device_bytes(arguments)
    temp = _compiler_bytes(message, "temporaries") or 0
    return {
        "step": step,
        **context,
        "argument_bytes": arguments_bytes,
        "temp_bytes": temp,
        "total_bytes": arguments_bytes + temp,
        "hbm_bytes": chip.hbm_bytes,
        "compiler_available_bytes": _compiler_bytes(message, "available"),
        "fits": False,
        "compiler_error": message.strip().splitlines()[0],
    }


def _gib(n: float) -> str:
    return f"{n / tpu_chips.GIB:.2f} GiB"


def does_not_fit(line: Mapping[str, Any], items: Mapping[str, int], config) -> str:
    """One line: the bytes needed and available per chip, the largest items, what would help."""
    ranked = sorted(items.items(), key=lambda item: -item[1])
    largest = ", ".join(f"{name} {_gib(size)}" for name, size in ranked if size)
    mesh = config.mesh
    knobs = []
    state_heavy = items.get("parameters", 0) + items.get("optimizer state", 0) >= items.get(
        "activations and temporaries", 0
    )
    shard_state = [
        f"--config.mesh.fsdp=N (now {mesh.fsdp}: shards parameters and optimizer state)",
        f"--config.mesh.tensor=N (now {mesh.tensor}: splits heads, MLP and vocabulary)",
    ]
    shrink_activations = []
    if line["step"] == "train":
        shrink_activations.append(
            f"--config.train.grad_accum_steps=K (now {config.train.grad_accum_steps}: "
            "activations of 1/K of the batch at a time)"
        )
    if str(config.model.get("dtype", "float32")) == "float32":
        shrink_activations.append("--config.model.dtype=bfloat16 (half the activations)")
    knobs = shard_state + shrink_activations if state_heavy else shrink_activations + shard_state
    return (
        f"--mode=compile: the {line['step']} step needs {_gib(line['total_bytes'])} per chip on "
        f"{line['topology']} (mesh {line['mesh']}), the chip has {_gib(line['hbm_bytes'])}; "
        f"largest: {largest}; try {'; '.join(knobs)}"
    )


def compile_run(config: ml_collections.ConfigDict, workdir: str | None) -> list[dict[str, Any]]:
    """Compiles the config's steps for `config.compile.topology`; prints and returns the lines.

    Raises:
      RunError: libtpu or the topology missing, or a step that does not fit
        (after every line is printed).
    """
    topology = config.compile.topology
    chip = tpu_chips.chip_of(topology)
    devices = topology_devices(topology)
    which = [name.strip() for name in config.compile.steps.split(",") if name.strip()]
    for name in which:
        if name not in STEPS:
            raise RunError(
                f"config.compile.steps={config.compile.steps!r}: {name!r} is not one of {STEPS}"
            )

    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
    rules = sharding.parse_rules(config.mesh.get("rules"))
    run_lib.check_batch_sizes(config, mesh)
    data_sharding = sharding.batch_sharding(mesh, rules)
    vocab, vocab_source = run_lib.vocab_without_data(config, workdir)
    parts = run_lib.build_model_parts(config, vocab, mesh, rules)
    # The model's non-parameter state (RNG streams) is a constant of the steps; it is
    # small and made here, on the CPU, as Run.build makes it on the run's devices.
    rest = jax.jit(parts.init_rest)()
    with sharding.activate(mesh, rules):
        # The state's shardings are those XLA gives init_state's outputs on this
        # mesh: what Run.build reads from the state it makes.
        init = jax.jit(parts.init_state).lower().compile()
        state = _abstract(jax.eval_shape(parts.init_state), init.output_shardings)
    state_shardings = init.output_shardings
    params = state.params

    context = {
        "topology": topology,
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "mesh": dict(mesh.shape),
        "vocab_size": vocab,
        "vocab_source": vocab_source,
    }
    label_smoothing = float(config.train.label_smoothing)
    target_length = config.task.max_target_length
    builders: dict[str, Callable[[], tuple[Any, tuple[Any, ...], int, dict[str, int]]]] = {}

    def train():
        step = jax.jit(
            # As train.py compiles it.
            steps.make_train_step(
                parts.graphdef,
                rest,
                parts.optimizer,
                label_smoothing=label_smoothing,
                grad_accum_steps=config.train.grad_accum_steps,
                loss_terms=parts.loss_terms,
            ),
            in_shardings=(state_shardings, data_sharding),
            out_shardings=(state_shardings, None),
            donate_argnums=0,
        )
        batch = batch_specs(config, parts.model_config, train=True, sharding_=data_sharding)
        items = {
            "parameters": per_device_bytes(state.params),
            "optimizer state": per_device_bytes(state.opt_state),
        }
        return step, (state, batch), config.train.batch_size * target_length, items

    def evaluate():
        step = jax.jit(
            steps.make_eval_step(parts.graphdef, rest, label_smoothing=label_smoothing),
            in_shardings=(state_shardings.params, data_sharding),
        )
        batch = batch_specs(config, parts.model_config, train=False, sharding_=data_sharding)
        items = {"parameters": per_device_bytes(params)}
        return step, (params, batch), config.eval.batch_size * target_length, items

    def decode():
        def search(params, source):
            # As evaluate.py calls it on every evaluation batch.
            model = nnx.merge(parts.graphdef, params, rest)
            return decoding.beam_search(
                model,
                source,
                beam_size=config.eval.beam_size,
                length_penalty=config.eval.length_penalty,
                alpha=config.eval.alpha,
                max_length=target_length,
                return_weights=True,
            )

        batch = batch_specs(config, parts.model_config, train=False, sharding_=data_sharding)
        source = batch["image"] if "image" in batch else batch["inputs"]
        step = jax.jit(search, in_shardings=(state_shardings.params, data_sharding))
        items = {"parameters": per_device_bytes(params)}
        return step, (params, source), config.eval.batch_size * target_length, items

    builders.update(train=train, eval=evaluate, decode=decode)
    lines, failures = [], []
    for name in which:
        step, arguments, tokens, items = builders[name]()
        start = time.perf_counter()
        try:
            with sharding.activate(mesh, rules):
                compiled = step.lower(*arguments).compile()
        except jax.errors.JaxRuntimeError as error:
            if "RESOURCE_EXHAUSTED" not in str(error):
                raise
            line = out_of_memory(str(error), arguments, step=name, chip=chip, context=context)
        else:
            line = report(compiled, step=name, chip=chip, tokens=tokens, context=context)
        line["compile_s"] = round(time.perf_counter() - start, 1)
        print(json.dumps(line), flush=True)
        lines.append(line)
        if not line["fits"]:
            items["activations and temporaries"] = line["temp_bytes"]
            failures.append(does_not_fit(line, items, config))
    if failures:
        raise RunError(" | ".join(failures))
    return lines
