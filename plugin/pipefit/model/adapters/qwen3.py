"""Qwen3: the Llama layout with per-head RMSNorm on queries and keys (QK-norm).

The QK-norm lives inside HF's ``Qwen3Attention``; the pipeline calls the block as Llama's.
Sliding-window layers, when ``use_sliding_window`` is set, follow ``config.layer_types``.
"""

from dataclasses import replace

from pipefit.model.adapters import register
from pipefit.model.adapters.llama import LLAMA

QWEN3 = register(replace(LLAMA, name="qwen3", config_classes=("Qwen3Config",), qk_norm=True))
