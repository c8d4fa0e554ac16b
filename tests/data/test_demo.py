import hashlib
import json
import re

from protein_llava.data.demo import FEATURES, RESIDUE_NAMES, net_charge, write_demo_dataset
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
    for conversation in read_conversations(str(paths["train"])):
        (residues,) = conversation.proteins
        answer = conversation.turns[-1].content
        if answer.startswith("The determined function"):
            feature = functions[re.search(r"include\(s\): (.*)\.$", answer).group(1)]
            planted = [f.name for f in FEATURES if re.search(f.pattern, residues)]
            assert planted == ([] if feature.name == "none" else [feature.name])
        else:
            residue = re.search(r"\(([A-Z])\)", answer).group(1)
            counts = {r: residues.count(r) for r in set(residues)}
            assert counts[residue] == max(counts.values()) and RESIDUE_NAMES[residue] in answer
            assert f"net charge of {net_charge(residues):+d}" in answer
            assert f"{len(residues)} residues long" in answer
