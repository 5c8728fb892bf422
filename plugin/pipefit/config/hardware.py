"""``hardware=auto``: the preset of the detected CUDA device, or ``cpu`` without one."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from omegaconf import OmegaConf

from pipefit.config.schema import HardwareConfig

HARDWARE_PRESETS_DIR = Path(__file__).resolve().parents[3] / "conf" / "hardware"
# hardware=auto: the preset whose key appears in the CUDA device's name (torch.cuda.get_device_name).
CUDA_PRESETS = {"H200": "h200", "H100": "h100", "A100": "a100"}
_WARNED_DEVICES: set[str] = set()


def detect_device_name() -> str | None:
    """This rank's CUDA device name, or None without CUDA.

    Asks for the device at ``LOCAL_RANK`` (when visible), so that a rank opens no context on another
    rank's device.
    """
    import torch  # torch: imported when a device is asked about, not to read a config

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(_local_device_index())


def detect_device_memory_gib() -> float | None:
    """This rank's CUDA device memory in GiB, or None without CUDA."""
    import torch  # torch: imported when a device is asked about, not to read a config

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(_local_device_index()).total_memory / 1024**3


def _local_device_index() -> int:
    import torch  # torch: imported when a device is asked about, not to read a config

    index = int(os.environ.get("LOCAL_RANK", "0"))
    return index if index < torch.cuda.device_count() else 0


def resolve_hardware(
    hw: HardwareConfig, device_name: str | None, device_memory_gib: Callable[[], float | None] | None = None
) -> HardwareConfig:
    """``hardware=auto``: the preset of the detected CUDA device (by name) or ``cpu`` without one.

    A CUDA device without a preset is priced with the most conservative GPU preset's compute
    (a100) and its own memory (``device_memory_gib``), with a warning naming what to set: a run
    on such a device must not stop over a price. Fields given besides (``hardware=auto
    hardware.memory_gib=40``; any value other than the schema's default) are kept. Another
    ``hardware`` is returned as it is.
    """
    if hw.name != "auto":
        return hw
    memory = None
    if device_name is None:
        preset = "cpu"
    else:
        found = [p for key, p in CUDA_PRESETS.items() if key in device_name.upper()]
        preset = found[0] if found else "a100"
        if not found:
            memory = (device_memory_gib or detect_device_memory_gib)()
            if device_name not in _WARNED_DEVICES:  # validate runs more than once per launch
                _WARNED_DEVICES.add(device_name)
                logging.getLogger("pipefit").warning(
                    "hardware=auto: CUDA device %r has no preset (device names with %s do); priced with a100's "
                    "compute figures and the device's %.1f GiB; set hardware.peak_tflops_bf16, "
                    "hardware.peak_tflops_fp32 and hardware.link_bandwidth_gbs for exact prices",
                    device_name,
                    ", ".join(CUDA_PRESETS),
                    memory or 0.0,
                )
    values = OmegaConf.to_container(OmegaConf.load(HARDWARE_PRESETS_DIR / f"{preset}.yaml"))
    if memory is not None:
        values.update({"name": "cuda", "memory_gib": round(memory, 2)})  # type: ignore[union-attr]
    default = HardwareConfig()
    for f in fields(HardwareConfig):
        given = getattr(hw, f.name)
        if f.name != "name" and given != getattr(default, f.name):
            values[f.name] = given  # type: ignore[index]
    return HardwareConfig(**values)  # type: ignore[arg-type]
