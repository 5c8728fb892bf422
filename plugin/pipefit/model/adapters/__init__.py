"""Model-family adapters: what each Hugging Face family looks like as a pipeline, as data.

An adapter names the HF submodules (by their parameter prefix in the HF checkpoint) that make
up the ordered pipeline layers: token embedding (plus optional learned positions and input
projection), each decoder block, the final norm (plus optional output projection) and the LM
head. Everything that builds, loads or exports stages reads these names; nothing else knows
about a family. The HF modules themselves do the family's arithmetic (Gemma's scaled embedding,
QK-norm, soft-capped attention, parallel residuals): a pipeline layer calls them exactly as the
HF model's own forward does.

How to add a family (an adapter is data, not control flow):

1. Read the HF model's forward (``transformers/models/<family>/modeling_<family>.py``) between
   the input ids and the logits: what runs before the first block, how each block is called
   (keyword arguments, rotary tables, which mask), what runs after the last block.
2. Write ``adapters/<family>.py`` with an :class:`Adapter` naming those submodules by HF prefix,
   and the HF config class names it serves; :func:`register` it and import the module at the
   bottom of this file. A family that differs from another only in names or flags HF reads
   itself is one more config class of that adapter; one that differs in a field or two is
   ``dataclasses.replace(OTHER, ...)`` (see ``qwen3.py``, ``gemma.py``).
3. Whatever the HF forward does outside its submodules is a field here, read by the generic
   layers in :mod:`pipefit.model.layers`: learned positions and their offset, input/output
   projections, final-logit soft-capping, whether the mask sees the position ids. A new kind of
   glue is a new field with a default that changes nothing for the other families.
4. Add a tiny config to ``tests/conftest.py`` (``FAMILIES``, and ``TIED_FAMILIES`` when tied):
   the parity, weight round-trip, FLOP-count and ``pipefit verify`` tests then cover it; add a
   ``conf/model/<family>_tiny.yaml`` preset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipefit.model.tasks import CAUSAL_LM, TASKS

__all__ = ["Adapter", "UnknownFamilyError", "for_config", "register", "supported_config_classes"]


class UnknownFamilyError(ValueError):
    """Raised when no adapter serves a Hugging Face config class."""


@dataclass(frozen=True)
class Adapter:
    """Declarative description of one decoder-only family.

    Attributes:
        name: short family name.
        config_classes: HF config class names this adapter serves.
        embed: HF prefix of the token embedding (``nn.Embedding``).
        blocks: HF prefix of the ``ModuleList`` of decoder blocks; block ``i`` is ``{blocks}.{i}``.
        final_norm: HF prefix of the norm after the last block.
        lm_head: HF prefix of the output projection.
        position_embed: HF prefix of a learned position embedding added to token embeddings.
        embed_dropout: HF prefix of a dropout applied after the embeddings.
        rotary: HF prefix of the rotary embedding module; rebuilt inside every block stage
            from the integer position ids that cross stage boundaries.
        sliding_window_attr: config attribute that, when set and no ``layer_types`` exist,
            makes every block use sliding-window attention (Mistral's convention).
        position_offset: added to the position ids before the learned position lookup (OPT's
            ``OPTLearnedPositionalEmbedding`` reads row ``position + 2``).
        project_in: HF prefix of a projection from the token embedding's width to the hidden
            size, applied before positions are added (OPT's ``word_embed_proj_dim``); skipped
            where the HF model has none.
        project_out: HF prefix of a projection after the final norm back to the embedding's
            width (OPT); skipped where the HF model has none. The final norm is likewise
            skipped where the HF model has none (OPT with ``do_layer_norm_before=False``).
        final_logit_softcap_attr: config attribute holding the final-logit soft-cap ``c``: the
            head returns ``c * tanh(logits / c)`` when it is set (Gemma-2).
        mask_uses_position_ids: whether the HF forward builds its causal mask from the position
            ids (then position ids that restart mark packed documents that attend only within
            themselves); OPT builds its mask without them.
        checkpoint_aliases: ``(name, other name)`` pairs: a checkpoint may hold the tensor
            under the other name, which ``from_pretrained`` also maps (GPT-NeoX's ``embed_out``).
        base_prefix: the base model's prefix where a bare base-model checkpoint saves its tensors
            without it (BERT's ``bert``); empty: every name is looked up as it is.
        gated_mlp: the MLP is gate/up/down (SwiGLU/GeGLU) rather than up/down (cost model).
        qk_norm: blocks normalise queries and keys per head (Qwen3; cost model).
        norms_per_block: norms each block applies to the hidden states (cost model).
        kind: ``decoder`` (causal LM) or ``encoder`` (bidirectional, task heads; see
            ``adapters/bert.py``). A label only: what differs is the task (:meth:`task`).
    """

    name: str
    config_classes: tuple[str, ...]
    embed: str
    blocks: str
    final_norm: str
    lm_head: str
    position_embed: str | None = None
    embed_dropout: str | None = None
    rotary: str | None = None
    sliding_window_attr: str | None = None
    position_offset: int = 0
    project_in: str | None = None
    project_out: str | None = None
    final_logit_softcap_attr: str | None = None
    mask_uses_position_ids: bool = True
    checkpoint_aliases: tuple[tuple[str, str], ...] = ()
    base_prefix: str = ""
    gated_mlp: bool = False
    qk_norm: bool = False
    norms_per_block: int = 2
    kind: str = "decoder"

    def num_blocks(self, hf_config: Any) -> int:
        return int(hf_config.num_hidden_layers)

    def task(self, hf_config: Any) -> str:
        """The task this config trains (a key of :data:`pipefit.model.tasks.TASKS`): a causal LM."""
        return CAUSAL_LM

    def tied(self, hf_config: Any) -> bool:
        """Whether the head shares the token embedding's weight (where the config and the task tie them)."""
        return bool(getattr(hf_config, "tie_word_embeddings", False)) and TASKS[self.task(hf_config)].tieable

    def tied_names(self) -> tuple[tuple[str, str], ...]:
        """``(embedding-side name, head-side name)`` of each tensor a tied head shares."""
        return ((f"{self.embed}.weight", f"{self.lm_head}.weight"),)

    def head_prefixes(self) -> tuple[str, ...]:
        """Task-head prefixes a checkpoint may lack (then randomly initialised, as ``from_pretrained`` does)."""
        return ()

    def learned_positions(self) -> bool:
        """Whether positions index a learned table (``max_position_embeddings`` is then a hard limit)."""
        return bool(self.position_embed)

    def attention_kind(self, hf_config: Any, block_index: int) -> str:
        """``full_attention`` or ``sliding_attention`` for one block, as the HF model decides."""
        layer_types = getattr(hf_config, "layer_types", None)
        if layer_types:
            return str(layer_types[block_index])
        if self.sliding_window_attr and getattr(hf_config, self.sliding_window_attr, None) is not None:
            return "sliding_attention"
        return "full_attention"

    def block_prefix(self, block_index: int) -> str:
        return f"{self.blocks}.{block_index}"

    def final_logit_softcap(self, hf_config: Any) -> float | None:
        """The final-logit soft-cap the HF model applies, or ``None``."""
        if not self.final_logit_softcap_attr:
            return None
        cap = getattr(hf_config, self.final_logit_softcap_attr, None)
        return float(cap) if cap else None


_REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    for cls_name in adapter.config_classes:
        if cls_name in _REGISTRY:
            raise ValueError(f"config class {cls_name} is already served by adapter {_REGISTRY[cls_name].name!r}")
        _REGISTRY[cls_name] = adapter
    return adapter


def supported_config_classes() -> list[str]:
    return sorted(_REGISTRY)


def registered_adapters() -> list[Adapter]:
    seen: dict[str, Adapter] = {}
    for adapter in _REGISTRY.values():
        seen.setdefault(adapter.name, adapter)
    return list(seen.values())


def for_config(hf_config: Any) -> Adapter:
    """The adapter serving ``type(hf_config).__name__``; a one-line error lists what is supported."""
    cls_name = type(hf_config).__name__
    try:
        return _REGISTRY[cls_name]
    except KeyError:
        raise UnknownFamilyError(
            f"model family {cls_name} is not supported; supported HF config classes: "
            f"{', '.join(supported_config_classes())}"
        ) from None


# Families register themselves on import.
# bert is the encoder family (its layers: pipefit.model.encoder).
from pipefit.model.adapters import bert, gemma, gpt2, gpt_neox, llama, opt, qwen3  # noqa: E402,F401
