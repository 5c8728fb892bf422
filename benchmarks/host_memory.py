"""Host memory of half-precision runs, measured per rank: fp32 copies kept, peak RSS at start-up and at export.

    python benchmarks/host_memory.py                               # this checkout
    python benchmarks/host_memory.py --before /path/to/other/plugin  # another pipefit, side by side

A Llama of ~16M parameters (64 MB in fp32) is saved twice, in float32 and in bfloat16, and each
folder is trained for one step under ``train.precision=bf16`` and ZeRO-1 on one pipeline stage with
two data-parallel ranks (``accelerate launch``, CPU, gloo), then exported. Each rank reports
the fp32 values it holds across ``deepspeed.initialize`` (to become the masters), its peak resident
set size then (``VmHWM``), and the peak during the export above the resident size before it (the
peak is restarted through ``/proc/self/clear_refs``). A third case adds LoRA (frozen fp32 base).
With ``--before`` the same runs use that ``plugin`` folder: ``before -> this``, in one sitting.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPE = {
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 4096,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def _rank_main(report: str, overrides: list[str]) -> None:
    """One rank: the recipe, with its memory recorded after start-up, during the export and at exit."""
    import atexit

    from pipefit.run import engine, export

    rank = os.environ.get("RANK", "0")
    peaks: dict[str, float] = {}
    restore, export_pipeline = engine.restore_fp32_masters, export.export_pipeline

    def restore_and_measure(engine, loaded):  # called right after deepspeed.initialize
        peaks["startup_mb"] = _status_mb("VmHWM")
        peaks["kept_mb"] = sum(v.numel() * v.element_size() for v in loaded.values()) / 2**20
        restore(engine, loaded)

    def export_and_measure(*args, **kwargs):
        before = _status_mb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from here
        export_pipeline(*args, **kwargs)
        peaks["export_mb"] = _status_mb("VmHWM") - before

    engine.restore_fp32_masters, export.export_pipeline = restore_and_measure, export_and_measure

    def write() -> None:
        Path(report, f"rank{rank}.json").write_text(json.dumps(peaks))

    atexit.register(write)
    sys.argv = [str(REPO / "recipes" / "finetune.py"), *overrides]
    import runpy

    runpy.run_path(sys.argv[0], run_name="__main__")


def _save_folders(root: Path) -> dict[str, Path]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE))
    folders = {"fp32": root / "fp32", "bf16": root / "bf16"}
    model.save_pretrained(folders["fp32"])
    model.to(torch.bfloat16).save_pretrained(folders["bf16"])
    return folders


def _run(plugin: Path, folder: Path, out: Path, extra: list[str]) -> list[dict[str, float]]:
    report = out / "rss"
    report.mkdir(parents=True)
    overrides = [
        "model=local",
        f"model.path={folder}",
        "pipeline.stages=1",
        "train.precision=bf16",
        "zero.stage=1",
        "data.seq_len=32",
        "train.max_steps=1",
        "train.micro_batch_size=1",
        "train.grad_accum_steps=1",
        "optim.warmup_steps=0",
        f"output_dir={out / 'run'}",
        *extra,
    ]
    cmd = [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--config_file",
        str(REPO / "launch" / "cpu_2proc.yaml"),
        "--num_processes",
        "2",
        str(Path(__file__).resolve()),
        "--rank-report",
        str(report),
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(plugin)}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"run failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    return [json.loads((report / f"rank{r}.json").read_text()) for r in range(2)]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--rank-report":
        _rank_main(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="another pipefit's plugin folder, measured side by side")
    args = parser.parse_args()
    versions = {"this": REPO / "plugin"}
    if args.before:
        versions = {"before": args.before.resolve(), **versions}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = _save_folders(root)
        print(f"MiB per rank (Llama {SHAPE['hidden_size']}x{SHAPE['num_hidden_layers']}, ~16M params, 64 MB in fp32);")
        print("bf16, ZeRO-1, 1 stage x 2 data-parallel ranks, 1 step + export. kept: fp32 values held across")
        print(
            "deepspeed.initialize; startup: peak RSS then; export: peak RSS during the export above the RSS before it"
        )
        cases = {
            "fp32 folder": (folders["fp32"], []),
            "bf16 folder": (folders["bf16"], []),
            "fp32 + LoRA": (folders["fp32"], ["lora=qv"]),
        }
        for case, (folder, extra) in cases.items():
            got = {
                v: _run(plugin, folder, root / f"{v}-{case.replace(' ', '')}", extra) for v, plugin in versions.items()
            }
            for phase in ("kept_mb", "startup_mb", "export_mb"):
                cells = []
                for r in range(2):
                    values = [got[v][r][phase] for v in versions]
                    cells.append(f"rank {r}: " + " -> ".join(f"{x:6.1f}" for x in values))
                print(f"{case:12s} {phase[:-3]:8s} " + "; ".join(cells))


if __name__ == "__main__":
    main()
