"""Parity: the unmodified Hugging Face model as the yardstick (reference trainer, ``pipefit verify``)."""
