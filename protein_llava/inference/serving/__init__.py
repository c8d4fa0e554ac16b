"""`protein-llava serve`: an HTTP server with the OpenAI API (completions, chat, models) and `/v1/answer`."""

from .app import RequestRejected, ServerLimits, create_app

__all__ = ["RequestRejected", "ServerLimits", "create_app"]
