"""Train ProteinLLM: `python train.py stage=1` (projector alignment) then `python train.py stage=2` (SFT).

Overrides follow Hydra: model=tiny, data.path=FILE, trainer.max_steps=N, out=DIR, resume=auto, ...
Configs live in configs/train/; every key, its default and its check: protein_llava/training/config.py.
"""

import hydra
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

# Imported before Hydra configures logging, on purpose: Lightning adds its own console handlers when first
# imported, and configs/train/hydra/job_logging/console.yaml then removes them, so each line prints once.
from protein_llava.training.config import register_configs
from protein_llava.training.console import render_stage_table
from protein_llava.training.run import train

register_configs()


@hydra.main(config_path="configs/train", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    summary = train(cfg)
    if rank_zero_only.rank == 0:  # one table per run, not one per data-parallel process
        print(render_stage_table(summary))


if __name__ == "__main__":
    main()
