"""README stays true: CI runs its test command, and its code examples run."""

import pathlib
import re

import pytest

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
