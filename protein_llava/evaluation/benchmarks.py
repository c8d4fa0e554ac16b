"""Multiple-choice benchmarks: ProteinLMBench and a sequence-grounded set built from held-out SFT records.

Both become the same thing: `BenchmarkItem`s (question, numbered options, gold option number) and
`FlaggedItem`s (left out of the score, each with a reason the report counts). A bad entry is flagged,
never raised: one malformed item must not stop a 944-item run.
"""

from __future__ import annotations

import csv
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..data.records import RecordError, iter_raw_records, parse_record
from ..sequences import ProteinSequenceError, find_seq_spans, format_sequence, normalize_sequence

# The official ProteinLMBench zero-shot prompt (tsynbio/ProteinLMDataset, benchmark/benchmark_your_model.py),
# byte for byte. "option 7" is the benchmark's "unsure" answer.
OFFICIAL_INSTRUCTION = (
    "Answer the multiple-choice question based solely on the provided context. If you are still unsure about "
    "the answer, output option 7. Select only ONE correct option by its number. Start your response with 'The "
    "correct option is' followed by the option number ONLY. eg: \"The correct option is Option X.\" Think step "
    "by step."
)
ANSWER_ANCHOR = "The correct option is:"
SEQUENCE_QUESTION = "Which description fits this protein?"
MISSING_CELLS = {"", "nan"}  # how the CSV form writes a missing option; "None" can be a real answer
_OPTION_PREFIX = re.compile(r"^\s*option\s*(\d+)\s*[:.)]\s*", re.IGNORECASE)
_INTEGER = re.compile(r"\d+")


@dataclass(frozen=True)
class BenchmarkItem:
    """One scorable question. `options` are in the official form "option N: text"; `answer` counts from 1."""

    item_id: str
    question: str
    options: tuple[str, ...]
    answer: int
    proteins: tuple[str, ...] = ()
    context: str = ""  # the prompt the options answer (sequence-grounded: the record's own SFT prompt)
    category: str = ""  # the question type the report breaks accuracy down by (the record's "subset")

    @property
    def num_options(self) -> int:
        return len(self.options)


@dataclass(frozen=True)
class FlaggedItem:
    """An entry left out of the score: `reason` is a short code, `detail` says what was wrong."""

    item_id: str
    reason: str
    detail: str


@dataclass
class Benchmark:
    """Items to score and entries left out, in source order."""

    name: str
    source: str
    items: list[BenchmarkItem] = field(default_factory=list)
    flagged: list[FlaggedItem] = field(default_factory=list)

    def flag_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for flagged in self.flagged:
            counts[flagged.reason] = counts.get(flagged.reason, 0) + 1
        return dict(sorted(counts.items()))


class ItemError(ValueError):
    """A benchmark entry that cannot be scored; turned into a `FlaggedItem` by the loaders."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def official_prompt(question: str, options: Sequence[str]) -> str:
    """The official prompt: instruction, question, options one per line, then the answer anchor."""
    return OFFICIAL_INSTRUCTION + "\n Question: \n" + question + "\n Options: \n" + "\n".join(options) + "\n" + ANSWER_ANCHOR


def iter_training_records(paths: Sequence[str]) -> Iterator[tuple[str, object]]:
    """(record id, raw record) of every record in the training files, in order, as `iter_raw_records` gives
    them (an unreadable record as its RecordError). `paths` must be a sequence of existing files."""
    if isinstance(paths, (str, Path)):
        raise TypeError(f"paths must be a sequence of training files, got the single path {paths!r}")
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"training data file {path} does not exist")
        yield from iter_raw_records(str(path))


def check_parallel(**columns: Sequence) -> None:
    """ValueError unless the named columns (of a dataclass of parallel tuples) have one length."""
    lengths = [len(column) for column in columns.values()]
    if len(set(lengths)) > 1:
        names = ", ".join(columns)
        raise ValueError(f"{names} must be parallel, got lengths {', '.join(map(str, lengths))}")


def prediction_record(item: BenchmarkItem, predicted: int | None, **extra) -> dict:
    """One arm's outcome on `item` as the report and predictions.jsonl hold it (`extra`: scores, ...)."""
    return {
        "item_id": item.item_id,
        "num_options": item.num_options,
        "answer": item.answer,
        "predicted": predicted,
        "correct": predicted == item.answer,
        "unparseable": predicted is None,
        **extra,
    }


def first_integer(text: str) -> int | None:
    """The first run of digits in `text` as an int (the official answer parser), or None."""
    match = _INTEGER.search(text)
    return int(match.group()) if match else None


def cyclic_shift(item: BenchmarkItem, shift: int) -> BenchmarkItem:
    """The item with its options rotated left by `shift` and renumbered; position j shows original (j + shift) % K."""
    texts = [option_text(option) for option in item.options]
    k = len(texts)
    rotated = [texts[(j + shift) % k] for j in range(k)]
    gold = (item.answer - 1 - shift) % k + 1
    return replace(item, options=tuple(f"option {j + 1}: {text}" for j, text in enumerate(rotated)), answer=gold)


def option_text(option: str) -> str:
    """An option without its "option N:" prefix."""
    return _OPTION_PREFIX.sub("", option, count=1)


# --- ProteinLMBench


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and value != value) or (
        isinstance(value, str) and value.strip().lower() in MISSING_CELLS
    )


def _numbered_options(raw_options: Sequence) -> tuple[str, ...]:
    """Options as "option N: text" with N = position; trailing missing cells dropped, gaps flagged."""
    cells = list(raw_options)
    while cells and (_is_missing(cells[-1]) or _is_missing(option_text(str(cells[-1])))):
        cells.pop()
    options = []
    for position, cell in enumerate(cells, start=1):
        if not isinstance(cell, str) or _is_missing(cell) or _is_missing(option_text(cell)):
            raise ItemError("missing_option", f"option {position} is missing ({cell!r}) but later options are present")
        match = _OPTION_PREFIX.match(cell)
        if match and int(match.group(1)) != position:
            raise ItemError("bad_option_numbering", f"option at position {position} is numbered {match.group(1)}")
        # Options inside one prompt are separated by newlines: a newline inside an option would look like two.
        text = " ".join(option_text(cell).split())
        options.append(f"option {position}: {text}")
    if len(options) < 2:
        raise ItemError("too_few_options", f"{len(options)} usable options; a question needs at least 2")
    return tuple(options)


def parse_proteinlmbench_item(raw, item_id: str) -> BenchmarkItem:
    """One ProteinLMBench entry (official JSON schema, or a CSV row as a dict) → `BenchmarkItem`.

    Raises `ItemError` with a reason code: not_an_object, missing_field, empty_question, wrong_type,
    missing_option, bad_option_numbering, too_few_options, unparseable_answer, answer_not_in_options.
    """
    if not isinstance(raw, dict):
        raise ItemError("not_an_object", f"an item must be an object, got {type(raw).__name__}")
    for name in ("question", "answer"):
        if name not in raw:
            raise ItemError("missing_field", f"missing field {name!r} (found keys: {sorted(raw)})")
    question = raw["question"]
    if not isinstance(question, str) or _is_missing(question):
        raise ItemError("empty_question", f"question is empty or not text ({question!r})")
    if "options" in raw:
        raw_options = raw["options"]
        if not isinstance(raw_options, list):
            raise ItemError("wrong_type", f"'options' must be a list, got {type(raw_options).__name__}")
    else:
        columns = sorted((int(m.group(1)), key) for key in raw if (m := re.fullmatch(r"option\s*(\d+)", key.strip(), re.I)))
        if not columns:
            raise ItemError("missing_field", f"missing field 'options' (found keys: {sorted(raw)})")
        raw_options = [raw[key] for _, key in columns]
    options = _numbered_options(raw_options)
    answer_raw = raw["answer"]
    answer = first_integer(str(answer_raw)) if not _is_missing(answer_raw) else None
    if answer is None:
        raise ItemError("unparseable_answer", f"answer {answer_raw!r} holds no option number")
    if not 1 <= answer <= len(options):
        raise ItemError("answer_not_in_options", f"answer {answer_raw!r} is not among the {len(options)} options")
    return BenchmarkItem(item_id, question.strip(), options, answer)


def _iter_csv(path: Path) -> Iterable[tuple[str, dict]]:
    with path.open(newline="", encoding="utf-8") as handle:
        for index, row in enumerate(csv.DictReader(handle)):
            yield f"{path.name}[{index}]", row


def load_proteinlmbench(
    source: str, hub_config: str = "evaluation", split: str = "train", limit: int | None = None
) -> Benchmark:
    """ProteinLMBench from a local .json/.jsonl/.parquet/.csv file or the hub (e.g. "tsynbio/ProteinLMBench").

    `limit` keeps the first N entries, scored or flagged.
    """
    path = Path(source)
    if path.suffix.lower() == ".csv":
        if not path.is_file():
            raise FileNotFoundError(f"benchmark file {source} does not exist")
        entries = _iter_csv(path)
    else:
        entries = iter_raw_records(source, split=split, name=hub_config, streaming=False)
    benchmark = Benchmark("proteinlmbench", source)
    for index, (item_id, raw) in enumerate(entries):
        if limit is not None and index >= limit:
            break
        try:
            if isinstance(raw, RecordError):
                raise ItemError(raw.reason, str(raw))
            benchmark.items.append(parse_proteinlmbench_item(raw, item_id))
        except ItemError as error:
            benchmark.flagged.append(FlaggedItem(item_id, error.reason, str(error)))
    return benchmark


# --- sequence-grounded


def sequences_in(value) -> Iterable[str]:
    """Residues of every `<seq>` span in any string inside `value` (dicts and lists walked); bad spans skipped."""
    if isinstance(value, str):
        try:
            spans = find_seq_spans(value)
        except ProteinSequenceError:
            return
        for span in spans:
            try:
                yield normalize_sequence(span.inner)
            except ProteinSequenceError:
                continue
    elif isinstance(value, dict):
        for inner in value.values():
            yield from sequences_in(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from sequences_in(inner)


def training_sequences(paths: Sequence[str]) -> set[str]:
    """Every protein in the training data (ProteinLMDataset-format files); unreadable records are skipped."""
    seen: set[str] = set()
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"training data file {path} (for the overlap check) does not exist")
        for _, raw in iter_raw_records(str(path)):
            if not isinstance(raw, RecordError):
                seen.update(sequences_in(raw))
    return seen


@dataclass(frozen=True)
class SFTRecord:
    """A flat SFT record as the sequence-grounded items (and the probe arm's training labels) read it."""

    item_id: str
    instruction: str
    prompt: str
    output: str
    proteins: tuple[str, ...]
    subset: str


def read_sft_record(raw, item_id: str) -> SFTRecord:
    """A flat {"instruction", "input", "output"} record with at least one protein; `ItemError` otherwise.

    `output` is the reply with its whitespace normalised, as the items write their options."""
    try:
        conversation = parse_record(raw, item_id)
    except RecordError as error:
        raise ItemError(error.reason, str(error)) from error
    if not {"instruction", "output"} <= set(raw):
        raise ItemError("not_flat_sft", "sequence-grounded items need flat {'instruction', 'input', 'output'} records")
    proteins = tuple(conversation.proteins)
    if not proteins:
        raise ItemError("no_sequence", "the record holds no <seq> ... </seq> protein")
    user, assistant = conversation.turns[0].content, conversation.turns[1].content
    subset = raw.get("subset", "")
    if not isinstance(subset, str):
        raise ItemError("wrong_type", f"field 'subset' must be a string, got {type(subset).__name__}")
    return SFTRecord(item_id, raw["instruction"].strip(), user.strip(), " ".join(assistant.split()), proteins, subset)


def build_sequence_grounded(
    source: str,
    train_paths: Sequence[str] = (),
    num_options: int = 4,
    seed: int = 0,
    limit: int | None = None,
) -> Benchmark:
    """"Which description fits this protein?" items from held-out ProteinLMDataset-format records.

    Each record's own output is the answer; the distractors are `num_options - 1` outputs of other records
    with the same instruction and a different text. Each item draws them (and the answer's position) from
    its own RNG seeded by (`seed`, record id), so an item does not change when `limit` or other records do.
    Items whose protein occurs in `train_paths` are flagged `seen_in_training`.
    """
    if num_options < 2:
        raise ValueError(f"num_options must be >= 2, got {num_options}")
    if not Path(source).is_file():
        raise FileNotFoundError(f"benchmark file {source} does not exist")
    seen = training_sequences(train_paths)
    benchmark = Benchmark("sequence_grounded", source)
    records: list[SFTRecord | FlaggedItem] = []
    for item_id, raw in iter_raw_records(source):
        try:
            if isinstance(raw, RecordError):
                raise ItemError(raw.reason, str(raw))
            records.append(read_sft_record(raw, item_id))
        except ItemError as error:
            records.append(FlaggedItem(item_id, error.reason, str(error)))
    # Distractor pools come from the whole file, before `limit`, so limiting does not change items.
    pools: dict[str, list[str]] = {}
    for record in records:
        if isinstance(record, SFTRecord):
            pools.setdefault(record.instruction, []).append(record.output)
    pools = {instruction: sorted(set(outputs)) for instruction, outputs in pools.items()}
    for record in records[:limit]:
        if isinstance(record, FlaggedItem):
            benchmark.flagged.append(record)
            continue
        overlap = [p for p in record.proteins if p in seen]
        if overlap:
            benchmark.flagged.append(
                FlaggedItem(record.item_id, "seen_in_training", f"protein of {len(overlap[0])} residues occurs in the training data")
            )
            continue
        others = [output for output in pools[record.instruction] if output != record.output]
        if len(others) < num_options - 1:
            benchmark.flagged.append(
                FlaggedItem(
                    record.item_id,
                    "too_few_distractors",
                    f"{len(others)} other descriptions share this instruction; {num_options - 1} are needed",
                )
            )
            continue
        rng = random.Random(f"{seed}/{record.item_id}")
        texts = rng.sample(others, num_options - 1)
        answer = rng.randrange(num_options) + 1
        texts.insert(answer - 1, record.output)
        options = tuple(f"option {n}: {text}" for n, text in enumerate(texts, start=1))
        question = f"{record.prompt}\n{SEQUENCE_QUESTION}"
        benchmark.items.append(
            BenchmarkItem(record.item_id, question, options, answer, record.proteins, record.prompt, record.subset)
        )
    return benchmark


# --- the protein-ablation control


def ablate_proteins(items: Sequence[BenchmarkItem], seed: int = 0, neighbours: int = 4) -> list[BenchmarkItem]:
    """The same items, each item's protein replaced by another protein of the same set with a similar length.

    If a model reads the sequence, its accuracy on these items falls to chance; if it still scores, the
    score came from priors (question wording, option text). The replacement is drawn, with a seed of its
    own per protein, from the `neighbours` proteins closest in length (itself excluded), so length alone
    carries over: the length question is no control under this ablation. Every item of one protein gets
    the same replacement, so its questions stay consistent with each other.
    """
    proteins = sorted({protein for item in items for protein in item.proteins}, key=lambda p: (len(p), p))
    if len(proteins) < 2:
        raise ValueError(f"the protein ablation needs at least 2 distinct proteins among the items, found {len(proteins)}")
    neighbours = min(neighbours, len(proteins) - 1)
    replacement = {}
    for index, protein in enumerate(proteins):
        nearby = sorted(
            (other for other in range(len(proteins)) if other != index),
            key=lambda other: (abs(len(proteins[other]) - len(protein)), abs(other - index)),
        )[:neighbours]
        pick = random.Random(f"{seed}/ablation/{protein}").choice(nearby)
        replacement[protein] = proteins[pick]
    return [_swap_proteins(item, replacement) for item in items]


def _swap_proteins(item: BenchmarkItem, replacement: dict[str, str]) -> BenchmarkItem:
    def rewrite(text: str) -> str:
        # Rebuild the text span by span so only the sequences change, whatever spacing the record used.
        pieces, last = [], 0
        for span in find_seq_spans(text):
            new = replacement.get(normalize_sequence(span.inner))
            if new is None:
                raise ValueError(f"item {item.item_id}: a <seq> span holds a protein not listed in item.proteins")
            pieces += [text[last : span.start], format_sequence(new)]
            last = span.end
        return "".join(pieces) + text[last:]

    return replace(
        item,
        question=rewrite(item.question),
        context=rewrite(item.context),
        proteins=tuple(replacement[p] for p in item.proteins),
    )


__all__ = [
    "ANSWER_ANCHOR",
    "ablate_proteins",
    "OFFICIAL_INSTRUCTION",
    "Benchmark",
    "BenchmarkItem",
    "FlaggedItem",
    "ItemError",
    "SFTRecord",
    "build_sequence_grounded",
    "cyclic_shift",
    "first_integer",
    "load_proteinlmbench",
    "official_prompt",
    "option_text",
    "parse_proteinlmbench_item",
    "prediction_record",
    "read_sft_record",
    "training_sequences",
]
