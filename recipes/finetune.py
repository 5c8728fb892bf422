"""Fine-tune a Hugging Face causal LM as a DeepSpeed pipeline (ZeRO-1 across data-parallel ranks).

One node, 2 CPU processes (the embedded default: tiny Llama, offline tokenizer and text)::

    accelerate launch --config_file launch/cpu_2proc.yaml recipes/finetune.py
    accelerate launch --use_deepspeed --num_processes 2 recipes/finetune.py train.max_steps=20

Overrides are Hydra's: ``model=gpt2_tiny``, ``model.path=/models/my-llama``, ``pipeline.stages=4``,
``pipeline.partition=profile|uniform|parameters|type:REGEX|manual pipeline.boundaries=[0,3,6]`` (default
``flops``: the cost-priced split),
``zero.stage=0``, ``train.max_steps=100``, ``optim.lr=3e-4``, ``output_dir=runs/x``;
``--cfg job`` prints the resolved config.

Several nodes, one launch per node (num_processes counts all nodes)::

    accelerate launch --use_deepspeed --num_machines 2 --machine_rank $R --num_processes 4 \\
        --main_process_ip $HEAD --main_process_port 29500 --deepspeed_multinode_launcher standard \\
        recipes/finetune.py pipeline.stages=2
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import pipefit.config  # noqa: F401  (registers the schema with Hydra's ConfigStore)
from pipefit.run.exits import check_overrides
from pipefit.run.main import main as train_main


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    train_main(cfg, list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    check_overrides(sys.argv[1:], Path(__file__).resolve().parent.parent / "conf")  # typo'd key: one line
    main()
