"""The browser demo of `protein-llava demo`: a Gradio chat about one protein, answers streamed as generated.

`build_app(loaded)` returns the `gradio.Blocks` app; `protein-llava demo --model FOLDER` launches it on
127.0.0.1, and a Hugging Face Space's `app.py` does the same with a downloaded folder (see the README).
The protein box takes raw residues or FASTA; it is checked by `predict.check_records`, the check
`protein-llava predict` runs, so a bad residue or an over-long protein gets the CLI's message. The first
question carries the protein in ProteinLMDataset's form, later turns only their question, and the history
(`chat.chat_messages`, as in `protein-llava chat`) goes through the chat template each turn.

Generation runs in a worker thread feeding a `TextIteratorStreamer`; Stop sets an event that a stopping
criterion reads, so the partial answer stays in the chat and in the history. Event handlers queue one at a
time (Gradio's default concurrency of 1), so the one model is never asked two things at once.
"""

import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from ..data.prompts import TEMPLATES
from ..loading import GREEDY_BELOW, LoadedModel
from .chat import chat_messages
from .predict import FastaRecord, Query, check_records
from ..sequences import ProteinSequenceError, SequenceReason

RAW_ID = "query"  # the id a pasted sequence without a FASTA header gets, as `predict --sequence` gives it

# Real proteins to click (UniProt sequences); the two-record FASTA shows picking a record.
EXAMPLE_PROTEINS = (
    ("ubiquitin (human, 76 aa)", "MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDGRTLSDYNIQKESTLHLVLRLRGG"),
    ("melittin (honeybee venom, 26 aa)", "GIGAVLKVLTTGLPALISWIKRKRQQ"),
    (
        "insulin A and B chains (human, FASTA)",
        ">insulin_A human insulin A chain\nGIVEQCCTSICSLYQLENYCN\n"
        ">insulin_B human insulin B chain\nFVNQHLCGSHLVEALYLVCGERGFFYTPKT\n",
    ),
)


@dataclass(frozen=True)
class DemoSettings:
    max_new_tokens: int = 128
    """The answer-length slider's starting value."""
    max_new_tokens_limit: int = 512
    """The answer-length slider's largest value."""
    temperature: float = 0.0
    """The temperature slider's starting value; 0 decodes greedily (the answers `predict` gives)."""
    max_temperature: float = 2.0
    """The temperature slider's largest value."""
    title: str = "Protein LLaVA"
    """The page title and heading."""
    examples: tuple[tuple[str, str], ...] = field(default=EXAMPLE_PROTEINS)
    """(label, residues or FASTA) pairs shown as clickable examples."""

    def __post_init__(self):
        if self.max_new_tokens_limit < 1:
            raise ValueError(f"max_new_tokens_limit must be >= 1, got {self.max_new_tokens_limit}")
        if not 1 <= self.max_new_tokens <= self.max_new_tokens_limit:
            raise ValueError(
                f"max_new_tokens must be in 1..max_new_tokens_limit ({self.max_new_tokens_limit}), got {self.max_new_tokens}"
            )
        if self.max_temperature <= 0:
            raise ValueError(f"max_temperature must be > 0, got {self.max_temperature}")
        if not 0 <= self.temperature <= self.max_temperature:
            raise ValueError(f"temperature must be in 0..max_temperature ({self.max_temperature}), got {self.temperature}")


# --- the protein box


def read_protein_text(text: str) -> list[FastaRecord]:
    """The records of the protein box: FASTA when it starts with '>' (Biopython's parser), else one
    record `query` of raw residues. An empty box gives no records (questions go to the decoder alone)."""
    text = text.strip()
    if not text:
        return []
    if not text.startswith(">"):
        return [FastaRecord(RAW_ID, text)]
    from Bio import SeqIO

    try:
        return [FastaRecord(r.id, str(r.seq)) for r in SeqIO.parse(io.StringIO(text), "fasta")]
    except ValueError as error:
        raise ProteinSequenceError(SequenceReason.BAD_MARKUP, f"the text is not readable FASTA: {str(error).splitlines()[0]}") from error


def choose_protein(records: list[FastaRecord], record_id: str | None, max_residues: int, overflow: str) -> Query | None:
    """The record to talk about (`record_id`, or the first), checked as `protein-llava predict` checks it:
    a bad residue, an empty record or (overflow "error") an over-long protein raises ProteinSequenceError
    with predict's message; overflow "truncate" keeps the first `max_residues` residues."""
    if not records:
        return None
    chosen = records[0] if record_id is None else next((r for r in records if r.id == record_id), None)
    if chosen is None:
        raise ProteinSequenceError(SequenceReason.BAD_MARKUP, f"no record {record_id!r} in the FASTA text")
    queries, problems = check_records([chosen], max_residues, overflow)
    if problems:
        raise ProteinSequenceError(SequenceReason(problems[0].reason), problems[0].detail)
    return queries[0]


def describe_protein(query: Query | None, processor) -> str:
    """One line for the protein status: what will be asked about, in residues and protein tokens."""
    if query is None:
        return "No protein: questions go to the decoder alone."
    text = f"Record `{query.id}`: {len(query.residues)} residues → {processor.num_protein_tokens(len(query.residues))} protein tokens"
    if query.truncated:
        text += f" (truncated from {query.length}: residues {len(query.residues) + 1}-{query.length} are cut)"
    return text + "."


# --- the conversation


def message_text(message: dict) -> str:
    """A chat message's text: Gradio hands content back as a list of {"type": "text"} parts."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def model_messages(history: list[dict], residues: str | None, protein_token: str) -> list[dict]:
    """The chat shown in the browser → the messages the model reads, built as `ChatSession` builds them
    (`chat.chat_messages`)."""
    turns = [{"role": message["role"], "content": message_text(message)} for message in history]
    return chat_messages(turns, residues, protein_token)


# --- streamed generation


class _StopOnEvent(StoppingCriteria):
    """Ends generation once `event` is set; counts the tokens generated so far."""

    def __init__(self, event: threading.Event, prompt_length: int):
        self.event, self.prompt_length = event, prompt_length
        self.new_tokens, self.triggered = 0, False

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.new_tokens = input_ids.shape[1] - self.prompt_length
        self.triggered = self.triggered or self.event.is_set()
        return torch.full((input_ids.shape[0],), self.triggered, dtype=torch.bool, device=input_ids.device)


class AnswerStream:
    """One answer to a rendered prompt (its proteins as `LoadedModel.encode` takes them), generated in a worker
    thread; iterating yields the growing text.

    temperature 0 decodes greedily with the settings of `LoadedModel.answer`, so the final text equals its
    answer; above 0 it samples. `stop()` (or leaving the loop early) ends generation after the current token.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        prompt: str,
        max_new_tokens: int,
        temperature: float = 0.0,
        stop_event: threading.Event | None = None,
        proteins: list[list[str]] | None = None,
    ):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.loaded = loaded
        # The chat template already placed any BOS token.
        self.inputs = loaded.encode([prompt], add_special_tokens=False, proteins=proteins)
        self.prompt_tokens = int(self.inputs["input_ids"].shape[1])
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.stop_event = stop_event or threading.Event()
        self._criterion = _StopOnEvent(self.stop_event, self.prompt_tokens)
        self._streamer = TextIteratorStreamer(loaded.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._error: BaseException | None = None
        self.text = ""

    @property
    def new_tokens(self) -> int:
        return self._criterion.new_tokens

    @property
    def stopped(self) -> bool:
        """Whether `stop()` ended the answer before the model did."""
        return self._criterion.triggered

    def stop(self) -> None:
        self.stop_event.set()

    def _generate(self) -> None:
        loaded = self.loaded
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature >= GREEDY_BELOW else {"do_sample": False}
        try:
            with torch.inference_mode():
                loaded.model.generate(
                    **self.inputs,
                    max_new_tokens=self.max_new_tokens,
                    **loaded.generation_options(),
                    streamer=self._streamer,
                    stopping_criteria=StoppingCriteriaList([self._criterion]),
                    **sampling,
                )
        except BaseException as error:  # noqa: BLE001 - re-raised in the consuming thread
            self._error = error
            self._streamer.end()

    def __iter__(self) -> Iterator[str]:
        worker = threading.Thread(target=self._generate, name="demo-generate", daemon=True)
        worker.start()
        try:
            for piece in self._streamer:
                self.text += piece
                yield self.text
        finally:
            self.stop_event.set()  # a consumer that leaves early ends the generation too
            worker.join()
        if self._error is not None:
            raise self._error


# --- the app's behaviour, independent of the widgets


@dataclass(frozen=True)
class LoadedProtein:
    """The protein of the current conversation (None-valued for a conversation without one)."""

    query: Query | None


class ProteinChat:
    """The demo's event handlers as plain methods (the tests call them directly); `build_app` wires them."""

    def __init__(self, model: LoadedModel, settings: DemoSettings | None = None):
        self.model = model
        self.settings = settings or DemoSettings()
        # One stop flag per browser session, set by the Stop button while that session's answer streams.
        self._stops: dict[str, threading.Event] = {}
        self._stops_lock = threading.Lock()

    @property
    def processor(self):
        return self.model.processor

    def check_protein(self, text: str, record_id: str | None = None) -> tuple[list[str], Query | None]:
        """(record ids of the box, the chosen protein); ProteinSequenceError for what cannot be asked about."""
        records = read_protein_text(text)
        ids = [r.id for r in records]
        if record_id not in ids:
            record_id = None
        return ids, choose_protein(records, record_id, self.processor.max_residues, self.processor.overflow)

    def protein_status(self, text: str, record_id: str | None = None) -> tuple[list[str], str]:
        """(record ids, a status line) for the box as typed: the protein's size, or the error in CLI words."""
        try:
            ids, query = self.check_protein(text, record_id)
        except ProteinSequenceError as error:
            ids = []
            try:
                ids = [r.id for r in read_protein_text(text)]
            except ProteinSequenceError:
                pass
            return ids, f"**Error:** {error}"
        return ids, self._status_line(ids, query)

    def _status_line(self, ids: list[str], query: Query | None) -> str:
        prefix = f"{len(ids)} FASTA records; " if len(ids) > 1 else ""
        return prefix + describe_protein(query, self.processor)

    def _stop_flag(self, session: str) -> threading.Event:
        with self._stops_lock:
            event = self._stops[session] = threading.Event()
            return event

    def _drop_stop_flag(self, session: str, event: threading.Event) -> None:
        with self._stops_lock:
            if self._stops.get(session) is event:
                del self._stops[session]

    def stop(self, session: str = "local") -> None:
        """The Stop button: the session's streaming answer ends after its current token."""
        with self._stops_lock:
            event = self._stops.get(session)
        if event is not None:
            event.set()

    def respond(
        self,
        text: str,
        record_id: str | None,
        question: str,
        history: list[dict],
        loaded: LoadedProtein | None,
        max_new_tokens: int,
        temperature: float,
        session: str = "local",
    ) -> Iterator[tuple[list[dict], LoadedProtein | None, str, str, str, str]]:
        """One turn: check the protein, then stream the answer.

        Yields (history, loaded protein, protein status, question box, model-input summary, rendered prompt);
        None for the last two leaves the panel as it was. A protein other than the conversation's starts a new
        conversation; a bad protein or an empty question changes nothing but the status.
        """
        history = list(history or [])
        unchanged = (history, loaded)
        question = question.strip()
        if not question:
            yield history, loaded, "**Error:** the question is empty: type one or pick a template.", "", None, None
            return
        try:
            ids, query = self.check_protein(text, record_id)
        except ProteinSequenceError as error:
            yield history, loaded, f"**Error:** {error}", question, None, None
            return
        status = self._status_line(ids, query)
        if loaded is None or loaded.query != query:
            history, loaded = [], LoadedProtein(query)
        residues = query.residues if query is not None else None
        history = [*history, {"role": "user", "content": question}]
        messages = model_messages(history, residues, self.processor.protein_token)
        prompt = self.model.render_chat(messages)
        proteins = None if residues is None else [[residues]]
        stop_flag = self._stop_flag(session)
        try:
            stream = AnswerStream(self.model, prompt, int(max_new_tokens), float(temperature), stop_event=stop_flag, proteins=proteins)
        except ProteinSequenceError as error:  # markup in the question itself: the conversation stays as it was
            self._drop_stop_flag(session, stop_flag)
            yield *unchanged, f"**Error:** {error}", question, None, None
            return
        turn = sum(m["role"] == "user" for m in history)
        summary = self._summary(query, stream, turn, "generating…")
        yield [*history, {"role": "assistant", "content": ""}], loaded, status, "", summary, prompt
        answer = ""
        try:
            for answer in stream:
                yield [*history, {"role": "assistant", "content": answer}], loaded, status, "", summary, prompt
        finally:
            self._drop_stop_flag(session, stop_flag)
        if stream.stopped:
            ending = "stopped by the user"
        elif stream.new_tokens >= stream.max_new_tokens:
            ending = "reached max_new_tokens"
        else:
            ending = "ended its turn"
        history = [*history, {"role": "assistant", "content": answer.strip()}]
        yield history, loaded, status, "", self._summary(query, stream, turn, ending), prompt

    def _summary(self, query: Query | None, stream: AnswerStream, turn: int, ending: str) -> str:
        """The "what the model saw" panel: the protein as encoded, token counts, decoding."""
        if query is None:
            protein = "- protein: none (the decoder alone)"
        else:
            protein = f"- protein: record `{query.id}`, {len(query.residues)} residues"
            if query.truncated:
                protein += f" (truncated from {query.length})"
            protein += f" → {self.processor.num_protein_tokens(len(query.residues))} protein tokens"
        decoding = "greedy" if stream.temperature < GREEDY_BELOW else f"sampled at temperature {stream.temperature:g}"
        return "\n".join(
            [
                protein,
                f"- prompt: {stream.prompt_tokens} tokens, turn {turn} of the conversation",
                f"- answer: {stream.new_tokens} new tokens of at most {stream.max_new_tokens}, {decoding}; {ending}",
            ]
        )


# --- the Gradio app


def build_app(loaded: LoadedModel, settings: DemoSettings | None = None, model_name: str | None = None):
    """The Gradio Blocks app of the demo (not launched): `build_app(loaded).launch()`."""
    import gradio as gr

    chat = ProteinChat(loaded, settings)
    settings = chat.settings

    def session_of(request: gr.Request | None) -> str:
        return request.session_hash if request is not None and request.session_hash else "local"

    def on_protein_change(text, record_id):
        ids, status = chat.protein_status(text or "", record_id)
        chosen = record_id if record_id in ids else (ids[0] if ids else None)
        records = gr.update(choices=ids, value=chosen, visible=len(ids) > 1)
        # Another protein is another conversation (`protein-llava chat`'s /protein does the same).
        return records, status, [], None, "", ""

    def on_template(name):
        return TEMPLATES.get(name, "")

    def on_respond(text, record_id, question, history, loaded, max_new_tokens, temperature, request: gr.Request):
        turns = chat.respond(
            text or "", record_id, question or "", history, loaded, max_new_tokens, temperature, session_of(request)
        )
        for *values, seen_text, prompt_text in turns:
            yield *values, gr.skip() if seen_text is None else seen_text, gr.skip() if prompt_text is None else prompt_text

    def on_stop(request: gr.Request):
        chat.stop(session_of(request))

    def on_clear(request: gr.Request):
        chat.stop(session_of(request))
        return [], None, "", ""

    heading = f"# {settings.title}"
    if model_name:
        heading += f"\nModel: `{model_name}`"
    with gr.Blocks(title=settings.title, analytics_enabled=False) as app:
        gr.Markdown(
            heading + "\n\nPaste a protein (one-letter residues or FASTA), ask about it, and follow up: the "
            "protein stays in the conversation. Answers come from a research model; check them before use."
        )
        loaded = gr.State(None)
        with gr.Row():
            with gr.Column(scale=2):
                sequence = gr.Textbox(
                    label="Protein: residues or FASTA",
                    lines=6,
                    placeholder=">my_protein\nMKTAYIAKQRQISFVKSHFSRQ…",
                    elem_id="sequence",
                )
                record = gr.Dropdown(label="FASTA record", choices=[], visible=False, elem_id="record")
                status = gr.Markdown(describe_protein(None, chat.processor), elem_id="protein-status")
                gr.Examples(
                    examples=[[value] for _, value in settings.examples],
                    example_labels=[label for label, _ in settings.examples],
                    inputs=[sequence],
                    label="Example proteins",
                )
                template = gr.Dropdown(
                    label="Question template (from `protein-llava predict --template`)",
                    choices=list(TEMPLATES),
                    value=None,
                    elem_id="template",
                )
                max_new_tokens = gr.Slider(
                    1, settings.max_new_tokens_limit, value=settings.max_new_tokens, step=1,
                    label="max_new_tokens", elem_id="max-new-tokens",
                )
                temperature = gr.Slider(
                    0.0, settings.max_temperature, value=settings.temperature, step=0.05,
                    label="temperature (0: greedy)", elem_id="temperature",
                )
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Conversation", elem_id="chat", height=380, render_markdown=False, feedback_options=None)
                question = gr.Textbox(
                    label="Question (Enter asks)", lines=1, max_lines=6, placeholder="What does this protein do?", elem_id="question"
                )
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    clear = gr.Button("New conversation", elem_id="clear")
                with gr.Accordion("What the model saw", open=False, elem_id="model-input"):
                    seen = gr.Markdown(elem_id="seen")
                    prompt = gr.Code(label="Rendered prompt (each <seq> span becomes protein tokens)", language=None, elem_id="prompt")

        protein_outputs = [record, status, chatbot, loaded, seen, prompt]
        sequence.change(on_protein_change, [sequence, record], protein_outputs, queue=False)
        record.input(on_protein_change, [sequence, record], protein_outputs, queue=False)
        template.input(on_template, [template], [question], queue=False)
        answering = gr.on(
            [ask.click, question.submit],
            on_respond,
            [sequence, record, question, chatbot, loaded, max_new_tokens, temperature],
            [chatbot, loaded, status, question, seen, prompt],
        )
        stop.click(on_stop, None, None, queue=False)
        clear.click(on_clear, None, [chatbot, loaded, seen, prompt], queue=False, cancels=[answering])
    return app


def launch(app, host: str = "127.0.0.1", port: int = 7860, **options):
    """Serve the app (blocking unless `prevent_thread_lock=True`); 127.0.0.1 keeps it on this machine."""
    options.setdefault("show_error", True)  # a failed generation shows its message, not a bare "Error"
    return app.launch(server_name=host, server_port=port, footer_links=[], **options)
