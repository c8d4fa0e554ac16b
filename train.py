"""Train ProteinLLM: `python train.py stage=1` (projector alignment) then `python train.py stage=2` (SFT).

Overrides follow Hydra: model=tiny, data.path=FILE, trainer.max_steps=N, out=DIR, resume=auto, ...
Configs live in configs/train/.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="configs/train", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from protein_llava.training.run import train

    print(train(cfg))


if __name__ == "__main__":
    main()
