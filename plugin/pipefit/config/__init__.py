"""The run's configuration: schemas (Hydra's ConfigStore), hardware presets, validation, composition.

``conf/config.yaml`` lists ``pipefit_schema`` first in its defaults, so every YAML file and every
command-line override is type-checked against these dataclasses at compose time (a misspelt key
fails there). :func:`validate` then checks the values that depend on each other, before any
process group exists. This is the bottom layer: it imports nothing else from pipefit.
"""

from pipefit.config.hardware import (
    CUDA_PRESETS,
    HARDWARE_PRESETS_DIR,
    detect_device_memory_gib,
    detect_device_name,
    resolve_hardware,
)
from pipefit.config.schema import (
    AUTO,
    AUTO_FIELDS,
    COST_METHODS,
    DATA_LAYOUTS,
    DATA_SOURCES,
    DATA_TEMPLATES,
    DEFAULT_CHAT_TEMPLATE,
    OPTIMIZER_IMPLS,
    PIPE_SCHEDULES,
    PRECISIONS,
    SCHEDULERS,
    ConfigError,
    DataConfig,
    HardwareConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    PipelineConfig,
    RunConfig,
    TrainConfig,
    ZeroConfig,
    register_configs,
)
from pipefit.config.validate import auto_fields, check_attention, check_world, to_run_config, validate, validate_data

__all__ = [
    "AUTO",
    "AUTO_FIELDS",
    "auto_fields",
    "COST_METHODS",
    "CUDA_PRESETS",
    "HARDWARE_PRESETS_DIR",
    "detect_device_memory_gib",
    "detect_device_name",
    "resolve_hardware",
    "DATA_LAYOUTS",
    "DATA_SOURCES",
    "DATA_TEMPLATES",
    "DEFAULT_CHAT_TEMPLATE",
    "OPTIMIZER_IMPLS",
    "PIPE_SCHEDULES",
    "PRECISIONS",
    "SCHEDULERS",
    "ConfigError",
    "DataConfig",
    "HardwareConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "PipelineConfig",
    "RunConfig",
    "TrainConfig",
    "ZeroConfig",
    "register_configs",
    "check_attention",
    "check_world",
    "to_run_config",
    "validate",
    "validate_data",
]
