"""SCL2205 (PyPI `p-scldata`) as ProteinLMDataset-format SFT records: "where in the cell is this protein?".

SCL2205 holds 19,074 Swiss-Prot proteins (UniProtKB 2022_05) with experimentally supported subcellular
location in 13 classes, split homology-reduced into `trn` / `evl` / `tst`. Package MIT, data CC BY 4.0.
Policy: `trn` trains, `evl` develops and evaluates, `tst` stays untouched, so it is never written here.

The package's files (`scldata/data/` in site-packages) are read directly rather than through
`scldata.load`, which needs pandas and offers no way to read a small stand-in set in tests:
- `scl2205.csv`: columns `entry` (UniProtKB accession), `seq`, `scl` (an integer label index);
- `labels.json`: `{"index_to_label": {"0": "Cytoplasm", ...}, "label_to_index": {...}}`;
- `entries.json`: `{"0": "A0A061ACU2", ...}`, integer index → accession;
- `splits.json`: `{"trn": [index, ...], "evl": [...], "tst": [...], "cv": {...}}`.

    python -m protein_llava.data.scl2205 checkpoints/scl2205 [--limit-per-split 2000] [--max-residues 1022]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import json
import random
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ..model.configuration import ESM2_MAX_RESIDUES
from ..files import atomic_write
from ..sequences import ProteinSequenceError, SequenceReason, check_sequence
from .prompts import TEMPLATES, protein_input

DISTRIBUTION, PACKAGE = "p-scldata", "scldata"
WRITABLE_SPLITS = ("trn", "evl")
HELD_OUT_SPLIT = "tst"
# The package's labels (labels.json, in index order) → the location named in the answer text.
LOCATIONS = {
    "Cytoplasm": "cytoplasm",
    "Plastid": "plastid",
    "Secreted": "extracellular space",
    "Mitochondrion": "mitochondrion",
    "Membrane": "membrane",
    "Peroxisome": "peroxisome",
    "Nucleus": "nucleus",
    "Cell projection": "cell projection",
    "ER": "endoplasmic reticulum",
    "Cytoplasm;Nucleus": "cytoplasm and nucleus",
    "Centrosome;Cytoplasm;Cytoskeleton;Microtubule organizing center": (
        "centrosome, cytoplasm, cytoskeleton and microtubule organizing center"
    ),
    "Cytoplasm;Membrane": "cytoplasm and membrane",
    "Cytoplasm;Cytoskeleton": "cytoplasm and cytoskeleton",
}
OUTPUT = "The protein is located in the {location}."
SUBSET = "SCL2205_Location"
# Raw sequences, no markup: every other SequenceReason can occur.
SKIP_REASONS = tuple(str(reason) for reason in SequenceReason if reason is not SequenceReason.BAD_MARKUP)
MAX_EXAMPLES = 3


def scl2205_classes() -> tuple[str, ...]:
    """The 13 locations, as the answers name them, in the package's label-index order."""
    return tuple(LOCATIONS.values())


def location_of(label: str) -> str:
    """The answer's location for one of the package's labels; an unknown label raises, naming it."""
    if label not in LOCATIONS:
        raise ValueError(f"unknown SCL2205 label {label!r}; known labels: {list(LOCATIONS)} (add it to LOCATIONS)")
    return LOCATIONS[label]


def package_data_dir() -> Path:
    """`scldata/data` of the installed p-scldata, found without importing it (its import loads pandas)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{DISTRIBUTION} is not installed: pip install {DISTRIBUTION}==2025.6.0")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def protein_record(accession: str, residues: str, location: str) -> dict:
    """One SFT record in ProteinLMDataset's flat shape (`residues` already normalised)."""
    return {
        "instruction": TEMPLATES["location"],
        "input": protein_input(residues),
        "output": OUTPUT.format(location=location),
        "subset": SUBSET,
        "id": accession,
    }


@dataclass(frozen=True)
class Protein:
    index: int
    """Row index in the package (entries.json / splits.json)."""
    accession: str
    sequence: str
    """As stored, not yet validated."""
    location: str


def read_split(data_dir: str | Path, split: str) -> list[Protein]:
    """The proteins of one split, in the order splits.json lists them."""
    data_dir = Path(data_dir)
    labels = json.loads((data_dir / "labels.json").read_text())["index_to_label"]
    for label in labels.values():
        location_of(label)  # a label this module does not know fails here, before anything is written
    entries = json.loads((data_dir / "entries.json").read_text())
    split_indices = json.loads((data_dir / "splits.json").read_text())
    if split not in split_indices:
        raise ValueError(f"split {split!r} is not in {data_dir / 'splits.json'} (found {sorted(split_indices)})")
    rows: dict[str, dict] = {}
    with (data_dir / "scl2205.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"entry", "seq", "scl"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"scl2205.csv lacks columns {sorted(missing)} (found {reader.fieldnames})")
        for row in reader:
            if row["entry"] in rows:
                raise ValueError(f"scl2205.csv lists entry {row['entry']!r} twice")
            rows[row["entry"]] = row
    proteins = []
    for index in split_indices[split]:
        accession = entries[str(index)]
        if accession not in rows:
            raise ValueError(f"{split} lists index {index} ({accession}), which scl2205.csv lacks")
        row = rows[accession]
        if row["scl"] not in labels:
            known = sorted(labels, key=int)
            raise ValueError(f"unknown SCL2205 label index {row['scl']!r} for {accession}; labels.json knows {known}")
        proteins.append(Protein(index, accession, row["seq"], location_of(labels[row["scl"]])))
    return proteins


def stratified_subset(proteins: Sequence[Protein], limit: int, seed: int, split: str) -> list[Protein]:
    """`limit` proteins in all, drawn class by class, kept in the input's order; same arguments → same subset.

    Each class keeps one protein when `limit` allows one per class; the rest is shared in proportion to
    class size (largest remainder, ties to the earlier class). Within a class the draw is
    `random.Random(f"{seed}/{split}/{location}")`, so which proteins it keeps depends only on its quota.
    """
    if limit >= len(proteins):
        return list(proteins)
    by_class: dict[str, list[Protein]] = {}
    for protein in proteins:
        by_class.setdefault(protein.location, []).append(protein)
    classes = [c for c in scl2205_classes() if c in by_class]
    floor = 1 if limit >= len(classes) else 0
    share = {c: len(by_class[c]) - floor for c in classes}
    left, total = limit - floor * len(classes), sum(share.values())
    quotas = {c: floor + left * share[c] // total for c in classes}
    by_remainder = sorted(classes, key=lambda c: (-(left * share[c] % total), classes.index(c)))
    for c in by_remainder[: limit - sum(quotas.values())]:
        quotas[c] += 1
    kept = []
    for c in classes:
        kept += random.Random(f"{seed}/{split}/{c}").sample(by_class[c], quotas[c])
    position = {p.index: i for i, p in enumerate(proteins)}
    return sorted(kept, key=lambda p: position[p.index])


def _median(lengths: list[int]) -> float | None:
    return statistics.median(lengths) if lengths else None


def write_scl2205_records(
    folder: str | Path,
    splits: Sequence[str] = WRITABLE_SPLITS,
    max_residues: int = ESM2_MAX_RESIDUES,
    limit_per_split: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> dict:
    """Write `folder/{split}.jsonl` (one SFT record per protein) and `folder/report.json`; return the report.

    Proteins `check_sequence` rejects (bad residues, longer than `max_residues`) are skipped and counted
    by their `SequenceReason`. `limit_per_split` then keeps a class-stratified seeded subset of the rest
    (`stratified_subset`). Every file is written atomically; same inputs → byte-identical files.
    `data_dir`: a folder in the package's format (default: the installed package's `scldata/data`).
    """
    splits = tuple(splits)
    if HELD_OUT_SPLIT in splits:
        raise ValueError(
            f"{HELD_OUT_SPLIT!r} is SCL2205's held-out test split and is never written; use {WRITABLE_SPLITS}"
        )
    unknown = [s for s in splits if s not in WRITABLE_SPLITS]
    if not splits or unknown or len(set(splits)) != len(splits):
        raise ValueError(f"splits must be distinct names from {WRITABLE_SPLITS}, got {list(splits)}")
    if max_residues < 1:
        raise ValueError(f"max_residues must be >= 1, got {max_residues}")
    if limit_per_split is not None and limit_per_split < 1:
        raise ValueError(f"limit_per_split must be >= 1 or None, got {limit_per_split}")
    package_version = None
    if data_dir is None:
        data_dir = package_data_dir()
        try:
            package_version = version(DISTRIBUTION)
        except PackageNotFoundError:
            pass
    data_dir, folder = Path(data_dir), Path(folder)
    report = {
        "source": {
            "dataset": "SCL2205",
            "package": DISTRIBUTION,
            "version": package_version,
            "csv_sha256": hashlib.sha256((data_dir / "scl2205.csv").read_bytes()).hexdigest(),
        },
        "settings": {
            "max_residues": max_residues,
            "limit_per_split": limit_per_split,
            "seed": seed,
            "subset": "class-stratified seeded draw of the proteins left after skipping (stratified_subset)",
        },
        "held_out": f"{HELD_OUT_SPLIT} is never written",
        "splits": {},
    }
    written_sequences: dict[str, set[str]] = {}
    for split in splits:
        proteins = read_split(data_dir, split)
        skipped, examples, eligible, residues_of = Counter(dict.fromkeys(SKIP_REASONS, 0)), {}, [], {}
        for protein in proteins:
            try:
                residues = check_sequence(protein.sequence, max_residues, "error", protein.accession).residues
            except ProteinSequenceError as error:
                skipped[error.reason] += 1
                found = examples.setdefault(str(error.reason), [])
                if len(found) < MAX_EXAMPLES:
                    found.append(f"{protein.accession}: {error}")
                continue
            eligible.append(protein)
            residues_of[protein.index] = residues
        kept = eligible if limit_per_split is None else stratified_subset(eligible, limit_per_split, seed, split)
        lines = [json.dumps(protein_record(p.accession, residues_of[p.index], p.location)) + "\n" for p in kept]
        path = folder / f"{split}.jsonl"
        atomic_write(path, lambda tmp, text="".join(lines): Path(tmp).write_text(text, encoding="utf-8"))
        classes = Counter(p.location for p in kept)
        written_sequences[split] = {residues_of[p.index] for p in kept}
        report["splits"][split] = {
            "path": path.name,
            "read": len(proteins),
            "skipped": dict(skipped),
            "skipped_examples": dict(sorted(examples.items())),
            "left_out_by_limit": len(eligible) - len(kept),
            "written": len(kept),
            "classes": {c: classes[c] for c in scl2205_classes()},
            "median_length_read": _median([len("".join(p.sequence.split())) for p in proteins]),
            "median_length_written": _median([len(residues_of[p.index]) for p in kept]),
        }
    if "trn" in written_sequences and "evl" in written_sequences:
        # The benchmark flags these items `seen_in_training` rather than scoring them.
        report["splits"]["evl"]["sequence_also_in_trn"] = len(written_sequences["evl"] & written_sequences["trn"])
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(folder / "report.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m protein_llava.data.scl2205",
        description="Write SCL2205 trn/evl as SFT records (tst is never written).",
    )
    parser.add_argument("out_dir", help="folder for trn.jsonl, evl.jsonl and report.json")
    parser.add_argument("--limit-per-split", type=int, default=None, help="keep a class-stratified seeded subset of N")
    parser.add_argument("--max-residues", type=int, default=ESM2_MAX_RESIDUES, help="skip longer proteins (counted)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit-per-split draw")
    parser.add_argument("--splits", nargs="+", default=list(WRITABLE_SPLITS), choices=WRITABLE_SPLITS)
    parser.add_argument("--data-dir", default=None, help="a folder in the package's format (default: p-scldata's)")
    args = parser.parse_args(argv)
    report = write_scl2205_records(
        args.out_dir, args.splits, args.max_residues, args.limit_per_split, args.seed, args.data_dir
    )
    for split, counts in report["splits"].items():
        print(
            f"{split}: {counts['read']} read, {counts['written']} written, skipped {counts['skipped']}, "
            f"{counts['left_out_by_limit']} left out by the limit, median length {counts['median_length_written']}"
        )
    print(f"wrote {Path(args.out_dir) / 'report.json'}")
    return report


if __name__ == "__main__":
    main()
