"""Encoder families (BERT) as pipeline stages: masked-LM and sequence-classification heads.

The task is the HF config's ``architectures`` entry (``BertForMaskedLM``,
``BertForSequenceClassification``): the skeleton is that HF model, built on the meta device, and
every layer owns its real submodules (see :class:`pipefit.model.layers.ModelSkeleton`).

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

import logging
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipefit.config import ConfigError, RunConfig
from pipefit.model.layers import (
    LayerInfo,
    ModelSkeleton,
    StageLayer,
    float32_model,
    mask_cache,
    stage_layers,
)
from pipefit.model.tasks import (
    MASKED_LM,
    auto_class,
    check_task_config,
)
from pipefit.model.weights import SafetensorsReader, hf_state_dict, load_layer

log = logging.getLogger("pipefit")


class EncoderSkeleton(ModelSkeleton):
    """The task's HF model (``AutoModelForMaskedLM`` / ``AutoModelForSequenceClassification``) on the meta device."""

    def __init__(self, hf_config: Any, adapter: Any, seed: int = 0) -> None:
        self.adapter = adapter
        self.seed = seed
        self.task = check_task_config(hf_config)
        with torch.device("meta"):
            self.model = float32_model(auto_class(self.task).from_config, hf_config, hf_config)
        self.config = self.model.config


# -- layers ----------------------------------------------------------------------------------------


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


class EncoderEmbedLayer(StageLayer):
    """``(input_ids, position_ids)`` -> ``(hidden, position_ids)`` through the HF embedding module.

    With a tied masked-LM head this module is shared through ``TiedLayerSpec`` and also holds the
    decoder's output bias (HF name ``cls.predictions.bias``), so the head needs nothing else. On a
    rank holding only the head (``role="head"``) it allocates just the word embedding and the bias.
    """

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


def mlm_tied_head_forward(embed: EncoderEmbedLayer, hidden: torch.Tensor) -> torch.Tensor:
    """Masked-LM decoder sharing the word embedding (``TiedLayerSpec`` forward_fn): ``hidden @ E^T + bias``."""
    return F.linear(hidden, embed.word_embedding().weight, embed.output_bias())


class EncoderBlockLayer(StageLayer):
    """One HF encoder block; its mask comes from the position ids (see :func:`document_mask`)."""

    def __init__(self, skeleton: ModelSkeleton, layer_index: int, block_index: int, device: str = "cpu") -> None:
        super().__init__()
        self.config = skeleton.config
        prefix = skeleton.adapter.block_prefix(block_index)
        self.adopt("block", skeleton.materialize(prefix, device, layer_index), prefix)
        self.masks = mask_cache(skeleton)  # one document_mask (and its host sync) per micro-batch and stage

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


# -- the layer list ----------------------------------------------------------------------------------


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def layer_plan(skeleton: EncoderSkeleton) -> list[LayerInfo]:
    """Embedding, each block, then ``transform`` + ``head`` (masked LM) or ``pooler`` + ``head`` (classification)."""
    a = skeleton.adapter
    cfg = skeleton.config
    model = skeleton.model
    tied = a.tied(cfg)
    vocab = int(cfg.vocab_size)
    embeddings = model.get_submodule(a.embeddings)
    # hf_prefixes name modules; the tied output bias (a bare parameter) is counted in num_params only.
    layers = [
        LayerInfo(
            0,
            "embed",
            (a.embeddings,),
            _numel(embeddings) + (vocab if tied else 0),
            ("EncoderEmbedLayer", type(embeddings).__name__),
            tied,
        )
    ]
    for b in range(a.num_blocks(cfg)):
        block = model.get_submodule(a.block_prefix(b))
        layers.append(
            LayerInfo(
                len(layers),
                "block",
                (a.block_prefix(b),),
                _numel(block),
                ("EncoderBlockLayer", type(block).__name__),
                block_index=b,
            )
        )

    def add(kind: str, prefix: str, layer_type: str) -> None:
        module = model.get_submodule(prefix)
        layers.append(LayerInfo(len(layers), kind, (prefix,), _numel(module), (layer_type, type(module).__name__)))

    if skeleton.task == MASKED_LM:
        add("transform", a.mlm_transform, "SubmoduleLayer")
        if tied:
            # DeepSpeed counts what the head's TiedLayerSpec builds: the word embedding and the bias.
            head_params = _numel(model.get_submodule(a.embed)) + vocab
            layers.append(
                LayerInfo(len(layers), "head", (a.embed,), head_params, ("EncoderEmbedLayer", "TiedHead"), True)
            )
        else:
            add("head", a.lm_head, "SubmoduleLayer")
    else:
        add("pooler", a.pooler, "SubmoduleLayer")
        add("head", a.classifier, "ClassifierLayer")
    return layers


# What pipefit.model.layer_list's one spec/build path needs from this layer list (see the decoder's).
EMBED_LAYER = EncoderEmbedLayer
TIED_HEAD_FORWARD = mlm_tied_head_forward
tied_weight_attrs = EncoderEmbedLayer.tied_weight_attrs


def layer_args(skeleton: EncoderSkeleton, layer: LayerInfo, device: str) -> tuple[type[nn.Module], tuple[Any, ...]]:
    """Class and arguments of a layer (a tied head aside: the layer list builds it on the embedding)."""
    a = skeleton.adapter
    if layer.kind == "embed":
        return EncoderEmbedLayer, (skeleton, 0, device)
    if layer.kind == "block":
        return EncoderBlockLayer, (skeleton, layer.index, layer.block_index, device)
    if layer.kind == "transform":
        return SubmoduleLayer, (skeleton, layer.index, "transform", a.mlm_transform, device)
    if layer.kind == "pooler":
        return SubmoduleLayer, (skeleton, layer.index, "pooler", a.pooler, device)
    if skeleton.task == MASKED_LM:
        return SubmoduleLayer, (skeleton, layer.index, "decoder", a.lm_head, device)
    return ClassifierLayer, (skeleton, layer.index, device)


# -- weights -----------------------------------------------------------------------------------------


class CheckpointNames:
    """Where each HF name of the pipeline is found in a checkpoint's ``weight_map``, if anywhere.

    A name is found as itself, through the tied decoder's other name (``cls.predictions.decoder.weight``
    for the word embedding, ``cls.predictions.decoder.bias`` for the output bias), or without the
    base-model prefix (a bare ``BertModel`` folder saves ``embeddings.*``, not ``bert.embeddings.*``).
    """

    def __init__(self, skeleton: EncoderSkeleton, weight_map: dict[str, str]) -> None:
        a = skeleton.adapter
        self.present = weight_map
        self.base = f"{a.base_prefix}."
        self.heads = a.head_prefixes()
        self.tied: dict[str, str] = {}
        if a.tied(skeleton.config):
            self.tied = {f"{a.embed}.weight": f"{a.lm_head}.weight", a.mlm_bias: f"{a.lm_head}.bias"}

    def resolve(self, name: str) -> str | None:
        for candidate in (name, self.tied.get(name)):
            if candidate is None:
                continue
            if candidate in self.present:
                return candidate
            if candidate.startswith(self.base) and candidate[len(self.base) :] in self.present:
                return candidate[len(self.base) :]
        return None

    def new_head(self, names: list[str]) -> bool:
        """All of ``names`` belong to a task head and none is in the checkpoint."""
        in_head = all(any(n == h or n.startswith(h + ".") for h in self.heads) for n in names)
        return in_head and all(self.resolve(n) is None for n in names)


def load_weights(module: nn.Module, skeleton: EncoderSkeleton, model_path: Any) -> int:
    """Fill every stage layer in ``module`` from a HF folder; returns the number of tensors read.

    Accepted checkpoints: the task's own model, another task's (``BertForMaskedLM`` weights under a
    classifier), or the bare base model (``BertModel``, saved without the ``bert.`` prefix). A task
    head the folder lacks entirely (pooler, classifier, masked-LM transform or bias) keeps its seeded
    random initialisation -- the same on every rank, whatever the partition -- as ``from_pretrained``
    initialises missing weights; it is logged. Any other missing tensor is an error.
    """

    reader = SafetensorsReader(model_path)
    names = CheckpointNames(skeleton, reader.weight_map)
    count = 0
    fresh: list[str] = []
    for layer in stage_layers(module):
        loaded: dict[str, str] = {}
        renamed: dict[str, str] = {}
        for local, prefix in layer.hf_prefixes.items():
            wanted = [f"{prefix}.{k}" for k in getattr(layer, local).state_dict()]
            if names.new_head(wanted):
                fresh.extend(wanted)
                continue
            loaded[local] = prefix
            renamed.update({n: r for n in wanted if (r := names.resolve(n)) not in (None, n)})
        view = SimpleNamespace(hf_prefixes=loaded, **{local: getattr(layer, local) for local in loaded})
        load_layer(view, reader, renamed)  # type: ignore[arg-type]
        count += len(hf_state_dict(view))  # type: ignore[arg-type]
    if fresh:
        log.warning(
            "model.path=%s has no %s: a new task head, randomly initialised (seeded by train.seed)",
            model_path,
            ", ".join(sorted(set(fresh))),
        )
    return count


# -- checks before any rank starts ------------------------------------------------------------------


def check_run(run: RunConfig, skeleton: EncoderSkeleton) -> None:
    """Encoder-specific input errors of a training run, one line each, before any process group exists."""
    check_attention(run, skeleton)
    max_positions = int(getattr(skeleton.config, "max_position_embeddings", run.data.seq_len))
    if run.data.seq_len > max_positions:
        raise ConfigError(
            f"data.seq_len={run.data.seq_len} exceeds the model's max_position_embeddings={max_positions}; "
            f"use data.seq_len <= {max_positions}"
        )


def check_attention(run: RunConfig, skeleton: EncoderSkeleton) -> None:
    """Flash attention would drop the encoder's padding mask (tokens would attend to padding): refused."""
    impl = run.model.attn_implementation or ""  # null picks sdpa or eager
    if "flash" in impl:
        raise ConfigError(
            f"model.attn_implementation={impl} is not accepted for {type(skeleton.config).__name__}: the encoder's "
            "flash path drops its padding mask; use model.attn_implementation=sdpa or eager"
        )
