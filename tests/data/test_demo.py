import hashlib
import json
import re

from protein_llava.data.demo import (
    CHARGE_BINS,
    FEATURES,
    QUESTION_TYPES,
    RESIDUE_NAMES,
    ensure_demo_dataset,
    net_charge,
    write_demo_dataset,
)
from protein_llava.data.records import read_conversations


def _digest(paths):
    return {split: hashlib.sha256(path.read_bytes()).hexdigest() for split, path in paths.items()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = write_demo_dataset(tmp_path / "a", num_train=40, num_heldout=10, seed=3)
    b = write_demo_dataset(tmp_path / "b", num_train=40, num_heldout=10, seed=3)
    c = write_demo_dataset(tmp_path / "c", num_train=40, num_heldout=10, seed=4)
    assert _digest(a) == _digest(b) != _digest(c)


def test_splits_are_disjoint_and_in_the_sft_format(tmp_path):
    paths = write_demo_dataset(tmp_path, num_train=60, num_heldout=20, seed=0)
    train = {p for c in read_conversations(str(paths["train"])) for p in c.proteins}
    heldout = {p for c in read_conversations(str(paths["heldout"])) for p in c.proteins}
    assert len(train) == 60 and len(heldout) == 20 and not train & heldout
    record = json.loads(paths["train"].read_text().splitlines()[0])
    assert set(record) == {"instruction", "input", "output", "subset"}
    assert "<seq> " in record["input"] and record["input"].endswith(" </seq>")


def test_every_answer_can_be_read_off_the_sequence(tmp_path):
    paths = write_demo_dataset(tmp_path, num_train=80, num_heldout=0, seed=1)
    functions = {f.function: f for f in FEATURES}
    records = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    conversations = list(read_conversations(str(paths["train"])))
    assert [r["subset"] for r in records[:4]] == list(QUESTION_TYPES)
    for record, conversation in zip(records, conversations, strict=True):
        (residues,) = conversation.proteins
        answer = conversation.turns[-1].content
        if record["subset"] == "function":
            feature = functions[re.search(r"include\(s\): (.*)\.$", answer).group(1)]
            planted = [f.name for f in FEATURES if re.search(f.pattern, residues)]
            assert planted == ([] if feature.name == "none" else [feature.name])
        elif record["subset"] == "enriched_residue":
            residue = re.search(r"\(([A-Z])\)", answer).group(1)
            counts = {r: residues.count(r) for r in set(residues)}
            assert counts[residue] == max(counts.values()) and RESIDUE_NAMES[residue] in answer
        elif record["subset"] == "net_charge":
            low, high = {name: (lo, hi) for lo, hi, name in CHARGE_BINS}[re.search(r"is (.*)\.$", answer).group(1)]
            assert low <= net_charge(residues) <= high
        else:
            assert record["subset"] == "length"
            low, high = map(int, re.search(r"between (\d+) and (\d+)", answer).groups())
            assert low <= len(residues) <= high


def test_every_question_type_has_four_classes_so_items_get_four_options(tmp_path):
    paths = write_demo_dataset(tmp_path, num_train=200, num_heldout=0, seed=2)
    records = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    for subset in QUESTION_TYPES:
        assert len({r["output"] for r in records if r["subset"] == subset}) >= 4, subset


def test_stale_demo_files_are_rewritten(tmp_path):
    paths = ensure_demo_dataset(tmp_path, seed=0, num_train=20, num_heldout=5)
    first = paths["train"].read_bytes()
    paths["train"].write_text('{"instruction": "old format", "output": "x"}\n')
    (tmp_path / "manifest.json").write_text('{"format": 1}')
    again = ensure_demo_dataset(tmp_path, seed=0, num_train=20, num_heldout=5)
    assert again["train"].read_bytes() == first
    # Same manifest: kept as is (no rewrite on every run).
    again["train"].write_text("kept")
    assert ensure_demo_dataset(tmp_path, seed=0, num_train=20, num_heldout=5)["train"].read_text() == "kept"
