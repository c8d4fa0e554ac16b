"""The run report: per-arm accuracy with a bootstrap interval, the paired McNemar test, option-position
bias, and the files: report.json, report.md, report.png, predictions.jsonl, flagged.jsonl."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .benchmarks import Benchmark, BenchmarkItem, FlaggedItem
from .config import BASELINE_ARM, MODEL_ARM
from .statistics import accuracy, bootstrap_ci, mcnemar_exact

if TYPE_CHECKING:
    from .config import EvalConfig


@dataclass
class ArmResult:
    """An arm's predictions (one dict per item it could read, keyed by item id) and the items it could not."""

    name: str
    source: str
    multimodal: bool
    predictions: dict[str, dict] = field(default_factory=dict)
    unreadable: list[FlaggedItem] = field(default_factory=list)


def _distribution(values) -> dict[str, int]:
    counts = Counter("unparseable" if v is None else str(v) for v in values)
    return dict(sorted(counts.items(), key=lambda kv: (kv[0] == "unparseable", int(kv[0]) if kv[0].isdigit() else 0)))


def summarize_arm(predictions: list[dict], n_flagged: int, bootstrap_samples: int = 1000, seed: int = 0) -> dict:
    """An arm's numbers over its scored items (`predictions`, in item order)."""
    correct = [p["correct"] for p in predictions]
    interval = bootstrap_ci(correct, bootstrap_samples, seed)
    summary = {
        "accuracy": accuracy(correct),
        "ci95": list(interval) if interval else None,
        "n_scored": len(predictions),
        "n_flagged": n_flagged,
        "n_unparseable": sum(p["unparseable"] for p in predictions),
        "n_correct": sum(correct),
        "predicted_distribution": _distribution(p["predicted"] for p in predictions),
    }
    if predictions and "correct_permuted" in predictions[0]:
        permuted = [p["correct_permuted"] for p in predictions]
        interval = bootstrap_ci(permuted, bootstrap_samples, seed)
        summary.update(
            accuracy_permuted=accuracy(permuted),
            ci95_permuted=list(interval) if interval else None,
            predicted_distribution_permuted=_distribution(p["predicted_permuted"] for p in predictions),
        )
    return summary


ALL_TYPES = "all"


def _accuracy_entry(items: list[BenchmarkItem], predictions: list[dict], bootstrap_samples: int, seed: int) -> dict:
    correct = [p["correct"] for p in predictions]
    interval = bootstrap_ci(correct, bootstrap_samples, seed)
    return {
        "accuracy": accuracy(correct),
        "ci95": list(interval) if interval else None,
        "n": len(items),
        "chance": sum(1 / item.num_options for item in items) / len(items) if items else None,
    }


def summarize_by_category(
    items: list[BenchmarkItem], predictions: list[dict], bootstrap_samples: int = 1000, seed: int = 0
) -> dict[str, dict]:
    """Per question type (`item.category`): accuracy, its 95% interval, n and chance; {} if items have none."""
    groups: dict[str, list[tuple[BenchmarkItem, dict]]] = {}
    for item, prediction in zip(items, predictions, strict=True):
        if item.category:
            groups.setdefault(item.category, []).append((item, prediction))
    return {
        category: _accuracy_entry([i for i, _ in pairs], [p for _, p in pairs], bootstrap_samples, seed)
        for category, pairs in groups.items()
    }


def accuracy_by_type(
    items: list[BenchmarkItem], predictions: dict[str, dict], bootstrap_samples: int = 1000, seed: int = 0
) -> dict[str, dict]:
    """{"all" | question type: {"accuracy", "ci95", "n", "chance"}}; `predictions` keyed by item id."""
    ordered = [predictions[item.item_id] for item in items]
    return {
        ALL_TYPES: _accuracy_entry(list(items), ordered, bootstrap_samples, seed),
        **summarize_by_category(list(items), ordered, bootstrap_samples, seed),
    }


def build_report(benchmark: Benchmark, results: list[ArmResult], config: EvalConfig) -> tuple[dict, list[dict], list[dict]]:
    """(report, per-item predictions, flagged entries). Only items every arm could read are scored, so
    the arms' outcomes pair up item by item. The exact McNemar test pairs the model with the baseline."""
    flagged = list(benchmark.flagged)
    unreadable_ids = set()
    for result in results:
        for entry in result.unreadable:
            if entry.item_id not in unreadable_ids:
                unreadable_ids.add(entry.item_id)
                flagged.append(entry)
    items = [item for item in benchmark.items if item.item_id not in unreadable_ids]
    n_flagged = len(flagged)
    arms, predictions = {}, []
    for result in results:
        arm_predictions = [result.predictions[item.item_id] for item in items]
        arms[result.name] = {
            "source": result.source,
            "multimodal": result.multimodal,
            **summarize_arm(arm_predictions, n_flagged, config.bootstrap_samples, config.seed),
            "by_category": summarize_by_category(items, arm_predictions, config.bootstrap_samples, config.seed),
        }
        predictions += [{"arm": result.name, "category": item.category, **p} for item, p in zip(items, arm_predictions)]
    report = {
        "benchmark": {
            "name": benchmark.name,
            "source": benchmark.source,
            "n_entries": len(benchmark.items) + len(benchmark.flagged),
            "n_scored": len(items),
            "n_flagged": n_flagged,
            "flagged_reasons": dict(sorted(Counter(f.reason for f in flagged).items())),
            "chance": sum(1 / item.num_options for item in items) / len(items) if items else None,
            "answer_distribution": _distribution(item.answer for item in items),
        },
        "settings": asdict(config),
        "arms": arms,
    }
    by_name = {result.name: result for result in results}
    if MODEL_ARM in by_name and BASELINE_ARM in by_name:
        first, second = by_name[MODEL_ARM], by_name[BASELINE_ARM]
        paired = {
            key: [
                [result.predictions[item.item_id][key] for item in items] for result in (first, second)
            ]
            for key in ("correct", "correct_permuted")
            if items and key in first.predictions[items[0].item_id]
        }
        test = mcnemar_exact(*paired["correct"]) if items else mcnemar_exact([], [])
        report["mcnemar"] = {
            "arms": [first.name, second.name],
            f"only_{first.name}_correct": test.only_first,
            f"only_{second.name}_correct": test.only_second,
            "p_value": test.p_value,
        }
        report["mcnemar_p"] = test.p_value
        for result in (first, second):
            arms[result.name]["mcnemar_p"] = test.p_value
        if "correct_permuted" in paired:
            report["mcnemar"]["p_value_permuted"] = mcnemar_exact(*paired["correct_permuted"]).p_value
    return report, predictions, [asdict(f) for f in flagged]


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _interval(ci: list[float] | None) -> str:
    return "n/a" if ci is None else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def render_markdown(report: dict) -> str:
    """report.md: the arms' table, the paired test, the option distributions and the flag counts."""
    bench, arms, settings = report["benchmark"], report["arms"], report["settings"]
    permuted = any("accuracy_permuted" in a for a in arms.values())
    lines = [
        f"# {bench['name']}: {bench['n_scored']} items scored, {bench['n_flagged']} flagged",
        "",
        f"Source `{bench['source']}`; mode `{settings['mode']}`, prompt `{settings['prompt_format']}`; "
        f"chance level {_percent(bench['chance'])} (mean of 1/number of options).",
        "",
        "| arm | source | accuracy | 95% CI | scored | flagged | unparseable |" + (" permuted accuracy | permuted 95% CI |" if permuted else ""),
        "|---|---|---|---|---|---|---|" + ("---|---|" if permuted else ""),
    ]
    for name, arm in arms.items():
        row = (
            f"| {name} | `{arm['source']}` | {_percent(arm['accuracy'])} | {_interval(arm['ci95'])} | "
            f"{arm['n_scored']} | {arm['n_flagged']} | {arm['n_unparseable']} |"
        )
        if permuted:
            row += f" {_percent(arm.get('accuracy_permuted'))} | {_interval(arm.get('ci95_permuted'))} |"
        lines.append(row)
    if "mcnemar" in report:
        test = report["mcnemar"]
        first, second = test["arms"]
        lines += [
            "",
            f"Exact McNemar test, {first} vs {second}: p = {test['p_value']:.4g} "
            f"({test[f'only_{first}_correct']} items only {first} got right, "
            f"{test[f'only_{second}_correct']} only {second}).",
        ]
    categories = sorted({category for arm in arms.values() for category in arm.get("by_category", {})})
    if categories:
        lines += [
            "",
            "## By question type (accuracy, 95% CI)",
            "",
            "| arm | " + " | ".join(categories) + " |",
            "|---" * (len(categories) + 1) + "|",
        ]
        for name, arm in arms.items():
            cells = []
            for category in categories:
                entry = arm["by_category"].get(category)
                cells.append("n/a" if entry is None else f"{_percent(entry['accuracy'])} {_interval(entry['ci95'])}, n={entry['n']}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        chance = {c: next(a["by_category"][c]["chance"] for a in arms.values() if c in a["by_category"]) for c in categories}
        lines.append("| chance | " + " | ".join(_percent(chance[c]) for c in categories) + " |")
    columns = [(name, arm["predicted_distribution"]) for name, arm in arms.items()]
    if permuted:
        columns += [(f"{name} (permuted)", arm["predicted_distribution_permuted"]) for name, arm in arms.items()]
    options = sorted(
        {key for _, counts in columns for key in counts} | set(bench["answer_distribution"]),
        key=lambda k: (k == "unparseable", int(k) if k.isdigit() else 0),
    )
    lines += [
        "",
        "## Predicted option numbers",
        "",
        "| option | gold | " + " | ".join(name for name, _ in columns) + " |",
        "|---" * (len(columns) + 2) + "|",
    ]
    for option in options:
        counts = [str(counts.get(option, 0)) for _, counts in columns]
        lines.append(f"| {option} | {bench['answer_distribution'].get(option, 0)} | " + " | ".join(counts) + " |")
    if bench["flagged_reasons"]:
        lines += ["", "## Flagged (left out of the score)", "", "| reason | items |", "|---|---|"]
        lines += [f"| {reason} | {count} |" for reason, count in bench["flagged_reasons"].items()]
    return "\n".join(lines) + "\n"


def plot_report(report: dict, path: str | Path) -> None:
    """A bar chart of each arm's accuracy with its 95% interval, permuted accuracy beside it, chance dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = report["arms"]
    series = [("accuracy", "ci95", "raw")]
    if any("accuracy_permuted" in a for a in arms.values()):
        series.append(("accuracy_permuted", "ci95_permuted", "permutation-averaged"))
    width = 0.8 / len(series)
    figure, axes = plt.subplots(figsize=(2 + 1.6 * len(arms), 3.5))
    for offset, (key, ci_key, label) in enumerate(series):
        xs, heights, errors = [], [], [[], []]
        for x, arm in enumerate(arms.values()):
            value, ci = arm.get(key), arm.get(ci_key)
            xs.append(x + (offset - (len(series) - 1) / 2) * width)
            heights.append(100 * (value or 0.0))
            errors[0].append(100 * max(0.0, (value or 0.0) - ci[0]) if ci else 0.0)
            errors[1].append(100 * max(0.0, ci[1] - (value or 0.0)) if ci else 0.0)
        axes.bar(xs, heights, width=width, yerr=errors, capsize=4, label=label)
    if report["benchmark"]["chance"] is not None:
        axes.axhline(100 * report["benchmark"]["chance"], color="grey", linestyle="--", linewidth=1, label="chance")
    axes.set_xticks(range(len(arms)), list(arms))
    axes.set_ylabel("accuracy (%), 95% bootstrap CI")
    axes.set_ylim(0, 100)
    axes.set_title(f"{report['benchmark']['name']} ({report['benchmark']['n_scored']} items)")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


@dataclass
class ArmScore:
    """One arm's headline numbers in report.json."""

    source: str | None
    accuracy: float | None
    ci95: list[float] | None
    n_scored: int


@dataclass
class ReportSummary:
    """What report.json says at a glance (the model card's results table reads it): written by
    `build_report` / `write_report` above, read by `read`, so the two sides of the file live here."""

    benchmark: str
    source: str | None
    n_entries: int | None
    n_scored: int | None
    chance: float | None
    mode: str | None
    prompt_format: str | None
    arms: dict[str, ArmScore]
    mcnemar_p: float | None = None

    @classmethod
    def read(cls, path: str | Path) -> ReportSummary:
        report = json.loads(Path(path).read_text())
        bench, settings = report.get("benchmark") or {}, report.get("settings") or {}
        arms = {
            name: ArmScore(arm.get("source"), arm.get("accuracy"), arm.get("ci95"), arm.get("n_scored", 0))
            for name, arm in (report.get("arms") or {}).items()
        }
        return cls(
            benchmark=bench.get("name", "evaluation"),
            source=bench.get("source"),
            n_entries=bench.get("n_entries"),
            n_scored=bench.get("n_scored"),
            chance=bench.get("chance"),
            mode=settings.get("mode"),
            prompt_format=settings.get("prompt_format"),
            arms=arms,
            mcnemar_p=report.get("mcnemar_p"),
        )


def write_report(report: dict, predictions: list[dict], flagged: list[dict], out: str | Path) -> dict[str, Path]:
    """Write report.json, report.md, report.png, predictions.jsonl and flagged.jsonl under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("report.json", "report.md", "report.png", "predictions.jsonl", "flagged.jsonl")}
    paths["report.json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["report.md"].write_text(render_markdown(report))
    plot_report(report, paths["report.png"])
    for name, rows in (("predictions.jsonl", predictions), ("flagged.jsonl", flagged)):
        with paths[name].open("w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    return paths


def report_card_rows(report_path: Path, model_export: Path) -> dict[str, str]:
    """A model card's results table from an eval run's report.json (`protein-llava export --eval-report`):
    each arm's accuracy and 95% CI, the chance level, the protocol and the paired test."""
    if not Path(report_path).is_file():
        raise FileNotFoundError(f"--eval-report {report_path}: no such file")
    report = ReportSummary.read(report_path)
    name = report.benchmark
    rows = {}
    for arm, score in report.arms.items():
        is_this = score.source is not None and Path(score.source).resolve() == model_export.resolve()
        text = f"accuracy {_percent(score.accuracy)}"
        if score.ci95:
            text += f" (95% CI {_percent(score.ci95[0])} to {_percent(score.ci95[1])})"
        text += f", {score.n_scored} items scored"
        rows[f"{name}: {arm}" + (" (this model)" if is_this else "")] = text
    if report.chance is not None:
        rows[f"{name}: chance level"] = _percent(report.chance)
    if report.mode is not None:
        rows[f"{name}: protocol"] = (
            f"mode {report.mode}, prompt format {report.prompt_format}; "
            f"{report.n_scored} of {report.n_entries} items scored, from `{report.source}`"
        )
    if report.mcnemar_p is not None:
        rows[f"{name}: exact McNemar p (arms paired)"] = f"{report.mcnemar_p:.3g}"
    return rows



__all__ = [
    "ALL_TYPES",
    "ArmResult",
    "ArmScore",
    "ReportSummary",
    "accuracy_by_type",
    "build_report",
    "plot_report",
    "render_markdown",
    "report_card_rows",
    "summarize_arm",
    "summarize_by_category",
    "write_report",
]
