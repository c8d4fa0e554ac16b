"""Evaluate a ProteinLLM and a text-only baseline on the same multiple-choice items.

    python eval.py                                   # the demo's exports on the demo's held-out proteins
    python eval.py benchmark=proteinlmbench benchmark.path=FILE model=PATH baseline=smollm2 limit=100 out=DIR

Settings: configs/eval/eval.yaml (fields of protein_llava.evaluation.EvalConfig).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from protein_llava.evaluation import EvalConfig, check_model_source, run_evaluation


@hydra.main(config_path="configs/eval", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        config = EvalConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))
    except ValueError as error:
        sys.exit(f"eval.py: {error}")
    try:
        for name, source in config.arm_sources().items():
            check_model_source(source, name)
        report = run_evaluation(config)
    except FileNotFoundError as error:
        # A missing model or data path: one line naming it, not a traceback.
        sys.exit(f"eval.py: {error}")
    for name, arm in report["arms"].items():
        interval = arm["ci95"] or [float("nan")] * 2
        print(
            f"{name}: accuracy {arm['accuracy']} (95% CI {interval[0]:.3f}-{interval[1]:.3f}), "
            f"{arm['n_scored']} scored, {arm['n_flagged']} flagged, {arm['n_unparseable']} unparseable"
        )
    if "mcnemar_p" in report:
        print(f"exact McNemar p = {report['mcnemar_p']:.4g}")
    print(f"chance {report['benchmark']['chance']}; report in {config.out}")


if __name__ == "__main__":
    main()
