"""The learning experiment: does the model learn to read proteins, and does it beat reading them as text?

One seed per run (`python experiment.py --seed N`, `make experiment SEED=N`):

1. The demo set for that seed (`data.demo`): proteins whose answers can only be read off the sequence,
   four question types, held-out proteins disjoint from training.
2. Two arms without training: retrieval (each item answered with the descriptions of the training protein
   nearest by alignment identity; each item's highest identity to any training protein is recorded, for
   leakage) and a linear probe (`evaluation.probe`: per question type, a logistic regression on the
   multimodal arm's frozen encoder features, mean-pooled; what a linear read-out of the encoder answers).
3. The multimodal arm: stage 1 (projector alignment) then stage 2 (projector + LoRA), and the text-only arm
   (the same decoder, LoRA, the same records with sequences inline as text) for the same number of
   optimizer steps and the same batch size. Held-out accuracy is scored at fixed steps while they train.
4. At the last step every arm is also scored with each item's protein swapped for another held-out
   protein of similar length (the ablation control: a model that reads the sequence falls to chance).

Writes `results.json` (keyed by arm, then question type: accuracy, ci95, n), `report.md` and `curves.png`
under the seed's folder, then `summary.json` / `summary.md` over every seed folder next to it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data.demo import QUESTION_TYPES, ensure_demo_dataset
from ..evaluation.benchmarks import ablate_proteins, build_sequence_grounded
from ..evaluation.probe import LinearProbe, load_labelled_proteins
from ..evaluation.report import ALL_TYPES, accuracy_by_type
from ..evaluation.retrieval import load_training_proteins, retrieval_predictions, summarise_identity
from .heldout import HeldOutEvaluation

ARMS = ("multimodal", "text_only", "multimodal_encoder_lora")
ABLATED = "_ablated"


@dataclass
class ExperimentConfig:
    """Settings of one learning-experiment run.

    Fields:
        seed: seeds the demo data, the distractor draw, the ablation and training.
        out: the seed's folder; results land there, the seeds' summary in its parent.
        train_config_dir: the folder of train.py's Hydra configs (`configs/train`).
        num_train / num_heldout: demo proteins (four records each).
        heldout_items: benchmark items scored (the first N: N / 4 held-out proteins, every question type).
        stage1_steps / stage2_steps: the multimodal arm's optimizer steps per stage; the text-only arm
            trains stage1_steps + stage2_steps steps of stage 2.
        eval_every: held-out accuracy every N steps (and at step 0 and the last step).
        contrast_weight: `stage2.contrast_weight` of the multimodal arms' stage 2 (the swap-contrast loss);
            never the text-only arm's, which has no protein to swap. 1.0 by default: the strongest lever
            measured at this budget (README, "What was tried", row E); 0 turns it off.
        arms: which trained arms to run (see `ARMS`); the retrieval and probe arms always run.
        train_overrides: extra Hydra overrides for every training run (e.g. "data.batch_size=8").
    """

    seed: int = 0
    out: str = "checkpoints/experiment/seed0"
    train_config_dir: str = "configs/train"
    num_train: int = 800
    num_heldout: int = 100
    heldout_items: int = 160
    stage1_steps: int = 20
    stage2_steps: int = 120
    eval_every: int = 60
    contrast_weight: float = 1.0
    arms: tuple[str, ...] = ("multimodal", "text_only")
    train_overrides: tuple[str, ...] = ()

    def __post_init__(self):
        self.arms = tuple(self.arms)
        self.train_overrides = tuple(self.train_overrides)
        unknown = [arm for arm in self.arms if arm not in ARMS]
        if unknown:
            raise ValueError(f"unknown arms {unknown}; choose from {ARMS}")
        for name in ("num_train", "num_heldout", "heldout_items", "stage1_steps", "stage2_steps", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.contrast_weight < 0:
            raise ValueError(f"contrast_weight must be >= 0, got {self.contrast_weight}")
        if any(override.lstrip("+~").startswith("stage2.contrast_weight") for override in self.train_overrides):
            raise ValueError(
                "give the swap-contrast weight as contrast_weight (--contrast-weight), not as a train override: "
                "a train override reaches the text-only arm too, which has no protein to swap"
            )
        if not Path(self.train_config_dir, "train.yaml").is_file():
            raise FileNotFoundError(f"train_config_dir={self.train_config_dir} holds no train.yaml")

    @property
    def total_steps(self) -> int:
        return self.stage1_steps + self.stage2_steps


def eval_steps(total: int, every: int) -> list[int]:
    """0, every, 2 * every, ... and `total` itself."""
    return sorted({*range(0, total, every), total})


@dataclass
class ArmRun:
    """What training one arm produced: held-out records at each step and the final predictions."""

    records: list[dict] = field(default_factory=list)
    final_predictions: dict[str, dict[str, dict]] = field(default_factory=dict)
    wall_seconds: dict[str, float] = field(default_factory=dict)


def _train(config: ExperimentConfig, overrides: list[str], callback: HeldOutEvaluation, label: str, run: ArmRun) -> None:
    from ..training.config import compose_train_config
    from ..training.run import train

    started = time.perf_counter()
    train(compose_train_config(overrides, config.train_config_dir), callbacks=[callback])
    run.wall_seconds[label] = round(time.perf_counter() - started, 1)
    run.records += callback.records
    run.final_predictions.update(callback.final_predictions)


def common_overrides(config: ExperimentConfig) -> list[str]:
    """The Hydra overrides every training run of the experiment shares (seed, data, the user's overrides)."""
    return [
        f"seed={config.seed}",
        f"checkpoints_dir={config.out}",
        f"data.demo_seed={config.seed}",
        f"data.demo_num_train={config.num_train}",
        f"data.demo_num_heldout={config.num_heldout}",  # the same files as the benchmark's, never rewritten
        "checkpoint_every=1000000",  # the experiment never resumes; skip writing Lightning checkpoints
        *config.train_overrides,
    ]


def multimodal_encoder(config: ExperimentConfig):
    """The frozen encoder the multimodal arm reads through, for the probe arm: the model `train()` builds for
    the arm's stage 1 (same overrides, so the same preset, weights and seed: `build_preset` seeds torch with
    `seed` right before the model, so the random-init encoder is bit-identical), its decoder dropped."""
    from ..training.config import compose_train_config
    from ..training.plan import resolve_plan
    from ..training.run import build_model

    overrides = [*common_overrides(config), "stage=1", f"out={Path(config.out) / 'multimodal' / 'stage1'}"]
    model, _, _ = build_model(resolve_plan(compose_train_config(overrides, config.train_config_dir)))
    return model.protein_encoder


def run_arm(arm: str, config: ExperimentConfig, items, ablated) -> ArmRun:
    """Train `arm` (see `ARMS`) on the seed's demo data, scoring `items` along the way."""
    out = Path(config.out)
    common = common_overrides(config)
    steps = eval_steps(config.total_steps, config.eval_every)
    run = ArmRun()
    if arm == "text_only":
        callback = HeldOutEvaluation(
            arm, items, steps, ablated_items=ablated, final_step=config.total_steps, seed=config.seed
        )
        overrides = [*common, "stage=2", "model=text-only", f"stage2.max_steps={config.total_steps}", f"out={out / arm}"]
        _train(config, overrides, callback, "stage2", run)
        return run
    stage1_projector = out / "multimodal" / "stage1" / "projector.safetensors"
    if arm == "multimodal" or not stage1_projector.is_file():
        # Stage 1 is shared: the encoder-LoRA arm reuses the multimodal arm's stage 1 when it exists.
        stage1_steps = [s for s in steps if s <= config.stage1_steps]
        callback = HeldOutEvaluation(arm, items, stage1_steps, seed=config.seed)
        overrides = [*common, "stage=1", f"stage1.max_steps={config.stage1_steps}", f"out={stage1_projector.parent}"]
        _train(config, overrides, callback, "stage1", run)
    stage2_steps = [s - config.stage1_steps for s in steps if s > config.stage1_steps]
    callback = HeldOutEvaluation(
        arm,
        items,
        stage2_steps,
        ablated_items=ablated,
        final_step=config.stage2_steps,
        step_offset=config.stage1_steps,
        seed=config.seed,
    )
    encoder = "lora" if arm == "multimodal_encoder_lora" else "frozen"
    overrides = [
        *common,
        "stage=2",
        f"stage2.max_steps={config.stage2_steps}",
        f"stage2.encoder={encoder}",
        *([f"stage2.contrast_weight={config.contrast_weight}"] if config.contrast_weight else []),
        f"stage2.projector={stage1_projector}",
        f"out={out / arm / 'stage2'}",
    ]
    _train(config, overrides, callback, "stage2", run)
    return run


def run_experiment(config: ExperimentConfig) -> dict:
    """The whole run for one seed; returns (and writes) the results."""
    started = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = ensure_demo_dataset(out / "demo-data", seed=config.seed, num_train=config.num_train, num_heldout=config.num_heldout)
    benchmark = build_sequence_grounded(
        str(paths["heldout"]), [str(paths["train"])], num_options=4, seed=config.seed, limit=config.heldout_items
    )
    if benchmark.flagged:
        reasons = benchmark.flag_counts()
        raise RuntimeError(f"{len(benchmark.flagged)} held-out items were flagged ({reasons}); the demo set should have none")
    items = benchmark.items
    ablated = ablate_proteins(items, seed=config.seed)

    arms: dict[str, dict] = {}
    curves: dict[str, list[dict]] = {}
    training = load_training_proteins([str(paths["train"])])
    retrieval = {suffix: retrieval_predictions(chosen, training) for suffix, chosen in (("", items), (ABLATED, ablated))}
    for suffix, chosen in (("", items), (ABLATED, ablated)):
        arms["retrieval" + suffix] = accuracy_by_type(chosen, retrieval[suffix], seed=config.seed)
    probe = LinearProbe.fit(multimodal_encoder(config), load_labelled_proteins([str(paths["train"])]))
    for suffix, chosen in (("", items), (ABLATED, ablated)):
        arms["probe" + suffix] = accuracy_by_type(chosen, probe.predictions(chosen), seed=config.seed)
    del probe
    wall = {}
    final: dict[str, dict] = {}
    for arm in config.arms:
        run = run_arm(arm, config, items, ablated)
        curves[arm] = [r for r in run.records if r["arm"] == arm]
        final.update(run.final_predictions)
        for name, predictions in run.final_predictions.items():
            chosen = ablated if name.endswith(ABLATED) else items
            arms[name] = accuracy_by_type(chosen, predictions, seed=config.seed)
        wall[arm] = run.wall_seconds
    results = {
        "seed": config.seed,
        "settings": asdict(config),
        "n_items": len(items),
        "question_types": [t for t in QUESTION_TYPES if any(i.category == t for i in items)],
        "arms": arms,
        "curves": curves,
        "identity": summarise_identity(retrieval[""]),
        "mcnemar": paired_tests(items, final),
        "wall_seconds": {"total": round(time.perf_counter() - started, 1), "per_arm": wall},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    # Each item's outcome per arm, so runs can be paired item by item later (McNemar across runs).
    with (out / "predictions.jsonl").open("w") as handle:
        for name, by_item in final.items():
            for item_id, prediction in by_item.items():
                handle.write(json.dumps({"arm": name, **prediction, "item_id": item_id}) + "\n")
    (out / "report.md").write_text(render_results(results))
    plot_curves(results, out / "curves.png")
    summarize_seeds(out.parent)
    return results


def paired_tests(items, predictions: dict[str, dict]) -> dict[str, dict]:
    """Exact McNemar tests on the held-out items: each trained arm against the text-only arm, and each against
    itself with the proteins swapped (the ablated items pair with the originals item by item)."""
    from ..evaluation.statistics import mcnemar_exact

    def outcomes(name):
        return [bool(predictions[name][item.item_id]["correct"]) for item in items]

    pairs = [(arm, "text_only") for arm in ARMS if arm != "text_only"]
    pairs += [(arm, arm + ABLATED) for arm in ARMS]
    tests = {}
    for first, second in pairs:
        if first in predictions and second in predictions:
            test = mcnemar_exact(outcomes(first), outcomes(second))
            tests[f"{first} vs {second}"] = {"only_first": test.only_first, "only_second": test.only_second, "p_value": test.p_value}
    return tests


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "n/a"
    low, high = entry["ci95"] or (float("nan"), float("nan"))
    return f"{100 * entry['accuracy']:.1f}% [{100 * low:.0f}, {100 * high:.0f}]"


def render_results(results: dict) -> str:
    """report.md of one seed: accuracy per arm and question type with 95% CIs, the ablation beside each arm."""
    types = [ALL_TYPES, *results["question_types"]]
    settings = results["settings"]
    any_arm = next(iter(results["arms"].values()))
    lines = [
        f"# Learning experiment, seed {results['seed']}",
        "",
        f"{results['n_items']} held-out items (4 options each); multimodal: {settings['stage1_steps']} stage-1 + "
        f"{settings['stage2_steps']} stage-2 steps"
        + (f" with swap-contrast weight {settings['contrast_weight']:g}" if settings.get("contrast_weight") else "")
        + f"; text-only: {settings['stage1_steps'] + settings['stage2_steps']} "
        f"stage-2 steps; wall time {results['wall_seconds']['total'] / 60:.1f} min.",
        "",
        "| arm | " + " | ".join(f"{t} (n={any_arm[t]['n']})" for t in types) + " |",
        "|---" * (len(types) + 1) + "|",
    ]
    for name, by_type in results["arms"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(by_type.get(t)) for t in types) + " |")
    lines.append("| chance | " + " | ".join(f"{100 * any_arm[t]['chance']:.1f}%" for t in types) + " |")
    if results.get("mcnemar"):
        lines.append("")
    for pair, test in results.get("mcnemar", {}).items():
        lines.append(
            f"Exact McNemar, {pair}: p = {test['p_value']:.3g} ({test['only_first']} items right only in the first, "
            f"{test['only_second']} only in the second)."
        )
    identity = results["identity"]
    lines += [
        "",
        f"Held-out proteins' highest identity to any training protein: median {100 * identity['median']:.1f}% "
        f"(min {100 * identity['min']:.1f}%, max {100 * identity['max']:.1f}%); bins {identity['bins']}.",
        "",
        "Accuracy at each step (all types):",
        "",
    ]
    for arm, records in results["curves"].items():
        points = ", ".join(f"{r['step']}: {100 * r['by_type'][ALL_TYPES]['accuracy']:.1f}%" for r in records)
        lines.append(f"- {arm}: {points}")
    return "\n".join(lines) + "\n"


def plot_curves(results: dict, path: Path) -> None:
    """Held-out accuracy against step, one panel per question type, chance dashed, final ablation as a cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = [ALL_TYPES, *results["question_types"]]
    figure, axes = plt.subplots(1, len(types), figsize=(3.2 * len(types), 3.2), sharey=True)
    for axis, kind in zip(axes, types):
        for arm, records in results["curves"].items():
            steps = [r["step"] for r in records]
            values = [100 * r["by_type"][kind]["accuracy"] for r in records]
            (line,) = axis.plot(steps, values, marker="o", label=arm)
            ablated = results["arms"].get(arm + ABLATED)
            if ablated and steps:
                axis.plot([steps[-1]], [100 * ablated[kind]["accuracy"]], marker="x", color=line.get_color(), markersize=9)
        for name, style in (("retrieval", ":"), ("probe", "-.")):
            untrained = results["arms"].get(name)
            if untrained:
                axis.axhline(100 * untrained[kind]["accuracy"], color="black", linestyle=style, linewidth=1, label=name)
        chance = next(iter(results["arms"].values()))[kind]["chance"]
        axis.axhline(100 * chance, color="grey", linestyle="--", linewidth=1, label="chance")
        axis.set_title(kind)
        axis.set_xlabel("optimizer step")
        axis.set_ylim(0, 100)
    axes[0].set_ylabel("held-out accuracy (%)")
    axes[0].legend(fontsize="x-small", title="x: protein-ablated", title_fontsize="x-small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def summarize_seeds(root: Path) -> dict | None:
    """Mean (and per-seed) accuracy over every `seed*/results.json` under `root`: summary.json, summary.md."""
    runs = [json.loads(p.read_text()) for p in sorted(Path(root).glob("seed*/results.json"))]
    if not runs:
        return None
    arms = sorted({arm for run in runs for arm in run["arms"]}, key=lambda a: (a.endswith(ABLATED), a))
    types = [ALL_TYPES, *runs[0]["question_types"]]
    summary = {"seeds": [run["seed"] for run in runs], "arms": {}}
    for arm in arms:
        summary["arms"][arm] = {}
        having = [run for run in runs if arm in run["arms"]]  # seeds run before an arm existed lack it
        for kind in types:
            values = [run["arms"][arm][kind]["accuracy"] for run in having]
            summary["arms"][arm][kind] = {
                "mean_accuracy": sum(values) / len(values),
                "per_seed": values,
                "ci95_per_seed": [run["arms"][arm][kind]["ci95"] for run in having],
                "n_per_seed": having[0]["arms"][arm][kind]["n"],
            }
    summary["chance"] = {kind: runs[0]["arms"][arms[0]][kind]["chance"] for kind in types}
    summary["wall_minutes_per_seed"] = [round(run["wall_seconds"]["total"] / 60, 1) for run in runs]
    lines = [
        f"# Learning experiment: mean over seeds {summary['seeds']}",
        "",
        "Each cell: mean held-out accuracy over the seeds (per-seed values in brackets).",
        "",
        "| arm | " + " | ".join(types) + " |",
        "|---" * (len(types) + 1) + "|",
    ]
    for arm, by_type in summary["arms"].items():
        cells = [
            f"{100 * v['mean_accuracy']:.1f}% (" + ", ".join(f"{100 * x:.1f}" for x in v["per_seed"]) + ")"
            for v in (by_type[k] for k in types)
        ]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines.append("| chance | " + " | ".join(f"{100 * summary['chance'][k]:.1f}%" for k in types) + " |")
    (Path(root) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (Path(root) / "summary.md").write_text("\n".join(lines) + "\n")
    return summary


__all__ = [
    "ARMS",
    "ExperimentConfig",
    "common_overrides",
    "eval_steps",
    "multimodal_encoder",
    "render_results",
    "run_arm",
    "run_experiment",
    "summarize_seeds",
]
