"""Gemma and Gemma-2: the Llama layout with Gemma's embedding scale, (1 + w) RMSNorm and soft-caps.

HF's own modules carry most of it: ``Gemma*TextScaledWordEmbedding`` multiplies by
sqrt(hidden_size) in the weight's dtype, the RMSNorms scale by ``1 + weight``, and Gemma-2's
attention soft-caps its scores and alternates sliding and full layers by ``config.layer_types``.
What ``Gemma2ForCausalLM.forward`` adds after the LM head is the final-logit soft-cap, applied
by the pipeline's head (tied or not). Gemma-2 blocks also norm before and after the MLP.
"""

from dataclasses import replace

from pipefit.model.adapters import register
from pipefit.model.adapters.llama import LLAMA

GEMMA = register(replace(LLAMA, name="gemma", config_classes=("GemmaConfig",)))

GEMMA2 = register(
    replace(
        GEMMA,
        name="gemma2",
        config_classes=("Gemma2Config",),
        final_logit_softcap_attr="final_logit_softcapping",
        norms_per_block=4,
    )
)
