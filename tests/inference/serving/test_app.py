"""/v1/answer and /health on a live server: batched answers equal single ones; 413 and 422."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sample_proteins import P1, P2

from protein_llava.data.prompts import TEMPLATES, user_message

SEQUENCES = [P1.replace(" ", ""), P2.replace(" ", ""), "MKTAYIAKQR", "MSIPSSQYGFVFNK"]
QUESTION = "What is the function of this protein?"


def ask(client, sequences, **fields) -> httpx.Response:
    return client.post("/v1/answer", json={"sequences": sequences, "question": QUESTION, "max_new_tokens": 6, **fields})


def test_health(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_concurrent_requests_are_batched_and_answer_as_alone(server, client):
    _, loaded = server
    single = []
    for sequence in SEQUENCES:
        response = ask(client, [sequence])
        assert response.status_code == 200, response.text
        single.append(response.json()["answers"][0])
    # The server's answers are `LoadedModel.answer`'s own, one prompt at a time.
    prompt = loaded.render_chat([{"role": "user", "content": user_message(QUESTION, SEQUENCES[0])}])
    assert single[0] == loaded.answer([prompt], 6)[0]

    with ThreadPoolExecutor(len(SEQUENCES)) as pool:
        responses = list(pool.map(lambda s: ask(client, [s]), SEQUENCES))
    assert [r.status_code for r in responses] == [200] * len(SEQUENCES)
    assert [r.json()["answers"][0] for r in responses] == single
    batching = client.get("/health").json()["batching"]
    assert batching["largest_batch_requests"] > 1, batching

    # One request with several sequences (and a smaller token limit): one answer each, in order.
    response = ask(client, SEQUENCES, max_new_tokens=3)
    shorter = [loaded.answer([loaded.render_chat([{"role": "user", "content": user_message(QUESTION, s)}])], 3)[0] for s in SEQUENCES]
    assert response.json() == {"answers": shorter}


def test_template_instead_of_question(server, client):
    _, loaded = server
    response = client.post("/v1/answer", json={"sequences": ["MKTAYIAKQR"], "template": "function", "max_new_tokens": 4})
    prompt = loaded.render_chat([{"role": "user", "content": user_message(TEMPLATES["function"], "MKTAYIAKQR")}])
    assert response.json() == {"answers": [loaded.answer([prompt], 4)[0]]}


def test_oversized_body_is_413(client):
    response = ask(client, ["M" * 5000])
    assert response.status_code == 413
    assert response.json()["reason"] == "body_too_large"
    assert "limit of 4096 bytes" in response.json()["detail"]


def test_streamed_oversized_body_is_413(client):
    body = json.dumps({"sequences": ["M" * 5000], "question": QUESTION}).encode()
    # A generator body is sent chunked, without Content-Length: the limit is counted as it streams.
    response = client.post("/v1/answer", content=iter([body[:2000], body[2000:]]), headers={"content-type": "application/json"})
    assert response.status_code == 413


@pytest.mark.parametrize(
    ("fields", "reason", "detail"),
    [
        ({"sequences": ["MKTAYJAK"]}, "invalid_residue", "invalid residue 'J' at position 6 in sequences[0]"),
        ({"sequences": ["MKT", "MK*"]}, "invalid_residue", "invalid residue '*' at position 3 in sequences[1]"),
        ({"sequences": ["M" * 1023]}, "too_long_protein", "protein of 1023 residues in sequences[0] is longer than the encoder's limit of 1022"),
        ({"sequences": ["MKT"] * 9}, "too_many_sequences", "at most 8"),
        ({"sequences": []}, "no_sequences", "empty"),
        ({"sequences": ["  "]}, "empty_sequence", "empty protein sequence in sequences[0]"),
        ({"sequences": ["MKT"], "max_new_tokens": 17}, "max_new_tokens", "between 1 and 16"),
        ({"sequences": ["MKT"], "template": "function"}, "question", "exactly one of"),
        ({"sequences": "MKT"}, "invalid_request", "body.sequences"),
    ],
)
def test_bad_requests_are_422_with_the_reason(client, fields, reason, detail):
    response = client.post("/v1/answer", json={"question": QUESTION, "max_new_tokens": 4, **fields})
    assert response.status_code == 422
    assert response.json()["reason"] == reason
    assert detail in response.json()["detail"]
