"""The recipe's config composed by Hydra from conf/ and ``key=value`` overrides, as the recipe would."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir

import pipefit.config.schema  # noqa: F401  (registers the schema)


def conf_dir(explicit: str | None = None) -> Path:
    """The Hydra config folder: ``--config-dir``, ``$PIPEFIT_CONF_DIR``, or ``conf/`` of this checkout."""
    candidates = [explicit, os.environ.get("PIPEFIT_CONF_DIR"), str(Path(__file__).resolve().parents[3] / "conf")]
    for c in candidates:
        if c and (Path(c) / "config.yaml").is_file():
            return Path(c).resolve()
    raise SystemExit("pipefit: error: no Hydra config folder found; pass --config-dir DIR (the repository's conf/)")


def compose(overrides: list[str], config_dir: str | None = None) -> Any:
    with initialize_config_dir(config_dir=str(conf_dir(config_dir)), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)
