"""The recipe's config composed by Hydra from conf/ and ``key=value`` overrides, as the recipe would."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from pipefit.config.schema import ConfigError, ModelConfig


def conf_dir(explicit: str | None = None) -> Path:
    """The Hydra config folder: ``--config-dir``, ``$PIPEFIT_CONF_DIR``, or ``conf/`` of this checkout."""
    candidates = [explicit, os.environ.get("PIPEFIT_CONF_DIR"), str(Path(__file__).resolve().parents[3] / "conf")]
    for c in candidates:
        if c and (Path(c) / "config.yaml").is_file():
            return Path(c).resolve()
    raise SystemExit("pipefit: error: no Hydra config folder found; pass --config-dir DIR (the repository's conf/)")


def compose(overrides: list[str], config_dir: str | None = None) -> Any:
    with initialize_config_dir(config_dir=str(conf_dir(config_dir)), version_base="1.3"):
        return model_folder(hydra_compose(config_name="config", overrides=overrides), overrides)


def _override_key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


# Override keys that choose the model preset (an experiment file may choose one).
PRESET_KEYS = ("model", "experiment")


def model_folder(cfg: Any, overrides: list[str]) -> Any:
    """``model.path=DIR`` on the command line means that folder's model.

    Without a preset named on the command line (``model=...``, ``experiment=...``) the default
    preset's fields (its ``hf_config``, name, attention) describe another model: they are dropped,
    as with ``model=local``, keeping only the ``model.*`` keys the command line gives, and the run is
    named after the folder (``outputs/<folder name>``). With a preset named too, a preset
    ``hf_config`` value that differs from the folder's ``config.json`` is a one-line error naming both.
    """
    keys = [_override_key(o) for o in overrides]
    if "model.path" not in keys or not OmegaConf.is_config(cfg) or not cfg.model.path:
        return cfg
    path = cfg.model.path
    given = {k.split(".")[1] for k in keys if k.startswith("model.") and k.count(".") == 1}
    given_hf = {k.split(".")[2] for k in keys if k.startswith("model.hf_config.")}
    chosen = [o for o, k in zip(overrides, keys, strict=True) if k in PRESET_KEYS]
    if chosen:
        _check_preset_matches_folder(cfg, chosen[-1], str(path), given_hf | ({"*"} if "hf_config" in given else set()))
        return cfg
    cfg = copy.deepcopy(cfg)
    for f in fields(ModelConfig):
        if f.name in given:
            continue
        if f.name == "hf_config":
            value: Any = {k: v for k, v in cfg.model.hf_config.items() if k in given_hf}
        elif f.name == "name":
            value = Path(str(path)).expanduser().resolve().name or "local"
        else:
            value = getattr(ModelConfig(), f.name)
        cfg.model[f.name] = value
    return cfg


def _check_preset_matches_folder(cfg: Any, preset: str, path: str, given_hf: set[str]) -> None:
    config_json = Path(path).expanduser() / "config.json"
    if "*" in given_hf or not config_json.is_file():
        return  # the whole hf_config is the user's own; a folder without config.json fails with its own line
    try:
        folder = json.loads(config_json.read_text())
    except (OSError, ValueError):
        return
    preset_hf = OmegaConf.to_container(cfg.model.hf_config, resolve=True)
    for key, value in preset_hf.items():  # type: ignore[union-attr]
        if key in given_hf or key not in folder or folder[key] == value:
            continue
        raise ConfigError(
            f"{preset} and model.path={path!r} describe different models: hf_config.{key} is {value!r} in the preset "
            f"but {folder[key]!r} in the folder's config.json; accepted: model.path={path} alone (the folder's own "
            f"model), or a preset that matches it"
        )


def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping (a config as plain containers) as ``{"dotted.key": value}``; empty mappings are leaves."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(leaves(value, dotted))
        else:
            out[dotted] = value
    return out
