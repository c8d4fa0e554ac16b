"""Fixtures of the serving tests: the tiny model loaded (`load_protein_llm`), and a live server around it."""

import httpx
import pytest
import torch
from live_server import MODEL_NAME, TEST_LIMITS, live_server

from protein_llava.loading import load_protein_llm
from protein_llava.inference.serving import create_app


@pytest.fixture(scope="package")
def tiny_answerer(tiny_folder):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # width-64 matmuls: one thread is faster than OpenMP's split
    yield load_protein_llm(tiny_folder, device="cpu")
    torch.set_num_threads(before)


@pytest.fixture(scope="package")
def server(tiny_answerer):
    """(base url, loaded) of a live server; batches wait 300 ms so concurrent requests meet."""
    with live_server(create_app(tiny_answerer, TEST_LIMITS, model_name=MODEL_NAME)) as url:
        yield url, tiny_answerer


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server[0], timeout=60, trust_env=False) as client:
        yield client
