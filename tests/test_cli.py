"""protein-llava end to end on the tiny preset: --help, predict (bad record, resume), chat (piped stdin),
convert-internlm2 (bad input), export (round trip, model card with the eval accuracy)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from sample_proteins import P1, P2

from protein_llava import ProteinLLM, ProteinLLMProcessor, build_tiny
from protein_llava.cli import main
from protein_llava.data.prompts import TEMPLATES, user_message
from protein_llava.inference.chat import ChatSession
from protein_llava.loading import load_protein_llm
from protein_llava.training.export import export_run

R1, R2 = P1.replace(" ", ""), P2.replace(" ", "")
SUBCOMMANDS = ("predict", "chat", "serve", "demo", "export", "convert-internlm2")


pytestmark = pytest.mark.usefixtures("one_thread")


def console_script() -> str:
    script = Path(sys.executable).with_name("protein-llava")
    found = str(script) if script.exists() else shutil.which("protein-llava")
    if found is None:
        pytest.fail("the protein-llava console script is not installed: pip install --no-deps -e .")
    return found


def run_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


HELP_FLAGS = {
    "predict": ["--fasta", "--sequence", "--question", "--template", "--out", "--batch-size", "--max-new-tokens"],
    "chat": ["--sequence", "--fasta", "/protein", "/quit"],
    "serve": ["--host", "--port", "127.0.0.1", "/v1/answer"],
    "demo": ["--model", "--host", "--port", "127.0.0.1", "--max-new-tokens", "--overflow"],
    "export": ["--run", "--out", "--eval-report", "--repo-id", "--stage1-run", "--push"],
    "convert-internlm2": ["src", "dst", "--dtype"],
}


def test_help_through_the_console_script():
    """The installed entry point reaches a subcommand's parser (one start imports torch and transformers: seconds)."""
    predict = subprocess.run([console_script(), "predict", "--help"], capture_output=True, text=True, env=run_env(), timeout=120)
    assert predict.returncode == 0, predict.stderr
    assert predict.stdout.startswith("usage: protein-llava predict")
    assert all(flag in " ".join(predict.stdout.split()) for flag in HELP_FLAGS["predict"])


def test_top_level_help_names_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    top = capsys.readouterr().out
    assert top.startswith("usage: protein-llava") and all(name in top for name in SUBCOMMANDS)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_help_of_every_subcommand(name, capsys):
    # The same parser the console script runs; one subprocess per subcommand would cost seconds each.
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith(f"usage: protein-llava {name}")
    assert all(flag in " ".join(help_text.split()) for flag in HELP_FLAGS[name])


# --- predict


def write_fasta(path: Path) -> Path:
    path.write_text(
        f">sp|P1|ONE first protein\n{R1[:30]}\n{R1[30:]}\n"
        ">bad a J is no residue\nMKTJAYIAK\n"
        f">two\n{R2}\n"
        ">three\nMKTAYIAKQR\n"
    )
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_writes_jsonl_reports_the_bad_record_and_resumes(tiny_folder, tmp_path, capsys):
    fasta, out = write_fasta(tmp_path / "proteins.fasta"), tmp_path / "answers.jsonl"
    argv = ["predict", "--model", str(tiny_folder), "--fasta", str(fasta), "--template", "function", "--out", str(out),
            "--batch-size", "2", "--max-new-tokens", "5", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    rows = read_jsonl(out)
    assert [(r["id"], r["sequence_length"]) for r in rows] == [("sp|P1|ONE", len(R1)), ("two", len(R2)), ("three", 10)]
    assert all(r["question"] == TEMPLATES["function"] and isinstance(r["answer"], str) for r in rows)
    # Each answer is the one the protein gets alone, through the chat template.
    loaded = load_protein_llm(tiny_folder, device="cpu")
    prompt = loaded.render_chat([{"role": "user", "content": user_message(TEMPLATES["function"], R2)}])
    assert rows[1]["answer"] == loaded.answer([prompt], 5)[0]

    errors = read_jsonl(tmp_path / "answers.errors.jsonl")
    assert [(e["id"], e["reason"]) for e in errors] == [("bad", "invalid_residue")]
    assert "invalid residue 'J' at position 4 in record 'bad'" in errors[0]["detail"]
    stderr = capsys.readouterr().err
    assert "4 records: 3 answered now, 0 already in" in stderr and "invalid_residue: 1" in stderr

    # An interrupted run: the last row lost, half a line written. The rerun answers only what is missing.
    out.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + '{"id": "thr')
    assert main(argv) == 0
    assert "1 answered now, 2 already in" in capsys.readouterr().err
    assert read_jsonl(out) == rows

    assert main([*argv[:5], "--question", "Another question?", *argv[7:]]) == 2
    assert "already holds answers to another question" in capsys.readouterr().err


def test_predict_one_sequence_to_stdout(tiny_folder, capsys):
    argv = ["predict", "--model", str(tiny_folder), "--sequence", "mktayiakqr", "--id", "q1", "--question", "What is it?",
            "--max-new-tokens", "3", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (row["id"], row["sequence_length"], row["question"]) == ("q1", 10, "What is it?")


def test_predict_bad_inputs_are_one_line_errors(tiny_folder, tmp_path, capsys):
    base = ["predict", "--model", str(tiny_folder), "--question", "Q?", "--device", "cpu"]
    assert main([*base, "--fasta", str(tmp_path / "missing.fasta")]) == 2
    assert "missing.fasta: no such FASTA file" in capsys.readouterr().err
    assert main(["predict", "--model", str(tmp_path), "--sequence", "MKT", "--question", "Q?"]) == 2
    assert "no config.json" in capsys.readouterr().err


# --- chat


def test_chat_reads_piped_stdin(tiny_folder):
    questions = "What does this protein do?\nIs it an enzyme?\n/protein MKTJ\n/protein " + R2 + "\nWhere is it found?\n/quit\nnever asked\n"
    result = subprocess.run(
        [console_script(), "chat", "--model", str(tiny_folder), "--sequence", R1, "--max-new-tokens", "4", "--device", "cpu"],
        input=questions, capture_output=True, text=True, timeout=120, env=run_env(),
    )
    assert result.returncode == 0, result.stderr
    # The same conversation in-process: history kept, the protein swapped, the bad one refused.
    session = ChatSession(load_protein_llm(tiny_folder, device="cpu"), max_new_tokens=4)
    session.load_protein(R1)
    expected = [session.ask("What does this protein do?"), session.ask("Is it an enzyme?")]
    session.load_protein(R2)
    expected.append(session.ask("Where is it found?"))
    assert result.stdout == "".join(answer + "\n" for answer in expected)
    assert "invalid residue 'J' at position 4" in result.stderr
    assert f"protein loaded: {len(R2)} residues; new conversation" in result.stderr


# --- convert-internlm2


def test_convert_internlm2_rejects_a_missing_source(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert-internlm2", str(tmp_path / "no-such-model"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "no-such-model" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.safetensors").exists()


# --- export


def fake_runs(root: Path) -> Path:
    """Stage-1 and stage-2 run folders as train.py writes them (export/ by the training export itself)."""
    stage1, stage2 = root / "tiny-stage1", root / "tiny-stage2"
    data = {"seen": 1600, "kept": 1598, "skipped": {"bad_sequence": 2}, "notes": {}, "examples": {}}
    for stage, run in ((1, stage1), (2, stage2)):
        (run / "hydra" / ".hydra").mkdir(parents=True)
        summary = {"stage": stage, "run": run.name, "nonfinite_skipped_steps": 0, "data": data, "final_train_loss": 2.5 / stage}
        (run / "summary.json").write_text(json.dumps(summary))
        (run / "data_report.json").write_text(json.dumps({"train": data, "val": None}))
        config = {
            "model": {"name": "tiny", "preset": "tiny", "decoder": None, "encoder_weights": None},
            "data": {"source": "demo", "path": None},
            "trainer": {"max_steps": 4},
            "stage1": {"lr": 1e-3, "max_steps": 120},
            "stage2": {"lr": 2e-4, "llm": "lora", "encoder": "frozen", "lora": {"r": 16, "alpha": 32},
                       "projector": str(stage1 / "projector.safetensors") if stage == 2 else None},
            "export": {"merge_adapter": True},
        }
        (run / "hydra" / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    model, processor = build_tiny(seed=1)
    export_run(model, processor, processor.tokenizer, stage2 / "export")
    return stage2


def test_export_round_trip_with_a_filled_model_card(tmp_path, capsys):
    run = fake_runs(tmp_path / "checkpoints")
    report = tmp_path / "report.json"
    report.write_text(json.dumps({
        "benchmark": {"name": "sequence_grounded", "source": "heldout.jsonl", "n_entries": 40, "n_scored": 40, "chance": 0.25},
        "settings": {"mode": "loglik", "prompt_format": "raw"},
        "arms": {
            "model": {"source": str(run / "export"), "accuracy": 0.625, "ci95": [0.475, 0.775], "n_scored": 40},
            "baseline": {"source": "text-only/export", "accuracy": 0.3, "ci95": [0.15, 0.45], "n_scored": 40},
        },
        "mcnemar_p": 0.0123,
    }))
    out = tmp_path / "hub-folder"
    assert main(["export", "--run", str(run), "--out", str(out), "--eval-report", str(report), "--repo-id", "someone/protein-llava-tiny"]) == 0

    exported, original = ProteinLLM.from_pretrained(out).eval(), ProteinLLM.from_pretrained(run / "export").eval()
    processor = ProteinLLMProcessor.from_pretrained(out)
    inputs = processor(text=[f"<seq> {P1} </seq> What is it?", f"Compare <seq> {P2} </seq>."])
    with torch.no_grad():
        assert torch.equal(exported(**inputs).logits, original(**inputs).logits)

    card = (out / "README.md").read_text()
    assert "| sequence_grounded: model (this model) | accuracy 62.5% (95% CI 47.5% to 77.5%), 40 items scored |" in card
    assert "sequence_grounded: baseline | accuracy 30.0%" in card
    assert "run `tiny-stage1`" in card and "run `tiny-stage2`" in card  # stage 1 found through the projector path
    assert "1598 of 1600 records kept (skipped: bad_sequence 2)" in card
    assert "decoder lora (r 16, alpha 32), merged into the weights" in card
    assert 'ProteinLLM.from_pretrained("someone/protein-llava-tiny")' in card
    assert "## Data licence" in card and "## Architecture" in card
    capsys.readouterr()

    # A non-empty --out is refused unless --force; a text-only run is refused.
    assert main(["export", "--run", str(run), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    (run / "export" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "other")]) == 2
    assert "text-only" in capsys.readouterr().err


def test_serve_flags_are_derived_from_server_limits():
    """Each limit's default lives once, in ServerLimits: the flags carry it, and a flag reaches its field."""
    import dataclasses

    from protein_llava.cli import build_parser
    from protein_llava.inference.server_limits import ServerLimits

    def limits(argv):
        args = build_parser().parse_args(["serve", "--model", "folder", *argv])
        return ServerLimits(**{field.name: getattr(args, field.name) for field in dataclasses.fields(ServerLimits)})

    assert limits([]) == ServerLimits()
    changed = limits(["--max-batch-size", "3", "--request-timeout", "5", "--max-new-tokens-limit", "7", "--max-prompt-tokens", "99"])
    assert changed == dataclasses.replace(ServerLimits(), max_batch_size=3, request_timeout_s=5.0, max_new_tokens=7, max_prompt_tokens=99)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--model", "folder", "--max-queued", "0"])
