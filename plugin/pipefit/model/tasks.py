"""Tasks as data: causal LM, masked LM and sequence classification, and what differs between them.

A decoder family trains as a causal LM; an encoder's task is chosen by ``hf_config.architectures``
(``BertForMaskedLM``, ``BertForSequenceClassification``; see the adapter's ``task``). Each
:class:`Task` says which HF auto class builds its model, whether its attention is bidirectional,
whether its head may be tied to the token embedding, whether the flops/profile cost models price
its layers, and which stage layers make up its layer list: the embedding, the block and the
:class:`Slot` s after the blocks (norm + LM head; MLM transform + decoder; pooler + classifier).
Layers are named by class name: :mod:`pipefit.model.layer_list` resolves them, so this table sits
below the layers. Consumers look a task up in :data:`TASKS` (batches in their own table keyed by
task name); none asks which family it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipefit.config import ConfigError

CAUSAL_LM = "causal_lm"
MASKED_LM = "masked_lm"
SEQUENCE_CLASSIFICATION = "sequence_classification"
# Masked LM: the token that replaces a masked position, and the share of real tokens masked.
MASK_TOKEN = "<|mask|>"
MLM_PROBABILITY = 0.15


@dataclass(frozen=True)
class Slot:
    """One pipeline layer after the blocks.

    ``kind`` is its kind in the layer list (``LayerInfo.kind``), ``layer`` its stage-layer class (by
    name), ``field`` the adapter field holding its HF prefix, ``local`` the name a plain submodule
    layer (``SubmoduleLayer``) holds it under.
    """

    kind: str
    layer: str
    field: str = ""
    local: str = ""


@dataclass(frozen=True)
class Task:
    name: str
    auto_class: str  # the HF auto class that builds the task's model from a config
    bidirectional: bool  # every token attends to its whole document (encoders), not only to earlier ones
    priced: bool  # the flops/profile cost models price its layers
    tieable: bool  # the head shares the token embedding where the config ties them (tie_word_embeddings)
    embed: str  # the embedding layer (class name); a tied head is built on the same class
    block: str  # the block layer (class name): its attention mask is the task's
    tail: tuple[Slot, ...]  # the layers after the blocks, the last one the head (replaced by the tied head)


TASKS = {
    CAUSAL_LM: Task(
        CAUSAL_LM,
        "AutoModelForCausalLM",
        bidirectional=False,
        priced=True,
        tieable=True,
        embed="EmbedLayer",
        block="BlockLayer",
        tail=(Slot("norm", "NormLayer"), Slot("head", "HeadLayer", "lm_head")),
    ),
    MASKED_LM: Task(
        MASKED_LM,
        "AutoModelForMaskedLM",
        bidirectional=True,
        priced=True,
        tieable=True,
        embed="EncoderEmbedLayer",
        block="EncoderBlockLayer",
        tail=(
            Slot("transform", "SubmoduleLayer", "mlm_transform", "transform"),
            Slot("head", "SubmoduleLayer", "lm_head", "decoder"),
        ),
    ),
    SEQUENCE_CLASSIFICATION: Task(
        SEQUENCE_CLASSIFICATION,
        "AutoModelForSequenceClassification",
        bidirectional=True,
        priced=True,
        tieable=False,
        embed="EncoderEmbedLayer",
        block="EncoderBlockLayer",
        tail=(Slot("pooler", "SubmoduleLayer", "pooler", "pooler"), Slot("head", "ClassifierLayer", "classifier")),
    ),
}
# The tasks an encoder's ``architectures`` may name.
TASK_AUTO_CLASSES = {t.name: t.auto_class for t in TASKS.values() if t.bidirectional}


def auto_class(task: str) -> Any:
    import transformers

    return getattr(transformers, TASKS[task].auto_class)


def task_class_name(task: str, hf_config: Any) -> str:
    """The HF model class of ``task`` for this config's family (``BertForMaskedLM``)."""
    return auto_class(task)._model_mapping[type(hf_config)].__name__


def task_of(hf_config: Any) -> str:
    """``masked_lm`` or ``sequence_classification``, read from ``hf_config.architectures``."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    for task in TASK_AUTO_CLASSES:
        if task_class_name(task, hf_config) in archs:
            return task
    # ++ adds the key or replaces it, whether or not the preset has one: the hint works as typed.
    accepted = " or ".join(
        f"++model.hf_config.architectures=[{task_class_name(t, hf_config)}]" for t in TASK_AUTO_CLASSES
    )
    raise ConfigError(
        f"model.hf_config.architectures={archs} names no task head for this encoder (a bare encoder checkpoint "
        f"has none); accepted: {accepted}"
    )


def check_task_config(hf_config: Any, task: str) -> None:
    """What the task needs of the config (a classifier: one label per example), one line if not."""
    if task == SEQUENCE_CLASSIFICATION:
        labels = int(hf_config.num_labels)
        problem = getattr(hf_config, "problem_type", None)
        if labels < 2 or problem not in (None, "single_label_classification"):
            raise ConfigError(
                f"model.hf_config.num_labels={labels} with problem_type={problem!r} is not accepted; accepted: "
                "num_labels >= 2 and problem_type null or single_label_classification (one label per example)"
            )


def unpriced_error(adapter: Any, method: str) -> ConfigError:
    """``pipeline.partition=flops|profile`` for a task whose layers no cost model prices."""
    return ConfigError(
        f"pipeline.partition={method} is not accepted for the family {adapter.name!r} (the flops/profile "
        "cost models do not price its task's layers); accepted: uniform, parameters, type:REGEX, manual"
    )
