"""Which parameters train: frozen Hugging Face tensors (``train.freeze``) and LoRA adapters (``lora``).

Both act on the stage layers after their weights are loaded and before ``deepspeed.initialize``,
so the optimizer (and ZeRO's flat partitions) only ever see trainable tensors.

``train.freeze`` is a list of regular expressions, each matched in full against Hugging Face
parameter names (``model.embed_tokens.weight``, ``model.layers.0.*``). A tied LM head answers to
both of its names, in the pipeline as in the HF model. A frozen tied embedding gets no gradient on
either stage that holds it, and DeepSpeed's tied-gradient all-reduce skips a missing gradient.

``lora`` puts peft's LoRA layers (``peft.inject_adapter_in_model``) on the Linear/Conv1D modules of
the decoder blocks (and an untied ``lm_head``) whose HF names end with one of
``lora.target_modules`` -- peft's own matching rule -- and freezes every base weight. Each
adapter's A/B matrices are initialised by peft's own rule from a seed that depends only on
``train.seed`` and the module's HF name, so they do not depend on the partition, and
:func:`reference_model` gives ``peft.get_peft_model`` the very same tensors. (With
``lora.dropout > 0`` the dropout masks depend on each rank's random stream, as any dropout does.)

Export: :func:`pipefit.model.weights.plain_state_dict` merges each adapter into its base weight (``W + B A * scale``),
so ``hf_model/`` is a normal HF folder; :func:`pipefit.run.export.export_adapter` also writes ``hf_adapter/``
(``adapter_model.safetensors`` + ``adapter_config.json``) for ``PeftModel.from_pretrained``.
A stage left with nothing to train is refused before any rank starts: DeepSpeed cannot build an
optimizer over no parameters.
"""

from __future__ import annotations

import json
import re
import uuid
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipefit.config import ConfigError, LoraConfig, RunConfig
from pipefit.model.layer_list import layer_plan, make_skeleton, stage_layers, tied_aliases
from pipefit.model.layers import ModelSkeleton
from pipefit.model.weights import ADAPTER, plain_state_dict, replace_dir

__all__ = ["ADAPTER", "plain_state_dict"]

ADAPTER_DIR = "hf_adapter"
_PEFT_PREFIX = "base_model.model."


# --- freezing ------------------------------------------------------------------------------------


def freeze_patterns(patterns: list[str]) -> list[re.Pattern[str]]:
    compiled = []
    for i, pattern in enumerate(patterns):
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise ConfigError(
                f"train.freeze[{i}]={pattern!r} is not a regular expression ({exc}); "
                "expected e.g. model.embed_tokens.weight or model.layers.0.*"
            ) from None
    return compiled


def is_frozen(name: str, patterns: list[re.Pattern[str]], aliases: dict[str, str]) -> bool:
    """Whether HF parameter ``name`` (or the other name of a tied tensor) matches a pattern in full."""
    names = (name, aliases[name]) if name in aliases else (name,)
    return any(p.fullmatch(n) for p in patterns for n in names)


def freeze(layers: list[Any], patterns: list[str], aliases: dict[str, str]) -> int:
    """Set ``requires_grad=False`` on every stage-layer parameter whose HF name matches; returns how many."""
    compiled = freeze_patterns(patterns)
    count = 0
    for layer in layers:
        for local, prefix in layer.hf_prefixes.items():
            for key, param in getattr(layer, local).named_parameters():
                if is_frozen(f"{prefix}.{key}", compiled, aliases):
                    param.requires_grad_(False)
                    count += 1
    return count


# --- LoRA ----------------------------------------------------------------------------------------


def _conv1d_type() -> type:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def peft_config(lora: LoraConfig, target_modules: list[str] | None = None, fan_in_fan_out: bool = False) -> Any:
    """peft's ``LoraConfig`` for ``lora`` (``target_modules`` replaces the configured suffixes when given)."""
    import peft

    return peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(target_modules if target_modules is not None else lora.target_modules),
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _lora_hosts(skeleton: Any) -> list[str]:
    """HF prefixes of the modules LoRA may adapt: every decoder block, and an untied LM head."""
    a = skeleton.adapter
    hosts = [a.block_prefix(b) for b in range(a.num_blocks(skeleton.config))]
    if not a.tied(skeleton.config):
        hosts.append(a.lm_head)
    return hosts


def lora_targets(lora: LoraConfig, skeleton: Any) -> list[str]:
    """HF names of the modules ``lora.target_modules`` adapts; a target that cannot be honoured is a ConfigError."""
    try:
        from peft.tuners.tuners_utils import check_target_module_exists
    except ImportError:
        raise ConfigError("lora.enabled=true needs peft, which is not installed: pip install 'pipefit[lora]'") from None
    if not lora.target_modules:
        raise ConfigError("lora.target_modules is empty; give HF module-name suffixes, e.g. [q_proj, v_proj]")
    if lora.r <= 0:
        raise ConfigError(f"lora.r={lora.r} is not accepted; expected an integer > 0")
    if lora.alpha <= 0:
        raise ConfigError(f"lora.alpha={lora.alpha} is not accepted; expected a number > 0")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"lora.dropout={lora.dropout} is not accepted; expected a number in [0, 1)")
    hosts = _lora_hosts(skeleton)
    linear = (nn.Linear, _conv1d_type())
    modules = dict(skeleton.model.named_modules())
    block0 = skeleton.adapter.block_prefix(0)
    examples = sorted(
        {n.rsplit(".", 1)[-1] for n, m in modules.items() if n.startswith(block0 + ".") and isinstance(m, linear)}
    )
    found: list[str] = []
    for target in lora.target_modules:
        single = peft_config(lora, [target])
        hits = [n for n in modules if n and check_target_module_exists(single, n)]
        if not hits:
            raise ConfigError(
                f"lora.target_modules: {target!r} matches no module of this model; "
                f"its decoder blocks hold {', '.join(examples)}"
            )
        for name in hits:
            if not any(name == h or name.startswith(h + ".") for h in hosts):
                raise ConfigError(
                    f"lora.target_modules: {target!r} matches {name}, outside the decoder blocks; pipefit puts "
                    f"LoRA on decoder-block layers ({', '.join(examples)}) and an untied lm_head only"
                )
            if not isinstance(modules[name], linear):
                raise ConfigError(
                    f"lora.target_modules: {target!r} matches {name} ({type(modules[name]).__name__}), "
                    f"not a Linear layer; use the projections, e.g. {', '.join(examples)}"
                )
        found += [n for n in hits if n not in found]
    return found


def _uses_conv1d(skeleton: Any, targets: list[str]) -> bool:
    return any(isinstance(skeleton.model.get_submodule(n), _conv1d_type()) for n in targets)


def _lora_seed(seed: int, hf_module: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(hf_module.encode())) % (2**63)


def _init_lora(layer: Any, hf_module: str, seed: int) -> None:
    """peft's own initialisation of one adapter, on CPU, from a seed of (train.seed, HF module name)."""
    parts = [layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]]
    device = parts[0].weight.device
    for part in parts:
        part.to("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_lora_seed(seed, hf_module))
        layer.reset_lora_parameters(ADAPTER, True)
    for part in parts:
        part.to(device)


def add_lora(layers: list[Any], skeleton: Any, lora: LoraConfig, seed: int) -> int:
    """Freeze every parameter of ``layers`` and inject LoRA adapters into the targeted modules.

    Returns the number of adapted modules. The adapters' init depends only on ``seed`` and each
    module's HF name, never on which stage holds it.
    """
    import peft
    from peft.tuners.lora import LoraLayer

    targets = set(lora_targets(lora, skeleton))
    fan_in_fan_out = _uses_conv1d(skeleton, sorted(targets))
    count = 0
    for layer in layers:
        layer.requires_grad_(False)
        local_to_hf: dict[str, str] = {}
        for local, prefix in layer.hf_prefixes.items():
            for sub, _ in getattr(layer, local).named_modules():
                hf = f"{prefix}.{sub}" if sub else prefix
                if hf in targets:
                    local_to_hf[f"{local}.{sub}" if sub else local] = hf
        if not local_to_hf:
            continue
        peft.inject_adapter_in_model(peft_config(lora, sorted(local_to_hf), fan_in_fan_out), layer, ADAPTER)
        for name, module in layer.named_modules():
            if isinstance(module, LoraLayer):
                _init_lora(module, local_to_hf[name], seed)
                count += 1
    return count


def adapter_state_dict(layer: Any) -> dict[str, torch.Tensor]:
    """The layer's LoRA tensors under the names peft saves (``base_model.model.<hf module>.lora_A.weight``)."""
    out: dict[str, torch.Tensor] = {}
    for local, prefix in layer.hf_prefixes.items():
        for key, tensor in getattr(layer, local).state_dict().items():
            plain = re.sub(rf"(^|\.)(lora_[AB])\.{ADAPTER}\.", r"\1\2.", key)
            if plain != key:
                out[f"{_PEFT_PREFIX}{prefix}.{plain}"] = tensor
    return out


def lora_from_checkpoint(config: dict[str, Any] | None) -> LoraConfig | None:
    """The ``lora`` settings a checkpoint was trained with (its resolved config), or None."""
    raw = (config or {}).get("lora") or {}
    if not raw.get("enabled"):
        return None
    return LoraConfig(**raw)


# --- the run -------------------------------------------------------------------------------------


def _layer_param_names(skeleton: Any, info: Any) -> list[str]:
    names = []
    for prefix in info.hf_prefixes:
        names += [f"{prefix}.{n}" for n, _ in skeleton.model.get_submodule(prefix).named_parameters()]
    return names


def trainable_layers(run: RunConfig, skeleton: ModelSkeleton) -> tuple[list[bool], str] | None:
    """Which pipeline layers keep something to train under ``lora`` or ``train.freeze`` (and the
    phrase naming the cause), or None when every layer trains. Checks the patterns and targets."""
    freeze_list = list(run.train.freeze)
    if run.lora.enabled and freeze_list:
        raise ConfigError(
            f"train.freeze={freeze_list} cannot be combined with lora.enabled=true: LoRA already freezes every "
            "base weight; leave train.freeze empty"
        )
    plan = layer_plan(skeleton)
    if run.lora.enabled:
        targets = lora_targets(run.lora, skeleton)
        trainable = [any(t == p or t.startswith(p + ".") for t in targets for p in info.hf_prefixes) for info in plan]
        return trainable, f"lora.target_modules={list(run.lora.target_modules)} puts no adapter on"
    if not freeze_list:
        return None
    patterns = freeze_patterns(freeze_list)
    aliases = tied_aliases(skeleton)
    names = [n for n, _ in skeleton.model.named_parameters(remove_duplicate=False)]
    for pattern, raw in zip(patterns, freeze_list, strict=True):
        if not any(pattern.fullmatch(n) for n in names):
            examples = ", ".join(dict.fromkeys([names[0], *[n for n in names if ".0." in n][:1], names[-1]]))
            raise ConfigError(
                f"train.freeze: {raw!r} matches no parameter of this model; patterns match Hugging Face "
                f"parameter names in full, e.g. {examples}"
            )
    trainable = [any(not is_frozen(n, patterns, aliases) for n in _layer_param_names(skeleton, info)) for info in plan]
    return trainable, f"train.freeze={freeze_list} freezes every parameter of"


def check(run: RunConfig, skeleton: ModelSkeleton, boundaries: list[int] | None) -> None:
    """Every ``train.freeze`` pattern and LoRA target is usable, and every stage keeps something to train.

    Raises a one-line :class:`ConfigError`; needs only the meta-device skeleton (no process group).
    """
    found = trainable_layers(run, skeleton)
    if found is None:
        return
    trainable, cause = found
    plan = layer_plan(skeleton)
    if not boundaries:
        return
    for s in range(len(boundaries) - 1):
        start, stop = boundaries[s], boundaries[s + 1]
        if not any(trainable[start:stop]):
            kinds = ", ".join(f"{i}:{plan[i].kind}" for i in range(start, stop))
            raise ConfigError(
                f"{cause} pipeline stage {s} (layers [{start}, {stop}): {kinds}); DeepSpeed cannot build an "
                "optimizer for a stage with nothing to train: choose pipeline.boundaries that give it a trainable layer"
            )


def check_resume(run: RunConfig, ckpt_config: dict[str, Any], ckpt: Path, same_shape: bool) -> None:
    """A checkpoint resumes only with the LoRA settings it was saved with (and, for its optimizer
    state, the same frozen set)."""
    theirs = lora_from_checkpoint(ckpt_config)
    mine = run.lora if run.lora.enabled else None
    if theirs != mine:
        raise ConfigError(
            f"lora={_describe(mine)} differs from the checkpoint's lora={_describe(theirs)} "
            f"(train.resume={str(ckpt)!r}); resume with the settings the checkpoint was trained with"
        )
    their_freeze = list(((ckpt_config or {}).get("train") or {}).get("freeze") or [])
    if same_shape and their_freeze != list(run.train.freeze):
        raise ConfigError(
            f"train.freeze={list(run.train.freeze)} differs from the checkpoint's {their_freeze} "
            f"(train.resume={str(ckpt)!r}); its optimizer state holds exactly that run's trainable tensors"
        )


def _describe(lora: LoraConfig | None) -> str:
    if lora is None:
        return "off"
    return f"(r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, target_modules={list(lora.target_modules)})"


def apply(
    module: nn.Module, run: RunConfig, skeleton: ModelSkeleton, measured_boundaries: list[int] | None = None
) -> None:
    """Freeze / add LoRA on this rank's stage (after its weights are loaded, before ``deepspeed.initialize``).

    ``measured_boundaries``: a split measured after the ranks started (``pipeline.partition=profile``),
    checked here (every stage keeps a trainable layer) with the same verdict on every rank.
    """
    if not (run.lora.enabled or run.train.freeze):
        return
    if measured_boundaries is not None:
        check(run, skeleton, measured_boundaries)
    layers = stage_layers(module)
    if run.lora.enabled:
        add_lora(layers, skeleton, run.lora, run.train.seed)
    else:
        freeze(layers, list(run.train.freeze), tied_aliases(skeleton))
    for param in module.parameters():
        if not param.requires_grad:
            # DeepSpeed's pipeline reads a tied weight's ``_hp_grad`` under its BF16 optimizer (bf16 +
            # ZeRO-1) and skips it when None; only trainable tensors ever get one set.
            param._hp_grad = None


def reference_model(model: Any, run: RunConfig) -> Any:
    """The single-process HF model with the run's freezing or LoRA (``peft.get_peft_model``), for parity.

    The adapters get exactly the pipeline's initial values (same seed per HF module name).
    """
    if run.lora.enabled:
        import peft
        from peft.tuners.lora import LoraLayer

        skeleton = make_skeleton(model.config)
        targets = lora_targets(run.lora, skeleton)
        wrapped = peft.get_peft_model(model, peft_config(run.lora, fan_in_fan_out=_uses_conv1d(skeleton, targets)))
        for name, module in wrapped.base_model.model.named_modules():
            if isinstance(module, LoraLayer):
                _init_lora(module, name, run.train.seed)
        return wrapped
    if run.train.freeze:
        patterns = freeze_patterns(list(run.train.freeze))
        for name, param in model.named_parameters(remove_duplicate=False):
            if any(p.fullmatch(name) for p in patterns):
                param.requires_grad_(False)
    return model


def write_adapter_folder(
    tensors: dict[str, torch.Tensor], lora: LoraConfig, skeleton: Any, out_dir: Path, base: str | None
) -> None:
    """``adapter_model.safetensors`` + ``adapter_config.json`` in ``out_dir``, replaced atomically."""
    from safetensors.torch import save_file

    targets = lora_targets(lora, skeleton)
    config = peft_config(lora, fan_in_fan_out=_uses_conv1d(skeleton, targets))
    config.base_model_name_or_path = base
    config.inference_mode = True
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    save_file(
        {k: v.detach().to("cpu").contiguous() for k, v in sorted(tensors.items())},
        str(staging / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    config.save_pretrained(str(staging))
    json.loads((staging / "adapter_config.json").read_text())  # written whole
    replace_dir(staging, out_dir)
