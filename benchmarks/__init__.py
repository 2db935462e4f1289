"""attnx's benchmarks: throughput and memory, JSON lines out (see benchmarks/README.md)."""
