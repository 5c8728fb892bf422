"""Llama-style decoders: RMSNorm, rotary positions, GQA, gated MLP, tied or untied head.

Llama, Mistral, Qwen2 and Phi-3 differ only in what HF's own modules read from the config
(biases on q/k/v, fused qkv and gate/up projections, partial rotary, sliding windows, layer
types), so one adapter serves all of them. Qwen3 and Gemma reuse this layout (``qwen3.py``,
``gemma.py``).
"""

from pipefit.model.adapters import Adapter, register

LLAMA = register(
    Adapter(
        name="llama",
        config_classes=("LlamaConfig", "MistralConfig", "Phi3Config", "Qwen2Config"),
        embed="model.embed_tokens",
        blocks="model.layers",
        final_norm="model.norm",
        lm_head="lm_head",
        rotary="model.rotary_emb",
        sliding_window_attr="sliding_window",
        gated_mlp=True,
    )
)
