"""A training run's summary files, written and read here only: `summary.json` and `data_report.json`.

`run.train` writes them; `protein-llava export` reads them for the model card, and the console prints the
closing table from the same object. Summaries written before this module (no `wall_seconds`, no `steps`
in hand-made ones) still read: every field but `stage` and `run` is optional.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SUMMARY_FILE = "summary.json"
DATA_REPORT_FILE = "data_report.json"


@dataclass
class DataCounts:
    """What became of the records of one file: read, kept, skipped by reason (with a few examples)."""

    seen: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)
    """Kept records that were changed (e.g. truncated), by kind."""
    examples: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict) -> DataCounts:
        return cls(**{key: values[key] for key in ("seen", "kept", "skipped", "notes", "examples") if key in values})

    def skipped_text(self) -> str:
        """ "bad_json 10, missing_field 3" (or "none")."""
        return ", ".join(f"{reason} {count}" for reason, count in sorted(self.skipped.items())) or "none"


@dataclass
class DataReport:
    """data_report.json: the training file's counts, and the validation file's when there is one."""

    train: DataCounts
    val: DataCounts | None = None

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / DATA_REPORT_FILE
        payload = {"train": asdict(self.train), "val": asdict(self.val) if self.val is not None else None}
        path.write_text(json.dumps(payload, indent=2))
        return path

    @classmethod
    def read(cls, folder: str | Path) -> DataReport | None:
        path = Path(folder) / DATA_REPORT_FILE
        if not path.is_file():
            return None
        payload = json.loads(path.read_text())
        val = payload.get("val")
        return cls(DataCounts.from_dict(payload["train"]), DataCounts.from_dict(val) if val else None)


@dataclass
class RunSummary:
    """summary.json: what one stage did.

    Fields:
        stage: 1 or 2. run: the run's name. out: its folder. steps: optimizer steps done.
        nonfinite_skipped_steps: steps skipped for a non-finite loss or gradient. data: the training records'
        counts. final_train_loss: the last logged training loss. export: the exported model folder.
        wall_seconds: the stage's wall time, model loading included.
    """

    stage: int
    run: str
    out: str | None = None
    steps: int | None = None
    nonfinite_skipped_steps: int = 0
    data: DataCounts | None = None
    final_train_loss: float | None = None
    export: str | None = None
    wall_seconds: float | None = None

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / SUMMARY_FILE
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def from_dict(cls, values: dict) -> RunSummary:
        known = {key: values[key] for key in cls.__dataclass_fields__ if key in values}
        if known.get("data") is not None:
            known["data"] = DataCounts.from_dict(known["data"])
        return cls(**known)

    @classmethod
    def read(cls, folder: str | Path) -> RunSummary | None:
        """The summary in `folder`, or None when it has none."""
        path = Path(folder) / SUMMARY_FILE
        return cls.from_dict(json.loads(path.read_text())) if path.is_file() else None
