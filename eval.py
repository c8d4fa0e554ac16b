"""Evaluate a ProteinLLM and a text-only baseline on the same multiple-choice items.

    python eval.py                                   # the demo's exports on the demo's held-out proteins
    python eval.py benchmark=proteinlmbench benchmark.path=FILE model=PATH baseline=smollm2 limit=100 out=DIR

Settings: fields of protein_llava.evaluation.EvalConfig (configs/eval/eval.yaml picks the benchmark).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from protein_llava.evaluation import EvalConfig, check_model_source, run_evaluation
from protein_llava.evaluation.config import ABLATED_SUFFIX, PROBE_ARM, RETRIEVAL_ARM, register_configs
from protein_llava.evaluation.runner import check_probe_model

register_configs()


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _interval(ci) -> str:
    return "n/a" if ci is None else f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f}%"


@hydra.main(config_path="configs/eval", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        config = EvalConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))
    except ValueError as error:
        sys.exit(f"eval.py: {error}")
    try:
        for name, source in config.arm_sources().items():
            check_model_source(source, name)
        check_probe_model(config)
    except (FileNotFoundError, ValueError) as error:
        # A missing model, or a text-only model asked for the probe arm: one line naming it, not a traceback.
        sys.exit(f"eval.py: {error}")
    try:
        report = run_evaluation(config)
    except FileNotFoundError as error:
        # A missing data path: one line naming it, not a traceback.
        sys.exit(f"eval.py: {error}")
    arms = report["arms"]
    for name, arm in arms.items():
        if name.endswith(ABLATED_SUFFIX):
            continue
        ablated = arms.get(name + ABLATED_SUFFIX)
        kind = "multimodal" if arm["multimodal"] else {RETRIEVAL_ARM: "retrieval", PROBE_ARM: "linear probe"}.get(name, "text-only")
        line = (
            f"{name} ({kind}): accuracy {_percent(arm['accuracy'])} (95% CI {_interval(arm['ci95'])}), "
            f"{arm['n_scored']} scored, {arm['n_flagged']} flagged, {arm['n_unparseable']} unparseable"
        )
        if ablated is not None:
            line += f"; protein-ablated {_percent(ablated['accuracy'])} (95% CI {_interval(ablated['ci95'])})"
        print(line)
        for category, entry in arm.get("by_category", {}).items():
            text = f"    {category}: {_percent(entry['accuracy'])} (95% CI {_interval(entry['ci95'])}, n={entry['n']})"
            if ablated is not None:
                text += f"; ablated {_percent(ablated['by_category'][category]['accuracy'])}"
            print(text + f"; chance {_percent(entry['chance'])}")
    if "mcnemar_p" in report:
        print(f"exact McNemar p = {report['mcnemar_p']:.4g}")
    print(f"chance {_percent(report['benchmark']['chance'])}; report in {config.out}")


if __name__ == "__main__":
    main()
