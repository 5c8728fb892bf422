"""The model as a pipeline: adapters (families as data), tasks, stage layers, the layer list, weights, LoRA."""
