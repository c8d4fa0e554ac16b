"""The embedded demo set: ProteinLMDataset-format SFT records whose answers can only be read off the sequence.

Every protein is random background with one planted feature (a functional motif, a transmembrane helix, or
none) and a planted composition bias. Each protein gets four records, one per question type: its function
(the planted feature), its most enriched residue, its net-charge class and its length class, four classes
each. Deterministic for a seed; train and held-out proteins are disjoint.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..sequences import format_sequence
from .prompts import TEMPLATES, protein_input

# Background frequencies roughly as in UniProt, without C and H so planted zinc fingers stay unambiguous.
BACKGROUND = "LLLLAAAAGGGGVVVVEEEESSSSIIIKKKRRRDDDTTTPPPNNQQFFYMW"
HYDROPHOBIC = "LIVFAMW"
RESIDUE_NAMES = {
    "K": "lysine", "E": "glutamate", "P": "proline", "G": "glycine", "S": "serine", "L": "leucine", "D": "aspartate",
}


@dataclass(frozen=True)
class Feature:
    """A planted feature: a residue pattern (planted by `make`), its regex, and what it says about function."""

    name: str
    function: str
    pattern: str


FEATURES = (
    Feature("p_loop", "binding of ATP or GTP through a P-loop (Walker A) motif", r"G....GK[ST]"),
    Feature("zinc_finger", "binding of zinc through a C2H2 zinc-finger motif", r"C..C.{12}H...H"),
    Feature("kdel", "retention in the endoplasmic reticulum by a C-terminal KDEL signal", r"KDEL$"),
    Feature("nls", "import into the nucleus through a nuclear localisation signal", r"PKKKRKV"),
    Feature("gdsl", "hydrolysis of ester bonds as a GDSL-motif lipase/esterase", r"GDSL"),
    Feature("transmembrane", "anchoring in a membrane through a single transmembrane helix", r"[LIVFAMW]{20}"),
    Feature("none", "no recognisable functional motif", r"(?!)"),
)
FUNCTION_OUTPUT = "The determined function(s) of the protein include(s): {function}."
RESIDUE_INSTRUCTION = "Which amino acid is this protein most enriched in?"
RESIDUE_OUTPUT = "It is rich in {residue_name} ({residue})."
CHARGE_INSTRUCTION = "What is the net charge of this protein at neutral pH?"
CHARGE_OUTPUT = "Its net charge at neutral pH is {charge_bin}."
LENGTH_INSTRUCTION = "How long is this protein?"
LENGTH_OUTPUT = "It is {length_bin} residues long."
MIN_LENGTH, MAX_LENGTH = 40, 119
# Four classes per question type, so every item can have four options (chance 25 %).
CHARGE_BINS = ((-999, -6, "strongly negative (below -5)"), (-5, 0, "slightly negative or zero (-5 to 0)"),
               (1, 5, "slightly positive (+1 to +5)"), (6, 999, "strongly positive (above +5)"))
LENGTH_BINS = ((40, 59, "between 40 and 59"), (60, 79, "between 60 and 79"), (80, 99, "between 80 and 99"),
               (100, 119, "between 100 and 119"))
# ProteinLMDataset records carry their subset; the demo's subsets are its question types.
QUESTION_TYPES = ("function", "enriched_residue", "net_charge", "length")
DEMO_FORMAT = 2  # bump when the generator's output changes, so stale demo files are rewritten
MANIFEST = "manifest.json"


def _plant(rng: random.Random, feature: Feature, length: int) -> str:
    background = [rng.choice(BACKGROUND) for _ in range(length)]
    if feature.name == "p_loop":
        motif = "G" + "".join(rng.choice("AEKRS") for _ in range(4)) + "GK" + rng.choice("ST")
    elif feature.name == "zinc_finger":
        motif = "C" + "".join(rng.choices(BACKGROUND, k=2)) + "C" + "".join(rng.choices(BACKGROUND, k=12)) + "H"
        motif += "".join(rng.choices(BACKGROUND, k=3)) + "H"
    elif feature.name == "kdel":
        return "".join(background[:-4]) + "KDEL"
    elif feature.name == "nls":
        motif = "PKKKRKV"
    elif feature.name == "gdsl":
        motif = "GDSL"
    elif feature.name == "transmembrane":
        motif = "".join(rng.choice(HYDROPHOBIC) for _ in range(22))
    else:
        return "".join(background)
    start = rng.randrange(0, length - len(motif))
    background[start : start + len(motif)] = motif
    return "".join(background)


def _enrich(rng: random.Random, residues: str, residue: str, fraction: float) -> str:
    chars = list(residues)
    # Substitute only outside the planted feature's span: find it again and protect it.
    protected = set()
    for feature in FEATURES:
        for match in re.finditer(feature.pattern, residues):
            protected.update(range(match.start(), match.end()))
    candidates = [i for i in range(len(chars)) if i not in protected]
    for i in rng.sample(candidates, k=int(fraction * len(chars))):
        chars[i] = residue
    return "".join(chars)


def _features_present(residues: str) -> list[str]:
    return [f.name for f in FEATURES if re.search(f.pattern, residues)]


def net_charge(residues: str) -> int:
    """K + R − D − E: the sign decides basic / acidic at neutral pH (H counted as neutral)."""
    return sum(residues.count(r) for r in "KR") - sum(residues.count(r) for r in "DE")


def make_protein(rng: random.Random) -> dict:
    """One protein with exactly one planted feature (or none) and a clear most-enriched residue."""
    while True:
        feature = rng.choice(FEATURES)
        length = rng.randrange(MIN_LENGTH, MAX_LENGTH + 1)
        residue = rng.choice(sorted(RESIDUE_NAMES))
        residues = _enrich(rng, _plant(rng, feature, length), residue, fraction=0.2)
        present = _features_present(residues)
        counts = sorted(((residues.count(r), r) for r in set(residues)), reverse=True)
        clear_winner = counts[0][1] == residue and counts[0][0] > counts[1][0]
        if present == ([] if feature.name == "none" else [feature.name]) and clear_winner:
            return {"residues": residues, "feature": feature, "residue": residue}


def _bin(value: int, bins) -> str:
    for low, high, name in bins:
        if low <= value <= high:
            return name
    raise ValueError(f"{value} lies outside every bin {[(low, high) for low, high, _ in bins]}")


def charge_bin(residues: str) -> str:
    """The net-charge class of `residues` (see `CHARGE_BINS`)."""
    return _bin(net_charge(residues), CHARGE_BINS)


def length_bin(residues: str) -> str:
    """The length class of `residues` (see `LENGTH_BINS`)."""
    return _bin(len(residues), LENGTH_BINS)


def protein_records(protein: dict) -> list[dict]:
    """The SFT records of one protein, one per question type (`QUESTION_TYPES`, in that order).

    The function record is ProteinLMDataset's UniProt_Function template; the others ask one property each,
    so each answer is one fact read off the sequence and the benchmark can score each kind separately.
    """
    residues, feature = protein["residues"], protein["feature"]
    seq = format_sequence(residues)
    answers = (
        (TEMPLATES["function"], protein_input(residues), FUNCTION_OUTPUT.format(function=feature.function)),
        (RESIDUE_INSTRUCTION, seq, RESIDUE_OUTPUT.format(residue_name=RESIDUE_NAMES[protein["residue"]], residue=protein["residue"])),
        (CHARGE_INSTRUCTION, seq, CHARGE_OUTPUT.format(charge_bin=charge_bin(residues))),
        (LENGTH_INSTRUCTION, seq, LENGTH_OUTPUT.format(length_bin=length_bin(residues))),
    )
    return [
        {"instruction": instruction, "input": input_text, "output": output, "subset": subset}
        for subset, (instruction, input_text, output) in zip(QUESTION_TYPES, answers)
    ]


def write_demo_dataset(folder: str | Path, num_train: int = 800, num_heldout: int = 40, seed: int = 0) -> dict[str, Path]:
    """Write `train.jsonl` and `heldout.jsonl` (one record per question type and protein) under `folder`.

    Returns their paths.

    Held-out proteins never occur in train. Same seed → byte-identical files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seen: set[str] = set()
    splits = {"train": num_train, "heldout": num_heldout}
    paths = {}
    for split, count in splits.items():
        proteins = []
        while len(proteins) < count:
            protein = make_protein(rng)
            if protein["residues"] not in seen:
                seen.add(protein["residues"])
                proteins.append(protein)
        path = folder / f"{split}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with tmp.open("w") as handle:
            for protein in proteins:
                for record in protein_records(protein):
                    handle.write(json.dumps(record) + "\n")
        tmp.replace(path)
        paths[split] = path
    manifest = {"format": DEMO_FORMAT, "seed": seed, "num_train": num_train, "num_heldout": num_heldout}
    (folder / MANIFEST).write_text(json.dumps(manifest) + "\n")
    return paths


def ensure_demo_dataset(folder: str | Path, seed: int = 0, num_train: int = 800, num_heldout: int = 40) -> dict[str, Path]:
    """The demo files under `folder`, written once (the generator is deterministic, so reuse is safe).

    Files written by another generator version or with other settings (`manifest.json` says) are rewritten.
    """
    folder = Path(folder)
    paths = {split: folder / f"{split}.jsonl" for split in ("train", "heldout")}
    wanted = {"format": DEMO_FORMAT, "seed": seed, "num_train": num_train, "num_heldout": num_heldout}
    manifest = folder / MANIFEST
    current = json.loads(manifest.read_text()) if manifest.is_file() else None
    if current != wanted or not all(p.is_file() for p in paths.values()):
        return write_demo_dataset(folder, num_train=num_train, num_heldout=num_heldout, seed=seed)
    return paths
