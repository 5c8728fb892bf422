"""The one layer list and the one weight loader: every family and task goes through the same code,
driven by the task record (its layers) and the adapter (its HF names)."""

from __future__ import annotations

import pytest

from conftest import FAMILIES, TIED_FAMILIES, tiny_hf_config
from pipefit.model.layer_list import layer_plan, make_skeleton
from pipefit.model.tasks import TASKS
from pipefit.model.weights import CheckpointNames


@pytest.mark.parametrize("family", FAMILIES)
def test_the_layer_list_is_the_task_records_layers(family: str) -> None:
    """Kinds and layer classes, in order, are exactly what the task names: embedding, one block layer per
    HF block, then the task's slots (the head is the embedding's class where the head is tied)."""
    skeleton = make_skeleton(tiny_hf_config(family))
    task = TASKS[skeleton.task]
    blocks = skeleton.adapter.num_blocks(skeleton.config)
    tied = family in TIED_FAMILIES
    plan = layer_plan(skeleton)
    tail = [(s.kind, task.embed if tied and s.kind == "head" else s.layer) for s in task.tail]
    assert [(x.kind, x.type_names[0]) for x in plan] == [
        ("embed", task.embed),
        *[("block", task.block)] * blocks,
        *tail,
    ]
    assert [x.index for x in plan] == list(range(len(plan)))
    assert [x.block_index for x in plan if x.kind == "block"] == list(range(blocks))
    assert [x.tied for x in plan] == [tied] + [False] * (len(plan) - 2) + [tied]


@pytest.mark.parametrize(
    ("family", "present", "wanted", "found"),
    [
        ("llama", ["model.norm.weight"], "model.norm.weight", "model.norm.weight"),
        # A decoder has no base prefix: a name without it is a different tensor.
        ("llama", ["norm.weight"], "model.norm.weight", None),
        # Tied: the embedding found under the head's name, and the reverse.
        ("llama_tied", ["lm_head.weight"], "model.embed_tokens.weight", "lm_head.weight"),
        ("gpt2", ["transformer.wte.weight"], "lm_head.weight", "transformer.wte.weight"),
        ("llama", ["lm_head.weight"], "model.embed_tokens.weight", None),  # untied: no alias
        # The adapter's own rename table (GPT-NeoX's embed_out).
        ("gpt_neox", ["embed_out.weight"], "lm_head.weight", "embed_out.weight"),
        # An encoder: a bare base-model folder, and the tied decoder's names of the embedding and bias.
        (
            "bert_mlm",
            ["embeddings.word_embeddings.weight"],
            "bert.embeddings.word_embeddings.weight",
            "embeddings.word_embeddings.weight",
        ),
        ("bert_mlm", ["cls.predictions.decoder.bias"], "cls.predictions.bias", "cls.predictions.decoder.bias"),
        ("bert_cls", ["cls.predictions.decoder.bias"], "cls.predictions.bias", None),  # a classifier ties nothing
    ],
)
def test_one_name_resolution_for_every_family(family: str, present: list[str], wanted: str, found: str | None) -> None:
    names = CheckpointNames(make_skeleton(tiny_hf_config(family)), dict.fromkeys(present, "model.safetensors"))
    assert names.resolve(wanted) == found
    # Only an encoder's task heads may be missing from a checkpoint (then freshly initialised).
    assert names.new_head(["classifier.weight"]) == family.startswith("bert")
