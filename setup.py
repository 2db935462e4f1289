"""attnx: a JAX/Flax research framework for attention mechanisms."""

import setuptools

# Floors are the versions this project was tested with (see BUILD.md).
INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "tensorflow-datasets>=4.9.10",
    "grain>=0.2.18",
    "array-record>=0.8.6",
    "absl-py>=2.5.1",
    "ml-collections>=1.1.0",
    "numpy>=2.0",
    # Bundled offline tasks are generated from these libraries.
    "babel>=2.18.0",
    "num2words>=0.5.14",
    "scikit-learn>=1.9.1",
    # Tokenizers, metrics and plots.
    "sentencepiece>=0.2.0",
    "sacrebleu>=2.6.0",
    "matplotlib>=3.11",
    "tensorboardX>=2.6.5",
]

EXTRAS_REQUIRE = {
    # selenium drives the system's Chromium in tests/interpret/test_html_page.py.
    # networkx is a reference max-flow in tests/interpret/test_flow.py.
    "test": ["pytest>=9.0", "pytest-xdist>=3.8", "ruff>=0.17", "selenium>=4.51", "networkx>=3.0"],
    # Accelerator builds of jaxlib; see BUILD.md.
    "gpu": ["jax[cuda12]>=0.10.2"],
    "tpu": ["jax[tpu]>=0.10.2"],
    # libtpu on any machine: --mode=compile compiles for a TPU topology without a TPU
    # (attnx/training/compile_mode.py); its tests run in CI. Pinned to the jax it matches.
    "aot": ["jax[tpu]==0.10.2"],
    # The PyTorch peers of benchmarks/ (python -m benchmarks.compare). Pinned: on a
    # machine with the CPU wheel of 2.13.0 at hand pip takes it; an open range may
    # pull a CUDA build of several GB. Not in 'test': the peers' tests skip without it.
    "bench": ["torch==2.13.0"],
}

setuptools.setup(
    name="attnx",
    version="0.1.0",
    description="Attention mechanisms in JAX/Flax: layers, architectures, training and interpretation.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["attnx", "attnx.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["attnx=attnx.main:run"]},
)
