"""The environment the tests run commands in, and the XLA flags of the test processes.

The tests compile hundreds of tiny programs in process and run most of them
for a step or two, so XLA's LLVM optimisation is most of their time and buys
them nothing: conftest.py runs the test processes with `QUICK_COMPILE` (the
HLO passes, fusion and layout included, still run; the arithmetic is the
same IEEE float32, only its order within a fused loop may differ). Measured
on 2 idle cores: a tiny Transformer's train step compiles in 2.1-2.7 s
instead of 3.5-4.4 s. The commands the tests run (`cpu_env`) keep XLA's
defaults, as a user's do: their compiles mostly hit the run's persistent
cache, so what is left is training steps, which run slower unoptimised
(tests/training/test_faults.py took 200 s with the flags and 174 s without).
"""

import os

QUICK_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def cpu_env(devices: int = 1, **variables: str) -> dict[str, str]:
    """This process's environment for a command on `devices` CPU devices, plus `variables`."""
    flags = f"--xla_force_host_platform_device_count={devices}"
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, **variables)
