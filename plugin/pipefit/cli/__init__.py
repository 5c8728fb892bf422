"""``pipefit`` console entry point.

    pipefit verify model=llama_tiny pipeline.stages=3
    pipefit verify model.path=/models/my-llama pipeline.stages=4 --tol 1e-5
    pipefit plan model=llama_tiny pipeline.stages=2 pipeline.partition=flops hardware=cpu --png plan.png
    pipefit plan pipeline.stages=2 pipeline.partition=manual pipeline.boundaries=[0,3,6] --costs profile
    pipefit plan model=llama3_8b pipeline.stages=4 pipeline.partition=profile train.precision=bf16 --device cuda
    pipefit plan pipeline.stages=2 --costs profile --contended --calibrate outputs/traced_run
    pipefit plan --search --world 8 model=llama3_8b hardware=a100 train.precision=bf16 data.seq_len=8192 \
        train.global_batch_size=512

Arguments of the form ``key=value`` are Hydra overrides of the same config the recipes use.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from pipefit.config import validate
from pipefit.config.compose import compose
from pipefit.model.layer_list import layer_plan
from pipefit.model.weights import CheckpointError
from pipefit.parity.verify import format_report, verify
from pipefit.partition.calibrate import Calibration, measured_layout, read_trace
from pipefit.partition.calibrate import fit as fit_calibration
from pipefit.partition.plan import format_plan, make_plan, price_run, settled, to_json, write_png
from pipefit.partition.search import format_search, resolve_auto, search_run
from pipefit.run.exits import user_error_types
from pipefit.run.export import export


def _verify(args: argparse.Namespace) -> int:
    device = plan_device(args.device)
    run, _ = resolve_auto(validate(compose(args.overrides, args.config_dir)), launch_world())
    try:
        report = verify(run, batch_size=args.batch_size, seq_len=args.seq_len, device=device)
    except Exception as exc:  # a damaged model folder is bad input (exit 2), not a verdict (exit 1)
        from safetensors import SafetensorError

        if not isinstance(exc, (SafetensorError, OSError)) or isinstance(exc, FileNotFoundError):
            raise
        where = f"model.path={run.model.path!r}" if run.model.path else f"model={run.model.name}"
        raise CheckpointError(
            f"{where} could not be read ({type(exc).__name__}: {str(exc).strip().splitlines()[0]}); "
            "expected a complete Hugging Face model folder (config.json + *.safetensors)"
        ) from None
    print(format_report(report))
    ok = report.worst <= args.tol
    print(f"{'PASS' if ok else 'FAIL'}: tolerance {args.tol:.1e}")
    return 0 if ok else 1


def plan_device(device: str, cuda_count: int | None = None) -> str:
    """``--device``: ``cpu``, ``cuda`` or ``cuda:N`` (where ``plan`` profiles layers, ``verify`` compares)."""
    import re

    if device == "cpu":
        return device
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise ValueError(f"--device={device!r} is not accepted; expected cpu, cuda or cuda:N")
    if cuda_count is None:
        import torch

        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if index >= cuda_count:
        raise ValueError(f"--device={device} is not available: this machine has {cuda_count} CUDA device(s)")
    return device


def launch_world(world: int | None = None) -> int:
    """``--world``, else the launch's ``WORLD_SIZE``, else 1."""
    value = world if world is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if value < 1:
        raise ValueError(f"--world={value} is not accepted; expected an integer >= 1")
    return value


def _calibration(args: argparse.Namespace, run: Any, device: str, costs_model: str | None) -> Calibration | None:
    """``--calibrate RUN_DIR``: the ratios of that traced run's measured seconds to its own layout's prices
    (priced by ``costs_model``, as the plan or search prices)."""
    if args.calibrate is None:
        return None
    measured, bounds, dp = measured_layout(args.calibrate, run)
    skeleton, costs, _ = price_run(measured, dp, device, args.cache_dir, costs_model, args.contended)
    ran, alone = settled(costs, layer_plan(skeleton), bounds)  # with contention: as that split ran
    return fit_calibration(ran, bounds, read_trace(args.calibrate), source=str(args.calibrate), alone=alone)


def _plan(args: argparse.Namespace) -> int:
    if args.dp < 1:
        raise ValueError(f"--dp={args.dp} is not accepted; expected an integer >= 1")
    device = plan_device(args.device)
    run = validate(compose(args.overrides, args.config_dir))
    world = launch_world(args.world)
    if args.search:
        costs = args.costs or "flops"
        result = search_run(
            run,
            world,
            costs_model=costs,
            contended=args.contended,
            device=device,
            cache_dir=args.cache_dir,
            calibration=_calibration(args, run, device, costs),
        )
        print(json.dumps(result, indent=1) if args.json else format_search(result))
        return 0
    run, chosen = resolve_auto(run, world)
    dp = chosen["dp"] if chosen else args.dp
    report = make_plan(
        run,
        dp=dp,
        device=device,
        cache_dir=args.cache_dir,
        costs_model=args.costs,
        contended=args.contended,
        calibration=_calibration(args, run, device, args.costs),
    )
    print(to_json(report) if args.json else format_plan(report))
    if args.png:
        write_png(report, args.png)
        # stdout stays pure JSON with --json
        print(f"wrote the plan picture to {Path(args.png).resolve()}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _export(args: argparse.Namespace) -> int:

    out = export(args.checkpoint, args.out_dir, max_shard_bytes=int(args.max_shard_gb * 1024**3))
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pipefit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="compare every stage, run in order, with the unmodified HF model")
    v.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=gpt2_tiny pipeline.stages=3")
    v.add_argument("--tol", type=float, default=1e-5, help="max abs difference allowed (fp32 default 1e-5)")
    v.add_argument("--batch-size", type=int, default=2)
    v.add_argument("--seq-len", type=int, default=32)
    v.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N; runs in train.precision (default fp32)")
    v.add_argument("--config-dir", default=None, help="Hydra config folder (default: the repository's conf/)")
    pl = sub.add_parser("plan", help="partition, memory per stage and predicted step time; starts no process")
    pl.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. pipeline.stages=4 hardware=h100")
    pl.add_argument("--json", action="store_true", help="machine-readable output (every figure, per-layer costs)")
    pl.add_argument("--png", default=None, metavar="PATH", help="draw stage costs and the 1F1B timeline")
    pl.add_argument("--dp", type=int, default=1, help="data-parallel replicas of each stage (default 1)")
    pl.add_argument(
        "--search",
        action="store_true",
        help="rank every layout (stages, replicas, micro-batch, checkpointing, ZeRO) for --world ranks and "
        "train.global_batch_size by predicted tokens/s",
    )
    pl.add_argument(
        "--world", type=int, default=None, help="ranks for --search and auto layouts (default: WORLD_SIZE, else 1)"
    )
    pl.add_argument(
        "--device", default="cpu", help="where pipeline.partition=profile measures layers: cpu, cuda, cuda:N"
    )
    pl.add_argument("--cache-dir", default=None, help="profile cache folder (default ~/.cache/pipefit)")
    pl.add_argument(
        "--costs",
        choices=("flops", "profile"),
        default=None,
        help="price every split with this cost model (default: profile for pipeline.partition=profile, else flops)",
    )
    pl.add_argument(
        "--contended",
        action="store_true",
        help="profile on CPU with one process per rank, all busy at once, with measured transfers and optimizer step",
    )
    pl.add_argument(
        "--calibrate",
        default=None,
        metavar="RUN_DIR",
        help="scale every price by what a traced run of the same model measured (its output_dir; "
        "train.trace=true), e.g. one short run of the launch layout",
    )
    pl.add_argument("--config-dir", default=None, help="Hydra config folder (default: the repository's conf/)")
    ex = sub.add_parser("export", help="write a Hugging Face folder from a checkpoint (or a run's newest one)")
    ex.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its newest complete checkpoint)")
    ex.add_argument(
        "out_dir", help="the Hugging Face folder to write: new, empty, or a previous export (replaced atomically)"
    )
    ex.add_argument("--max-shard-gb", type=float, default=2.0, help="safetensors shard size (default 2 GB)")
    args = parser.parse_args(argv)

    try:
        return {"verify": _verify, "plan": _plan, "export": _export}[args.command](args)
    except user_error_types() as exc:
        message = str(exc).splitlines()[0] if str(exc) else repr(exc)
        print(f"pipefit: error: {message}", file=sys.stderr)
        return 2
    except Exception as exc:  # Hydra's compose errors (unknown key, missing group option)
        if type(exc).__module__.startswith(("hydra", "omegaconf")):
            print(f"pipefit: error: {str(exc).splitlines()[0]}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
