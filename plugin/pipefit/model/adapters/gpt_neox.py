"""GPT-NeoX / Pythia: LayerNorm, partial rotary (``rotary_pct``), parallel residual, untied head.

The parallel residual (``use_parallel_residual``) and the partial rotary live inside HF's
``GPTNeoXLayer``/``GPTNeoXAttention``; the rotary tables come from ``gpt_neox.rotary_emb``.
Checkpoints name the head ``embed_out`` (Pythia on the hub, and transformers' own
``save_pretrained``) while the module is ``lm_head``; both names load, and an export writes
``lm_head``, which ``from_pretrained`` reads as well.
"""

from pipefit.model.adapters import Adapter, register

GPT_NEOX = register(
    Adapter(
        name="gpt_neox",
        config_classes=("GPTNeoXConfig",),
        embed="gpt_neox.embed_in",
        embed_dropout="gpt_neox.emb_dropout",
        blocks="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",
        rotary="gpt_neox.rotary_emb",
        checkpoint_aliases=(("lm_head.weight", "embed_out.weight"),),
    )
)
