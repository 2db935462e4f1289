"""The comparison implementations (PyTorch, plain Flax) and the machine measurements.

Nothing here imports attnx: the peers are independent implementations of the
cpu-small training steps that `benchmarks.compare` times beside attnx's.
"""
