"""GPT-2: learned absolute positions, Conv1D projections, embedding tied to the LM head."""

from pipefit.model.adapters import Adapter, register

GPT2 = register(
    Adapter(
        name="gpt2",
        config_classes=("GPT2Config",),
        embed="transformer.wte",
        position_embed="transformer.wpe",
        embed_dropout="transformer.drop",
        blocks="transformer.h",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
    )
)
