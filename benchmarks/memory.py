"""Per-stage memory, predicted by ``pipefit plan`` and measured on the ranks of a real run.

    python benchmarks/memory.py                  # the 0.5B case (~17 GB of RAM over 2 ranks) and pp=2 x dp=2
    python benchmarks/memory.py --quick          # small shapes, 1-2 min: checks the script runs
    python benchmarks/memory.py --save benchmarks/results/memory.txt

Each case trains a Llama-style model (random init, fp32, ZeRO-1) for a few steps through the recipe
(``accelerate launch``, CPU ranks, gloo, one thread each). Every rank records its peak memory above the
interpreter-and-libraries baseline it measured before building its stage (peak resident set on CPU,
``torch.cuda.max_memory_allocated`` on a GPU) and the plan's prediction for its stage
(``pipefit.partition.plan.predicted_stage_memory``); rank 0 writes both into ``partition.json``, which
this script reads. On CPU the resident set also keeps the allocator's free blocks, which the plan does
not predict: ``tests/run/test_memory.py`` checks the prediction against the live tensors themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _bench import save_results

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "cpu_2proc.yaml"


def _shape(hidden: int, inter: int, blocks: int, heads: int, vocab: int) -> list[str]:
    return [
        "model=llama_tiny",
        f"model.hf_config.hidden_size={hidden}",
        f"model.hf_config.intermediate_size={inter}",
        f"model.hf_config.num_hidden_layers={blocks}",
        f"model.hf_config.num_attention_heads={heads}",
        f"model.hf_config.num_key_value_heads={heads}",
        f"model.hf_config.vocab_size={vocab}",
    ]


# name -> (processes, overrides)
FULL = {
    "0.5B, pp=2 x dp=1 [0,5,11], seq 64": (
        2,
        [*_shape(2048, 5632, 8, 16, 32000), "data.seq_len=64", "train.micro_batch_size=1", "train.grad_accum_steps=2"]
        + ["pipeline.partition=manual", "pipeline.boundaries=[0,5,11]", "train.max_steps=3"],
    ),
    "0.1B, pp=2 x dp=2 [0,3,7], seq 64": (
        4,
        [*_shape(1024, 2816, 4, 16, 32000), "data.seq_len=64", "train.micro_batch_size=1", "train.grad_accum_steps=2"]
        + ["pipeline.partition=manual", "pipeline.boundaries=[0,3,7]", "train.max_steps=2"],
    ),
}
QUICK = {
    "14M, pp=2 x dp=1 [0,2,5], seq 32": (
        2,
        [*_shape(512, 1376, 2, 8, 8000), "data.seq_len=32", "train.micro_batch_size=2", "train.grad_accum_steps=2"]
        + ["pipeline.partition=manual", "pipeline.boundaries=[0,2,5]", "train.max_steps=2"],
    ),
    "14M, pp=2 x dp=2 [0,2,5], seq 32": (
        4,
        [*_shape(512, 1376, 2, 8, 8000), "data.seq_len=32", "train.micro_batch_size=2", "train.grad_accum_steps=2"]
        + ["pipeline.partition=manual", "pipeline.boundaries=[0,2,5]", "train.max_steps=2"],
    ),
}


def run_case(processes: int, overrides: list[str], out: Path) -> list[dict]:
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [accelerate, "launch", "--config_file", str(LAUNCH), "--num_processes", str(processes)]
    cmd += [str(REPO / "recipes" / "finetune.py"), *overrides, "pipeline.stages=2", "hardware=cpu"]
    cmd += ["train.export=false", "zero.stage=1", f"output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"case failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads((out / "partition.json").read_text())["ranks"]


def table(results: dict[str, list[dict]]) -> str:
    lines = [
        "fp32, ZeRO-1, CPU ranks x 1 thread; peak resident set above each rank's baseline vs pipefit plan",
        "",
        f"{'case':<36} {'rank':>4} {'stage':>5} {'params':>12} {'baseline GiB':>12} {'measured GiB':>12} "
        f"{'predicted GiB':>13} {'pred/meas':>9}",
    ]
    for name, ranks in results.items():
        for r in sorted(ranks, key=lambda r: r["rank"]):
            meas, pred, base = r["peak_memory_bytes"], r["predicted_memory_bytes"], r["baseline_memory_bytes"]
            lines.append(
                f"{name:<36} {r['rank']:>4} {r['stage']:>5} {r['params']:>12,} {base / 2**30:>12.3f} "
                f"{meas / 2**30:>12.3f} {pred / 2**30:>13.3f} {pred / meas:>9.3f}"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes: checks the script runs")
    parser.add_argument("--only", default=None, help="run only the cases whose name contains this text")
    parser.add_argument("--save", default=None, help="also write the table to this file")
    args = parser.parse_args()
    cases = QUICK if args.quick else FULL
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, (processes, overrides)) in enumerate(cases.items()):
            if args.only and args.only not in name:
                continue
            results[name] = run_case(processes, overrides, Path(tmp) / f"case{k}")
            print(f"measured {name}", flush=True)
    text = table(results)
    print(text)
    save_results(args.save, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
