"""``pipefit`` console entry point.

    pipefit verify model=llama_tiny pipeline.stages=3
    pipefit verify model=local model.path=/models/my-llama pipeline.stages=4 --tol 1e-5

Arguments of the form ``key=value`` are Hydra overrides of the same config the recipes use.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def conf_dir(explicit: str | None = None) -> Path:
    """The Hydra config folder: ``--config-dir``, ``$PIPEFIT_CONF_DIR``, or ``conf/`` of this checkout."""
    candidates = [explicit, os.environ.get("PIPEFIT_CONF_DIR"), str(Path(__file__).resolve().parents[2] / "conf")]
    for c in candidates:
        if c and (Path(c) / "config.yaml").is_file():
            return Path(c).resolve()
    raise SystemExit("pipefit: error: no Hydra config folder found; pass --config-dir DIR (the repository's conf/)")


def compose(overrides: list[str], config_dir: str | None = None) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import pipefit.config  # noqa: F401  (registers the schema)

    with initialize_config_dir(config_dir=str(conf_dir(config_dir)), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def _verify(args: argparse.Namespace) -> int:
    from pipefit.config import validate
    from pipefit.verify import format_report, verify

    run = validate(compose(args.overrides, args.config_dir))
    report = verify(run, batch_size=args.batch_size, seq_len=args.seq_len)
    print(format_report(report))
    ok = report.worst <= args.tol
    print(f"{'PASS' if ok else 'FAIL'}: tolerance {args.tol:.1e}")
    return 0 if ok else 1


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
    v.add_argument("--config-dir", default=None, help="Hydra config folder (default: the repository's conf/)")
    args = parser.parse_args(argv)
    from pipefit.train import user_error_types

    try:
        return _verify(args)
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
