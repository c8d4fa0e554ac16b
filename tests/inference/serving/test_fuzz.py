"""Fuzzing every endpoint over real HTTP: whatever a client sends, the answer is 2xx or 4xx with a reason,
never 5xx, and the server keeps answering valid requests afterwards."""

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
ODD_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=60) | st.sampled_from(
    ["<seq>", "</seq>", "<seq> M K J </seq>", "<seq> M K </seq><seq>", "<protein>", "\x00", "\ud7ff\ufffd", "M" * 1100]
)
TOKEN_IDS = st.lists(st.integers(min_value=-5, max_value=400), min_size=0, max_size=40)

VALID = {
    "/v1/completions": {"prompt": "abc", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi <seq> M K T </seq>"}], "max_tokens": 2},
    "/v1/answer": {"sequences": ["MKT"], "question": "ok?", "max_new_tokens": 2},
}
FIELDS = {
    "/v1/completions": {
        "prompt": ODD_TEXT | TOKEN_IDS | st.lists(TOKEN_IDS, max_size=3) | JSON,
        "max_tokens": st.integers(min_value=-3, max_value=2**64) | JSON,
        "temperature": st.floats() | JSON,
        "top_p": st.floats(),
        "logprobs": st.integers(min_value=-2, max_value=50) | JSON,
        "echo": st.booleans() | JSON,
        "stop": ODD_TEXT | st.lists(ODD_TEXT, max_size=6) | JSON,
        "seed": st.integers(min_value=-(2**65), max_value=2**65),
        "n": st.integers(min_value=-1, max_value=3),
    },
    "/v1/chat/completions": {
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "assistant", "system", "tool", ""]) | JSON,
                 "content": ODD_TEXT | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "protein", "image"]), "text": ODD_TEXT, "sequence": ODD_TEXT}), max_size=3) | JSON}
            ),
            max_size=4,
        )
        | JSON,
        "max_tokens": st.integers(min_value=-3, max_value=2**64) | JSON,
        "stream": st.booleans(),
        "top_logprobs": st.integers(min_value=-1, max_value=30),
        "logprobs": st.booleans() | JSON,
        "temperature": st.floats(),
    },
    "/v1/answer": {
        "sequences": st.lists(ODD_TEXT, max_size=10) | JSON,
        "question": ODD_TEXT | JSON,
        "template": st.sampled_from(["function", "nope"]) | JSON,
        "max_new_tokens": st.integers(min_value=-3, max_value=2**64) | JSON,
    },
}


def check(client, response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        body = response.json()
        assert body["reason"] and body["detail"], body
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        assert "[DONE]" in response.text and '"status": 5' not in response.text


def bodies(endpoint):
    mutated = st.fixed_dictionaries({}, optional=FIELDS[endpoint]).map(lambda fields: {**VALID[endpoint], **fields})
    return mutated | JSON


# The same 60 examples every run, so `make test` and CI are reproducible (a random search found the
# vanishing-temperature 500 once, now a regression test in test_openai.py); PROTEIN_LLAVA_FUZZ_EXPLORE=1
# draws new examples each run, for a wider search by hand.
SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=not os.environ.get("PROTEIN_LLAVA_FUZZ_EXPLORE"),
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.mark.parametrize("endpoint", list(VALID))
def test_structured_garbage_never_gets_a_5xx(client, endpoint):
    @SETTINGS
    @given(body=bodies(endpoint))
    def run(body):
        check(client, client.post(endpoint, content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"}))

    run()
    assert client.post(endpoint, json=VALID[endpoint]).status_code == 200
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("endpoint", list(VALID))
def test_malformed_bodies_never_get_a_5xx(client, endpoint):
    @SETTINGS
    @given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode), content_type=st.sampled_from(["application/json", "text/plain", ""]))
    def run(raw, content_type):
        check(client, client.post(endpoint, content=raw, headers={"content-type": content_type}))

    run()
    assert client.post(endpoint, json=VALID[endpoint]).status_code == 200


def test_odd_methods_and_paths_are_4xx(client):
    for method, path in [("GET", "/v1/completions"), ("DELETE", "/v1/models"), ("POST", "/v1/nothing"), ("PUT", "/health")]:
        assert 400 <= client.request(method, path).status_code < 500
