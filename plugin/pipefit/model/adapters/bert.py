"""BERT: a bidirectional encoder with a masked-LM head or a sequence-classification head.

The pipeline layers (classes in :mod:`pipefit.model.encoder`, named by the tasks) are:

- embedding: ``bert.embeddings`` (word + position + token-type embeddings, LayerNorm, dropout);
- one layer per block ``bert.encoder.layer.{i}`` (post-norm; no norm after the last block);
- masked LM: ``cls.predictions.transform`` (dense, activation, LayerNorm), then the decoder
  ``cls.predictions.decoder`` -- with tied embeddings the word-embedding matrix plus the
  output bias ``cls.predictions.bias``, shared with the embedding stage through DeepSpeed's
  ``TiedLayerSpec``;
- sequence classification: the pooler ``bert.pooler`` (dense + tanh on the first token), then
  ``dropout`` + ``classifier``.

The task is the HF config's own ``architectures`` entry (``BertForMaskedLM`` or
``BertForSequenceClassification``), so a checkpoint, a pipefit checkpoint and an export all say
which head they carry; a bare ``BertModel`` folder needs it set
(``++model.hf_config.architectures=[BertForMaskedLM]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipefit.model.adapters import Adapter, register
from pipefit.model.tasks import task_of


@dataclass(frozen=True)
class EncoderAdapter(Adapter):
    """An encoder family: the decoder fields name the token embedding, blocks and untied decoder;
    these name the rest. A family that differs only in prefixes is another instance of this class.

    Attributes:
        embeddings: HF prefix of the whole embedding module (called with ids, positions, token types).
        mlm_transform: HF prefix of the masked-LM head's transform (dense, activation, LayerNorm).
        mlm_bias: HF name of the masked-LM output bias (a parameter, not a module).
        pooler: HF prefix of the pooler (first token -> dense -> tanh).
        classifier_dropout: HF prefix of the dropout before the classifier.
        classifier: HF prefix of the classification projection.
    """

    kind: str = "encoder"
    embeddings: str = ""
    mlm_transform: str = ""
    mlm_bias: str = ""
    pooler: str = ""
    classifier_dropout: str = ""
    classifier: str = ""

    def task(self, hf_config: Any) -> str:
        """The task head named by ``hf_config.architectures`` (only a masked-LM head ties; see the task table)."""
        return task_of(hf_config)

    def tied_names(self) -> tuple[tuple[str, str], ...]:
        """The tied masked-LM decoder shares the word embedding and the output bias."""
        return (*super().tied_names(), (self.mlm_bias, f"{self.lm_head}.bias"))

    def learned_positions(self) -> bool:
        """The position table lives inside the embedding module."""
        return True

    def head_prefixes(self) -> tuple[str, ...]:
        """Task-head tensors: a checkpoint without them (a bare encoder, another task) leaves them at
        their random initialisation, as ``from_pretrained`` does."""
        return (self.mlm_transform, self.mlm_bias, self.lm_head, self.pooler, self.classifier)


BERT = register(
    EncoderAdapter(
        name="bert",
        config_classes=("BertConfig",),
        embed="bert.embeddings.word_embeddings",
        blocks="bert.encoder.layer",
        final_norm="",  # post-norm blocks: nothing runs between the last block and the heads
        lm_head="cls.predictions.decoder",
        embeddings="bert.embeddings",
        base_prefix="bert",
        mlm_transform="cls.predictions.transform",
        mlm_bias="cls.predictions.bias",
        pooler="bert.pooler",
        classifier_dropout="dropout",
        classifier="classifier",
    )
)
