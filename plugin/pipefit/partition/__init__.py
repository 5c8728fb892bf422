"""Partitioning: cost models (flops, profile), the min-max partitioner, the 1F1B simulator, boundaries."""
