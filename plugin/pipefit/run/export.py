"""Export: the trained pipeline, or a checkpoint, as a normal Hugging Face folder; LoRA's peft folder.

:func:`export_pipeline` writes each stage's layers from the running engine (collective);
:func:`export` rebuilds one layer at a time from a checkpoint's layer files (``pipefit export``).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from pipefit.model import lora as trainable
from pipefit.model.hf import load_tokenizer
from pipefit.model.layer_list import build_layers as build
from pipefit.model.layer_list import layer_plan, make_skeleton, stage_layers
from pipefit.model.lora import add_lora, lora_from_checkpoint
from pipefit.model.weights import check_export_destination, finalize_export, hf_state_dict, staging_dir, write_shard
from pipefit.run.checkpoint import check_files, find_checkpoint, read_state, safe_load
from pipefit.run.precision import FrozenFromFolder, KeptValues, export_dtype, fp32_parameters, master_weights
from pipefit.run.preflight import Prepared

log = logging.getLogger("pipefit")


def export_pipeline(
    engine: Any,
    prepared: Prepared,
    out_dir: Path,
    tag: str,
    frozen_fp32: dict[int, torch.Tensor] | None = None,
    frozen_from_folder: FrozenFromFolder | None = None,
) -> None:
    """Every stage writes its own shard (dp rank 0 only); rank 0 adds index, config, tokenizer; atomic.

    Written are the trained weights in the model config's dtype (:func:`export_dtype`); under
    bf16/fp16 those are the optimizer's fp32 master weights and, for frozen parameters (which have
    no master), their fp32 values as loaded (``frozen_fp32``, by ``id(param)``, or read again from
    the model folder by ``frozen_from_folder``; a frozen parameter in neither is exact in its
    training copy), cast once, never the rounded training copies.
    LoRA adapters are merged in fp32 too. Masters are fetched one layer at a time and each tensor
    goes to the host already in the export dtype, so a rank holds one layer's masters and its shard.
    """
    import torch.distributed as dist

    module = engine.module
    stage = engine.stage_id
    num_stages = engine.num_stages
    rank = dist.get_rank()
    staging = staging_dir(out_dir, tag)
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    dtype = export_dtype(prepared.hf_config)
    names: list[str] = []
    filename = f"model-{stage + 1:05d}-of-{num_stages:05d}.safetensors"
    writer = engine.grid.get_data_parallel_rank() == 0
    tensors: dict[str, torch.Tensor] = {}
    tied_ids = {id(m) for m in module.tied_modules.values()}
    for layer in stage_layers(module):
        if id(layer) in tied_ids and stage != 0:
            continue  # the tied embedding is saved once, by the stage that owns the embedding
        masters = master_weights(engine, layer.parameters())  # every dp rank of the stage takes part
        if not writer:
            continue
        again = frozen_from_folder.values(layer.parameters()) if frozen_from_folder is not None else {}
        with fp32_parameters(layer, {**(frozen_fp32 or {}), **again, **masters}):
            tensors.update(
                {
                    k: v.to(device="cpu", dtype=dtype) if v.is_floating_point() else v.to("cpu")
                    for k, v in hf_state_dict(layer).items()
                }
            )
        del masters, again
    if writer:
        write_shard(tensors, staging, filename)
        names = sorted(tensors)
    del tensors
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (filename, names))
    if rank == 0:
        shards: dict[str, list[str]] = {}
        for fname, ns in gathered:
            if ns:
                shards[fname] = ns
        finalize_export(staging, out_dir, shards, prepared.hf_config, prepared.tokenizer)
    dist.barrier()


def save_probe_logits(engine: Any, prepared: Prepared, export_dir: Path) -> None:
    """Run one micro-batch through the trained pipeline and keep its logits beside the export.

    ``pipeline_probe.safetensors`` (input_ids, position_ids, logits) lets anyone check that
    ``from_pretrained(export_dir)`` reproduces the pipeline's logits, without pipefit.
    """
    from safetensors.torch import save_file

    probe = prepared.batches.micro_batches(0, 0)[0]
    _, logits = engine.eval_batch(iter([probe]), return_logits=True, num_micro_batches=1)
    engine.module.train()
    if engine.is_last_stage() and engine.grid.get_data_parallel_rank() == 0:
        (ids, pos), _ = probe
        tensors = {"input_ids": ids, "position_ids": pos, "logits": logits.detach().float().cpu().contiguous()}
        tmp = export_dir / ".pipeline_probe.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, export_dir / "pipeline_probe.safetensors")
    import torch.distributed as dist

    dist.barrier()


def export_run(engine: Any, prepared: Prepared, output_dir: Path, kept: KeptValues, rank: int) -> None:
    """The end of a run: ``hf_model/`` (and, with LoRA, the peft folder) and the probe logits. Collective."""
    run = prepared.run
    export_dir = output_dir / "hf_model"
    export_pipeline(engine, prepared, export_dir, f"step{run.train.max_steps}", kept.frozen_fp32, kept.from_folder)
    export_adapter(engine, prepared, output_dir / trainable.ADAPTER_DIR)  # lora: peft folder
    save_probe_logits(engine, prepared, export_dir)
    if rank == 0:
        log.info("exported Hugging Face model to %s", export_dir)


def export_adapter(engine: Any, prepared: Prepared, out_dir: Path) -> None:
    """With LoRA on: every stage's adapter tensors (dp rank 0) gathered into one peft folder. Collective."""
    import torch.distributed as dist

    run = prepared.run
    if not run.lora.enabled:
        return
    tensors: dict[str, torch.Tensor] = {}
    for layer in stage_layers(engine.module):
        # bf16/fp16: the optimizer's fp32 copies of this layer's adapters (collective over dp; dp rank 0 keeps).
        lora = [p for n, p in layer.named_parameters() if "lora_" in n]
        with fp32_parameters(layer, master_weights(engine, lora)):
            if engine.grid.get_data_parallel_rank() == 0:
                tensors.update({k: v.detach().to("cpu") for k, v in trainable.adapter_state_dict(layer).items()})
    rank = dist.get_rank()
    gathered: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(tensors, gathered, dst=0)
    if gathered is not None:
        merged: dict[str, torch.Tensor] = {}
        for part in gathered:
            merged.update(part)
        trainable.write_adapter_folder(merged, run.lora, prepared.skeleton, out_dir, run.model.path)
    dist.barrier()


def export(ckpt_or_run: str | os.PathLike, out_dir: str | os.PathLike, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """A Hugging Face folder from a checkpoint, one layer in memory at a time (``pipefit export``)."""
    from transformers import AutoConfig

    ckpt = find_checkpoint(str(ckpt_or_run), "/nonexistent")
    assert ckpt is not None
    # Before anything is read or written: never over the checkpoint itself, its run, or a user's folder.
    check_export_destination(out_dir, "out_dir", [("checkpoint", str(ckpt_or_run)), ("checkpoint", ckpt)])
    state = read_state(ckpt)
    hf_config = AutoConfig.from_pretrained(ckpt / "hf_config")
    skeleton = make_skeleton(hf_config)
    plan = layer_plan(skeleton)
    tied = skeleton.adapter.tied(hf_config)
    check_files(ckpt, len(plan), tied, state["stages"], state["world_size"], same_shape=False)
    out = Path(out_dir)
    staging = staging_dir(out, f"export-{state['step']}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    # One layer in memory at a time; a shard is written as soon as it is full.
    written: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            write_shard(current, staging, f"part-{len(written):05d}.safetensors")
            written.append(sorted(current))
            current, size = {}, 0

    lora = lora_from_checkpoint(state.get("config"))
    for info in plan:
        if info.kind == "head" and tied:
            continue  # the tied head is the embedding, already written
        (layer,) = build(skeleton, info.index, info.index + 1)
        if lora is not None:  # layer files hold LoRA adapters: rebuilt here, merged by hf_state_dict
            add_lora(stage_layers(torch.nn.ModuleList([layer])), skeleton, lora, seed=0)
        state_dict = safe_load(ckpt / f"layer_{info.index:02d}-model_states.pt", map_location="cpu")
        for sub in stage_layers(torch.nn.ModuleList([layer])):
            wanted = sub.state_dict()
            sub.load_state_dict({k: state_dict[k] for k in wanted}, strict=True)
            for name, tensor in hf_state_dict(sub).items():
                nbytes = tensor.numel() * tensor.element_size()
                if size and size + nbytes > max_shard_bytes:
                    flush()
                current[name] = tensor.detach().clone()
                size += nbytes
        del layer, state_dict
    flush()
    names: dict[str, list[str]] = {}
    for i, keys in enumerate(written):
        fname = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(staging / f"part-{i:05d}.safetensors", staging / fname)
        names[fname] = keys
    tokenizer = load_tokenizer(ckpt / "tokenizer") if (ckpt / "tokenizer").is_dir() else None
    finalize_export(staging, out, names, hf_config, tokenizer)
    return out
