"""ProteinLMDataset's record shapes → `Conversation`s, with bad records counted by reason.

Shapes read:
- flat SFT `{"instruction", "input", "output"}` (sequences inside `<seq> ... </seq>` in `input`); the
  self-supervised text records use the same keys with `input` empty;
- XTuner `{"conversation": [{"system"?, "input", "output"}, ...]}` (upstream's misspelling `intput`
  is mapped to `input` and counted);
- LLaVA `{"conversations": [{"from": "system"|"human"|"gpt", "value"}, ...]}`;
- plain text `{"text"}` (language-modelling loss on the whole text).

Sources: local `.json` (a list), `.jsonl`, `.parquet`, or a Hugging Face hub dataset through `datasets`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..sequences import ProteinSequenceError, find_seq_spans, normalize_sequence
from .prompts import join_user_turn

Role = Literal["system", "user", "assistant", "text"]
KNOWN_MISSPELLINGS = {"intput": "input"}
LLAVA_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class RecordError(ValueError):
    """A record that cannot be used. `reason` is a short code the run report counts by (a `SequenceReason`
    for a bad protein or `<seq>` markup)."""

    def __init__(self, reason: str, record_id: str, detail: str):
        super().__init__(f"{record_id}: {detail}")
        self.reason = str(reason)  # a plain string in reports, whatever enum it came from
        self.record_id = record_id


class DataQualityError(RuntimeError):
    """Most of the data is bad: stopping early rather than training on what is left."""


@dataclass(frozen=True)
class Turn:
    role: Role
    content: str


@dataclass(frozen=True)
class Conversation:
    """One training sample: turns in order, and where it came from (`file:line` or `name[index]`)."""

    turns: tuple[Turn, ...]
    record_id: str
    notes: tuple[str, ...] = ()

    @property
    def proteins(self) -> list[str]:
        """Residues of every `<seq>` span, in order of appearance."""
        found = []
        for turn in self.turns:
            found.extend(normalize_sequence(span.inner) for span in find_seq_spans(turn.content))
        return found


def _field(raw: dict, name: str, record_id: str, required: bool = True, allow_empty: bool = False) -> str:
    if name not in raw:
        if not required:
            return ""
        raise RecordError("missing_field", record_id, f"missing field {name!r} (found keys: {sorted(raw)})")
    value = raw[name]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise RecordError("wrong_type", record_id, f"field {name!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(f"empty_{name}", record_id, f"field {name!r} is empty")
    return value


def _rename_misspellings(turn: dict) -> tuple[dict, list[str]]:
    notes = []
    for wrong, right in KNOWN_MISSPELLINGS.items():
        if wrong in turn and right not in turn:
            turn = {**turn, right: turn[wrong]}
            notes.append(f"renamed_{wrong}")
    return turn, notes


def parse_record(raw, record_id: str) -> Conversation:
    """One raw record → `Conversation`; anything unusable raises `RecordError` naming the record and field."""
    if not isinstance(raw, dict):
        raise RecordError("not_an_object", record_id, f"a record must be a JSON object, got {type(raw).__name__}")
    if "conversation" in raw:
        turns, notes = _parse_xtuner(raw["conversation"], record_id)
    elif "conversations" in raw:
        turns, notes = _parse_llava(raw["conversations"], record_id), []
    elif "text" in raw and "output" not in raw:
        turns, notes = (Turn("text", _field(raw, "text", record_id)),), []
    else:
        raw, notes = _rename_misspellings(raw)
        instruction = _field(raw, "instruction", record_id, allow_empty=True)
        input_text = _field(raw, "input", record_id, required=False, allow_empty=True)
        output = _field(raw, "output", record_id)
        user = join_user_turn(instruction, input_text)
        if not user.strip():
            raise RecordError("empty_prompt", record_id, "both 'instruction' and 'input' are empty")
        turns = (Turn("user", user), Turn("assistant", output))
    conversation = Conversation(tuple(turns), record_id, tuple(notes))
    _check_sequences(conversation)
    return conversation


def _parse_xtuner(turns_raw, record_id: str) -> tuple[tuple[Turn, ...], list[str]]:
    if not isinstance(turns_raw, list) or not turns_raw:
        raise RecordError("wrong_type", record_id, "field 'conversation' must be a non-empty list of turns")
    turns, notes = [], []
    for index, turn in enumerate(turns_raw):
        where = f"{record_id} turn {index}"
        if not isinstance(turn, dict):
            raise RecordError("wrong_type", record_id, f"turn {index} of 'conversation' must be an object")
        turn, renamed = _rename_misspellings(turn)
        notes += renamed
        system = _field(turn, "system", where, required=False, allow_empty=True)
        if system.strip():
            if turns:
                raise RecordError("bad_structure", record_id, f"turn {index} has a 'system' after the first turn")
            turns.append(Turn("system", system))
        turns.append(Turn("user", _field(turn, "input", where)))
        turns.append(Turn("assistant", _field(turn, "output", where)))
    return tuple(turns), notes


def _parse_llava(turns_raw, record_id: str) -> tuple[Turn, ...]:
    if not isinstance(turns_raw, list) or not turns_raw:
        raise RecordError("wrong_type", record_id, "field 'conversations' must be a non-empty list of turns")
    turns = []
    for index, turn in enumerate(turns_raw):
        if not isinstance(turn, dict):
            raise RecordError("wrong_type", record_id, f"turn {index} of 'conversations' must be an object")
        speaker = _field(turn, "from", f"{record_id} turn {index}")
        if speaker not in LLAVA_ROLES:
            raise RecordError(
                "bad_structure", record_id, f"turn {index} has unknown speaker {speaker!r}; expected {sorted(LLAVA_ROLES)}"
            )
        turns.append(Turn(LLAVA_ROLES[speaker], _field(turn, "value", f"{record_id} turn {index}")))
    return tuple(turns)


def _check_sequences(conversation: Conversation) -> None:
    roles = [t.role for t in conversation.turns if t.role != "system"]
    if roles != ["text"]:
        expected = ["user", "assistant"] * (len(roles) // 2)
        if roles != expected or not roles:
            raise RecordError(
                "bad_structure", conversation.record_id, f"turns must alternate user/assistant, got {roles}"
            )
    try:
        _ = conversation.proteins  # parses every <seq> span: bad markup or residues fail here, naming the record
    except ProteinSequenceError as error:
        raise RecordError(error.reason, conversation.record_id, str(error)) from error


# --- sources


def iter_raw_records(source: str, split: str = "train", name: str | None = None, streaming: bool = True) -> Iterator:
    """Yield `(record_id, raw)` pairs; a line that is not JSON or not UTF-8 yields `(record_id, RecordError)`.

    `source`: a local `.json` / `.jsonl` / `.parquet` file, or a Hugging Face hub dataset id (read with
    `datasets.load_dataset(source, name, split=split, streaming=streaming)`).
    """
    path = Path(source)
    if path.exists():
        yield from _iter_local(path)
    elif source.endswith((".json", ".jsonl", ".parquet")):
        raise FileNotFoundError(f"data file {source} does not exist")
    else:
        import datasets

        dataset = datasets.load_dataset(source, name, split=split, streaming=streaming)
        for index, raw in enumerate(dataset):
            yield f"{source}[{index}]", raw


def _iter_local(path: Path) -> Iterator:
    if path.stat().st_size == 0:
        raise DataQualityError(f"data file {path} is empty")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open("rb") as handle:
            for line_number, line in enumerate(handle, start=1):
                record_id = f"{path.name}:{line_number}"
                if not line.strip():
                    continue
                try:
                    yield record_id, json.loads(line.decode("utf-8"))
                except UnicodeDecodeError as error:
                    yield record_id, RecordError("not_utf8", record_id, f"line is not UTF-8 ({error.reason})")
                except json.JSONDecodeError as error:
                    yield record_id, RecordError("bad_json", record_id, f"line is not JSON ({error.msg})")
    elif suffix == ".json":
        try:
            records = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataQualityError(f"{path} is not a valid UTF-8 JSON file: {error}") from error
        if not isinstance(records, list):
            raise DataQualityError(f"{path} must hold a JSON list of records, got {type(records).__name__}")
        for index, raw in enumerate(records):
            yield f"{path.name}[{index}]", raw
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for index, raw in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path.name}[{index}]", raw
    else:
        raise ValueError(f"unsupported data file {path}: use .json, .jsonl or .parquet")


@dataclass
class RecordReport:
    """Counts of skipped / truncated / renamed records by reason, with the first few examples of each.

    `strict=True` turns the first bad record into an error. A run whose records are mostly bad stops
    once `min_records_for_check` have been seen.
    """

    strict: bool = False
    max_examples: int = 3
    max_bad_fraction: float = 0.5
    min_records_for_check: int = 100
    seen: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def record_ok(self, conversation: Conversation | None = None) -> None:
        self.seen += 1
        self.kept += 1
        for note in conversation.notes if conversation is not None else ():
            self.notes[note] += 1

    def record_note(self, reason: str, message: str) -> None:
        self.notes[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < self.max_examples:
            self.examples[reason].append(message)

    def record_skip(self, error: RecordError) -> None:
        if self.strict:
            raise error
        self.seen += 1
        self.skipped[error.reason] += 1
        self.examples.setdefault(error.reason, [])
        if len(self.examples[error.reason]) < self.max_examples:
            self.examples[error.reason].append(str(error))
        bad = sum(self.skipped.values())
        if self.seen >= self.min_records_for_check and bad / self.seen > self.max_bad_fraction:
            raise DataQualityError(
                f"{bad} of the first {self.seen} records are unusable ({dict(self.skipped)}); "
                f"first examples: {self.examples}. Fix the data, or pass strict=true to stop at the first one."
            )

    def reject_kept(self, error: RecordError) -> None:
        """A record counted as kept turned out unusable later (e.g. at tokenization): count it as skipped."""
        self.kept -= 1
        self.seen -= 1  # record_skip counts it as seen again
        self.record_skip(error)

    def summary(self) -> str:
        lines = [f"records: {self.seen} read, {self.kept} kept, {sum(self.skipped.values())} skipped"]
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  skipped {reason}: {count}; e.g. {self.examples.get(reason, [])[:self.max_examples]}")
        for reason, count in sorted(self.notes.items()):
            lines.append(f"  {reason}: {count}; e.g. {self.examples.get(reason, [])[:self.max_examples]}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "seen": self.seen,
            "kept": self.kept,
            "skipped": dict(self.skipped),
            "notes": dict(self.notes),
            "examples": self.examples,
        }


def read_conversations(
    source: str, report: RecordReport | None = None, limit: int | None = None, **source_kwargs
) -> list[Conversation]:
    """Every usable record of `source` as a `Conversation`; the rest are counted in `report`."""
    report = report if report is not None else RecordReport()
    conversations = []
    for record_id, raw in iter_raw_records(source, **source_kwargs):
        if limit is not None and len(conversations) >= limit:
            break
        try:
            if isinstance(raw, RecordError):
                raise raw
            conversation = parse_record(raw, record_id)
        except RecordError as error:
            report.record_skip(error)
            continue
        report.record_ok(conversation)
        conversations.append(conversation)
    if not conversations:
        raise DataQualityError(f"no usable records in {source}: {report.summary()}")
    return conversations
