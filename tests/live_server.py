"""A live server for tests: uvicorn on a free 127.0.0.1 port, in a thread, real HTTP."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from protein_llava.inference.serving import ServerLimits

MODEL_NAME = "tiny-protein-llava"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def live_server(app):
    """The app served on 127.0.0.1 until the block ends; yields its base url."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


TEST_LIMITS = ServerLimits(
    max_body_bytes=4096, max_sequences=8, max_new_tokens=16, max_prompt_tokens=1024, max_batch_size=8, max_wait_ms=300
)
