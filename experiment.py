"""The learning experiment (one seed per run): both arms on the same demo records, held-out accuracy at
fixed steps, the protein-ablation control and a retrieval arm. See protein_llava.experiment.learning.

    python experiment.py --seed 0                 # make experiment SEED=0
    python experiment.py --seed 1 --arms multimodal multimodal_encoder_lora
"""

from __future__ import annotations

import argparse
from pathlib import Path

from protein_llava.experiment.learning import ARMS, ExperimentConfig, run_experiment

HERE = Path(__file__).resolve().parent


def main() -> None:
    defaults = ExperimentConfig(train_config_dir=str(HERE / "configs" / "train"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", default=None, help="the seed's folder (default: checkpoints/experiment/seed<SEED>)")
    parser.add_argument("--num-train", type=int, default=defaults.num_train, help="training proteins")
    parser.add_argument("--num-heldout", type=int, default=defaults.num_heldout, help="held-out proteins")
    parser.add_argument("--heldout-items", type=int, default=defaults.heldout_items, help="held-out items scored")
    parser.add_argument("--stage1-steps", type=int, default=defaults.stage1_steps)
    parser.add_argument("--stage2-steps", type=int, default=defaults.stage2_steps)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument(
        "--contrast-weight", type=float, default=defaults.contrast_weight,
        help="the swap-contrast loss in the multimodal arms' stage 2 (default %(default)s; 0 turns it off; the text-only "
        "arm has no protein to swap)",
    )
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(defaults.arms))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every training run, e.g. data.batch_size=8")
    args = parser.parse_args()
    config = ExperimentConfig(
        seed=args.seed,
        out=args.out or f"checkpoints/experiment/seed{args.seed}",
        train_config_dir=defaults.train_config_dir,
        num_train=args.num_train,
        num_heldout=args.num_heldout,
        heldout_items=args.heldout_items,
        stage1_steps=args.stage1_steps,
        stage2_steps=args.stage2_steps,
        eval_every=args.eval_every,
        contrast_weight=args.contrast_weight,
        arms=tuple(args.arms),
        train_overrides=tuple(args.overrides),
    )
    run_experiment(config)
    print((Path(config.out) / "report.md").read_text())
    print(f"results in {config.out}/results.json; all seeds: {Path(config.out).parent}/summary.md")


if __name__ == "__main__":
    main()
