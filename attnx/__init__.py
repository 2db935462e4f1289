"""attnx: attention mechanisms in JAX/Flax. `attnx.load(workdir)` opens a trained run.

`load` is imported on first use, so that `import attnx.layers` stays light.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "load":
        from attnx.inference import load

        return load
    raise AttributeError(f"module 'attnx' has no attribute {name!r}")
