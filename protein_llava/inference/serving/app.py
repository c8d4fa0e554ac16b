"""The HTTP server of `protein-llava serve`: FastAPI on uvicorn, concurrent requests batched together.

Endpoints:
- `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`: the OpenAI API (`openai_api`).
- `POST /v1/answer`: `{"sequences": [...], "question": "..." | "template": "function", "max_new_tokens": 64}`
  → `{"answers": [...]}`, one greedy answer per sequence.
- `GET /health`: 200 with the batching counters while the worker runs.

Every request's work is bounded before any model work starts: prompt tokens (question, history and
protein placeholders together) against `max_prompt_tokens` and the model's context, a bounded queue
(503 + Retry-After when full), and a deadline (504; the job is cancelled and its slot freed, as it is
when a client disconnects). Rejections are JSON with a reason code:
`{"reason": CODE, "detail": MESSAGE, "error": {"message", "type", "code"}}` (the last in OpenAI's form).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from contextlib import asynccontextmanager
from dataclasses import asdict

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from ...data.prompts import TEMPLATES, marked_user_message
from ...sequences import ProteinSequenceError
from ...loading import GREEDY_BELOW, LoadedModel
from ..server_limits import ServerLimits
from . import openai_api as oai
from .engine import Completion, Engine, Job, JobCancelled, QueueFull, Sampling
from .prompts import (
    PreparedPrompt,
    PromptError,
    prepare_rendered_prompt,
    prepare_text_prompt,
    prepare_token_prompt,
)


class RequestRejected(HTTPException):
    """A request the server refuses, with a reason code for clients to branch on."""

    def __init__(self, status_code: int, reason: str, detail: str, headers: dict | None = None):
        super().__init__(status_code=status_code, detail=detail, headers=headers)
        self.reason = reason


_HTTP_REASONS = {400: "malformed_body", 404: "not_found", 405: "method_not_allowed"}


def _rejection(error: RequestRejected) -> JSONResponse:
    kind = "invalid_request_error" if error.status_code < 500 else "server_error"
    body = {"reason": error.reason, "detail": error.detail, "error": {"message": error.detail, "type": kind, "code": error.reason}}
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)


class AnswerRequest(BaseModel):
    sequences: list[str]
    question: str | None = None
    template: str | None = None
    max_new_tokens: int = 64


class AnswerResponse(BaseModel):
    answers: list[str]


# --- request checks


def prepare_answer_prompts(body: AnswerRequest, loaded: LoadedModel, limits: ServerLimits) -> list[PreparedPrompt]:
    """The request's prompts, or `RequestRejected` (422) naming what is wrong and where."""
    if not body.sequences:
        raise RequestRejected(422, "no_sequences", "'sequences' is empty; send at least one protein sequence")
    if len(body.sequences) > limits.max_sequences:
        raise RequestRejected(
            422, "too_many_sequences", f"{len(body.sequences)} sequences; this server takes at most {limits.max_sequences} per request"
        )
    _check_max_tokens(body.max_new_tokens, limits, "max_new_tokens", minimum=1)
    question = _question(body)
    processor = loaded.processor
    # One prompt for every sequence: each one's checked residues go to the processor as data behind the
    # marker, not as text to parse again.
    rendered = loaded.render_chat([{"role": "user", "content": marked_user_message(question, processor.protein_token)}])
    prompts = []
    for index, sequence in enumerate(body.sequences):
        where = f"sequences[{index}]"
        try:
            residues = processor.check_sequence(sequence, where, warn=False).residues
        except ProteinSequenceError as error:
            raise RequestRejected(422, str(error.reason), str(error)) from error
        prompts.append(_prepared(prepare_rendered_prompt, processor, rendered, where, proteins=[residues]))
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


def _check_max_tokens(value: int, limits: ServerLimits, name: str, minimum: int) -> None:
    if not minimum <= value <= limits.max_new_tokens:
        raise RequestRejected(422, name, f"{name} must be between {minimum} and {limits.max_new_tokens}, got {value}")


def _prepared(prepare, processor, prompt, where: str, **options) -> PreparedPrompt:
    try:
        return prepare(processor, prompt, where, **options)
    except PromptError as error:
        raise RequestRejected(422, error.reason, str(error)) from error
    except ProteinSequenceError as error:
        raise RequestRejected(422, str(error.reason), str(error)) from error


class TokenBudget:
    """Prompt tokens + new tokens against the server's limit and the model's context length."""

    def __init__(self, limits: ServerLimits, context_length: int | None):
        self.max_prompt_tokens = limits.max_prompt_tokens
        self.context_length = context_length

    def check(self, prompt: PreparedPrompt, max_new_tokens: int, where: str) -> None:
        tokens = prompt.num_tokens
        if self.max_prompt_tokens is not None and tokens > self.max_prompt_tokens:
            raise RequestRejected(
                422,
                "prompt_too_long",
                f"{where} is {tokens} tokens (text, history and protein tokens together); this server takes at most "
                f"{self.max_prompt_tokens}",
            )
        if self.context_length is not None and tokens + max_new_tokens > self.context_length:
            raise RequestRejected(
                422,
                "prompt_too_long",
                f"{where} is {tokens} tokens and asks for {max_new_tokens} new ones: {tokens + max_new_tokens} is over "
                f"the model's context of {self.context_length} tokens",
            )


def context_length(model) -> int | None:
    """The decoder's context length from its config, when it states one."""
    text_config = model.config.get_text_config()
    return getattr(text_config, "max_position_embeddings", None)


def default_sampling(generation_config) -> Sampling:
    """What an unset temperature / top_p means: the model's generation config (greedy unless it samples)."""
    if not generation_config.do_sample:
        return Sampling()
    return Sampling(temperature=generation_config.temperature or 1.0, top_p=generation_config.top_p or 1.0)


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


class BearerAuth:
    """ASGI middleware: every /v1/ request must carry `Authorization: Bearer <api key>`, else 401.
    /health stays open so a supervisor can probe the server without the key."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = RequestRejected(401, "unauthorized", "missing or wrong API key (send Authorization: Bearer <key>)", {"WWW-Authenticate": "Bearer"})
                return await _rejection(error)(scope, receive, send)
        await self.app(scope, receive, send)


async def await_completions(request: Request, engine: Engine, jobs: list[Job], timeout_s: float) -> list[Completion]:
    """Queue the jobs and wait for them; 503 when the queue is full, 504 past the deadline. A client that
    disconnects, or a deadline that passes, cancels the jobs (their rows stop at the next token)."""
    try:
        futures = engine.submit(jobs)
    except QueueFull as error:
        raise RequestRejected(503, "queue_full", f"{error}; retry shortly", {"Retry-After": "1"}) from error
    everything = asyncio.gather(*futures)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise RequestRejected(504, "deadline", f"no answer within this server's limit of {timeout_s:g} s; the request was cancelled")
            done, _ = await asyncio.wait({everything}, timeout=min(remaining, 0.5))
            if done:
                return everything.result()
            if await request.is_disconnected():
                raise RequestRejected(499, "client_disconnected", "the client went away")
    except JobCancelled as error:
        raise RequestRejected(504, "deadline", str(error)) from error
    finally:
        if not everything.done():
            for job in jobs:
                job.cancel()
            everything.cancel()
        elif not everything.cancelled() and everything.exception() is not None:
            everything.exception()  # retrieved, so asyncio does not log it again


def create_app(
    loaded: LoadedModel,
    limits: ServerLimits | None = None,
    model_name: str = "protein_llava",
    api_key: str | None = None,
) -> FastAPI:
    """The FastAPI app around a `LoadedModel`; the batching worker runs for the app's lifespan."""
    limits = limits or ServerLimits()
    engine = Engine(loaded, limits.max_batch_size, limits.max_wait_ms / 1000, limits.max_queued)
    budget = TokenBudget(limits, context_length(loaded.model))
    processor, tokenizer = loaded.processor, loaded.processor.tokenizer
    model_default = default_sampling(loaded.model.generation_config)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="protein_llava", summary="Answers questions about protein sequences.", lifespan=lifespan)
    app.state.engine = engine
    app.state.limits = limits
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)

    @app.exception_handler(RequestRejected)
    async def rejected(request: Request, error: RequestRejected):
        return _rejection(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        # Starlette's own refusals (unparsable body, unknown path, wrong method) in the same shape as ours.
        reason = _HTTP_REASONS.get(error.status_code, "http_error")
        return _rejection(RequestRejected(error.status_code, reason, str(error.detail), getattr(error, "headers", None)))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        return _rejection(RequestRejected(422, "invalid_request", problems))

    def check_model(requested: str | None) -> None:
        if requested is not None and requested != model_name:
            raise RequestRejected(404, "model_not_found", f"this server serves {model_name!r}, not {requested!r}")

    def sampling_of(body: oai._Request) -> Sampling:
        unsupported = body.unsupported()
        if unsupported:
            raise RequestRejected(422, "unsupported", "not supported by this server: " + "; ".join(unsupported))
        temperature = model_default.temperature if body.temperature is None else body.temperature
        top_p = model_default.top_p if body.top_p is None else body.top_p
        try:
            return Sampling(temperature=temperature, top_p=top_p, seed=body.seed if temperature >= GREEDY_BELOW else None)
        except ValueError as error:
            raise RequestRejected(422, "sampling", str(error)) from error

    def stop_strings(body: oai._Request) -> tuple[str, ...]:
        try:
            return body.stop_strings()
        except ValueError as error:
            raise RequestRejected(422, "stop", str(error)) from error

    @app.get("/health")
    async def health():
        body = {
            "status": "ok" if engine.running else "worker stopped",
            "model": model_name,
            "waiting": engine.waiting,
            "batching": asdict(engine.stats),
        }
        return JSONResponse(body, status_code=200 if engine.running else 503)

    @app.get("/v1/models")
    async def models():
        return oai.models_response(model_name, started)

    @app.post("/v1/answer", response_model=AnswerResponse)
    async def answer(body: AnswerRequest, request: Request) -> AnswerResponse:
        prompts = prepare_answer_prompts(body, loaded, limits)
        for index, prompt in enumerate(prompts):
            budget.check(prompt, body.max_new_tokens, f"sequences[{index}]")
        request_id = engine.new_request_id()
        jobs = [Job(prompt, body.max_new_tokens, request_id=request_id) for prompt in prompts]
        completions = await await_completions(request, engine, jobs, limits.request_timeout_s)
        return AnswerResponse(answers=[completion.text.strip() for completion in completions])

    @app.post("/v1/completions")
    async def completions(body: oai.CompletionRequest, request: Request):
        check_model(body.model)
        sampling, stop = sampling_of(body), stop_strings(body)
        _check_max_tokens(body.max_tokens, limits, "max_tokens", minimum=0 if body.echo else 1)
        raw_prompts = body.prompts()
        if len(raw_prompts) > limits.max_sequences:
            raise RequestRejected(
                422, "too_many_prompts", f"{len(raw_prompts)} prompts; this server takes at most {limits.max_sequences} per request"
            )
        prompts = []
        for index, raw in enumerate(raw_prompts):
            where = f"prompt[{index}]"
            if isinstance(raw, str):
                prompt = _prepared(prepare_text_prompt, processor, raw, where)
            else:
                prompt = _prepared(prepare_token_prompt, processor, raw, where)
            budget.check(prompt, body.max_tokens, where)
            prompts.append(prompt)
        request_id = engine.new_request_id()
        echo_logprobs = body.echo and body.logprobs is not None
        jobs = [
            Job(prompt, body.max_tokens, sampling, stop, body.logprobs, echo_logprobs, request_id=request_id)
            for prompt in prompts
        ]
        results = await await_completions(request, engine, jobs, limits.request_timeout_s)
        choices = [
            oai.completion_choice(index, prompt, result, tokenizer, body.echo, body.logprobs)
            for index, (prompt, result) in enumerate(zip(prompts, results))
        ]
        return oai.completion_response(
            model_name, choices, sum(p.num_tokens for p in prompts), sum(len(r.token_ids) for r in results)
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: oai.ChatCompletionRequest, request: Request):
        check_model(body.model)
        sampling, stop = sampling_of(body), stop_strings(body)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise RequestRejected(422, "max_tokens", "give max_tokens or max_completion_tokens, not both")
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = min(256, limits.max_new_tokens) if requested is None else requested
        _check_max_tokens(max_tokens, limits, "max_tokens", minimum=1)
        messages = [message.as_template_message() for message in body.messages]
        for index, message in enumerate(body.messages):
            for part_index, part in enumerate(message.content if isinstance(message.content, list) else []):
                if isinstance(part, oai.ProteinPart):
                    where = f"messages[{index}].content[{part_index}]"
                    try:
                        processor.check_sequence(part.sequence, where, warn=False)
                    except ProteinSequenceError as error:
                        raise RequestRejected(422, str(error.reason), str(error)) from error
        try:
            rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
        except ProteinSequenceError as error:
            raise RequestRejected(422, str(error.reason), str(error)) from error
        except Exception as error:  # a chat template rejects bad role orders with its own exception type
            raise RequestRejected(422, "invalid_messages", f"the chat template refused these messages: {error}") from error
        prompt = _prepared(prepare_rendered_prompt, processor, rendered, "messages")
        budget.check(prompt, max_tokens, "messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs is not None and not body.logprobs:
            raise RequestRejected(422, "logprobs", "top_logprobs needs logprobs=true")
        job = Job(prompt, max_tokens, sampling, stop, top, request_id=engine.new_request_id())
        if not body.stream:
            (result,) = await await_completions(request, engine, [job], limits.request_timeout_s)
            return oai.chat_response(model_name, result, prompt.num_tokens, tokenizer)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        job.stream = lambda token: loop.call_soon_threadsafe(tokens.put_nowait, token)
        try:
            (future,) = engine.submit([job])  # before the stream starts, so a full queue is a real 503
        except QueueFull as error:
            raise RequestRejected(503, "queue_full", f"{error}; retry shortly", {"Retry-After": "1"}) from error
        future.add_done_callback(lambda _: tokens.put_nowait(None))
        return StreamingResponse(
            _chat_events(job, future, tokens, model_name, tokenizer, limits.request_timeout_s, include_usage),
            media_type="text/event-stream",
        )

    return app


async def _chat_events(
    job: Job, future: asyncio.Future, tokens: asyncio.Queue, model: str, tokenizer, timeout_s: float, include_usage: bool
):
    """Server-sent events of one streamed chat completion: role, content deltas, finish, [DONE].

    `tokens` receives the job's token ids as they are generated, then None when the job is done. Text is
    held back while it could still turn into a stop string, or ends inside a character; the final text
    always equals the non-streamed answer.
    """
    loop = asyncio.get_running_loop()
    chunk_id, created = oai.new_id("chatcmpl"), int(time.time())
    deadline = loop.time() + timeout_s
    generated: list[int] = []
    emitted = ""
    try:
        yield oai.chat_chunk(chunk_id, created, model, {"role": "assistant", "content": ""})
        while True:
            try:
                token = await asyncio.wait_for(tokens.get(), timeout=max(deadline - loop.time(), 0))
            except TimeoutError:
                job.cancel()
                yield f"data: {_error_event(504, 'deadline', f'no answer within this server limit of {timeout_s:g} s')}\n\n"
                yield "data: [DONE]\n\n"
                return
            if token is None:
                break
            generated.append(token)
            text = tokenizer.decode(generated, skip_special_tokens=True)
            safe = _streamable(text, job.stop)
            if len(safe) > len(emitted) and safe.startswith(emitted):
                yield oai.chat_chunk(chunk_id, created, model, {"content": safe[len(emitted) :]})
                emitted = safe
        try:
            result = future.result()
        except Exception as error:  # noqa: BLE001 - the stream has started: report in-band
            reason = "deadline" if isinstance(error, JobCancelled) else "generation_error"
            yield f"data: {_error_event(504 if reason == 'deadline' else 500, reason, str(error))}\n\n"
            yield "data: [DONE]\n\n"
            return
        rest = result.text[len(emitted) :] if len(result.text) > len(emitted) and result.text.startswith(emitted) else ""
        if job.logprobs is not None:
            # Logprobs come from the scores `generate` returns at the end, so they travel in one last content
            # chunk, every generated token's (the stop token's included); clients concatenate chunks' lists.
            yield oai.chat_chunk(chunk_id, created, model, {"content": rest}, logprobs=oai.chat_logprobs(result, tokenizer))
        elif rest:
            yield oai.chat_chunk(chunk_id, created, model, {"content": rest})
        yield oai.chat_chunk(chunk_id, created, model, {}, result.finish_reason)
        if include_usage:
            yield oai.chat_chunk(chunk_id, created, model, None, usage_=oai.usage(job.prompt.num_tokens, len(result.token_ids)))
        yield "data: [DONE]\n\n"
    finally:
        if not future.done():
            job.cancel()  # the client went away (the generator was closed) or the deadline passed


def _streamable(text: str, stops: tuple[str, ...]) -> str:
    """The part of the text so far that can be sent: cut at a stop string, without a trailing piece that
    may still grow into one, and without a trailing half character."""
    for stop in stops:
        if stop in text:
            text = text[: text.find(stop)]
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    text = text[: len(text) - hold] if hold else text
    return text.rstrip("\ufffd")


def _error_event(status: int, reason: str, detail: str) -> str:
    return json.dumps({"error": {"message": detail, "type": "server_error" if status >= 500 else "invalid_request_error", "code": reason, "status": status}})
