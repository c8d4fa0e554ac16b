"""The OpenAI-compatible API: request schemas, and completions turned into OpenAI's response shapes.

`/v1/completions` follows the legacy completions schema closely enough for lm-evaluation-harness's
`local-completions` (log-likelihood through `echo` + `logprobs`, generation through `stop`), and
`/v1/chat/completions` the chat schema (string content with `<seq>` spans, or parts
`{"type": "text"}` / `{"type": "protein", "sequence": ...}`), streamed as server-sent events on request.
Parameters the server cannot honour (n > 1, penalties, logit_bias, tools, ...) are refused with 422,
never ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from .engine import Completion, TokenLogprobs
from .prompts import PreparedPrompt

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16  # OpenAI takes 4; lm-eval generation tasks can send more
MAX_SEED = 2**63 - 1

Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Stop = StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP_STRINGS)] | None


class _Request(BaseModel):
    # Unknown fields are ignored (clients send extras such as `user`); known unsupported ones are checked.
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: Stop = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None

    def unsupported(self) -> list[str]:
        """Fields set to something this server cannot do."""
        problems = []
        if self.n != 1:
            problems.append(f"n={self.n} (this server returns one choice per prompt)")
        if self.presence_penalty or self.frequency_penalty:
            problems.append("presence_penalty / frequency_penalty (not implemented)")
        if self.logit_bias:
            problems.append("logit_bias (not implemented)")
        return problems

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not stop for stop in stops):
            raise ValueError("stop strings must not be empty")
        return tuple(stops)


PromptIds = Annotated[list[StrictInt], Field(min_length=1)]


class CompletionRequest(_Request):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1)] | PromptIds | Annotated[list[PromptIds], Field(min_length=1)]
    max_tokens: int = 16
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    stream: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a list: texts, or token-id lists."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    def unsupported(self) -> list[str]:
        problems = super().unsupported()
        if self.stream:
            problems.append("stream=true on /v1/completions (use /v1/chat/completions to stream)")
        if self.best_of not in (None, 1):
            problems.append(f"best_of={self.best_of}")
        if self.suffix:
            problems.append("suffix (no insertion mode)")
        return problems


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ProteinPart(BaseModel):
    type: Literal["protein"]
    sequence: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: StrictStr | Annotated[list[Annotated[TextPart | ProteinPart, Field(discriminator="type")]], Field(min_length=1)]

    def as_template_message(self) -> dict:
        content = self.content if isinstance(self.content, str) else [part.model_dump() for part in self.content]
        return {"role": self.role, "content": content}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: list | None = None
    response_format: dict | None = None

    def unsupported(self) -> list[str]:
        problems = super().unsupported()
        if self.tools:
            problems.append("tools (no function calling)")
        if self.response_format and self.response_format.get("type", "text") != "text":
            problems.append("response_format other than text")
        return problems


# --- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, prompt: PreparedPrompt, completion: Completion, tokenizer, echo: bool, logprobs: int | None) -> dict:
    """One `choices[]` entry of /v1/completions. With echo, text and logprobs start with the prompt, in the
    tokens the client sent: a token inside (or against) a protein span has null logprob and top_logprobs,
    since the model saw placeholders there, not that token."""
    prompt_text = prompt.client_text if echo else ""
    choice = {"index": index, "text": prompt_text + completion.text, "logprobs": None, "finish_reason": completion.finish_reason}
    if logprobs is None:
        return choice
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    if echo:
        for position, (token, offset, model_position) in enumerate(zip(prompt.client_ids, prompt.client_offsets, prompt.positions)):
            tokens.append(_token_text(tokenizer, token))
            offsets.append(offset)
            entry = None if model_position is None or position == 0 else completion.prompt_logprobs[model_position]
            token_logprobs.append(None if entry is None else entry.logprob)
            top_logprobs.append(None if entry is None else _top_by_text(tokenizer, entry))
    cursor = len(prompt_text)
    for entry in completion.logprobs or []:
        piece = _token_text(tokenizer, entry.token_id)
        tokens.append(piece)
        offsets.append(cursor)
        cursor += len(piece)
        token_logprobs.append(entry.logprob)
        top_logprobs.append(_top_by_text(tokenizer, entry))
    choice["logprobs"] = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}
    return choice


def chat_logprobs(completion: Completion, tokenizer) -> dict | None:
    if completion.logprobs is None:
        return None
    content = []
    for entry in completion.logprobs:
        piece = _token_text(tokenizer, entry.token_id)
        top = [
            {"token": _token_text(tokenizer, token), "logprob": logprob, "bytes": list(_token_text(tokenizer, token).encode())}
            for token, logprob in entry.top.items()
        ]
        content.append({"token": piece, "logprob": entry.logprob, "bytes": list(piece.encode()), "top_logprobs": top})
    return {"content": content}


def completion_response(model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_response(model: str, completion: Completion, prompt_tokens: int, tokenizer) -> dict:
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": completion.text},
                "logprobs": chat_logprobs(completion, tokenizer),
                "finish_reason": completion.finish_reason,
            }
        ],
        "usage": usage(prompt_tokens, len(completion.token_ids)),
    }


def chat_chunk(
    chunk_id: str,
    created: int,
    model: str,
    delta: dict | None,
    finish_reason: str | None = None,
    usage_: dict | None = None,
    logprobs: dict | None = None,
) -> str:
    """One server-sent event of a streamed chat completion."""
    body = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model}
    body["choices"] = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]
    if usage_ is not None:
        body["usage"] = usage_
    return f"data: {json.dumps(body)}\n\n"


def models_response(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "protein_llava"}]}


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _top_by_text(tokenizer, entry: TokenLogprobs) -> dict[str, float]:
    top: dict[str, float] = {}
    for token, logprob in entry.top.items():
        text = _token_text(tokenizer, token)
        top[text] = max(logprob, top.get(text, float("-inf")))
    return top
