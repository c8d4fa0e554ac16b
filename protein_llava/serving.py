"""The HTTP server of `protein-llava serve`: FastAPI on uvicorn, with concurrent requests batched together.

`POST /v1/answer` takes `{"sequences": [...], "question": "..." | "template": "function", "max_new_tokens": 64}`
and returns `{"answers": [...]}`, one per sequence. Each sequence becomes one prompt on an asyncio queue; a
single worker gathers prompts for up to `max_wait_ms` (or until `max_batch_size`) and runs one greedy
`generate` per batch in a worker thread, so a batched answer equals the answer the prompt gets alone.
`GET /health` answers 200 with the batching counters while the worker runs.

Rejections are JSON `{"reason": CODE, "detail": MESSAGE}`: 413 for an oversized body, 422 for everything
else a client can fix (invalid residue, too many or too long sequences, max_new_tokens out of range).
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import asdict, dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from .predict import TEMPLATES, Answerer, user_message
from .sequences import ProteinSequenceError, normalize_sequence


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 1 << 20
    """Largest request body in bytes; a bigger one is refused with 413 before it is parsed."""
    max_sequences: int = 32
    """Most sequences one request may carry."""
    max_new_tokens: int = 512
    """Largest `max_new_tokens` a request may ask for."""
    max_batch_size: int = 16
    """Most prompts (from any number of requests) one `generate` call takes."""
    max_wait_ms: float = 10.0
    """How long the worker waits for more prompts after the first one of a batch arrives."""

    def __post_init__(self):
        for name in ("max_body_bytes", "max_sequences", "max_new_tokens", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")


class RequestRejected(HTTPException):
    """A request the server refuses, with a reason code for clients to branch on."""

    def __init__(self, status_code: int, reason: str, detail: str):
        super().__init__(status_code=status_code, detail=detail)
        self.reason = reason


class AnswerRequest(BaseModel):
    sequences: list[str]
    question: str | None = None
    template: str | None = None
    max_new_tokens: int = 64


class AnswerResponse(BaseModel):
    answers: list[str]


# --- batching


@dataclass
class BatchStats:
    """Counters shown by /health: how much batching actually happened."""

    batches: int = 0
    prompts: int = 0
    largest_batch: int = 0
    largest_batch_requests: int = 0
    failed_batches: int = 0


@dataclass
class _Pending:
    prompt: str
    max_new_tokens: int
    request_id: int
    future: asyncio.Future = field(repr=False)


class AnswerBatcher:
    """An asyncio queue of prompts and the one worker task that answers them a batch at a time."""

    def __init__(self, answerer: Answerer, max_batch_size: int, max_wait_s: float):
        self.answerer = answerer
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        self._request_ids = itertools.count()

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run(), name="answer-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass

    async def submit(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Queue one request's prompts and wait for their answers (in order)."""
        if not self.running:
            raise RequestRejected(503, "not_ready", "the batching worker is not running")
        loop = asyncio.get_running_loop()
        request_id = next(self._request_ids)
        pending = [_Pending(prompt, max_new_tokens, request_id, loop.create_future()) for prompt in prompts]
        for item in pending:
            self._queue.put_nowait(item)
        return list(await asyncio.gather(*(item.future for item in pending)))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch_size:
                remaining = deadline - loop.time()
                try:
                    item = self._queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self._queue.get(), remaining)
                except (asyncio.QueueEmpty, TimeoutError):
                    break
                batch.append(item)
            batch = [item for item in batch if not item.future.done()]  # drop prompts of disconnected clients
            if batch:
                await self._answer(batch)

    async def _answer(self, batch: list[_Pending]) -> None:
        self.stats.batches += 1
        self.stats.prompts += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        self.stats.largest_batch_requests = max(self.stats.largest_batch_requests, len({p.request_id for p in batch}))
        try:
            answers = await asyncio.to_thread(
                self.answerer.answer, [p.prompt for p in batch], [p.max_new_tokens for p in batch]
            )
        except Exception as error:  # noqa: BLE001 - retried prompt by prompt so one failure costs only itself
            self.stats.failed_batches += 1
            if len(batch) == 1:
                _resolve(batch[0].future, error=error)
                return
            for item in batch:
                await self._answer([item])
            return
        for item, answer in zip(batch, answers):
            _resolve(item.future, answer)


def _resolve(future: asyncio.Future, answer: str | None = None, error: Exception | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(answer)


# --- request checks


def prepare_prompts(body: AnswerRequest, answerer: Answerer, limits: ServerLimits) -> list[str]:
    """The request's prompts, or `RequestRejected` (422) naming what is wrong and where."""
    if not body.sequences:
        raise RequestRejected(422, "no_sequences", "'sequences' is empty; send at least one protein sequence")
    if len(body.sequences) > limits.max_sequences:
        raise RequestRejected(
            422, "too_many_sequences", f"{len(body.sequences)} sequences; this server takes at most {limits.max_sequences} per request"
        )
    if not 1 <= body.max_new_tokens <= limits.max_new_tokens:
        raise RequestRejected(
            422, "max_new_tokens", f"max_new_tokens must be between 1 and {limits.max_new_tokens}, got {body.max_new_tokens}"
        )
    question = _question(body)
    processor = answerer.processor
    prompts = []
    for index, sequence in enumerate(body.sequences):
        where = f"sequences[{index}]"
        if not "".join(sequence.split()):
            raise RequestRejected(422, "empty_sequence", f"{where} is empty")
        try:
            residues = normalize_sequence(sequence, where)
        except ProteinSequenceError as error:
            raise RequestRejected(422, "invalid_residue", str(error)) from error
        if len(residues) > processor.max_residues:
            if processor.overflow == "error":
                raise RequestRejected(
                    422,
                    "too_long",
                    f"{where} has {len(residues)} residues, over the encoder's limit of {processor.max_residues}",
                )
            residues = residues[: processor.max_residues]
        prompts.append(answerer.render([{"role": "user", "content": user_message(question, residues)}]))
    return prompts


def _question(body: AnswerRequest) -> str:
    if (body.question is None) == (body.template is None):
        raise RequestRejected(422, "question", "give exactly one of 'question' (text) or 'template' (a name)")
    if body.template is not None:
        if body.template not in TEMPLATES:
            raise RequestRejected(422, "template", f"unknown template {body.template!r}; choose one of {sorted(TEMPLATES)}")
        return TEMPLATES[body.template]
    if not body.question.strip():
        raise RequestRejected(422, "question", "'question' is empty")
    return body.question


# --- the app


class BodySizeLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` with 413, by Content-Length or as streamed."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = _rejection(RequestRejected(413, "body_too_large", self._message(int(declared))))
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI re-raises HTTPExceptions from body reading; the app's handler answers 413.
                    raise RequestRejected(413, "body_too_large", self._message(received))
            return message

        await self.app(scope, limited_receive, send)

    def _message(self, size: int) -> str:
        return f"request body of {size} bytes is over this server's limit of {self.max_bytes} bytes"


def _rejection(error: RequestRejected) -> JSONResponse:
    return JSONResponse({"reason": error.reason, "detail": error.detail}, status_code=error.status_code)


def create_app(answerer: Answerer, limits: ServerLimits | None = None, model_name: str = "protein_llava") -> FastAPI:
    """The FastAPI app around a loaded `Answerer`; the batching worker runs for the app's lifespan."""
    from contextlib import asynccontextmanager

    limits = limits or ServerLimits()
    batcher = AnswerBatcher(answerer, limits.max_batch_size, limits.max_wait_ms / 1000)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="protein_llava", summary="Answers questions about protein sequences.", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.limits = limits
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)

    @app.exception_handler(RequestRejected)
    async def rejected(request: Request, error: RequestRejected):
        return _rejection(error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        return JSONResponse({"reason": "invalid_request", "detail": problems}, status_code=422)

    @app.get("/health")
    async def health():
        body = {"status": "ok" if batcher.running else "worker stopped", "model": model_name, "batching": asdict(batcher.stats)}
        return JSONResponse(body, status_code=200 if batcher.running else 503)

    @app.post("/v1/answer", response_model=AnswerResponse)
    async def answer(body: AnswerRequest) -> AnswerResponse:
        prompts = prepare_prompts(body, answerer, limits)
        return AnswerResponse(answers=await batcher.submit(prompts, body.max_new_tokens))

    return app
