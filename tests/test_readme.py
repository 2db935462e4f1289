"""README stays true: CI runs its test command, and its code examples run."""

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import preloaded
import pytest
from command_env import cpu_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _example(name: str) -> str:
    match = re.search(rf"<!-- readme-test: {name} -->\n```python\n(.*?)```", README, re.S)
    assert match, f"README has no example marked readme-test: {name}"
    return match.group(1)


def test_ci_runs_the_readme_test_command_verbatim():
    commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


@pytest.mark.parametrize("name", ["nnx", "linen"])
def test_reuse_examples_run(name):
    exec(compile(_example(name), f"README:{name}", "exec"), {"__name__": "readme_example"})


def _python(code: str, **kwargs) -> subprocess.CompletedProcess:
    # A subprocess: the examples register a normalizer and an architecture, which
    # must not leak into the registries that other tests of this process read.
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=600,
        **kwargs,
    )


def test_a_new_normalizer_is_one_registration_away():
    result = _python(_example("mechanism"))
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_new_architecture_trains_through_the_entry_point(tmp_path, dates_data_dir):
    (tmp_path / "my_architecture.py").write_text(_example("architecture"))
    (tmp_path / "my_experiment.py").write_text(
        textwrap.dedent(
            """
            import os
            import sys

            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            import my_architecture  # noqa: F401  (registers 'attention_only')

            from attnx.training.config import base_config, smoke_run
            from attnx.training.config_overrides import set_model


            def get_config(arg=None):
                config = base_config()
                config.task.dataset = "dates"
                config.task.max_source_length = 40
                config.task.max_target_length = 12
                set_model(config, "attention_only", "tiny")
                return smoke_run(config)
            """
        )
    )
    result = preloaded.run(
        [
            sys.executable,
            "-m",
            "attnx.main",
            f"--config={tmp_path / 'my_experiment.py'}",
            f"--workdir={tmp_path / 'run'}",
            f"--config.task.data_dir={dates_data_dir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=cpu_env(),
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    # The last step's rows: validation, then the best checkpoint on the test split.
    last = {key: value for row in rows if row["step"] == 20 for key, value in row.items()}
    assert "eval/exact_match" in last and np.isfinite(last["eval/loss"])
    assert "test/exact_match" in last and last["test/checkpoint_step"] in (10, 20)
