"""The stage layers of encoder families (BERT): embedding, block, masked-LM and classifier heads.

The task is the HF config's ``architectures`` entry (``BertForMaskedLM``,
``BertForSequenceClassification``): the skeleton is that HF model, built on the meta device, and
every layer owns its real submodules (see :class:`pipefit.model.layers.ModelSkeleton`). The task
table (:data:`pipefit.model.tasks.TASKS`) names these layers; :mod:`pipefit.model.layer_list` builds
the layer list and :mod:`pipefit.model.weights` loads them, as for decoders.

What crosses a stage boundary is ``(hidden, position_ids)``, as for decoders. Attention is
bidirectional within a document; documents are delimited by position ids that restart at 0
(document id = ``cumsum(position_ids == 0)``), and a right-padded tail with its own positions
from 0 is a document of its own, so no real token attends to padding. Every block builds its
mask from the integer position ids with HF's ``create_bidirectional_mask`` (boolean for sdpa,
additive for eager); a float mask never crosses a stage. Token type ids are all zeros (single
segments; HF's own default when none are given).

Layers: embedding, one per block, then ``transform`` + ``head`` (masked LM: the decoder tied to the
word embedding through DeepSpeed's ``TiedLayerSpec``, output bias included) or ``pooler`` + ``head``
(dropout + classifier, logits ``[batch, num_labels]``). Both tasks train with
:func:`pipefit.model.layers.causal_lm_loss`: masked LM on targets that are the original ids at masked
positions and ``-100`` elsewhere (no shift), classification on one label per row with ``scale``
counting examples instead of tokens.

Data: masked LM masks the rows :mod:`pipefit.data.batches` builds (any ``data.layout``) with
``DataCollatorForLanguageModeling`` (15% of the non-special tokens; 80% mask token, 10% random,
10% kept), from a generator seeded by ``train.seed`` and the step, over the whole global batch, so
every rank, any data-parallel split, a resumed run and the single-process reference see the same
masks. A tokenizer without a mask token gets ``<|mask|>`` added (the model's vocabulary must hold
it). Classification reads ``data.text_field`` and ``data.label_field``: one example per row,
truncated to ``data.seq_len`` and right-padded.

Reference: :class:`pipefit.parity.reference.DocumentMasked` gives the unmodified HF model the same document mask, so
:func:`pipefit.parity.reference.train_reference` is the single-process yardstick for encoders too.
Priced like decoders by the ``flops``/``profile`` cost models (:mod:`pipefit.partition.costs`), so
``pipefit plan`` and the default partition balance them. Not supported: token types other than
zero, regression and multi-label classification.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipefit.model.layers import LayerInfo, ModelSkeleton, StageLayer
from pipefit.model.tasks import Slot


def document_mask(config: Any, hidden: torch.Tensor, position_ids: torch.Tensor) -> Any:
    """The attention mask of one block: bidirectional inside each document, nothing across.

    ``None`` (no mask) when every row is one document, as HF's own mask builder returns for sdpa.
    """
    from transformers.masking_utils import create_bidirectional_mask, packed_sequence_mask_function

    documents = (position_ids == 0).cumsum(-1)
    single = bool((documents[:, -1] == documents[:, 0]).all())
    return create_bidirectional_mask(
        config=config,
        inputs_embeds=hidden,
        attention_mask=None,
        and_mask_function=None if single else packed_sequence_mask_function(documents),
    )


def mlm_tied_head_forward(embed: EncoderEmbedLayer, hidden: torch.Tensor) -> torch.Tensor:
    """Masked-LM decoder sharing the word embedding (``TiedLayerSpec`` forward_fn): ``hidden @ E^T + bias``."""
    return F.linear(hidden, embed.word_embedding().weight, embed.output_bias())


class EncoderEmbedLayer(StageLayer):
    """``(input_ids, position_ids)`` -> ``(hidden, position_ids)`` through the HF embedding module.

    With a tied masked-LM head this module is shared through ``TiedLayerSpec`` and also holds the
    decoder's output bias (HF name ``cls.predictions.bias``), so the head needs nothing else. On a
    rank holding only the head (``role="head"``) it allocates just the word embedding and the bias.
    """

    head_forward = staticmethod(mlm_tied_head_forward)

    @classmethod
    def planned_prefixes(cls, skeleton: ModelSkeleton, slot: Slot) -> tuple[str, ...]:
        # hf_prefixes name modules; the tied output bias (a bare parameter) is counted in num_params only.
        return (skeleton.adapter.embeddings,)

    @staticmethod
    def tied_extra_params(skeleton: ModelSkeleton) -> int:
        """The tied output bias, held by the embedding and by the head that shares it."""
        return int(skeleton.config.vocab_size)

    def __init__(self, skeleton: ModelSkeleton, layer_index: int, device: str = "cpu", role: str = "embed") -> None:
        super().__init__()
        a = skeleton.adapter
        self.word_attr = a.embed[len(a.embeddings) + 1 :]
        if role == "embed":
            embeddings = skeleton.materialize(a.embeddings, device, layer_index)
        else:
            embeddings = nn.Module()
            setattr(embeddings, self.word_attr, skeleton.materialize(a.embed, device, layer_index))
        self.adopt("embeddings", embeddings, a.embeddings)
        self.predictions = None
        if a.tied(skeleton.config):
            bias_prefix, bias_name = a.mlm_bias.rsplit(".", 1)
            holder = nn.Module()
            # HF initialises the output bias to zeros.
            holder.register_parameter(
                bias_name, nn.Parameter(torch.zeros(int(skeleton.config.vocab_size), device=device))
            )
            self.adopt("predictions", holder, bias_prefix)
            self.bias_name = bias_name

    @staticmethod
    def tied_weight_attrs(skeleton: ModelSkeleton) -> list[str]:
        a = skeleton.adapter
        return [f"embeddings.{a.embed[len(a.embeddings) + 1 :]}.weight", f"predictions.{a.mlm_bias.rsplit('.', 1)[1]}"]

    def word_embedding(self) -> nn.Embedding:
        return getattr(self.embeddings, self.word_attr)

    def output_bias(self) -> torch.Tensor:
        return getattr(self.predictions, self.bias_name)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, position_ids = inputs
        hidden = self.embeddings(
            input_ids=input_ids, position_ids=position_ids, token_type_ids=torch.zeros_like(input_ids)
        )
        if self.predictions is not None and torch.is_grad_enabled() and self.output_bias().requires_grad:
            # The tied bias is used only by the head; adding exactly zero gives it a (zero) gradient
            # here too, so both tied stages take part in DeepSpeed's tied-gradient all-reduce.
            hidden = hidden + 0.0 * self.output_bias()[:1].sum()
        return hidden, position_ids


class EncoderBlockLayer(StageLayer):
    """One HF encoder block; its mask comes from the position ids (see :func:`document_mask`)."""

    @classmethod
    def spec_args(cls, skeleton: ModelSkeleton, layer: LayerInfo, slot: Slot, device: str) -> tuple[Any, ...]:
        return (skeleton, layer.index, layer.block_index, device)

    def __init__(self, skeleton: ModelSkeleton, layer_index: int, block_index: int, device: str = "cpu") -> None:
        super().__init__()
        self.config = skeleton.config
        prefix = skeleton.adapter.block_prefix(block_index)
        self.adopt("block", skeleton.materialize(prefix, device, layer_index), prefix)
        self.masks = skeleton.masks  # one document_mask (and its host sync) per micro-batch and stage

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, position_ids = inputs
        mask = self.masks.get(
            "document", hidden, position_ids, lambda: document_mask(self.config, hidden, position_ids)
        )
        out = self.block(hidden, attention_mask=mask, position_ids=position_ids)
        if isinstance(out, tuple):
            out = out[0]
        return out, position_ids


class SubmoduleLayer(StageLayer):
    """One HF submodule applied to the hidden states (MLM transform, pooler, untied decoder)."""

    @classmethod
    def spec_args(cls, skeleton: ModelSkeleton, layer: LayerInfo, slot: Slot, device: str) -> tuple[Any, ...]:
        return (skeleton, layer.index, slot.local, getattr(skeleton.adapter, slot.field), device)

    def __init__(self, skeleton: ModelSkeleton, layer_index: int, local: str, prefix: str, device: str = "cpu"):
        super().__init__()
        self.local = local
        self.adopt(local, skeleton.materialize(prefix, device, layer_index), prefix)

    def forward(self, inputs: Any) -> torch.Tensor:
        hidden = inputs[0] if isinstance(inputs, tuple) else inputs
        return getattr(self, self.local)(hidden)


class ClassifierLayer(StageLayer):
    """Dropout + classifier on the pooled output: ``[batch, hidden]`` -> logits ``[batch, num_labels]``."""

    def __init__(self, skeleton: ModelSkeleton, layer_index: int, device: str = "cpu") -> None:
        super().__init__()
        a = skeleton.adapter
        self.dropout = skeleton.materialize(a.classifier_dropout, device, layer_index)
        self.adopt("classifier", skeleton.materialize(a.classifier, device, layer_index), a.classifier)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(pooled))
