"""pipefit: Hugging Face causal LMs as balanced DeepSpeed pipelines."""

__version__ = "0.1.0"
