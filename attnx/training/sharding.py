"""Device mesh and the one table of rules from logical axis names to mesh axes.

Parameters and activations in attnx carry logical axis names ('batch',
'embed', 'heads', 'mlp', ...; see `attnx.layers.params`). A rules table maps
each logical name to a mesh axis (or None = replicated); `jax.jit` with the
resulting in/out shardings partitions the program (what `pjit` used to do).

The mesh has three axes:
  data    pure data parallelism: batch split, parameters replicated;
  fsdp    batch split *and* parameters sharded (ZeRO-3 / FSDP style): the
          'embed' axis of every weight is split and gathered when used;
  tensor  model parallelism (Megatron style): heads, MLP and vocabulary split.

A logical axis is left unsharded when its size does not divide the mesh
axes it maps to, or when an earlier axis of the same array already took
that mesh axis; so one table serves every model size and mesh.
"""

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

# logical axis -> mesh axes. Overridable per experiment (config.mesh.rules).
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("joined_kv", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("channels", "tensor"),
    ("rnn_hidden", "tensor"),
    ("conv_width", None),
    ("positions", None),
)


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None
) -> Mesh:
    """A `(data, fsdp, tensor)` mesh over all devices (of every process).

    One size may be -1: it takes whatever the others leave. The sizes must
    multiply to the number of devices; the error names the config keys.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: at most one of mesh.{', mesh.'.join(free)} may be -1")
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(f"mesh.{name} must be a positive size or -1, got {size}")
    fixed = int(np.prod([size for size in sizes.values() if size != -1]))
    if free:
        if len(devices) % fixed:
            raise ValueError(
                f"mesh: {len(devices)} devices do not divide into mesh.fsdp x mesh.tensor "
                f"x mesh.data = {sizes} (the fixed sizes multiply to {fixed})"
            )
        sizes[free[0]] = len(devices) // fixed
    elif fixed != len(devices):
        raise ValueError(
            f"mesh: mesh.data x mesh.fsdp x mesh.tensor = {sizes['data']} x {sizes['fsdp']} x "
            f"{sizes['tensor']} = {fixed}, but there are {len(devices)} devices"
        )
    shape = tuple(sizes[name] for name in MESH_AXES)
    # Auto axes: XLA propagates shardings from the jit boundaries (GSPMD), so
    # layers need no per-op sharding annotations.
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types, devices=devices)


def _axis_size(mesh: Mesh, axes: MeshAxes) -> int:
    axes = (axes,) if isinstance(axes, str) else axes or ()
    return int(np.prod([mesh.shape[a] for a in axes]))


def logical_to_mesh_spec(
    logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules
) -> PartitionSpec:
    """The PartitionSpec for an array with these logical axes and shape.

    Unknown logical names are an error (a typo would silently replicate).
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape, strict=True):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(
                f"sharding: logical axis {name!r} has no rule; known: {sorted(table)} "
                "(add it to config.mesh.rules)"
            )
        axes = table[name]
        axes_tuple = (axes,) if isinstance(axes, str) else tuple(axes or ())
        # Keep only mesh axes that are real, not yet used, and of size > 1.
        axes_tuple = tuple(a for a in axes_tuple if a not in used and mesh.shape.get(a, 1) > 1)
        if not axes_tuple or size % _axis_size(mesh, axes_tuple):
            spec.append(None)
            continue
        used.update(axes_tuple)
        spec.append(axes_tuple[0] if len(axes_tuple) == 1 else axes_tuple)
    return PartitionSpec(*spec)


def logical_sharding(
    logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_mesh_spec(logical_axes, shape, mesh, rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
    """NamedShardings for every variable of an (abstract) NNX state.

    Variables with logical axis metadata (`out_sharding`) are sharded by the
    rules; everything else (step counters, RNG keys, scalars) is replicated.
    """

    def one(variable):
        value = variable.get_value() if isinstance(variable, nnx.Variable) else variable
        shape = getattr(value, "shape", ())
        axes = None
        if isinstance(variable, nnx.Variable):
            axes = variable.get_metadata().get("out_sharding")
        if axes is None or len(axes) != len(shape):
            return NamedSharding(mesh, PartitionSpec())
        return logical_sharding(axes, shape, mesh, rules)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of input batches: the leading axis over the 'batch' rule's mesh axes."""
    axes = dict(rules).get("batch")
    return NamedSharding(mesh, PartitionSpec(axes))


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """`jax.set_mesh(mesh)` with `rules` as Flax's logical-axis rules, for tracing steps.

    Kernels that run per device under `jax.shard_map` (splash attention) read
    the rules to split their 'batch' and 'heads' axes over the mesh.
    """
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        yield


def parse_rules(rules: Sequence[Sequence[Any]] | Mapping[str, Any] | None) -> Rules:
    """Rules from a config: a list of [logical, mesh_axes] pairs or a dict; None = defaults.

    Given rules override the defaults name by name, so a config lists only what it changes.
    """
    table = dict(DEFAULT_RULES)
    if rules:
        items = rules.items() if isinstance(rules, Mapping) else rules
        for item in items:
            if len(item) != 2:
                raise ValueError(
                    f"mesh.rules: each rule is (logical_axis, mesh_axes), got {item!r}"
                )
            name, axes = item
            if isinstance(axes, list):
                axes = tuple(axes)
            for axis in (axes,) if isinstance(axes, str) else axes or ():
                if axis not in MESH_AXES:
                    raise ValueError(
                        f"mesh.rules: rule for {name!r} names mesh axis {axis!r}; "
                        f"mesh axes are {MESH_AXES}"
                    )
            table[name] = axes
    return tuple(table.items())
