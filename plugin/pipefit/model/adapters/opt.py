"""OPT: learned positions offset by 2, optional input/output projections, tied head.

``OPTDecoder.forward`` embeds tokens at ``word_embed_proj_dim``, projects them to the hidden
size (``project_in``, present when the two differ), adds the learned positions looked up at
``position_ids + 2``, and after the blocks applies the final LayerNorm (absent when
``do_layer_norm_before`` is false) and ``project_out``. Its causal mask ignores the position
ids, so packed documents attend across their boundaries, as in HF.
"""

from pipefit.model.adapters import Adapter, register

OPT = register(
    Adapter(
        name="opt",
        config_classes=("OPTConfig",),
        embed="model.decoder.embed_tokens",
        position_embed="model.decoder.embed_positions",
        position_offset=2,
        project_in="model.decoder.project_in",
        blocks="model.decoder.layers",
        final_norm="model.decoder.final_layer_norm",
        project_out="model.decoder.project_out",
        lm_head="lm_head",
        mask_uses_position_ids=False,
    )
)
