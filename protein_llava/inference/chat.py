"""A conversation about one protein: the history builder every chat shares (`chat_messages`: the CLI chat
and the web demo), `ChatSession` (the history, re-rendered each turn) and the terminal loop of
`protein-llava chat` (`run_chat`)."""

from __future__ import annotations

import sys

from ..data.prompts import marked_user_message
from ..loading import LoadedModel
from ..sequences import ProteinSequenceError, strip_markup

CHAT_COMMANDS = """commands: /protein SEQ (load another protein, new conversation), /reset (clear the conversation),
/help, /quit (or end of input). Anything else is a question about the loaded protein."""


def chat_messages(turns: list[dict], residues: str | None, protein_token: str) -> list[dict]:
    """A conversation's turns ({"role", "content"} with plain-text content) → the messages the model reads:
    the protein rides in the first user turn, as a training record puts it, behind the processor's marker
    (`protein_token`; its residues go to the processor as data: `proteins=[[residues]]`); replies lose
    protein markup, because the processor parses the whole history again and a reply must not read as one.

    The one history builder of `ChatSession` (the CLI chat) and the web demo."""
    messages = []
    for turn in turns:
        text = turn["content"]
        if turn["role"] == "user" and not messages and residues is not None:
            text = marked_user_message(text, protein_token)
        elif turn["role"] == "assistant":
            text = strip_markup(text, protein_token)
        messages.append({"role": turn["role"], "content": text})
    return messages


class ChatSession:
    """A conversation about one protein: the history is re-rendered through the chat template for every
    question (`chat_messages`). Loading another protein starts afresh."""

    def __init__(self, model: LoadedModel, max_new_tokens: int = 256):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.residues: str | None = None
        self.turns: list[dict] = []

    @property
    def messages(self) -> list[dict]:
        """The history as the model reads it."""
        return chat_messages(self.turns, self.residues, self.model.processor.protein_token)

    def load_protein(self, sequence: str) -> str:
        """Validate and load a protein (ProteinSequenceError names a bad residue); the history is cleared."""
        self.residues = self.model.processor.check_sequence(sequence, "the protein").residues
        self.turns = []
        return self.residues

    def reset(self) -> None:
        self.turns = []

    def ask(self, question: str) -> str:
        turns = [*self.turns, {"role": "user", "content": question}]
        prompt = self.model.render_chat(chat_messages(turns, self.residues, self.model.processor.protein_token))
        proteins = None if self.residues is None else [[self.residues]]
        answer = self.model.answer([prompt], self.max_new_tokens, proteins=proteins)[0]
        self.turns = [*turns, {"role": "assistant", "content": answer}]
        return answer


def run_chat(session: ChatSession, interactive: bool) -> None:
    """Questions from stdin, one per line, until end of input or /quit; answers on stdout, everything else
    (prompts, command replies, errors) on stderr so that piped answers stay clean."""
    if interactive:
        print(CHAT_COMMANDS, file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "").strip()
        except EOFError:
            break
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/help":
            print(CHAT_COMMANDS, file=sys.stderr)
        elif line == "/reset":
            session.reset()
            print("conversation cleared", file=sys.stderr)
        elif line == "/protein" or line.startswith("/protein "):
            try:
                residues = session.load_protein(line[len("/protein") :])
            except ProteinSequenceError as error:
                print(f"error: {error}; the previous protein stays loaded", file=sys.stderr)
                continue
            print(f"protein loaded: {len(residues)} residues; new conversation", file=sys.stderr)
        elif line.startswith("/"):
            print(f"unknown command {line.split()[0]!r}; {CHAT_COMMANDS}", file=sys.stderr)
        else:
            try:
                print(session.ask(line), flush=True)
            except ProteinSequenceError as error:  # markup in the question itself: say so, keep going
                print(f"error: {error}; load proteins with /protein SEQ", file=sys.stderr)


__all__ = ["CHAT_COMMANDS", "ChatSession", "chat_messages", "run_chat"]
