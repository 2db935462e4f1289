"""benchmarks/profile_step.py reads the compiled HLO right and profiles a real step (no timing)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchmarks import profile_step  # noqa: E402


def test_kinds_and_phases_of_a_compiled_step():
    def loss(w, x, key):
        keep = jax.random.bernoulli(key, 0.9, x.shape)  # threefry bits
        h = jnp.where(keep, x, 0.0) @ w  # a matmul
        return jax.nn.logsumexp(h, axis=-1).sum()  # reductions

    optimizer = optax.adam(1e-3)

    def step(w, opt_state, x, key):
        updates, opt_state = optimizer.update(jax.grad(loss)(w, x, key), opt_state, w)
        return optax.apply_updates(w, updates), opt_state

    w, x = jnp.ones((64, 32)), jnp.ones((16, 64))
    compiled = jax.jit(step).lower(w, optimizer.init(w), x, jax.random.key(0)).compile()
    hlo = profile_step.parse_hlo(compiled.as_text())
    executed = [
        name
        for name, info in hlo.items()
        if name != "__computations__"
        and info["computation"].startswith("main")
        and info["opcode"] not in {"parameter", "constant", "tuple", "get-tuple-element"}
    ]
    kinds = {profile_step.kind_of(name, hlo) for name in executed}
    assert {"matmul", "random bits", "reduction"} <= kinds, kinds
    phases = {profile_step.phase_of(name, hlo) for name in executed}
    # The gradient's matmul is JAX's transpose of the forward's; Adam is outside both.
    assert phases == {"forward", "backward", "optimizer"}, phases
    # Every kind is one the report knows.
    assert kinds <= set(profile_step.KINDS)


def test_opcode_of_tuple_typed_instructions():
    assert profile_step._opcode("(f32[2]{0}, (s32[], f32[])) while(%t), body=%b") == "while"
    assert profile_step._opcode("f32[2,3]{1,0} fusion(%a, %b), kind=kLoop") == "fusion"


def test_attribute_counts_leaf_operations_per_step_and_skips_loops():
    hlo = {
        "dot.1": dict(opcode="dot", computation="main", calls=[], op_name="jit(f)/jvp()/dot_general",
                      target=""),
        "while.2": dict(opcode="while", computation="main", calls=[], op_name="",
                        target=""),
        "__computations__": {"main": ["dot.1", "while.2"]},
    }  # fmt: skip
    events = [
        {"name": "dot.1", "dur": 3000.0},
        {"name": "dot.1", "dur": 1000.0},
        {"name": "while.2", "dur": 9000.0},  # holds its body's operations: not counted again
        {"name": "python", "dur": 5000.0},  # not an HLO instruction
    ]
    found = profile_step.attribute(events, hlo, steps=2)
    assert found["by_kind"] == {"matmul": 2.0}  # (3 + 1) ms over 2 steps
    assert found["by_phase"] == {"forward": 2.0}
    assert found["matched_events"] == 2


def test_one_step_of_the_captioner_is_profiled(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile_step", "--models", "spatial", "--steps", "1",
         "--trace_dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    kinds = {line["what"]: line["ms_per_step"] for line in lines if line["kind"] == "by_kind"}
    # The CNN's convolutions are im2col: patch copies (data movement) and matmuls.
    assert kinds.get("matmul", 0) > 0 and kinds.get("data movement", 0) > 0, kinds
    summary = [line for line in lines if line["kind"] == "summary"]
    assert summary and summary[0]["op_ms_per_step"] > 0 and summary[0]["gflop_per_step"] > 0
    assert sum(line["kind"] == "top_op" for line in lines) == 10
