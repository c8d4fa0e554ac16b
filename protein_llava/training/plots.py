"""The PNGs written at the end of each stage, from the CSV logger's metrics: the loss curve and the
interface diagnostics (`training/diagnostics.py`)."""

from __future__ import annotations

import csv
from pathlib import Path


def plot_loss_curve(metrics_csv: Path, png: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _read_series(metrics_csv, ("train/loss", "val/loss"))
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, (steps, values) in series.items():
        if steps:
            axis.plot(steps, values, label=name, marker="." if len(steps) < 50 else None)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("cross-entropy (nats / supervised token)")
    axis.set_title(title)
    if axis.get_legend_handles_labels()[0]:
        axis.legend()
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    plt.close(figure)
    return png


def _read_series(metrics_csv: Path, names) -> dict[str, tuple[list[int], list[float]]]:
    series = {name: ([], []) for name in names}
    with Path(metrics_csv).open() as handle:
        for row in csv.DictReader(handle):
            for name, (steps, values) in series.items():
                if row.get(name):
                    steps.append(int(row["step"]))
                    values.append(float(row[name]))
    return series


def plot_diagnostics(metrics_csv: Path, png: Path, title: str = "") -> Path | None:
    """Three panels: answer NLL with true vs swapped proteins, protein- vs text-token RMS, the projector's
    share of the gradient norm. None (nothing written) if the log holds no diagnostics."""
    panels = (
        ("answer NLL, held-out (nats/token)", ("diag/nll_true", "diag/nll_swapped")),
        ("token RMS (per element)", ("diag/protein_token_rms", "diag/text_token_rms")),
        ("projector share of grad norm", ("diag/grad_share_projector",)),
    )
    series = _read_series(metrics_csv, [name for _, names in panels for name in names])
    if not any(steps for steps, _ in series.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(13, 3.6))
    for axis, (label, names) in zip(axes, panels):
        for name in names:
            steps, values = series[name]
            if steps:
                axis.plot(steps, values, marker=".", label=name.removeprefix("diag/"))
        axis.set_xlabel("optimizer step")
        axis.set_title(label, fontsize="medium")
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(png, dpi=110)
    plt.close(figure)
    return png
