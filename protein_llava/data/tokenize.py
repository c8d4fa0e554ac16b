"""Conversations → token ids and labels, with the label mask checked rather than assumed.

Each assistant reply is rendered through the chat template, located in the rendered text and tokenized as
its own segment; its tokens are supervised and must decode back to exactly the reply's text. A mismatch is a
`RecordError` naming the record (LLaVA's "tokenization mismatch", made an error instead of a silently
all-masked sample).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from ..constants import IGNORE_INDEX
from ..model.processing import ProteinLLMProcessor
from ..sequences import ProteinSequenceError, find_seq_spans
from .records import Conversation, RecordError, Turn

Mode = Literal["sft", "caption"]


@dataclass(frozen=True)
class Example:
    """One tokenized sample. `protein_token_counts[i]` placeholders stand for `proteins[i]`, in order."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    proteins: tuple[str, ...]
    record_id: str
    protein_token_counts: tuple[int, ...] = ()
    truncated: bool = False

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def with_proteins(example: Example, proteins: Sequence[str], counts: Sequence[int], protein_token_id: int) -> Example:
    """`example` reading `proteins` instead of its own: each placeholder run resized to the new protein's
    `counts[i]` tokens (placeholders are never supervised), every other token and label unchanged."""
    if len(proteins) != len(example.proteins) or len(counts) != len(proteins):
        raise ValueError(
            f"{example.record_id}: {len(example.proteins)} proteins, given {len(proteins)} replacements and {len(counts)} counts"
        )
    input_ids, labels, position, protein = [], [], 0, 0
    while position < len(example.input_ids):
        if example.input_ids[position] == protein_token_id:
            if protein >= len(counts):
                raise ValueError(f"{example.record_id}: more placeholder runs than its {len(counts)} proteins")
            input_ids += [protein_token_id] * counts[protein]
            labels += [IGNORE_INDEX] * counts[protein]
            position += example.protein_token_counts[protein]
            protein += 1
        else:
            input_ids.append(example.input_ids[position])
            labels.append(example.labels[position])
            position += 1
    return replace(
        example, input_ids=tuple(input_ids), labels=tuple(labels), proteins=tuple(proteins),
        protein_token_counts=tuple(counts), record_id=example.record_id + "/swapped",
    )


def caption_conversation(conversation: Conversation) -> Conversation:
    """Stage 1's caption form: the user turn is the protein alone, the reply its description (the last output)."""
    spans = [span for turn in conversation.turns if turn.role == "user" for span in find_seq_spans(turn.content)]
    replies = [turn.content for turn in conversation.turns if turn.role == "assistant"]
    if not spans:
        raise RecordError("no_protein", conversation.record_id, "caption training needs a <seq> span in the prompt")
    if not replies:
        raise RecordError("no_reply", conversation.record_id, "caption training needs an assistant reply")
    user = " ".join(f"<seq> {span.inner.strip()} </seq>" for span in spans)
    return Conversation((Turn("user", user), Turn("assistant", replies[-1])), conversation.record_id, conversation.notes)


class ConversationTokenizer:
    """Tokenizes conversations for training.

    Args:
        processor: the ProteinLLM's processor (multimodal: `<seq>` spans become placeholder runs), or
            None with `tokenizer` for the text-only arm (sequences stay inline as text).
        max_length: longest sample in tokens; longer replies are cut (never inside a protein's placeholder
            run) and counted, prompts that leave no room for a reply are skipped.
        mode: "sft" (every assistant turn supervised) or "caption" (stage 1: protein → description).
    """

    def __init__(self, processor: ProteinLLMProcessor | None, max_length: int, mode: Mode = "sft", tokenizer=None):
        if processor is None and tokenizer is None:
            raise ValueError("give a processor (multimodal) or a tokenizer (text-only)")
        if mode not in ("sft", "caption"):
            raise ValueError(f"mode must be 'sft' or 'caption', got {mode!r}")
        if max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {max_length}")
        self.processor = processor
        self.tokenizer = processor.tokenizer if processor is not None else tokenizer
        if self.tokenizer.chat_template is None:
            raise ValueError("the decoder's tokenizer has no chat template; set one (e.g. ChatML) before training")
        self.max_length = max_length
        self.mode = mode

    def __call__(self, conversation: Conversation) -> Example:
        if self.mode == "caption":
            conversation = caption_conversation(conversation)
        messages, proteins, counts = self._expand(conversation)
        input_ids, labels = self._tokenize(messages, conversation.record_id)
        return self._fit(input_ids, labels, proteins, counts, conversation.record_id)

    def _expand(self, conversation: Conversation) -> tuple[list[dict], list[str], list[int]]:
        messages, proteins, counts = [], [], []
        for turn in conversation.turns:
            content = turn.content
            if self.processor is not None:
                try:
                    content, residues = self.processor.expand_proteins(content, record=conversation.record_id)
                except ProteinSequenceError as error:
                    raise RecordError(error.reason, conversation.record_id, str(error)) from error
                proteins += residues
                counts += [self.processor.num_protein_tokens(len(r)) for r in residues]
            messages.append({"role": turn.role, "content": content})
        return messages, proteins, counts

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _tokenize(self, messages: list[dict], record_id: str) -> tuple[list[int], list[int]]:
        if [m["role"] for m in messages] == ["text"]:
            ids = self._encode(messages[0]["content"])
            if self.tokenizer.eos_token_id is not None:
                ids.append(self.tokenizer.eos_token_id)
            return ids, list(ids)
        input_ids: list[int] = []
        labels: list[int] = []
        rendered_so_far = ""
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self._render(messages[:index], add_generation_prompt=True)
            full = self._render(messages[: index + 1])
            reply = message["content"]
            if not prefix.startswith(rendered_so_far) or not full.startswith(prefix + reply):
                raise RecordError(
                    "template_mismatch",
                    record_id,
                    f"the chat template does not render turn {index}'s reply verbatim after its prompt",
                )
            prompt_ids = self._encode(prefix[len(rendered_so_far) :])
            reply_ids = self._encode(reply)
            tail_ids = self._encode(full[len(prefix) + len(reply) :])
            if not tail_ids and self.tokenizer.eos_token_id is not None:
                tail_ids = [self.tokenizer.eos_token_id]  # a template without an end-of-turn marker: teach EOS
            decoded = self.tokenizer.decode(reply_ids)
            if decoded != reply:
                raise RecordError(
                    "label_mismatch",
                    record_id,
                    f"turn {index}: supervised tokens decode to {decoded[:80]!r}, not the reply {reply[:80]!r}",
                )
            input_ids += prompt_ids + reply_ids + tail_ids
            labels += [IGNORE_INDEX] * len(prompt_ids) + reply_ids + tail_ids
            rendered_so_far = full
        return input_ids, labels

    def _fit(self, input_ids, labels, proteins, counts, record_id) -> Example:
        truncated = False
        if len(input_ids) > self.max_length:
            cut = self._safe_cut(input_ids, counts, self.max_length)
            if not any(label != IGNORE_INDEX for label in labels[:cut]):
                raise RecordError(
                    "prompt_too_long",
                    record_id,
                    f"{len(input_ids)} tokens and the prompt alone fills max_length={self.max_length}",
                )
            input_ids, labels, truncated = input_ids[:cut], labels[:cut], True
            kept = self._placeholders(input_ids)
            boundaries = _cumulative(counts)
            num_kept = bisect.bisect_right(boundaries, kept) - 1
            proteins, counts = proteins[:num_kept], counts[:num_kept]
        if not any(label != IGNORE_INDEX for label in labels):
            raise RecordError("no_supervised_tokens", record_id, "no token is supervised")
        return Example(tuple(input_ids), tuple(labels), tuple(proteins), record_id, tuple(counts), truncated)

    def _placeholders(self, ids) -> int:
        if self.processor is None:
            return 0
        return sum(1 for token in ids if token == self.processor.protein_token_id)

    def _safe_cut(self, input_ids: list[int], counts: list[int], limit: int) -> int:
        """The largest cut <= limit that does not fall inside a protein's placeholder run."""
        if self.processor is None or not counts:
            return limit
        boundaries = _cumulative(counts)  # placeholder counts at which a protein ends
        seen = self._placeholders(input_ids[:limit])
        if seen in boundaries:
            return limit
        # Step back to the first placeholder of the protein the cut would split.
        complete = boundaries[bisect.bisect_right(boundaries, seen) - 1]
        position, found = 0, 0
        for position, token in enumerate(input_ids):
            if token == self.processor.protein_token_id:
                if found == complete:
                    return position
                found += 1
        return limit


def _cumulative(counts) -> list[int]:
    total, out = 0, [0]
    for count in counts:
        total += count
        out.append(total)
    return out
