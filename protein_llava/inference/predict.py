"""Answers about proteins: prompts through the chat template, greedy batched `generate`, FASTA → JSONL.

`Answerer` wraps a loaded ProteinLLM + processor and is shared by `protein-llava predict`, `chat` and
`serve`. `predict_fasta` is the batch job: it validates every record first (bad ones are reported and
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

import torch

from ..data.prompts import user_message
from ..loading import PROTEIN_LLM_MODEL_TYPE, load_model, saved_model_type
from ..sequences import CheckedSequence, ProteinSequenceError, check_sequence, strip_markup


class Answerer:
    """A ProteinLLM and its processor that answer rendered chat prompts greedily, one `generate` per batch.

    Greedy decoding is prefix-stable, so a batch runs to its largest `max_new_tokens` and each row is then
    cut to its own limit: every answer equals the one the prompt would get alone.
    """

    def __init__(self, model, processor, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.processor = processor
        tokenizer = processor.tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stop_token_ids = stop_token_ids(tokenizer, model.generation_config)

    @classmethod
    def from_folder(
        cls, folder: str | Path, device: str = "auto", dtype: str | None = None, load_in_4bit: bool = False
    ) -> Answerer:
        """Load a saved ProteinLLM folder (model + processor); a non-ProteinLLM folder raises ValueError.

        `load_in_4bit`: the decoder in 4-bit NF4 (bitsandbytes), computing in `dtype` (default float32);
        encoder and projector stay in full precision.
        """
        model_type = saved_model_type(folder)
        if model_type != PROTEIN_LLM_MODEL_TYPE:
            raise ValueError(
                f"{folder} holds a {model_type!r} model, not a ProteinLLM (model_type {PROTEIN_LLM_MODEL_TYPE!r}); "
                "the text-only arm cannot read proteins"
            )
        loaded = load_model(folder, dtype, device, load_in_4bit=load_in_4bit)
        return cls(loaded.model, loaded.processor, loaded.device)

    @property
    def max_residues(self) -> int:
        return self.processor.max_residues

    def render(self, messages: list[dict]) -> str:
        """Messages (proteins inline as `<seq> ... </seq>`) → the prompt text, assistant turn opened."""
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def generation_options(self) -> dict:
        """The `generate` settings every caller shares (Answerer, the server's engine, the web demo)."""
        return {
            "num_beams": 1,
            "eos_token_id": self.stop_token_ids or None,
            "pad_token_id": self.pad_token_id,
            # A generated placeholder would be read as a protein slot on the next step.
            "suppress_tokens": [self.processor.protein_token_id],
        }

    @torch.inference_mode()
    def answer(self, prompts: Sequence[str], max_new_tokens: int | Sequence[int]) -> list[str]:
        """Greedy answers for rendered prompts; `max_new_tokens` is one limit or one per prompt."""
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(limits)} max_new_tokens values")
        # The chat template already placed any BOS token.
        inputs = self.processor(text=list(prompts), add_special_tokens=False).to(self.device)
        generated = self.model.generate(**inputs, max_new_tokens=max(limits), do_sample=False, **self.generation_options())
        new_tokens = generated[:, inputs["input_ids"].shape[1] :].tolist()  # (batch, new) as lists
        answers = []
        for tokens, limit in zip(new_tokens, limits):
            tokens = tokens[:limit]
            for index, token in enumerate(tokens):
                if token in self.stop_token_ids:
                    tokens = tokens[:index]
                    break
            answers.append(self.processor.decode(tokens, skip_special_tokens=True).strip())
        return answers


def stop_token_ids(tokenizer, generation_config) -> list[int]:
    """Ids that end an answer: the generation config's and tokenizer's EOS, and ChatML's end of turn."""
    ids = generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    # A chat model ends its turn with <|im_end|> (ChatML) even where EOS is another token.
    end_of_turn = tokenizer.get_vocab().get("<|im_end|>")
    if end_of_turn is not None:
        ids.append(end_of_turn)
    return sorted(set(ids))


class ChatSession:
    """A conversation about one protein: the protein rides in the first user turn, the history is
    re-rendered through the chat template for every question. Loading another protein starts afresh."""

    def __init__(self, answerer: Answerer, max_new_tokens: int = 256):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.answerer = answerer
        self.max_new_tokens = max_new_tokens
        self.residues: str | None = None
        self.messages: list[dict] = []

    def load_protein(self, sequence: str) -> str:
        """Validate and load a protein (ProteinSequenceError names a bad residue); the history is cleared."""
        self.residues = self.answerer.processor.check_sequence(sequence, "the protein").residues
        self.messages = []
        return self.residues

    def reset(self) -> None:
        self.messages = []

    def ask(self, question: str) -> str:
        content = question if self.messages else user_message(question, self.residues)
        messages = [*self.messages, {"role": "user", "content": content}]
        answer = self.answerer.answer([self.answerer.render(messages)], self.max_new_tokens)[0]
        # The history is parsed again next turn: a reply must not read as protein markup.
        safe = strip_markup(answer, self.answerer.processor.protein_token)
        self.messages = [*messages, {"role": "assistant", "content": safe}]
        return answer


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
    answerer: Answerer,
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
    queries, problems = check_records(records, answerer.max_residues, answerer.processor.overflow)
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
                for query, answer in _answer_batch(answerer, batch, question, max_new_tokens, report):
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


def _answer_batch(answerer: Answerer, batch: list[Query], question: str, max_new_tokens: int, report):
    """(query, answer) pairs; when a batch fails, each record is retried alone so one bad record
    (or a batch too large for memory) costs only itself."""
    prompts = [answerer.render([{"role": "user", "content": user_message(question, q.residues)}]) for q in batch]
    try:
        return list(zip(batch, answerer.answer(prompts, max_new_tokens)))
    except Exception as error:  # noqa: BLE001 - any failure is retried record by record, then reported
        if len(batch) == 1:
            report(RecordProblem(batch[0].id, "generation_error", f"{type(error).__name__}: {error}"))
            return []
    pairs = []
    for query, prompt in zip(batch, prompts):
        try:
            pairs.append((query, answerer.answer([prompt], max_new_tokens)[0]))
        except Exception as error:  # noqa: BLE001
            report(RecordProblem(query.id, "generation_error", f"{type(error).__name__}: {error}"))
    return pairs
