"""The tasks an encoder is trained for: masked LM and sequence classification, read from the HF config.

The task is chosen by ``hf_config.architectures`` (``BertForMaskedLM``,
``BertForSequenceClassification``); each has the HF auto class that builds its reference model.
"""

from __future__ import annotations

from typing import Any

from pipefit.config import ConfigError

MASKED_LM = "masked_lm"
SEQUENCE_CLASSIFICATION = "sequence_classification"
# Masked LM: the token that replaces a masked position, and the share of real tokens masked.
MASK_TOKEN = "<|mask|>"
MLM_PROBABILITY = 0.15
# The HF auto class that builds each task's model from a config.
TASK_AUTO_CLASSES = {MASKED_LM: "AutoModelForMaskedLM", SEQUENCE_CLASSIFICATION: "AutoModelForSequenceClassification"}


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
    accepted = " or ".join(f"[{task_class_name(t, hf_config)}]" for t in TASK_AUTO_CLASSES)
    raise ConfigError(
        f"model.hf_config.architectures={archs} names no task head for this encoder; accepted: {accepted} "
        "(a bare encoder checkpoint: set model.hf_config.architectures to choose the head)"
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
