"""ZeRO-1 at dp=1: DeepSpeed's gradient reduction + optimizer step against pipefit's direct path.

    python benchmarks/zero_dp1.py                      # the critical stage of the peer benchmark; ~2-4 min
    python benchmarks/zero_dp1.py --quick              # tiny shapes, few repetitions: checks the script runs
    python benchmarks/zero_dp1.py --save benchmarks/results/zero_dp1.txt

The parameters of the critical stage of ``benchmarks/peer.py`` (the model of
``benchmarks/partition.py``, split [0, 7, 11]: embedding + 6 Llama blocks, 7.5 M parameters), in
one process with one thread, fp32, ZeRO-1 over a data-parallel group of one, torch AdamW with
pipefit's weight-decay groups and clipping that engages. Three engines, each step timed in turn
(alternating, so contention falls on all alike), with the same synthetic gradients:

- ``deepspeed``: DeepSpeed's ``reduce_gradients(pipeline_parallel=True)`` with pipefit's default
  ``reduce_bucket_size`` (50 M elements), then ``step``;
- ``deepspeed-capped``: the same with the bucket capped to the stage's parameters (what capping
  the buckets at dp=1 in ``run/ds_config.py`` does);
- ``direct``: pipefit.run.zero_dp1 installed (no bucket, no copies; the fp32 partition shares the
  model's storage, so ``step``'s copy back is a no-op), then the same ``step``.

Printed: the median seconds of reduce and step per variant, and the ratios to ``direct``; the
three engines' weights are checked equal to the bit at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugin"))
sys.path.insert(0, str(REPO / "benchmarks"))
from partition import FULL, QUICK  # noqa: E402  (the same model)


def stage_params(shape: dict, blocks: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{k: shape[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads")})
    cfg.num_key_value_heads, cfg.vocab_size, cfg.num_hidden_layers = (
        shape["num_key_value_heads"],
        shape["vocab_size"],
        blocks,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).model  # embedding + blocks (+ its final norm)
    return model


def build(shape: dict, blocks: int, bucket: int, direct: bool) -> Any:
    import deepspeed

    from pipefit.run.zero_dp1 import install_dp1_direct_gradients

    model = stage_params(shape, blocks)
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.ndim > 1]
    no_decay = [p for n, p in named if p.ndim <= 1]
    cfg = {
        "train_batch_size": 1,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_clipping": 1e-3,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01, "torch_adam": True}},
        "zero_optimization": {"stage": 1, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket},
        "steps_per_print": 10**9,
    }
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    engine, *_ = deepspeed.initialize(model=model, config=cfg, model_parameters=groups)
    if direct:
        assert install_dp1_direct_gradients(engine)
    return engine


def timed_step(engine: Any, grads: list[Any]) -> tuple[float, float]:
    for p, g in zip(engine.module.parameters(), grads, strict=True):
        p.grad = g.clone()
    opt = engine.optimizer
    t0 = time.perf_counter()
    opt.reduce_gradients(pipeline_parallel=True)
    t1 = time.perf_counter()
    opt.step()
    t2 = time.perf_counter()
    opt.zero_grad()
    return t1 - t0, t2 - t1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions: checks the script runs")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 30; quick 4)")
    parser.add_argument("--save", default=None, help="also write the table to this file")
    args = parser.parse_args()
    os.environ.update({"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"})
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    shape, blocks = (QUICK, 2) if args.quick else (FULL, 6)
    steps = args.steps or (4 if args.quick else 30)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend="gloo")
        numel = sum(p.numel() for p in stage_params(shape, blocks).parameters())
        variants = {
            "deepspeed": build(shape, blocks, 50_000_000, direct=False),
            "deepspeed-capped": build(shape, blocks, numel, direct=False),
            "direct": build(shape, blocks, numel, direct=True),
        }
        g = torch.Generator().manual_seed(1)
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
        for step in range(steps + 1):  # step 0: warm-up (optimizer state allocated), not counted
            grads = [torch.randn(p.shape, generator=g) for p in variants["direct"].module.parameters()]
            order = list(variants) if step % 2 == 0 else list(reversed(variants))
            for name in order:
                t = timed_step(variants[name], grads)
                if step:
                    times[name].append(t)
        weights = {k: torch.cat([p.detach().reshape(-1) for p in e.module.parameters()]) for k, e in variants.items()}
        same = all(torch.equal(weights["direct"], w) for w in weights.values())
        dist.destroy_process_group()

    lines = [
        f"ZeRO-1, dp=1, fp32, one thread: {numel / 1e6:.2f} M parameters "
        f"({'quick' if args.quick else 'critical stage of benchmarks/peer.py'}), {steps} steps, medians",
        f"{'variant':<18} {'reduce s':>10} {'step s':>10} {'total s':>10} {'total / direct':>15}",
    ]
    med = {k: tuple(statistics.median(x[i] for x in v) for i in (0, 1)) for k, v in times.items()}
    direct_total = sum(med["direct"])
    for name, (r, s) in med.items():
        lines.append(f"{name:<18} {r:>10.4f} {s:>10.4f} {r + s:>10.4f} {(r + s) / direct_total:>15.2f}")
    lines.append(f"weights after {steps + 1} steps identical to the bit across variants: {same}")
    text = "\n".join(lines)
    print(text)
    if args.save:
        Path(args.save).write_text(text + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
