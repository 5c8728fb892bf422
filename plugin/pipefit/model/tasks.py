"""Tasks as data: causal LM, masked LM and sequence classification, and what differs between them.

A decoder family trains as a causal LM; an encoder's task is chosen by ``hf_config.architectures``
(``BertForMaskedLM``, ``BertForSequenceClassification``). Each :class:`Task` says which HF auto
class builds its reference model, whether its attention is bidirectional and whether the
flops/profile cost models price its layers. Consumers look a task up in :data:`TASKS` (and the
layer list and batches in their own tables keyed by task name); none asks which family it holds.
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
class Task:
    name: str
    auto_class: str  # the HF auto class that builds the task's model from a config
    bidirectional: bool  # every token attends to its whole document (encoders), not only to earlier ones
    priced: bool  # the flops/profile cost models price its layers


TASKS = {
    CAUSAL_LM: Task(CAUSAL_LM, "AutoModelForCausalLM", bidirectional=False, priced=True),
    MASKED_LM: Task(MASKED_LM, "AutoModelForMaskedLM", bidirectional=True, priced=True),
    SEQUENCE_CLASSIFICATION: Task(
        SEQUENCE_CLASSIFICATION, "AutoModelForSequenceClassification", bidirectional=True, priced=True
    ),
}
# The tasks an encoder's ``architectures`` may name.
TASK_AUTO_CLASSES = {t.name: t.auto_class for t in TASKS.values() if t.bidirectional}


def auto_class(task: str) -> Any:
    import transformers

    return getattr(transformers, TASK_AUTO_CLASSES[task])


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


def check_task_config(hf_config: Any) -> str:
    task = task_of(hf_config)
    if task == SEQUENCE_CLASSIFICATION:
        labels = int(hf_config.num_labels)
        problem = getattr(hf_config, "problem_type", None)
        if labels < 2 or problem not in (None, "single_label_classification"):
            raise ConfigError(
                f"model.hf_config.num_labels={labels} with problem_type={problem!r} is not accepted; accepted: "
                "num_labels >= 2 and problem_type null or single_label_classification (one label per example)"
            )
    return task


def unpriced_error(adapter: Any, method: str) -> ConfigError:
    """``pipeline.partition=flops|profile`` for a task whose layers no cost model prices."""
    return ConfigError(
        f"pipeline.partition={method} is not accepted for the family {adapter.name!r} (the flops/profile "
        "cost models do not price its task's layers); accepted: uniform, parameters, type:REGEX, manual"
    )
