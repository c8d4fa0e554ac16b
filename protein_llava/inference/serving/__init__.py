"""`protein-llava serve`: an HTTP server with the OpenAI API (completions, chat, models) and `/v1/answer`."""

from ..server_limits import ServerLimits
from .app import RequestRejected, create_app

__all__ = ["RequestRejected", "ServerLimits", "create_app"]
