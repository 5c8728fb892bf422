"""``pipefit verify``: build every stage in one process and compare with the unmodified HF model.

Stages are built separately (each loads only its own tensors), run in order on random tokens,
and compared with the HF model at every stage boundary (the hidden state entering the next
stage), on the logits and on the loss.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from pipefit.config import RunConfig
from pipefit.model.hf import load_hf_config, set_attn_implementation
from pipefit.model.layer_list import (
    build_layers,
    check_attention,
    layer_plan,
    load_weights,
    make_skeleton,
    stage_layers,
)
from pipefit.model.layers import IGNORE_INDEX, causal_lm_loss, float32_model
from pipefit.model.tasks import CAUSAL_LM, MASKED_LM, MLM_PROBABILITY, SEQUENCE_CLASSIFICATION, TASKS
from pipefit.model.weights import CheckpointNames, SafetensorsReader, hf_state_dict
from pipefit.parity.reference import task_reference_model
from pipefit.partition.boundaries import run_boundaries


@dataclass
class VerifyReport:
    boundaries: list[int]
    boundary_diffs: list[tuple[int, int, float]]  # (stage boundary index, layer index, max |diff|)
    logits_diff: float
    loss_pipeline: float
    loss_hf: float

    @property
    def worst(self) -> float:
        diffs = [d for _, _, d in self.boundary_diffs] + [self.logits_diff, abs(self.loss_pipeline - self.loss_hf)]
        return max(diffs)


def _reference_model(run: RunConfig, hf_config: Any, folder: str | None) -> Any:
    from transformers import AutoModelForCausalLM

    if folder:
        return float32_model(
            AutoModelForCausalLM.from_pretrained,
            hf_config,
            folder,
            config=hf_config,
            attn_implementation=hf_config._attn_implementation,
        )
    torch.manual_seed(run.train.seed)
    return float32_model(AutoModelForCausalLM.from_config, hf_config, hf_config)


def _inputs_to_layers(
    model: Any, skeleton: Any, plan: list[Any], indices: list[int]
) -> tuple[dict[int, torch.Tensor], list[Any]]:
    """Forward pre-hooks capturing the hidden state entering each layer in ``indices``."""
    a = skeleton.adapter
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for idx in indices:
        layer = plan[idx]
        if layer.kind in ("block", "norm") and layer.hf_prefixes:
            # The first HF module the layer runs (a block; the final norm, or OPT's project_out without one).
            prefix = layer.hf_prefixes[0]
        else:
            prefix = a.lm_head

        def hook(_mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any], idx: int = idx) -> None:
            captured[idx] = (args[0] if args else kwargs["hidden_states"]).detach()

        handles.append(model.get_submodule(prefix).register_forward_pre_hook(hook, with_kwargs=True))
    return captured, handles


@contextlib.contextmanager
def loaded_stages(
    model: Any, skeleton: Any, boundaries: list[int], folder: str | None
) -> Iterator[tuple[list[list[Any]], str]]:
    """Each stage's layers built on their own and loaded from ``folder`` (else from ``model``, saved to a
    temporary folder), as ranks would; yields ``(stages, folder)`` while the folder exists."""
    with tempfile.TemporaryDirectory() as tmp:
        if not folder:
            model.save_pretrained(tmp)
            folder = tmp
        stages = []
        for s in range(len(boundaries) - 1):
            layers = build_layers(skeleton, boundaries[s], boundaries[s + 1])
            load_weights(torch.nn.ModuleList(layers), skeleton, folder)
            stages.append(layers)
        yield stages, folder


def run_stages(
    stages: list[list[Any]], boundaries: list[int], inputs: Any
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Feed ``inputs`` through every stage's layers in order (eval mode, no grad).

    Returns the float logits and the hidden state leaving each stage, keyed by the first layer
    index of the next stage.
    """
    x: Any = inputs
    crossing: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for s, layers in enumerate(stages):
            for layer in layers:
                layer.eval()
                x = layer(x)
            if s < len(stages) - 1:
                crossing[boundaries[s + 1]] = x[0] if isinstance(x, tuple) else x
    return x.float(), crossing


def verify(run: RunConfig, batch_size: int = 2, seq_len: int = 32, seed: int = 0, device: str = "cpu") -> VerifyReport:
    """Every stage built on its own, run in order, against the unmodified HF model of the config's task."""
    hf_config = load_hf_config(run.model.path, dict(run.model.hf_config))
    set_attn_implementation(hf_config, run.model.attn_implementation)
    skeleton = make_skeleton(hf_config, seed=run.train.seed)
    return VERIFIERS[skeleton.task](run, hf_config, skeleton, batch_size, seq_len, seed, device)


def verify_causal_lm(
    run: RunConfig, hf_config: Any, skeleton: Any, batch_size: int, seq_len: int, seed: int, device: str
) -> VerifyReport:
    """Compare on ``device`` in ``train.precision``: both models loaded in fp32, then cast alike."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[run.train.precision]
    plan = layer_plan(skeleton)
    boundaries = run_boundaries(skeleton, run)
    model = _reference_model(run, hf_config, run.model.path).eval()
    with loaded_stages(model, skeleton, boundaries, run.model.path) as (stages, _):
        pass
    model.to(device=device, dtype=dtype)
    for layers in stages:
        for layer in layers:
            layer.to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    max_pos = int(getattr(hf_config, "max_position_embeddings", seq_len) or seq_len)
    seq = min(seq_len, max_pos)
    ids = torch.randint(0, int(hf_config.vocab_size), (batch_size, seq), generator=gen)
    pos = torch.arange(seq).expand(batch_size, seq).contiguous()
    targets = torch.cat([ids[:, 1:], torch.full((batch_size, 1), IGNORE_INDEX)], dim=1)
    ids, pos, targets = ids.to(device), pos.to(device), targets.to(device)
    inner = boundaries[1:-1]
    captured, handles = _inputs_to_layers(model, skeleton, plan, inner)
    try:
        with torch.no_grad():
            ref_logits = model(input_ids=ids, position_ids=pos).logits.float()
            logits, crossing = run_stages(stages, boundaries, (ids, pos))
    finally:
        for h in handles:
            h.remove()
    diffs = [(i + 1, b, float((crossing[b].float() - captured[b].float()).abs().max())) for i, b in enumerate(inner)]
    n = int((targets != IGNORE_INDEX).sum())
    scale = torch.tensor([1.0 / n], device=device)
    loss_pipe = float(causal_lm_loss(logits, (targets, scale)))
    loss_hf = float(
        torch.nn.functional.cross_entropy(
            ref_logits.reshape(-1, ref_logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
        )
    )
    return VerifyReport(boundaries, diffs, float((logits - ref_logits).abs().max()), loss_pipe, loss_hf)


def verify_encoder(
    run: RunConfig, hf_config: Any, skeleton: Any, batch_size: int, seq_len: int, seed: int, device: str
) -> VerifyReport:
    """``pipefit verify`` for an encoder: every stage, run in order, against the HF task model (cpu, fp32).

    The last row is right-padded over its last quarter (HF gets the matching ``attention_mask``);
    hidden states and masked-LM logits are compared on the real tokens, classification logits in full.
    """
    if device != "cpu" or run.train.precision != "fp32":
        raise ValueError(
            f"pipefit verify of an encoder runs on cpu in fp32 only (got --device={device}, "
            f"train.precision={run.train.precision})"
        )
    check_attention(run, skeleton)
    plan = layer_plan(skeleton)
    boundaries = run_boundaries(skeleton, run)
    model = task_reference_model(hf_config, run.model.path, run.train.seed).eval()
    with loaded_stages(model, skeleton, boundaries, run.model.path) as (stages, folder):
        # A task head the folder lacks is random in both models: give HF the pipeline's (seeded) one.
        names = CheckpointNames(skeleton, SafetensorsReader(folder).weight_map)
        fresh = {
            name: tensor
            for layer in stage_layers(torch.nn.ModuleList([x for layers in stages for x in layers]))
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
    # The HF module each boundary layer wraps; a tied head's is the decoder it stands for.
    head_prefix = getattr(a, TASKS[skeleton.task].tail[-1].field)
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for idx in boundaries[1:-1]:
        layer = plan[idx]
        prefix = head_prefix if layer.kind == "head" else layer.hf_prefixes[0]

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


# Each task's comparison with its HF model.
VERIFIERS = {CAUSAL_LM: verify_causal_lm, MASKED_LM: verify_encoder, SEQUENCE_CLASSIFICATION: verify_encoder}


def format_report(report: VerifyReport, plan: list[Any] | None = None) -> str:
    lines = [f"boundaries: {report.boundaries}"]
    for stage_boundary, layer, diff in report.boundary_diffs:
        lines.append(f"stage boundary {stage_boundary} (entering layer {layer}): max |diff| {diff:.3e}")
    lines.append(f"logits: max |diff| {report.logits_diff:.3e}")
    lines.append(
        f"loss: pipeline {report.loss_pipeline:.8f} hf {report.loss_hf:.8f} "
        f"|diff| {abs(report.loss_pipeline - report.loss_hf):.3e}"
    )
    lines.append(f"overall: max |diff| {report.worst:.3e}")
    return "\n".join(lines)
