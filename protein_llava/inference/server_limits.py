"""The limits of `protein-llava serve`, in a module of their own: the CLI builds its flags from them without
importing the server (FastAPI), which only `serve` itself needs."""

from __future__ import annotations

from dataclasses import dataclass, field


def _limit(default, help: str, flag: str | None = None):
    """A ServerLimits field with its `protein-llava serve` flag's help (and name, where it is not the field's)."""
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True)
class ServerLimits:
    """The server's limits; `protein-llava serve` derives one flag per field from here (name, type, default,
    help), so each default lives once."""

    max_body_bytes: int = _limit(1 << 20, "largest request body in bytes; a bigger one is refused with 413 before it is parsed")
    max_sequences: int = _limit(32, "most sequences (/v1/answer) or prompts (/v1/completions) one request may carry")
    max_new_tokens: int = _limit(512, "largest max_new_tokens / max_tokens a request may ask for", flag="--max-new-tokens-limit")
    max_prompt_tokens: int | None = _limit(
        None,
        "most model input tokens per prompt (text, history and protein placeholders together); none: the model's "
        "context length minus the request's max_tokens, which is checked in any case",
    )
    max_batch_size: int = _limit(16, "most prompts (from any number of requests) one generate call takes")
    max_wait_ms: float = _limit(10.0, "how long the worker waits for more prompts after the first one of a batch arrives")
    max_queued: int = _limit(64, "most prompts waiting or running at once; more are refused with 503 and Retry-After")
    request_timeout_s: float = _limit(300.0, "seconds before an unanswered request is cancelled and answered 504", flag="--request-timeout")

    def __post_init__(self):
        for name in ("max_body_bytes", "max_sequences", "max_new_tokens", "max_batch_size", "max_queued"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1 or None, got {self.max_prompt_tokens}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")


__all__ = ["ServerLimits"]
