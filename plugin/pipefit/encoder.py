"""Encoder families (BERT) as pipeline stages: masked-LM and sequence-classification heads.

The task is the HF config's ``architectures`` entry (``BertForMaskedLM``,
``BertForSequenceClassification``): the skeleton is that HF model, built on the meta device, and
every layer owns its real submodules (see :class:`pipefit.stages.ModelSkeleton`).

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
:func:`pipefit.stages.causal_lm_loss`: masked LM on targets that are the original ids at masked
positions and ``-100`` elsewhere (no shift), classification on one label per row with ``scale``
counting examples instead of tokens.

Data: masked LM masks the rows :mod:`pipefit.data` builds (any ``data.layout``) with
``DataCollatorForLanguageModeling`` (15% of the non-special tokens; 80% mask token, 10% random,
10% kept), from a generator seeded by ``train.seed`` and the step, over the whole global batch, so
every rank, any data-parallel split, a resumed run and the single-process reference see the same
masks. A tokenizer without a mask token gets ``<|mask|>`` added (the model's vocabulary must hold
it). Classification reads ``data.text_field`` and ``data.label_field``: one example per row,
truncated to ``data.seq_len`` and right-padded.

Reference: :class:`DocumentMasked` gives the unmodified HF model the same document mask, so
:func:`pipefit.reference.train_reference` is the single-process yardstick for encoders too.
Not supported: the ``flops``/``profile`` cost model (and so ``pipefit plan``), token types other
than zero, regression and multi-label classification.
"""

from __future__ import annotations

import functools
import logging
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipefit.build import TIED_KEY, LayerInfo
from pipefit.config import ConfigError, DataConfig, RunConfig
from pipefit.data import BatchLayout, GlobalBatches, Rows, load_raw_dataset
from pipefit.data import build_batches as build_lm_batches
from pipefit.stages import IGNORE_INDEX, ModelSkeleton, StageLayer, float32_model, mask_cache

log = logging.getLogger("pipefit")

MASKED_LM = "masked_lm"
SEQUENCE_CLASSIFICATION = "sequence_classification"
# The HF auto class that builds each task's model from a config.
TASK_AUTO_CLASSES = {MASKED_LM: "AutoModelForMaskedLM", SEQUENCE_CLASSIFICATION: "AutoModelForSequenceClassification"}
MASK_TOKEN = "<|mask|>"
MLM_PROBABILITY = 0.15
COST_METHODS = ("flops", "profile")


# -- task ------------------------------------------------------------------------------------------


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


class _TiedMLMHead(nn.Module):
    def __init__(self, embed: EncoderEmbedLayer) -> None:
        super().__init__()
        self.embed = embed

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return mlm_tied_head_forward(self.embed, hidden)


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


def _layer_args(skeleton: EncoderSkeleton, layer: LayerInfo, device: str) -> tuple[type[nn.Module], tuple[Any, ...]]:
    """Class and arguments of an untied layer (everything but the embedding and a tied head)."""
    a = skeleton.adapter
    if layer.kind == "block":
        return EncoderBlockLayer, (skeleton, layer.index, layer.block_index, device)
    if layer.kind == "transform":
        return SubmoduleLayer, (skeleton, layer.index, "transform", a.mlm_transform, device)
    if layer.kind == "pooler":
        return SubmoduleLayer, (skeleton, layer.index, "pooler", a.pooler, device)
    if skeleton.task == MASKED_LM:
        return SubmoduleLayer, (skeleton, layer.index, "decoder", a.lm_head, device)
    return ClassifierLayer, (skeleton, layer.index, device)


def layer_specs(skeleton: EncoderSkeleton, device: str = "cpu") -> list[Any]:
    """DeepSpeed layer specs in pipeline order; a tied masked-LM head shares the embedding module."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    specs: list[Any] = []
    for layer in layer_plan(skeleton):
        if layer.kind == "embed" and layer.tied:
            attrs = EncoderEmbedLayer.tied_weight_attrs(skeleton)
            specs.append(
                TiedLayerSpec(TIED_KEY, EncoderEmbedLayer, skeleton, 0, device, "embed", tied_weight_attr=attrs)
            )
        elif layer.kind == "embed":
            specs.append(LayerSpec(EncoderEmbedLayer, skeleton, 0, device))
        elif layer.kind == "head" and layer.tied:
            attrs = EncoderEmbedLayer.tied_weight_attrs(skeleton)
            specs.append(
                TiedLayerSpec(
                    TIED_KEY,
                    EncoderEmbedLayer,
                    skeleton,
                    0,
                    device,
                    "head",
                    forward_fn=mlm_tied_head_forward,
                    tied_weight_attr=attrs,
                )
            )
        else:
            cls, args = _layer_args(skeleton, layer, device)
            specs.append(LayerSpec(cls, *args))
    return specs


def build_layers(skeleton: EncoderSkeleton, start: int, stop: int, device: str = "cpu") -> list[nn.Module]:
    """Layers ``[start, stop)`` in one process; a tied head reuses an embedding in the same range."""
    shared: EncoderEmbedLayer | None = None
    out: list[nn.Module] = []
    for layer in layer_plan(skeleton)[start:stop]:
        if layer.kind == "embed":
            shared = EncoderEmbedLayer(skeleton, 0, device, "embed")
            out.append(shared)
        elif layer.kind == "head" and layer.tied:
            out.append(_TiedMLMHead(shared if shared is not None else EncoderEmbedLayer(skeleton, 0, device, "head")))
        else:
            cls, args = _layer_args(skeleton, layer, device)
            out.append(cls(*args))
    return out


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
    from pipefit.build import stage_layers
    from pipefit.weights import SafetensorsReader, hf_state_dict, load_layer

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


def reference_model(hf_config: Any, folder: Any = None, seed: int = 0) -> Any:
    """The unmodified HF task model: from ``folder``, or randomly initialised from ``seed``."""
    cls = auto_class(task_of(hf_config))
    if folder:
        return float32_model(
            cls.from_pretrained, hf_config, folder, config=hf_config, attn_implementation=hf_config._attn_implementation
        )
    torch.manual_seed(seed)
    return float32_model(cls.from_config, hf_config, hf_config)


class DocumentMasked(nn.Module):
    """An HF encoder model that keeps the documents of a row apart as the pipeline does.

    ``forward(input_ids, position_ids)`` builds the same mask as every pipeline block
    (:func:`document_mask`) and passes it as the 4-D ``attention_mask``, so the single-process
    reference (:func:`pipefit.reference.train_reference`) trains on padded and packed rows exactly
    like the pipeline. ``use_cache`` is accepted and ignored (encoders keep no cache).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, **kwargs: Any) -> Any:
        kwargs.pop("use_cache", None)
        shape = torch.empty(*input_ids.shape, 0, dtype=self.model.dtype, device=input_ids.device)
        mask = document_mask(self.model.config, shape, position_ids)
        return self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, **kwargs)


# -- data --------------------------------------------------------------------------------------------


def ensure_mask_token(tokenizer: Any, hf_config: Any) -> int:
    """The tokenizer's mask token id; ``<|mask|>`` is added to a tokenizer that has none."""
    if tokenizer.mask_token is None:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    vocab = int(hf_config.vocab_size)
    if len(tokenizer) > vocab:
        raise ConfigError(
            f"model.hf_config.vocab_size={vocab} has no room for the mask token {tokenizer.mask_token!r}: the "
            f"tokenizer has {len(tokenizer)} tokens with it; use vocab_size >= {len(tokenizer)}"
        )
    return int(tokenizer.mask_token_id)


class MaskedLMBatches:
    """Masked-LM micro-batches over ``base`` (:class:`pipefit.data.GlobalBatches`), identical on every rank.

    Step ``k``'s whole global batch is masked at once by a generator seeded with ``(seed, k)``;
    targets are the original ids at masked positions, ``-100`` elsewhere, and ``scale`` is
    ``grad_accum * dp / masked tokens in the global batch`` (the token mean, as for causal LMs).
    Special tokens and padding are never masked.
    """

    def __init__(self, base: GlobalBatches, tokenizer: Any, seed: int) -> None:
        from transformers import DataCollatorForLanguageModeling

        from pipefit.data import pad_token_id

        self.base = base
        self.layout: BatchLayout = base.layout
        self.seed = seed
        self.collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=MLM_PROBABILITY)
        self.never_masked = torch.tensor(sorted({*tokenizer.all_special_ids, pad_token_id(tokenizer)}))
        self._cached: tuple[int, Any] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.base.steps_per_epoch

    def masked_global_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(masked input ids, position ids, targets)`` of the whole global batch of ``step``."""
        if self._cached is not None and self._cached[0] == step:
            return self._cached[1]
        lay = self.layout
        per_rank = [self.base.micro_batches(step, r) for r in range(lay.dp)]
        order = [per_rank[r][j][0] for j in range(lay.grad_accum_steps) for r in range(lay.dp)]
        ids = torch.cat([x[0] for x in order])
        pos = torch.cat([x[1] for x in order])
        self.collator.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        masked, targets = self.collator.torch_mask_tokens(
            ids.clone(), special_tokens_mask=torch.isin(ids, self.never_masked)
        )
        self._cached = (step, (masked, pos, targets))
        return masked, pos, targets

    def micro_batches(self, step: int, dp_rank: int) -> list[Any]:
        ids, pos, targets = self.masked_global_batch(step)
        lay = self.layout
        scale = torch.tensor([lay.grad_accum_steps * lay.dp / max(int((targets != IGNORE_INDEX).sum()), 1)])
        return [
            ((ids[lay.rows(j, dp_rank)], pos[lay.rows(j, dp_rank)]), (targets[lay.rows(j, dp_rank)], scale))
            for j in range(lay.grad_accum_steps)
        ]

    def iterate(self, dp_rank: int, start_step: int = 0) -> Any:
        step = start_step
        while True:
            yield from self.micro_batches(step, dp_rank)
            step += 1

    def tokens_per_step(self) -> int:
        return self.base.tokens_per_step()


class ClassificationBatches(MaskedLMBatches):
    """Sequence-classification micro-batches: ``((input_ids, position_ids), (labels[batch], scale))``.

    The rows carry each example's label in target column 0 (``-100`` elsewhere), so ``scale`` from
    :class:`~pipefit.data.GlobalBatches` is ``grad_accum * dp / examples in the global batch``.
    """

    def __init__(self, base: GlobalBatches) -> None:
        self.base = base
        self.layout = base.layout

    def micro_batches(self, step: int, dp_rank: int) -> list[Any]:
        return [(inputs, (targets[:, 0], scale)) for inputs, (targets, scale) in self.base.micro_batches(step, dp_rank)]


def _label_ids(values: list[Any], cfg: DataConfig, hf_config: Any) -> np.ndarray:
    num_labels = int(hf_config.num_labels)
    label2id = dict(getattr(hf_config, "label2id", None) or {})
    out = np.empty(len(values), dtype=np.int32)
    for i, value in enumerate(values):
        label = label2id.get(value) if isinstance(value, str) else value
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < num_labels:
            raise ConfigError(
                f"data.label_field={cfg.label_field!r}: row {i} has label {value!r}; accepted: an integer in "
                f"[0, {num_labels}) (model.hf_config.num_labels) or one of model.hf_config.label2id {sorted(label2id)}"
            )
        out[i] = label
    return out


def classification_rows(
    cfg: DataConfig, tokenizer: Any, hf_config: Any, split: str | None = None, split_field: str = "data.split"
) -> Rows:
    """One example per row: ``data.text_field`` tokenised (the tokenizer's own special tokens), truncated to
    ``data.seq_len``, right-padded; its label (``data.label_field``) in target column 0."""
    from pipefit.data import pad_token_id

    dataset = load_raw_dataset(cfg, split, split_field)
    for field_name, column in (("data.text_field", cfg.text_field), ("data.label_field", cfg.label_field)):
        if column not in dataset.column_names:
            raise ConfigError(
                f"{field_name}={column!r} is not a column of the data (sequence classification); "
                f"columns: {', '.join(dataset.column_names)}"
            )
    labels = _label_ids(list(dataset[cfg.label_field]), cfg, hf_config)
    texts = [str(t) for t in dataset[cfg.text_field]]
    encoded = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=cfg.seq_len, verbose=False)
    n, s = len(texts), cfg.seq_len
    ids = np.full((n, s), pad_token_id(tokenizer), dtype=np.int32)
    pos = np.zeros((n, s), dtype=np.int32)
    targets = np.full((n, s), IGNORE_INDEX, dtype=np.int32)
    ramp = np.arange(s, dtype=np.int32)
    for r, row in enumerate(encoded["input_ids"]):
        ids[r, : len(row)] = row
        pos[r, : len(row)] = ramp[: len(row)]
        pos[r, len(row) :] = ramp[: s - len(row)]  # the padding: a document of its own
    targets[:, 0] = labels
    return Rows(torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(targets), "pad")


def build_batches(
    hf_config: Any, cfg: DataConfig, tokenizer: Any, layout: BatchLayout, seed: int
) -> tuple[Any, Any | None]:
    """Training and (optional) evaluation batches for the encoder's task; see :mod:`pipefit.data` for the layout."""
    task = task_of(hf_config)
    if task == MASKED_LM:
        ensure_mask_token(tokenizer, hf_config)
        train, evaluation = build_lm_batches(cfg, tokenizer, layout, seed)
        return MaskedLMBatches(train, tokenizer, seed), (
            MaskedLMBatches(evaluation, tokenizer, seed) if evaluation is not None else None
        )
    if cfg.template is not None:
        raise ConfigError(
            f"data.template={cfg.template} is not accepted for sequence classification; accepted: null "
            "(data.text_field and data.label_field columns)"
        )
    rows = classification_rows(cfg, tokenizer, hf_config)
    eval_rows = None
    if cfg.eval_split:
        eval_rows = classification_rows(cfg, tokenizer, hf_config, cfg.eval_split, "data.eval_split")
    elif cfg.eval_fraction > 0:
        held = max(1, round(len(rows) * cfg.eval_fraction))
        if held >= len(rows):
            raise ConfigError(f"data.eval_fraction={cfg.eval_fraction} holds out all {len(rows)} rows; lower it")
        rows, eval_rows = rows[:-held], rows[-held:]
    train = ClassificationBatches(GlobalBatches(rows, layout, seed))
    evaluation = None
    if eval_rows is not None:
        eval_layout = BatchLayout(layout.micro_batch_size, 1, layout.dp)
        evaluation = ClassificationBatches(GlobalBatches(eval_rows, eval_layout, seed, "evaluation"))
    return train, evaluation


# -- checks before any rank starts ------------------------------------------------------------------


def cost_model_error(adapter: Any, method: str) -> ConfigError:
    return ConfigError(
        f"pipeline.partition={method} is not accepted for the encoder family {adapter.name!r} (the flops/profile "
        "cost model prices decoder layers only); accepted: uniform, parameters, type:REGEX, manual"
    )


def check_partition(run: RunConfig, skeleton: EncoderSkeleton) -> None:
    if run.pipeline.partition in COST_METHODS:
        raise cost_model_error(skeleton.adapter, run.pipeline.partition)


def check_run(run: RunConfig, skeleton: EncoderSkeleton) -> None:
    """Encoder-specific input errors of a training run, one line each, before any process group exists."""
    check_partition(run, skeleton)
    check_attention(run, skeleton)
    max_positions = int(getattr(skeleton.config, "max_position_embeddings", run.data.seq_len))
    if run.data.seq_len > max_positions:
        raise ConfigError(
            f"data.seq_len={run.data.seq_len} exceeds the model's max_position_embeddings={max_positions}; "
            f"use data.seq_len <= {max_positions}"
        )


def check_attention(run: RunConfig, skeleton: EncoderSkeleton) -> None:
    """Flash attention would drop the encoder's padding mask (tokens would attend to padding): refused."""
    impl = run.model.attn_implementation
    if "flash" in impl:
        raise ConfigError(
            f"model.attn_implementation={impl} is not accepted for {type(skeleton.config).__name__}: the encoder's "
            "flash path drops its padding mask; use model.attn_implementation=sdpa or eager"
        )


def make_batches_factory(hf_config: Any) -> Any:
    """``pipefit.data.build_batches``'s signature, for the encoder's task."""
    return functools.partial(build_batches, hf_config)


# -- pipefit verify ---------------------------------------------------------------------------------


def verify(run: RunConfig, hf_config: Any, batch_size: int = 2, seq_len: int = 32, seed: int = 0) -> Any:
    """``pipefit verify`` for an encoder: every stage, run in order, against the HF task model.

    The last row is right-padded over its last quarter (HF gets the matching ``attention_mask``);
    hidden states and masked-LM logits are compared on the real tokens, classification logits in full.
    """
    from pipefit import build as build_mod
    from pipefit.build import stage_layers
    from pipefit.stages import causal_lm_loss
    from pipefit.verify import VerifyReport, loaded_stages, run_stages
    from pipefit.weights import SafetensorsReader, hf_state_dict

    skeleton = build_mod.make_skeleton(hf_config, seed=run.train.seed)
    check_partition(run, skeleton)
    check_attention(run, skeleton)
    plan = layer_plan(skeleton)
    boundaries = build_mod.boundaries_for(
        skeleton, run.pipeline.partition, run.pipeline.stages, run.pipeline.boundaries
    )
    model = reference_model(hf_config, run.model.path, run.train.seed).eval()
    with loaded_stages(model, skeleton, boundaries, run.model.path) as (stages, folder):
        # A task head the folder lacks is random in both models: give HF the pipeline's (seeded) one.
        names = CheckpointNames(skeleton, SafetensorsReader(folder).weight_map)
        fresh = {
            name: tensor
            for layer in stage_layers(nn.ModuleList([x for layers in stages for x in layers]))
            for name, tensor in hf_state_dict(layer).items()
            if names.resolve(name) is None
        }
        if fresh:
            model.load_state_dict(fresh, strict=False)

    gen = torch.Generator().manual_seed(seed)
    seq = min(seq_len, int(getattr(hf_config, "max_position_embeddings", seq_len) or seq_len))
    ids = torch.randint(0, int(hf_config.vocab_size), (batch_size, seq), generator=gen)
    real = torch.ones(batch_size, seq, dtype=torch.long)
    pad = seq // 4
    if pad:
        real[-1, seq - pad :] = 0
    pos = torch.arange(seq).expand(batch_size, seq).clone()
    pos[-1, seq - pad :] = torch.arange(pad)
    a = skeleton.adapter
    if skeleton.task == MASKED_LM:
        chosen = (torch.rand(batch_size, seq, generator=gen) < MLM_PROBABILITY) & real.bool()
        chosen[0, 0] = True
        targets = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
        n = int(chosen.sum())
    else:
        targets = torch.randint(0, int(hf_config.num_labels), (batch_size,), generator=gen)
        n = batch_size
    prefix_of = {"block": None, "transform": a.mlm_transform, "pooler": a.pooler}
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for idx in boundaries[1:-1]:
        layer = plan[idx]
        if layer.kind == "block":
            prefix = a.block_prefix(layer.block_index)
        elif layer.kind == "head":
            prefix = a.lm_head if skeleton.task == MASKED_LM else a.classifier
        else:
            prefix = prefix_of[layer.kind]

        def hook(_mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any], idx: int = idx) -> None:
            captured[idx] = (args[0] if args else kwargs["hidden_states"]).detach()

        handles.append(model.get_submodule(prefix).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=real, labels=targets)
            logits, crossing = run_stages(stages, boundaries, (ids, pos))
    finally:
        for h in handles:
            h.remove()
    keep = real.bool()

    def diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
        d = (ours.float() - theirs.float()).abs()
        if d.dim() >= 2 and d.shape[:2] == keep.shape:
            d = d[keep]
        return float(d.max())

    diffs = [(i + 1, b, diff(crossing[b], captured[b])) for i, b in enumerate(boundaries[1:-1])]
    loss_pipe = float(causal_lm_loss(logits, (targets, torch.tensor([1.0 / n]))))
    return VerifyReport(boundaries, diffs, diff(logits, ref.logits), loss_pipe, float(ref.loss))
