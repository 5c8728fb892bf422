"""The DeepSpeed config, derived from the composed pipefit config (one source, never two copies).

Settings given to ``accelerate launch`` (``--zero_stage``, ``--gradient_accumulation_steps``,
``--gradient_clipping``, ``--mixed_precision``, ``--deepspeed_config_file``) reach the script as
``ACCELERATE_*`` environment variables. accelerate exports the zero stage, accumulation steps
and clipping only when the user gave them (flag or config file; ``ACCELERATE_CONFIG_DS_FIELDS``
lists those that came from a config file), while ``ACCELERATE_MIXED_PRECISION`` is always present
and defaults to ``no``, so ``no`` counts as unset. :func:`apply_accelerate_settings` honours each
setting: it replaces the Hydra default, and it is an error when the same field was also set on
the Hydra command line to a different value.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipefit.config import AUTO, ConfigError, RunConfig
from pipefit.partition.memory import reduce_bucket_elements

log = logging.getLogger("pipefit")

# accelerate field name -> (environment variable, pipefit field, parser)
_PRECISION_FROM_ACCELERATE = {"no": "fp32", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


def _int(v: str) -> int:
    return int(float(v))


ACCELERATE_FIELDS: dict[str, tuple[str, str, Any]] = {
    "zero_stage": ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "zero.stage", _int),
    "gradient_accumulation_steps": ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "train.grad_accum_steps", _int),
    "gradient_clipping": ("ACCELERATE_GRADIENT_CLIPPING", "optim.grad_clip", float),
    "mixed_precision": (
        "ACCELERATE_MIXED_PRECISION",
        "train.precision",
        lambda v: _PRECISION_FROM_ACCELERATE.get(v, v),
    ),
}

# DeepSpeed JSON path -> pipefit field, for a user-supplied --deepspeed_config_file.
DS_JSON_FIELDS: dict[tuple[str, ...], str] = {
    ("train_micro_batch_size_per_gpu",): "train.micro_batch_size",
    ("gradient_accumulation_steps",): "train.grad_accum_steps",
    ("gradient_clipping",): "optim.grad_clip",
    ("zero_optimization", "stage"): "zero.stage",
}


@dataclass
class AccelerateSettings:
    """What accelerate passed: field -> (value, where it came from)."""

    values: dict[str, tuple[Any, str]]
    config_file: str | None


def read_accelerate_env(env: Mapping[str, str] | None = None) -> AccelerateSettings:
    env = os.environ if env is None else env
    values: dict[str, tuple[Any, str]] = {}
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return AccelerateSettings({}, None)
    for name, (var, field_name, parse) in ACCELERATE_FIELDS.items():
        if env.get(var) not in (None, "", "none", "None", "auto", "no"):
            try:
                values[field_name] = (parse(env[var]), f"accelerate --{name} {env[var]}")
            except ValueError:
                raise ConfigError(f"accelerate --{name}={env[var]!r} is not a valid value for {field_name}") from None
    config_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None
    if config_file in ("none", "None"):
        config_file = None
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"accelerate --deepspeed_config_file={config_file!r} does not exist")
        try:
            ds_json = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"accelerate --deepspeed_config_file={config_file!r} is not valid JSON ({exc})") from None
        for keys, field_name in DS_JSON_FIELDS.items():
            node: Any = ds_json
            for k in keys:
                node = node.get(k) if isinstance(node, dict) else None
            if node is not None and node != "auto":
                values.setdefault(field_name, (node, f"{config_file}:{'.'.join(keys)}={node}"))
        for prec in ("bf16", "fp16"):
            if isinstance(ds_json.get(prec), dict) and ds_json[prec].get("enabled") is True:
                values.setdefault("train.precision", (prec, f"{config_file}:{prec}.enabled=true"))
    return AccelerateSettings(values, config_file)


def _get(run: RunConfig, dotted: str) -> Any:
    section, name = dotted.split(".")
    return getattr(getattr(run, section), name)


def _set(run: RunConfig, dotted: str, value: Any) -> None:
    section, name = dotted.split(".")
    setattr(getattr(run, section), name, value)


def apply_accelerate_settings(run: RunConfig, settings: AccelerateSettings, explicit: set[str]) -> RunConfig:
    """Honour accelerate's DeepSpeed settings; a conflict with an explicit Hydra override is an error."""
    for field_name, (value, source) in settings.values.items():
        current = _get(run, field_name)
        same = current == value or (isinstance(current, float) and float(value) == current)
        # A group choice on the command line (zero=zero0) sets every field of that group.
        was_explicit = field_name in explicit or field_name.split(".")[0] in explicit
        if was_explicit and not same:
            raise ConfigError(
                f"{field_name}={current} (Hydra override) conflicts with {source}; "
                "set it in one place or make them agree"
            )
        # An auto layout field (a string) takes the launcher's number as it is.
        _set(run, field_name, type(current)(value) if current is not None and current != AUTO else value)
    return run


def fused_adam_prebuilt(installed_ops: Mapping[str, bool] | None = None, builder: Any = None) -> tuple[bool, str]:
    """Whether DeepSpeed's FusedAdam op is prebuilt for this machine, and why not when it is not.

    Only a prebuilt op counts: otherwise ``deepspeed.initialize`` compiles it on every rank, which fails
    without nvcc/ninja and can outlast ``train.dist_timeout_s``. ``installed_ops`` defaults to
    ``deepspeed.git_version_info.installed_ops``, ``builder`` to DeepSpeed's ``FusedAdamBuilder()``.
    """
    if installed_ops is None:
        from deepspeed.git_version_info import installed_ops
    if not installed_ops.get("fused_adam", False):
        return False, "DeepSpeed's fused_adam op is not prebuilt (DS_BUILD_FUSED_ADAM=1 at install prebuilds it)"
    if builder is None:
        from deepspeed.ops.op_builder import FusedAdamBuilder

        builder = FusedAdamBuilder()
    if not builder.is_compatible(False):
        return False, "DeepSpeed's fused_adam op is prebuilt but not compatible with this machine"
    return True, "DeepSpeed's fused_adam op is prebuilt"


def _optimizer_block(run: RunConfig, device_kind: str) -> dict[str, Any]:
    """AdamW for DeepSpeed. ``optim.impl=auto``: torch's AdamW on CPU; on an accelerator DeepSpeed's
    FusedAdam when its op is prebuilt, else torch's fused AdamW (same update, no compile at start)."""
    o = run.optim
    use_torch = o.impl == "torch" or (o.impl == "auto" and device_kind == "cpu")
    torch_fused = False
    if o.impl == "auto" and device_kind != "cpu":
        prebuilt, why = fused_adam_prebuilt()
        use_torch = torch_fused = not prebuilt
        chosen = "DeepSpeed FusedAdam" if prebuilt else "torch.optim.AdamW(fused=True)"
        log.info("optim.impl=auto on %s: %s (%s)", device_kind, chosen, why)
    params: dict[str, Any] = {
        "lr": o.lr,
        "betas": list(o.betas),
        "eps": o.eps,
        "weight_decay": o.weight_decay,
        "torch_adam": use_torch,
        "adam_w_mode": True,
    }
    if torch_fused:
        params["fused"] = True  # passed through by DeepSpeed to torch.optim.AdamW
    return {"type": "AdamW", "params": params}


def build_ds_config(run: RunConfig, dp: int, device_kind: str, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON for this run. ``base`` (a user's DS file) supplies keys pipefit does not derive.

    The learning-rate schedule is not a DeepSpeed "scheduler" block: it is built from the same
    config by :mod:`pipefit.run.schedule` and passed to ``deepspeed.initialize`` (see there why).
    """
    t = run.train
    cfg: dict[str, Any] = json.loads(json.dumps(dict(base or {})))
    for key, instead in (("scheduler", "optim.scheduler/optim.warmup_steps"), ("optimizer", "optim.*")):
        if key in cfg:
            raise ConfigError(
                f"the DeepSpeed config file sets {key!r}; pipefit derives it from the Hydra config: "
                f"remove it from the file and set {instead}"
            )
    cfg.update(
        {
            "train_batch_size": t.micro_batch_size * t.grad_accum_steps * dp,
            "train_micro_batch_size_per_gpu": t.micro_batch_size,
            "gradient_accumulation_steps": t.grad_accum_steps,
            "gradient_clipping": run.optim.grad_clip,
            "optimizer": _optimizer_block(run, device_kind),
            "bf16": {"enabled": t.precision == "bf16"},
            "fp16": {"enabled": t.precision == "fp16"},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
            "seed": t.seed,
        }
    )
    zero = dict(cfg.get("zero_optimization") or {})
    zero.update(
        {
            "stage": run.zero.stage,
            # At dp=1 nothing is reduced or gathered: small buckets (see partition.memory.DP1_BUCKET_ELEMENTS).
            "reduce_bucket_size": reduce_bucket_elements(run.zero.reduce_bucket_size, dp),
            "allgather_bucket_size": reduce_bucket_elements(run.zero.allgather_bucket_size, dp),
        }
    )
    cfg["zero_optimization"] = zero
    pipeline = dict(cfg.get("pipeline") or {})
    # DeepSpeed's non-reentrant checkpoint: the first stage's inputs are integer ids (nothing requires
    # grad), with which the reentrant one would cut the embedding and the first blocks off autograd.
    pipeline.update(
        {"activation_checkpoint_interval": run.pipeline.activation_checkpoint_interval, "use_reentrant": False}
    )
    cfg["pipeline"] = pipeline
    if t.precision == "bf16" and run.zero.stage == 1:
        # Gradients accumulate over micro-batches in fp32 (DeepSpeed's BF16_Optimizer, whose fp32 master
        # weights and moments are sharded over data-parallel ranks, as ZeRO-1 shards them).
        cfg["data_types"] = {"grad_accum_dtype": "fp32", **dict(cfg.get("data_types") or {})}
    return cfg


def check_precision(precision: str, accelerator: Any = None) -> None:
    """A one-line error when this machine's DeepSpeed accelerator cannot train in ``precision``.

    Call before any process group exists; ``accelerator`` defaults to DeepSpeed's ``get_accelerator()``.
    """
    if precision == "fp32":
        return
    if accelerator is None:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
    supported = {"fp32": True, "bf16": accelerator.is_bf16_supported(), "fp16": accelerator.is_fp16_supported()}
    if not supported.get(precision, False):
        accepted = ", ".join(p for p, ok in supported.items() if ok)
        raise ConfigError(
            f"train.precision={precision} is not supported on this {accelerator.device_name()} device "
            f"(DeepSpeed accelerator {type(accelerator).__name__}); accepted here: {accepted}"
        )


# Blocks of a user's DeepSpeed file that pipefit derives itself -> the Hydra fields that set them.
REFUSED_DS_BLOCKS = {"optimizer": "optim.*", "scheduler": "optim.scheduler/optim.warmup_steps"}


def load_base_config(settings: AccelerateSettings) -> dict[str, Any] | None:
    """The user's ``--deepspeed_config_file`` (keys pipefit does not derive), checked before any rank starts."""
    if not settings.config_file:
        return None
    cfg = json.loads(Path(settings.config_file).read_text())
    for key, instead in REFUSED_DS_BLOCKS.items():
        if key in cfg:
            raise ConfigError(
                f"accelerate --deepspeed_config_file={settings.config_file!r} sets {key!r}; pipefit derives it from "
                f"the Hydra config: remove it from the file and set {instead}"
            )
    return cfg
