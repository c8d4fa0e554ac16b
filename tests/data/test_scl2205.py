import csv
import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from protein_llava.data import scl2205
from protein_llava.data.records import parse_record
from protein_llava.data.scl2205 import LOCATIONS, scl2205_classes, write_scl2205_records

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_LABELS = list(LOCATIONS)  # labels.json's index_to_label of p-scldata 2025.6.0, in index order
CYT, PLA, SEC, MIT, MEM, PER, NUC, CEP, ER = range(9)
INSTRUCTION = (
    "The sequence of the protein is as follows. Please analyze the sequence and describe its subcellular location."
)


def write_package(folder: Path, splits: dict, labels=PACKAGE_LABELS) -> Path:
    """A stand-in for `scldata/data`: `splits` maps a split to [(accession, sequence, label index), ...]."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [row for split_rows in splits.values() for row in split_rows]
    index_to_label = {str(i): label for i, label in enumerate(labels)}
    (folder / "labels.json").write_text(
        json.dumps({"index_to_label": index_to_label, "label_to_index": {v: int(k) for k, v in index_to_label.items()}})
    )
    (folder / "entries.json").write_text(json.dumps({str(i): row[0] for i, row in enumerate(rows)}))
    with (folder / "scl2205.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["entry", "seq", "scl"])
        writer.writerows(rows)
    indices, start = {}, 0
    for split, split_rows in splits.items():
        indices[split] = list(range(start, start + len(split_rows)))
        start += len(split_rows)
    (folder / "splits.json").write_text(json.dumps({**indices, "cv": {}}))
    return folder


def small_package(folder: Path) -> Path:
    trn = [(f"T{i:05d}", "MKT" + "ACDEFGHIKL"[i % 10] * (5 + i), i % 5) for i in range(10)]
    evl = [
        ("P12345", "mktayiak", NUC),  # lower case: normalised, not skipped
        ("Q00001", "MSKGEELFTG", ER),
        ("Q00002", "MALWMRLLPLLALLALWGPDPAAA", SEC),
        ("Q00003", "MLSRAVCGTSRQLAPVLGYLGSRQ", MIT),
        ("Q00004", trn[0][1], CYT),  # the same protein as a trn one: the benchmark flags it
    ]
    tst = [("Z99999", "MTSTHELD", PER)]
    return write_package(folder, {"trn": trn, "evl": evl, "tst": tst})


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_known_protein_record_is_exact(tmp_path):
    data = small_package(tmp_path / "pkg")
    write_scl2205_records(tmp_path / "out", data_dir=data)
    first, second = (tmp_path / "out" / "evl.jsonl").read_text().splitlines()[:2]
    assert first == (
        '{"instruction": "The sequence of the protein is as follows. Please analyze the sequence and describe its '
        'subcellular location.", "input": "Presented here is a sequence of amino acids in a protein: '
        '<seq> M K T A Y I A K </seq>", "output": "The protein is located in the nucleus.", '
        '"subset": "SCL2205_Location", "id": "P12345"}'
    )
    assert json.loads(second)["output"] == "The protein is located in the endoplasmic reticulum."


def test_two_runs_are_byte_identical_and_leave_no_temp_files(tmp_path):
    data = small_package(tmp_path / "pkg")
    digests = []
    for name in ("a", "b"):
        write_scl2205_records(tmp_path / name, data_dir=data, limit_per_split=4, seed=1)
        files = sorted(p.name for p in (tmp_path / name).iterdir())
        assert files == ["evl.jsonl", "report.json", "trn.jsonl"]
        digests.append({f: hashlib.sha256((tmp_path / name / f).read_bytes()).hexdigest() for f in files})
    assert digests[0] == digests[1]


def test_a_crash_while_writing_keeps_the_old_file_whole(tmp_path, monkeypatch):
    data = small_package(tmp_path / "pkg")
    out = tmp_path / "out"
    write_scl2205_records(out, data_dir=data)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def half_then_crash(self, text, encoding=None):
        with open(self, "w", encoding=encoding) as handle:
            handle.write(text[: len(text) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        write_scl2205_records(out, data_dir=data, limit_per_split=2)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_tst_is_never_written(tmp_path):
    data = small_package(tmp_path / "pkg")
    report = write_scl2205_records(tmp_path / "out", data_dir=data)
    assert sorted(report["splits"]) == ["evl", "trn"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["evl.jsonl", "report.json", "trn.jsonl"]
    assert not any("Z99999" in p.read_text() or "M T S T H E L D" in p.read_text() for p in (tmp_path / "out").iterdir())
    with pytest.raises(ValueError, match="'tst' is SCL2205's held-out test split and is never written"):
        write_scl2205_records(tmp_path / "out2", splits=("trn", "tst"), data_dir=data)
    assert not (tmp_path / "out2").exists()


def test_overlong_and_invalid_proteins_are_counted_not_dropped_silently(tmp_path):
    evl = [
        ("OK00001", "M" * 10, CYT),  # exactly max_residues: kept
        ("LONG001", "M" * 11, CYT),
        ("STOP001", "MKT*", NUC),
        ("GAP0001", "MK-T", NUC),
        ("EMPTY01", "", MEM),
    ]
    data = write_package(tmp_path / "pkg", {"trn": [("T1", "MKV", CYT)], "evl": evl})
    report = write_scl2205_records(tmp_path / "out", data_dir=data, max_residues=10)
    counts = report["splits"]["evl"]
    assert counts["read"] == 5 and counts["written"] == 1
    assert counts["skipped"] == {"empty_sequence": 1, "invalid_residue": 2, "too_long_protein": 1}
    (long,) = counts["skipped_examples"]["too_long_protein"]
    assert long.startswith("LONG001: ") and "11 residues in LONG001 is longer than the encoder's limit of 10" in long
    assert [e.split(":")[0] for e in counts["skipped_examples"]["invalid_residue"]] == ["STOP001", "GAP0001"]
    assert counts["skipped_examples"]["empty_sequence"] == ["EMPTY01: empty protein sequence in EMPTY01"]
    assert "stop codon" in counts["skipped_examples"]["invalid_residue"][0]
    assert [r["id"] for r in lines(tmp_path / "out" / "evl.jsonl")] == ["OK00001"]
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report


def test_unknown_labels_raise_naming_them(tmp_path):
    data = write_package(tmp_path / "a", {"trn": [("T1", "MKV", 13)]}, labels=[*PACKAGE_LABELS, "Golgi apparatus"])
    with pytest.raises(ValueError, match="unknown SCL2205 label 'Golgi apparatus'"):
        write_scl2205_records(tmp_path / "out", splits=("trn",), data_dir=data)
    data = write_package(tmp_path / "b", {"trn": [("T1", "MKV", 42)]})
    with pytest.raises(ValueError, match="unknown SCL2205 label index '42' for T1"):
        write_scl2205_records(tmp_path / "out", splits=("trn",), data_dir=data)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="unknown SCL2205 label 'Cytosol'"):
        scl2205.location_of("Cytosol")


def test_limit_keeps_a_class_stratified_seeded_subset(tmp_path):
    # Classes of 20 / 10 / 6 / 4 proteins; limit 10 keeps one per class, then shares 6 by size (largest
    # remainder): 4 / 3 / 2 / 1.
    sizes = {CYT: 20, PLA: 10, SEC: 6, MIT: 4}
    trn = [(f"T{label}{i:03d}", "MKV" + "A" * i, label) for label, n in sizes.items() for i in range(n)]
    data = write_package(tmp_path / "pkg", {"trn": trn, "evl": [("E1", "MKV", CYT)]})
    runs = {}
    for seed in (0, 0, 1):
        report = write_scl2205_records(tmp_path / f"s{seed}", splits=("trn",), data_dir=data, limit_per_split=10, seed=seed)
        ids = [r["id"] for r in lines(tmp_path / f"s{seed}" / "trn.jsonl")]
        assert ids == sorted(ids)  # the package's order
        assert runs.setdefault(seed, ids) == ids
        counts = report["splits"]["trn"]
        assert counts["written"] == 10 and counts["left_out_by_limit"] == 30
        assert {k: v for k, v in counts["classes"].items() if v} == {
            "cytoplasm": 4, "plastid": 3, "extracellular space": 2, "mitochondrion": 1,
        }
    assert runs[0] != runs[1]
    report = write_scl2205_records(tmp_path / "all", splits=("trn",), data_dir=data, limit_per_split=100)
    assert report["splits"]["trn"]["written"] == 40


def test_records_parse_and_build_four_option_items(tmp_path):
    from protein_llava.evaluation.benchmarks import build_sequence_grounded

    data = small_package(tmp_path / "pkg")
    report = write_scl2205_records(tmp_path / "out", data_dir=data)
    trn, evl = tmp_path / "out" / "trn.jsonl", tmp_path / "out" / "evl.jsonl"
    for path in (trn, evl):
        for number, raw in enumerate(lines(path), start=1):
            conversation = parse_record(raw, f"{path.name}:{number}")
            assert conversation.turns[0].content.startswith(INSTRUCTION + "\nPresented here")
            assert len(conversation.proteins) == 1
    assert report["splits"]["evl"]["sequence_also_in_trn"] == 1
    benchmark = build_sequence_grounded(str(evl), [str(trn)], num_options=4, seed=0)
    assert len(benchmark.items) == 4
    assert [(f.item_id, f.reason) for f in benchmark.flagged] == [("evl.jsonl:5", "seen_in_training")]
    outputs = {r["id"]: r["output"] for r in lines(evl)}
    for item, accession in zip(benchmark.items, ["P12345", "Q00001", "Q00002", "Q00003"]):
        assert len(item.options) == 4 and len(set(item.options)) == 4
        assert item.options[item.answer - 1] == f"option {item.answer}: {outputs[accession]}"


def test_cli_writes_the_files(tmp_path, capsys):
    data = small_package(tmp_path / "pkg")
    scl2205.main([str(tmp_path / "out"), "--limit-per-split", "3", "--max-residues", "12", "--data-dir", str(data)])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["settings"] == {
        "max_residues": 12, "limit_per_split": 3, "seed": 0, "subset": report["settings"]["subset"],
    }
    assert report["splits"]["trn"]["skipped"]["too_long_protein"] == 5  # the trn proteins of 13 to 17 residues
    assert "trn: 10 read, 3 written" in capsys.readouterr().out


def test_configs_point_at_the_builder_output():
    from omegaconf import OmegaConf

    from protein_llava.evaluation.config import EvalConfig, compose_eval_config
    from protein_llava.training.config import compose_train_config

    data = OmegaConf.to_container(compose_train_config(["stage=2", "data=scl2205"], ROOT / "configs" / "train").data)
    assert (data["source"], data["path"]) == ("local", "checkpoints/scl2205/trn.jsonl")
    assert data["max_length"] >= 1022 + 64  # the longest protein's placeholders plus the text around them
    cfg = compose_eval_config(["benchmark=scl2205"], ROOT / "configs" / "eval")

    benchmark = EvalConfig.from_dict(OmegaConf.to_container(cfg, resolve=True)).benchmark
    assert (benchmark.name, benchmark.path, benchmark.train_paths, benchmark.num_options, benchmark.seed) == (
        "sequence_grounded", "checkpoints/scl2205/evl.jsonl", ["checkpoints/scl2205/trn.jsonl"], 4, 0,
    )


def test_real_package_splits_and_classes(tmp_path):
    if importlib.util.find_spec("scldata") is None:
        pytest.skip("p-scldata not installed: pip install p-scldata==2025.6.0 (requirements-dev.txt)")
    data = scl2205.package_data_dir()
    labels = json.loads((data / "labels.json").read_text())["index_to_label"]
    assert [labels[str(i)] for i in range(len(labels))] == PACKAGE_LABELS and len(scl2205_classes()) == 13
    splits = json.loads((data / "splits.json").read_text())
    sizes = {s: len(splits[s]) for s in ("trn", "evl", "tst")}
    assert sizes == {"trn": 15183, "evl": 1260, "tst": 2631}  # the package README has trn and evl swapped
    assert len(set().union(*(splits[s] for s in sizes))) == sum(sizes.values()) == 19074
    report = write_scl2205_records(tmp_path, splits=("evl",))
    counts = report["splits"]["evl"]
    assert (counts["read"], counts["written"], counts["skipped"]) == (1260, 1114, {"empty_sequence": 0, "invalid_residue": 0, "too_long_protein": 146})
    assert report["source"]["version"] == "2025.6.0"
    record = next(r for r in lines(tmp_path / "evl.jsonl") if r["id"] == "C0HKP8")
    assert record["input"].endswith("<seq> " + " ".join("GLWSTIKQKGKEAAIAAAKAAGKAALNAASEAL") + " </seq>")
    assert record["output"] == "The protein is located in the extracellular space."
