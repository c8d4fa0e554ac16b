"""ProteinLLMProcessor: text with proteins → decoder token ids with `<protein>` placeholders + ESM token ids.

A protein is given either inline, in ProteinLMDataset's form `<seq> M K T ... </seq>`, or as an explicit
`proteins=[[...], ...]` list whose entries fill `<protein>` markers in the text. Either way each protein
becomes `num_protein_tokens(length)` placeholders, and its residues go to the encoder as ESM-2 tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AddedToken, BatchFeature, ProcessorMixin

from .configuration import ESM2_MAX_RESIDUES, ProjectorConfig, num_protein_tokens
from ..constants import PROTEIN_TOKEN
from .encoder import esm2_alphabet
from ..sequences import (
    CheckedSequence,
    OverflowPolicy,
    ProteinSequenceError,
    SequenceReason,
    check_sequence,
    find_seq_spans,
    format_sequence,
    normalize_sequence,
)



class ProteinLLMProcessor(ProcessorMixin):
    """Pairs the decoder's tokenizer with ESM-2's alphabet and the placeholder-count rule.

    Args:
        tokenizer: the decoder's tokenizer; `<protein>` is added to it as a special token.
        projector_config: the model's projector config (dict or `ProjectorConfig`): it fixes how many
            placeholders a protein takes.
        max_residues: the encoder's length limit (1022 for ESM-2).
        overflow: "error" (default) or "truncate" for proteins over `max_residues`.
        protein_token: the placeholder's text.
        chat_template: optional override of the tokenizer's chat template.
    """

    def __init__(
        self,
        tokenizer=None,
        projector_config: dict | ProjectorConfig | None = None,
        max_residues: int = ESM2_MAX_RESIDUES,
        overflow: OverflowPolicy = "error",
        protein_token: str = PROTEIN_TOKEN,
        chat_template: str | None = None,
        **kwargs,
    ):
        if tokenizer is None:
            raise ValueError("ProteinLLMProcessor needs the decoder's tokenizer")
        if overflow not in ("error", "truncate"):
            raise ValueError(f"overflow must be 'error' or 'truncate', got {overflow!r}")
        if max_residues < 1:
            raise ValueError(f"max_residues must be >= 1, got {max_residues}")
        if isinstance(projector_config, ProjectorConfig):
            projector_config = projector_config.to_diff_dict()
        self.projector_config = dict(projector_config or {})
        self._projector = ProjectorConfig(**{k: v for k, v in self.projector_config.items() if k != "model_type"})
        self.max_residues = max_residues
        self.overflow = overflow
        self.protein_token = protein_token
        if protein_token not in tokenizer.get_vocab():
            tokenizer.add_tokens([AddedToken(protein_token, special=True, normalized=False)], special_tokens=True)
        self.protein_token_id = tokenizer.convert_tokens_to_ids(protein_token)
        alphabet = esm2_alphabet()
        self._esm_index = alphabet.tok_to_idx
        self._esm_cls, self._esm_eos, self._esm_pad = alphabet.cls_idx, alphabet.eos_idx, alphabet.padding_idx
        super().__init__(tokenizer, chat_template=chat_template)

    # --- the counting rule, shared with the model
    def num_protein_tokens(self, length: int) -> int:
        return num_protein_tokens(length, self._projector)

    # --- validation: this processor's limit and overflow policy
    def check_sequence(self, sequence: str, record: str | None = None, warn: bool = True) -> CheckedSequence:
        """`sequences.check_sequence` under this processor's `max_residues` and `overflow`: the residues the
        encoder will read. A bad protein raises `ProteinSequenceError` (its `reason` says why)."""
        return check_sequence(sequence, self.max_residues, self.overflow, record, warn=warn)

    # --- text → (text with placeholders, proteins)
    def expand_proteins(
        self, text: str, proteins: Sequence[str] | None = None, record: str | None = None
    ) -> tuple[str, list[str]]:
        """Replace each protein in `text` by its placeholder run; return the new text and the residues.

        Inline `<seq> ... </seq>` spans are read in order. With `proteins`, the text must instead hold exactly
        one `<protein>` marker per listed protein (inline spans may not be mixed with an explicit list).
        """
        spans = find_seq_spans(text, record)
        if proteins is None:
            if self.protein_token in text:
                raise ProteinSequenceError(
                    SequenceReason.BAD_MARKUP,
                    f"{self.protein_token!r} appears literally in the text of {record or 'a sample'}; "
                    f"give its sequence through proteins=[...] or write it as <seq> ... </seq>"
                )
            pieces, residues_list, cursor = [], [], 0
            for index, span in enumerate(spans):
                where = f"{record}, protein {index + 1}" if record else f"protein {index + 1}"
                residues = self.check_sequence(span.inner, where).residues
                pieces += [text[cursor : span.start], self.protein_token * self.num_protein_tokens(len(residues))]
                residues_list.append(residues)
                cursor = span.end
            pieces.append(text[cursor:])
            return "".join(pieces), residues_list
        if spans:
            raise ProteinSequenceError(
                SequenceReason.BAD_MARKUP,
                f"{record or 'a sample'} mixes inline <seq> spans with an explicit proteins list; use one form"
            )
        parts = text.split(self.protein_token)
        if len(parts) - 1 != len(proteins):
            raise ProteinSequenceError(
                SequenceReason.BAD_MARKUP,
                f"{record or 'a sample'} has {len(parts) - 1} {self.protein_token} markers but {len(proteins)} proteins"
            )
        residues_list = []
        for index, sequence in enumerate(proteins):
            where = f"{record}, protein {index + 1}" if record else f"protein {index + 1}"
            residues_list.append(self.check_sequence(sequence, where).residues)
        pieces = [parts[0]]
        for residues, part in zip(residues_list, parts[1:]):
            pieces += [self.protein_token * self.num_protein_tokens(len(residues)), part]
        return "".join(pieces), residues_list

    def encode_proteins(self, proteins: Sequence[str]) -> torch.Tensor:
        """ESM-2 token ids (N, longest + 2): `<cls>` residues `<eos>`, right-padded with `<pad>`."""
        longest = max((len(p) for p in proteins), default=0)
        tokens = torch.full((len(proteins), longest + 2), self._esm_pad, dtype=torch.long)
        for row, residues in enumerate(proteins):
            ids = [self._esm_cls, *(self._esm_index[r] for r in residues), self._esm_eos]
            tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return tokens

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        proteins: Sequence[Sequence[str]] | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        padding_side: str = "left",
        add_special_tokens: bool = True,
        **tokenizer_kwargs,
    ) -> BatchFeature:
        """Tokenize a batch. Returns `input_ids`, `attention_mask` and, if any sample has a protein,
        `protein_input_ids` (all proteins of the batch, in order of appearance).

        Left padding by default so that batched `generate` works; training collators pad for themselves.
        """
        if text is None:
            raise ValueError("ProteinLLMProcessor needs text=")
        texts = [text] if isinstance(text, str) else list(text)
        if proteins is not None and len(proteins) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(proteins)} protein lists")
        expanded, all_residues = [], []
        for index, sample in enumerate(texts):
            sample_proteins = None if proteins is None else proteins[index]
            sample_text, residues = self.expand_proteins(sample, sample_proteins, record=f"sample {index}")
            expanded.append(sample_text)
            all_residues.extend(residues)
        encoding = self.tokenizer(
            expanded,
            padding=padding,
            padding_side=padding_side,
            add_special_tokens=add_special_tokens,
            return_tensors=return_tensors,
            **tokenizer_kwargs,
        )
        self.check_placeholder_counts(encoding["input_ids"], expanded)
        data = dict(encoding)
        if all_residues:
            protein_input_ids = self.encode_proteins(all_residues)
            data["protein_input_ids"] = protein_input_ids if return_tensors == "pt" else protein_input_ids.tolist()
        return BatchFeature(data=data, tensor_type=None)

    def check_placeholder_counts(self, input_ids, expanded_texts: list[str]) -> None:
        """Raise ValueError where the token ids hold another number of placeholders than their text.

        A fault of the tokenizer, never of the input (a literal placeholder in the input is refused before,
        as bad_markup), so a caller reports it as its own error, not the client's."""
        # A tokenizer that splits "<protein>" or merges it with neighbours would silently misalign proteins.
        for index, (ids, sample) in enumerate(zip(input_ids, expanded_texts)):
            ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
            found, expected = ids.count(self.protein_token_id), sample.count(self.protein_token)
            if found != expected:
                raise ValueError(
                    f"sample {index}: the tokenizer produced {found} {self.protein_token} tokens where the text "
                    f"holds {expected}; the tokenizer must keep {self.protein_token} as one special token"
                )

    # --- chat
    def render_message_content(self, content) -> str:
        """A message's content as text: strings pass through; parts {"type": "text"|"protein"} are joined."""
        if isinstance(content, str):
            return content
        pieces = []
        for part in content:
            kind = part.get("type")
            if kind == "text":
                pieces.append(part["text"])
            elif kind == "protein":
                pieces.append(format_sequence(normalize_sequence(part["sequence"])))
            else:
                raise ValueError(f"unknown message part type {kind!r}; expected 'text' or 'protein'")
        return "".join(pieces)

    def apply_chat_template(self, conversation, add_generation_prompt: bool = False, tokenize: bool = False, chat_template: str | None = None, **kwargs):
        """Render messages through the decoder's chat template (or `chat_template`), proteins included.

        Content may be a string with `<seq> ... </seq>` spans or a list of {"type": "text", "text"} /
        {"type": "protein", "sequence"} parts. With `tokenize=True` the result goes through `__call__`.
        """
        conversations = [conversation] if conversation and isinstance(conversation[0], dict) else list(conversation)
        rendered = []
        for messages in conversations:
            plain = [{**m, "content": self.render_message_content(m["content"])} for m in messages]
            rendered.append(
                self.tokenizer.apply_chat_template(
                    plain,
                    add_generation_prompt=add_generation_prompt,
                    tokenize=False,
                    chat_template=chat_template or self.chat_template,
                )
            )
        if tokenize:
            # The template already placed any BOS token.
            return self(text=rendered, add_special_tokens=False, **kwargs)
        return rendered[0] if conversation and isinstance(conversation[0], dict) else rendered

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "protein_input_ids"]
