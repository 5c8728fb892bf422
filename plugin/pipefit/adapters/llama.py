"""Llama-style decoders: RMSNorm, rotary positions, GQA, gated MLP, tied or untied head.

Llama, Mistral and Qwen2 differ only in flags HF already reads from the config (biases on
q/k/v, sliding windows, layer types), so one adapter serves all of them.
"""

from pipefit.adapters import Adapter, register

LLAMA = register(
    Adapter(
        name="llama",
        config_classes=("LlamaConfig", "MistralConfig", "Qwen2Config"),
        embed="model.embed_tokens",
        blocks="model.layers",
        final_norm="model.norm",
        lm_head="lm_head",
        rotary="model.rotary_emb",
        sliding_window_attr="sliding_window",
    )
)
