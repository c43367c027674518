"""Quality: what pruning does to a model (size, FLOPs, latency, metrics on data)."""
