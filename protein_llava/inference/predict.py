"""Answers about proteins in batch: FASTA → JSONL.

Generation itself is `LoadedModel.answer` (protein_llava.loading), shared by `protein-llava predict`, `chat`
(`inference/chat.py`), `serve` and the web demo. `predict_fasta` is the batch job: it validates every record first (bad ones are reported and
skipped, never fatal), skips ids already answered in the output file, and appends one flushed JSONL
line per answer so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


from ..data.prompts import marked_user_message
from ..loading import LoadedModel
from ..sequences import CheckedSequence, ProteinSequenceError, check_sequence


# --- FASTA records → validated queries


@dataclass(frozen=True)
class FastaRecord:
    id: str
    sequence: str


@dataclass(frozen=True)
class Query(CheckedSequence):
    """A record that passed validation: its id, residues (cut to the encoder limit under overflow=truncate)
    and length before any cut."""

    id: str = field(kw_only=True)


@dataclass(frozen=True)
class RecordProblem:
    """A record left out, with a reason code (duplicate_id, generation_error, or a `SequenceReason`:
    empty_sequence, invalid_residue, too_long_protein) and a message naming the character, position or limit."""

    id: str
    reason: str
    detail: str

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "reason": self.reason, "detail": self.detail})


def read_fasta(path: str | Path) -> list[FastaRecord]:
    """Every record of a FASTA file (Biopython's parser); a file that is not FASTA raises ValueError."""
    from Bio import SeqIO

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such FASTA file")
    with path.open() as handle:
        try:
            records = [FastaRecord(record.id, str(record.seq)) for record in SeqIO.parse(handle, "fasta")]
        except ValueError as error:
            raise ValueError(f"{path} is not a readable FASTA file: {str(error).splitlines()[0]}") from error
    if not records:
        raise ValueError(f"{path} holds no FASTA records (each record starts with a '>' header line)")
    return records


def check_records(
    records: Sequence[FastaRecord], max_residues: int, overflow: str = "error"
) -> tuple[list[Query], list[RecordProblem]]:
    """Split records into usable queries and problems; the first record of a repeated id wins."""
    queries, problems, seen = [], [], set()
    for record in records:
        if record.id in seen:
            problems.append(RecordProblem(record.id, "duplicate_id", f"id {record.id!r} appears more than once; the first record was kept"))
            continue
        seen.add(record.id)
        try:
            # Truncation is reported in each answer row (`truncated_to`), not as a warning per record.
            checked = check_sequence(record.sequence, max_residues, overflow, f"record {record.id!r}", warn=False)
        except ProteinSequenceError as error:
            problems.append(RecordProblem(record.id, error.reason, str(error)))
            continue
        queries.append(Query(checked.residues, checked.length, id=record.id))
    return queries, problems


# --- the batch job


@dataclass
class PredictSummary:
    records: int = 0
    answered: int = 0
    already_done: int = 0
    truncated: int = 0
    problems: Counter = field(default_factory=Counter)

    def line(self, out: str, errors: str | None) -> str:
        skipped = sum(self.problems.values())
        text = (
            f"{self.records} records: {self.answered} answered now, {self.already_done} already in {out}, "
            f"{skipped} skipped"
        )
        if skipped:
            text += " (" + ", ".join(f"{reason}: {count}" for reason, count in sorted(self.problems.items())) + ")"
        if self.truncated:
            text += f"; {self.truncated} truncated to the encoder limit"
        if skipped and errors:
            text += f"; details in {errors}"
        return text


def answered_ids(out: Path, question: str) -> set[str]:
    """Ids already answered in `out` (for resuming). A partial last line from a killed run is dropped;
    answers to a different question make resuming ambiguous and raise ValueError."""
    if not out.is_file():
        return set()
    text = out.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        out.write_text(text)
    done = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row_id, row_question = row["id"], row["question"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{out} line {number} is not an answer row ({error}); use a new --out") from error
        if row_question != question:
            raise ValueError(
                f"{out} already holds answers to another question ({row_question[:60]!r}); use a new --out to "
                "ask a different question"
            )
        done.add(row_id)
    return done


def predict_fasta(
    loaded: LoadedModel,
    records: Sequence[FastaRecord],
    question: str,
    out: Path | None,
    errors: Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    progress: bool = True,
) -> PredictSummary:
    """Answer `question` for every usable record; rows go to `out` (appended, flushed per batch) or stdout.

    Problems (bad records, a record whose generation fails on its own) go to `errors`, rewritten per run.
    Proteins over the encoder limit follow the processor's `overflow` policy (skipped, or truncated).
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    summary = PredictSummary(records=len(records))
    queries, problems = check_records(records, loaded.max_residues, loaded.processor.overflow)
    done = answered_ids(out, question) if out is not None else set()
    pending = [q for q in queries if q.id not in done]
    summary.already_done = len(queries) - len(pending)

    error_handle = errors.open("w") if errors is not None else None
    out_handle = out.open("a") if out is not None else sys.stdout

    def report(problem: RecordProblem) -> None:
        summary.problems[problem.reason] += 1
        if error_handle is not None:
            error_handle.write(problem.to_json() + "\n")
            error_handle.flush()

    try:
        for problem in problems:
            report(problem)
        with tqdm(total=len(pending), desc="predict", unit="protein", disable=not progress, file=sys.stderr) as bar:
            for start in range(0, len(pending), batch_size):
                batch = pending[start : start + batch_size]
                for query, answer in _answer_batch(loaded, batch, question, max_new_tokens, report):
                    row = {"id": query.id, "sequence_length": query.length, "question": question, "answer": answer}
                    if query.truncated:
                        row["truncated_to"] = len(query.residues)
                        summary.truncated += 1
                    out_handle.write(json.dumps(row) + "\n")
                    summary.answered += 1
                out_handle.flush()
                bar.update(len(batch))
    finally:
        if error_handle is not None:
            error_handle.close()
        if out is not None:
            out_handle.close()
    return summary


def _answer_batch(loaded: LoadedModel, batch: list[Query], question: str, max_new_tokens: int, report):
    """(query, answer) pairs; when a batch fails, each record is retried alone so one bad record
    (or a batch too large for memory) costs only itself."""
    # The checked residues go to the processor as data, each behind its marker, not as text to parse again.
    marked = marked_user_message(question, loaded.processor.protein_token)
    prompt = loaded.render_chat([{"role": "user", "content": marked}])
    prompts = [prompt] * len(batch)
    try:
        return list(zip(batch, loaded.answer(prompts, max_new_tokens, proteins=[[q.residues] for q in batch])))
    except Exception as error:  # noqa: BLE001 - any failure is retried record by record, then reported
        if len(batch) == 1:
            report(RecordProblem(batch[0].id, "generation_error", f"{type(error).__name__}: {error}"))
            return []
    pairs = []
    for query in batch:
        try:
            pairs.append((query, loaded.answer([prompt], max_new_tokens, proteins=[[query.residues]])[0]))
        except Exception as error:  # noqa: BLE001
            report(RecordProblem(query.id, "generation_error", f"{type(error).__name__}: {error}"))
    return pairs
