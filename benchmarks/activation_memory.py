"""Activation checkpointing, measured: bytes a stage holds for backward per micro-batch, with and without.

    python benchmarks/activation_memory.py                 # the llama_tiny preset shape and a larger one
    python benchmarks/activation_memory.py --shapes tiny --json

One process (a world of one, gloo) builds the model as one pipeline stage holding every layer with
pipefit's ``build_pipeline_module`` and DeepSpeed's checkpoint function as ``build_ds_config`` asks
the engine to set it (``pipeline.use_reentrant``), then runs one micro-batch forward and the
pipeline's loss. What stays alive for backward is counted exactly: every tensor autograd saves
(``torch.autograd.graph.saved_tensors_hooks``; checkpointed ranges save nothing inside) plus the
inputs each checkpointed range keeps for its recomputation, by storage, parameters and buffers
excluded. Under 1F1B a stage holds this once per micro-batch in flight (up to ``stages - stage``).
It prints, per shape and ``pipeline.activation_checkpoint_interval``, the bytes, their ratio to no
checkpointing, the forward+backward time ratio (the recomputation's price), and the largest
difference of the loss and of any gradient from the run without checkpointing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import time
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

# The llama_tiny preset (conf/model/llama_tiny.yaml) at the default data.seq_len and train.micro_batch_size.
TINY = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 4096,
    "seq_len": 128,
    "micro_batch_size": 4,
}
LARGER = {**TINY, "num_hidden_layers": 8, "seq_len": 256}
SHAPES = {"tiny": TINY, "larger": LARGER}


def _init_world_of_one() -> None:
    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)


def build_stage(shape: dict[str, Any], interval: int) -> Any:
    """The whole model as one pipeline stage, checkpointing as a pipefit run configures DeepSpeed."""
    from deepspeed.runtime.activation_checkpointing import checkpointing
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology
    from transformers import LlamaConfig

    from pipefit.config import PipelineConfig, RunConfig
    from pipefit.model.layer_list import layer_plan, make_skeleton
    from pipefit.run.ds_config import build_ds_config
    from pipefit.run.engine import build_pipeline_module

    hf = {k: v for k, v in shape.items() if k not in ("seq_len", "micro_batch_size")}
    cfg = LlamaConfig(**hf, max_position_embeddings=max(1024, shape["seq_len"]), tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    skeleton = make_skeleton(cfg, seed=0)
    topo = PipeDataParallelTopology(num_pp=1, num_dp=1)
    module = build_pipeline_module(skeleton, [0, len(layer_plan(skeleton))], topo, "cpu", interval)
    pipe = build_ds_config(
        RunConfig(pipeline=PipelineConfig(stages=1, activation_checkpoint_interval=interval)), 1, "cpu"
    )
    # What PipelineEngine.__init__ does with the "pipeline" block of the DeepSpeed config.
    if pipe["pipeline"]["use_reentrant"] is False:
        module.activation_checkpoint_func = checkpointing.non_reentrant_checkpoint
    module.activation_checkpoint_interval = pipe["pipeline"]["activation_checkpoint_interval"]
    if module.activation_checkpoint_interval > 0:
        module._precompute_checkpointable_values()
    module.train()
    return module


def micro_batch(shape: dict[str, Any]) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(0)
    b, s, v = shape["micro_batch_size"], shape["seq_len"], shape["vocab_size"]
    ids = torch.randint(0, v, (b, s), generator=g)
    pos = torch.arange(s).expand(b, s).contiguous()
    targets = torch.randint(0, v, (b, s), generator=g)
    return (ids, pos), (targets, torch.tensor([1.0 / (b * s)]))


def saved_for_backward(module: Any, inputs: Any, labels: Any) -> tuple[int, torch.Tensor]:
    """Bytes held for backward after one forward (and the loss), and the loss."""
    from pipefit.model.layers import causal_lm_loss

    own = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    held: dict[int, int] = {}

    def note(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            held[storage.data_ptr()] = max(held.get(storage.data_ptr(), 0), storage.nbytes())

    def pack(t: torch.Tensor) -> torch.Tensor:
        note(t)
        return t

    checkpoint = module.activation_checkpoint_func

    def counting_checkpoint(function: Any, *args: Any) -> Any:
        for a in args:  # a checkpointed range keeps its inputs to recompute from
            if torch.is_tensor(a):
                note(a)
        return checkpoint(function, *args)

    module.activation_checkpoint_func = counting_checkpoint
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = causal_lm_loss(module(inputs), labels)
    finally:
        module.activation_checkpoint_func = checkpoint
    return sum(held.values()), loss


def measure(shape: dict[str, Any], interval: int) -> dict[str, Any]:
    """Bytes held for backward, the loss and the gradients of one micro-batch; the module, for timing."""
    module = build_stage(shape, interval)
    inputs, labels = micro_batch(shape)
    held, loss = saved_for_backward(module, inputs, labels)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters()}
    return {"bytes": held, "loss": float(loss.detach()), "grads": grads, "module": module}


def fwd_bwd_seconds(modules: list[Any], shape: dict[str, Any], rounds: int = 5) -> list[float]:
    """Median forward+backward time of each module, timed in alternation (drift falls on all alike)."""
    from pipefit.model.layers import causal_lm_loss

    inputs, labels = micro_batch(shape)
    times: list[list[float]] = [[] for _ in modules]
    for _ in range(rounds + 1):  # the first round warms up
        for i, module in enumerate(modules):
            module.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            causal_lm_loss(module(inputs), labels).backward()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t[1:]) for t in times]


def compare(shape: dict[str, Any], intervals: list[int], timing: bool = True) -> list[dict[str, Any]]:
    base = measure(shape, 0)
    runs = [base if interval == 0 else measure(shape, interval) for interval in intervals]
    modules = [base["module"], *(m["module"] for m in runs if m is not base)]
    seconds = fwd_bwd_seconds(modules, shape) if timing else [math.nan] * len(modules)
    base_s, others = seconds[0], iter(seconds[1:])
    rows = []
    for interval, m in zip(intervals, runs, strict=True):
        sec = base_s if m is base else next(others)
        rows.append(
            {
                "interval": interval,
                "bytes": m["bytes"],
                "ratio": m["bytes"] / base["bytes"],
                "time_ratio": sec / base_s,
                "loss_diff": abs(m["loss"] - base["loss"]),
                "grad_max_diff": max(float((m["grads"][n] - g).abs().max()) for n, g in base["grads"].items()),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["tiny", "larger"])
    parser.add_argument("--intervals", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout instead of the table")
    parser.add_argument("--no-timing", action="store_true", help="bytes and differences only (time ratios: nan)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    _init_world_of_one()
    results = {name: compare(SHAPES[name], args.intervals, timing=not args.no_timing) for name in args.shapes}
    if args.json:
        print(json.dumps({"shapes": {n: SHAPES[n] for n in args.shapes}, "results": results}))
        return
    for name in args.shapes:
        s = SHAPES[name]
        print(
            f"{name}: hidden {s['hidden_size']}, {s['num_hidden_layers']} blocks, vocab {s['vocab_size']}, "
            f"seq {s['seq_len']}, micro-batch {s['micro_batch_size']} (one stage holding every layer)"
        )
        print("  interval   held for backward   vs none   fwd+bwd time vs none   max |loss diff|   max |grad diff|")
        for r in results[name]:
            print(
                f"  {r['interval']:>8}   {r['bytes'] / 2**20:>13.2f} MiB   {r['ratio']:>7.3f}   "
                f"{r['time_ratio']:>20.2f}   {r['loss_diff']:>15.2e}   {r['grad_max_diff']:>15.2e}"
            )


if __name__ == "__main__":
    main()
