"""pipefit end to end against PyTorch's own pipeline runtime, on the same model, split and data.

    python benchmarks/peer.py                         # 3 rounds, the issue's model; ~6-10 min on 2 CPU cores
    python benchmarks/peer.py --quick                 # 1 round, tiny shapes: checks the script runs (1-2 min)
    python benchmarks/peer.py --save benchmarks/results/peer.txt
    python benchmarks/peer.py --extra zero.stage=0    # pipefit overrides appended to its command line

The model of ``benchmarks/partition.py`` (Llama-style, hidden 256, 8 blocks, vocab 12288, seq 256,
micro-batch 2 x 8 micro-batches), split [0, 7, 11] (embedding + 6 blocks | 2 blocks + norm + head),
two ranks with one thread each, gloo:

- **pipefit**: ``accelerate launch recipes/finetune.py`` (ZeRO-1, the default), ``step_time_s`` of
  ``metrics.jsonl``;
- **peer**: ``torch.distributed.pipelining`` ``Schedule1F1B`` over the unmodified HF modules split the
  same way, torch ``AdamW`` with pipefit's weight-decay groups and learning-rate schedule, clipping by
  the global gradient norm over both stages (one all-reduce), pipefit's own global batches and
  token-weighted loss; the step time is rank 0's ``schedule.step`` + clip + ``optimizer.step``, as
  pipefit's is rank 0's ``train_batch``.

Each round runs both, in alternating order, and prints the ratio of the medians of steps 2-6; then
the median ratio over rounds. ``--single`` adds the same model trained by one process with one
thread (``pipefit.parity.reference``) to every round: pipefit's speedup T_s/T_p, its tokens/s, and
the ideal p*m/(m+p-1). With ``--trace`` pipefit runs with ``train.trace=true`` and
the per-stage breakdown of its last round is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _bench import free_port as _free_port  # noqa: E402
from _bench import save_results  # noqa: E402

from partition import FULL, QUICK, overrides, single_process  # noqa: E402  (the same model and shapes)

STEPS = 6  # timed: steps 2..6 (step 1 allocates and exchanges shapes)


def pipefit_overrides(shape: dict, output_dir: str, extra: list[str], trace: bool) -> list[str]:
    n = shape["num_hidden_layers"] + 3
    split = [0, n - 4, n] if n == 11 else [0, n // 2 + 1, n]
    return [
        *overrides(shape, output_dir),
        f"train.max_steps={STEPS}",
        "train.progress_bar=false",
        "train.heartbeat_timeout_s=0",
        "pipeline.partition=manual",
        f"pipeline.boundaries=[{','.join(map(str, split))}]",
        *(["train.trace=true", f"train.trace_steps=[2,{STEPS}]"] if trace else []),
        *extra,
    ]


def run_pipefit(
    shape: dict, tmp: Path, extra: list[str], trace: bool, png: Path | None = None
) -> tuple[float, list[float], dict | None]:
    out = tmp / f"pipefit-{time.monotonic_ns()}"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [accelerate, "launch", "--config_file", str(REPO / "launch" / "cpu_2proc.yaml"), "--num_processes", "2"]
    cmd += ["--main_process_port", str(_free_port()), str(REPO / "recipes" / "finetune.py")]
    cmd += pipefit_overrides(shape, str(out), extra, trace)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"pipefit run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    traced = next((x["trace"] for x in lines if "trace" in x), None)
    if png is not None and (out / "trace.png").is_file():
        shutil.copyfile(out / "trace.png", png)
    times = [x["step_time_s"] for x in steps[1:]]
    return statistics.median(times), [x["loss"] for x in steps], traced


def run_peer(shape: dict, tmp: Path, quick: bool) -> tuple[float, list[float], list[list[float]]]:
    result = tmp / f"peer-{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    cmd += [str(Path(__file__).resolve()), "--worker", "--result", str(result), "--output-dir", str(tmp / "peer")]
    cmd += ["--quick"] if quick else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "plugin"), str(REPO)])}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"peer run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    data = json.loads(result.read_text())
    return statistics.median(data["times"][1:]), data["losses"], data["parts"]


# --- worker: one rank of the torch.distributed.pipelining peer ------------------------------------


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B
    from transformers import AutoModelForCausalLM
    from transformers.masking_utils import create_causal_mask

    from pipefit.cli import compose
    from pipefit.config import validate
    from pipefit.model.layers import IGNORE_INDEX
    from pipefit.run.preflight import Prepared
    from pipefit.run.schedule import scheduler_factory, weight_decay_groups

    torch.set_num_threads(1)
    shape = QUICK if args.quick else FULL
    run = validate(compose(pipefit_overrides(shape, args.output_dir, [], False)))
    prepared = Prepared(run, world_size=2)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(run.train.seed)
    model = AutoModelForCausalLM.from_config(prepared.hf_config, attn_implementation="sdpa")
    first_block, last_block = prepared.boundaries[1] - 1, shape["num_hidden_layers"]  # layer 0 is the embedding

    class Stage(nn.Module):
        """HF submodules of one stage; mask and rotary tables built as ``LlamaModel.forward`` builds them."""

        def __init__(self, lo: int, hi: int, embed: bool, head: bool) -> None:
            super().__init__()
            inner = model.model
            self.embed = inner.embed_tokens if embed else None
            self.layers = nn.ModuleList(inner.layers[lo:hi])
            self.rotary = inner.rotary_emb
            self.norm = inner.norm if head else None
            self.lm_head = model.lm_head if head else None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x) if self.embed is not None else x
            pos = torch.arange(h.shape[1]).unsqueeze(0).expand(h.shape[0], -1)
            mask = create_causal_mask(
                config=model.config, inputs_embeds=h, attention_mask=None, cache=None, position_ids=None
            )
            pe = self.rotary(h, pos)
            for layer in self.layers:
                out = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
                h = out[0] if isinstance(out, tuple) else out
            if self.lm_head is not None:
                h = self.lm_head(self.norm(h))
            return h

    module = Stage(0, first_block, True, False) if rank == 0 else Stage(first_block, last_block, False, True)
    m = run.train.grad_accum_steps
    stage = PipelineStage(module, rank, 2, torch.device("cpu"))
    batches = prepared.batches

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        mbs = batches.micro_batches(step, 0)
        ids = torch.cat([inp[0] for inp, _ in mbs])
        targets = torch.cat([t for _, (t, _) in mbs])
        return ids, targets, int((targets != IGNORE_INDEX).sum())

    tokens = [0]

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        summed = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return summed / tokens[0]  # the token-weighted mean over the global batch, as pipefit's loss

    schedule = Schedule1F1B(stage, n_microbatches=m, loss_fn=loss_fn)
    o = run.optim
    params = list(module.named_parameters())
    opt = torch.optim.AdamW(
        weight_decay_groups(params, o.weight_decay),
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
        weight_decay=o.weight_decay,
    )
    lr_schedule = scheduler_factory(o, run.train.max_steps)(opt)  # pipefit's warmup and decay
    times, losses, parts = [], [], []  # parts: (schedule, norm + clip, optimizer) seconds per step
    for step in range(STEPS):
        ids, targets, tokens[0] = batch(step)
        t0 = time.perf_counter()
        micro: list[torch.Tensor] = []
        if rank == 0:
            schedule.step(ids)
        else:
            schedule.step(target=targets, losses=micro)
        t1 = time.perf_counter()
        grads = [p.grad for _, p in params if p.grad is not None]
        sq = torch.stack(torch._foreach_norm(grads, 2)).pow(2).sum().reshape(1)
        dist.all_reduce(sq)  # the global norm over both stages, as one process clips
        coef = o.grad_clip / (float(sq.sqrt()) + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_(grads, coef)
        t2 = time.perf_counter()
        opt.step()
        lr_schedule.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        parts.append((t1 - t0, t2 - t1, t0 + times[-1] - t2))
        if micro:
            losses.append(float(torch.stack(micro).sum()))
    box: list[Any] = [losses]
    dist.broadcast_object_list(box, src=1)
    every: list[Any] = [None, None]
    dist.all_gather_object(every, [statistics.median(x) for x in zip(*parts[1:], strict=True)])
    if rank == 0:
        Path(args.result).write_text(json.dumps({"times": times, "losses": box[0], "parts": every}))
    dist.barrier()
    dist.destroy_process_group()


# --- parent -----------------------------------------------------------------------------------------


def breakdown_lines(traced: dict) -> list[str]:
    lines = []
    for stage, row in traced.items():
        step = row["step_s"] or 1.0
        kinds = ("compute", "communication", "optimizer", "data", "logging", "idle")
        lines.append(
            f"  {stage}: step {step:.3f} s = " + ", ".join(f"{k} {row[k]:.3f} ({row[k] / step:.0%})" for k in kinds)
        )
        top = sorted(row["instructions"].items(), key=lambda kv: -kv[1])
        lines.append("    per instruction (s/step): " + ", ".join(f"{k} {v:.3f}" for k, v in top))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one round: checks the script runs")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of (pipefit, peer), alternating (default 3)")
    parser.add_argument("--extra", nargs="*", default=[], help="pipefit overrides appended to its command line")
    parser.add_argument(
        "--trace", action="store_true", help="run pipefit with train.trace=true and print its breakdown"
    )
    parser.add_argument("--single", action="store_true", help="also time one process (speedup T_s/T_p)")
    parser.add_argument("--save", default=None, help="also write the table to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    rounds = args.rounds or (1 if args.quick else 3)
    shape = QUICK if args.quick else FULL
    lines = [
        f"pipefit (accelerate launch recipes/finetune.py {' '.join(args.extra)}) vs torch.distributed.pipelining "
        f"Schedule1F1B; median step_time_s of steps 2-{STEPS}, 2 ranks x 1 thread, gloo",
        f"shape: {json.dumps(shape)}",
    ]
    print("\n".join(lines), flush=True)
    ratios, speedups, traced = [], [], None
    m = shape["micro_batches"]
    tokens = m * shape["micro_batch_size"] * shape["seq_len"]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            order = ["pipefit", "peer", *(["single"] if args.single else [])]
            order = order[r % len(order) :] + order[: r % len(order)]
            got = {}
            for who in order:
                if who == "pipefit":
                    png = Path(args.save).with_name("trace.png") if args.save and args.trace else None
                    got["pipefit"], pf_losses, traced = run_pipefit(shape, Path(tmp), args.extra, args.trace, png)
                elif who == "peer":
                    got["peer"], peer_losses, peer_parts = run_peer(shape, Path(tmp), args.quick)
                else:
                    import torch

                    torch.set_num_threads(1)  # one thread, as each pipeline rank
                    got["single"] = single_process(shape, str(Path(tmp) / "single"))(3)
            ratio = got["pipefit"] / got["peer"]
            ratios.append(ratio)
            line = (
                f"round {r + 1}/{rounds} ({' > '.join(order)}): pipefit {got['pipefit']:.3f} s/step, "
                f"peer {got['peer']:.3f} s/step, ratio {ratio:.3f} "
                f"(loss at step {STEPS}: {pf_losses[-1]:.3f} / {peer_losses[-1]:.3f})"
            )
            if "single" in got:
                speedups.append(got["single"] / got["pipefit"])
                line += f"; one process {got['single']:.3f} s/step, speedup T_s/T_p {speedups[-1]:.3f}"
            print(line, flush=True)
            lines.append(line)
    lines.append(f"median ratio pipefit / peer: {statistics.median(ratios):.3f} over {rounds} rounds")
    if speedups:
        ideal = 2 * m / (m + 1)
        best = statistics.median(speedups)
        lines.append(
            f"pipefit speedup T_s/T_p (median): {best:.3f}, ideal p*m/(m+p-1) = {ideal:.3f}, "
            f"{best / ideal:.2f} of ideal; {tokens} tokens/step"
        )
    lines.append(
        f"peer, last round, median of steps 2-{STEPS} (s/step): "
        + "; ".join(
            f"stage {s}: schedule.step {a:.3f}, norm+clip {b:.3f}, AdamW {c:.3f}"
            for s, (a, b, c) in enumerate(peer_parts)
        )
    )
    if traced:
        lines.append(
            f"pipefit breakdown (train.trace, last round, mean of steps 2-{STEPS}, slowest replica per stage):"
        )
        lines += breakdown_lines(traced)
    print("\n".join(lines[2 + rounds :]))
    save_results(args.save, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
