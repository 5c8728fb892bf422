"""Data: datasets -> token rows (concat, pack, pad; chat and instruction templates) -> micro-batches."""
