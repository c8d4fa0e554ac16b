"""The loss curve PNG written at the end of each stage, from the CSV logger's metrics."""

from __future__ import annotations

import csv
from pathlib import Path


def plot_loss_curve(metrics_csv: Path, png: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list[int], list[float]]] = {"train/loss": ([], []), "val/loss": ([], [])}
    with Path(metrics_csv).open() as handle:
        for row in csv.DictReader(handle):
            for name, (steps, values) in series.items():
                if row.get(name):
                    steps.append(int(row["step"]))
                    values.append(float(row[name]))
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, (steps, values) in series.items():
        if steps:
            axis.plot(steps, values, label=name, marker="." if len(steps) < 50 else None)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("cross-entropy (nats / supervised token)")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    plt.close(figure)
    return png
