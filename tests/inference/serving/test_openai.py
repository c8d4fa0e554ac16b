"""The OpenAI API on a live server: logprobs equal a direct forward, chat equals /v1/answer, streaming equals
non-streaming, the `openai` client works against it, and the API key is enforced."""

import copy
import json

import httpx
import openai
import pytest
import torch
from live_server import MODEL_NAME, TEST_LIMITS, live_server

from protein_llava.data.prompts import user_message
from protein_llava.inference.serving import create_app

PROTEIN = "MKTAYIAKQRQISFVK"
QUESTION = "What is the function of this protein?"


def direct_logprobs(loaded, input_ids, proteins=()):
    """log P(token i | tokens < i) for i >= 1, by one plain forward of the model."""
    ids = torch.tensor([input_ids])
    extra = {"protein_input_ids": loaded.processor.encode_proteins(list(proteins))} if proteins else {}
    with torch.inference_mode():
        logits = loaded.model(input_ids=ids, **extra).logits[0].float()
    logp = logits.log_softmax(-1)
    placeholder = loaded.processor.protein_token_id
    return [None if input_ids[i] == placeholder else float(logp[i - 1, input_ids[i]]) for i in range(1, len(input_ids))]


def test_models_lists_the_served_model(client):
    body = client.get("/v1/models").json()
    assert [model["id"] for model in body["data"]] == [MODEL_NAME]
    assert body["object"] == "list"


def test_echo_logprobs_equal_a_direct_forward(server, client):
    _, loaded = server
    text = "The quick brown fox"
    response = client.post("/v1/completions", json={"prompt": text, "max_tokens": 1, "echo": True, "logprobs": 2, "temperature": 0})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    logprobs = choice["logprobs"]
    ids = loaded.processor.tokenizer(text)["input_ids"]
    assert len(logprobs["tokens"]) == len(ids) + 1  # the prompt, then the one generated token
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1 : len(ids)] == pytest.approx(direct_logprobs(loaded, ids), abs=1e-5)
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert choice["text"].startswith(text)
    assert logprobs["text_offset"] == [sum(len(t) for t in logprobs["tokens"][:i]) for i in range(len(logprobs["tokens"]))]
    for value, top in zip(logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:]):
        assert len(top) <= 2 and max(top.values()) >= value - 1e-6
    # The generated token is the greedy one: its logprob is the best of its position.
    assert logprobs["token_logprobs"][-1] == pytest.approx(max(logprobs["top_logprobs"][-1].values()))
    # ... and the very token `generate` picks for the same prompt without echo.
    plain = client.post("/v1/completions", json={"prompt": text, "max_tokens": 1, "temperature": 0}).json()
    assert choice["text"] == text + plain["choices"][0]["text"]


def test_logprobs_after_a_protein_are_exact_and_inside_are_null(server, client):
    _, loaded = server
    processor = loaded.processor
    text = f"Protein: <seq> {' '.join(PROTEIN)} </seq> is an enzyme"
    ids = processor.tokenizer(text)["input_ids"]
    response = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert response.status_code == 200, response.text
    logprobs = response.json()["choices"][0]["logprobs"]
    assert len(logprobs["token_logprobs"]) == len(ids)
    # The model's own input for this text, through the processor (as eval.py builds it).
    expanded, proteins = processor.expand_proteins(text)
    model_ids = processor.tokenizer(expanded)["input_ids"]
    expected = direct_logprobs(loaded, model_ids, proteins)
    tail = len(processor.tokenizer(" is an enzyme", add_special_tokens=False)["input_ids"])
    assert logprobs["token_logprobs"][-tail:] == pytest.approx(expected[-tail:], abs=1e-5)
    span = text.index("<seq>"), text.index("</seq>") + len("</seq>")
    for offset, value in zip(logprobs["text_offset"], logprobs["token_logprobs"]):
        if span[0] <= offset < span[1]:
            assert value is None  # the model saw placeholders here, not this token


def test_text_and_token_prompts_give_the_same_answer(server, client):
    _, loaded = server
    text = f"Describe <seq> {' '.join(PROTEIN)} </seq> please:"
    ids = loaded.processor.tokenizer(text)["input_ids"]
    payload = {"max_tokens": 6, "temperature": 0, "logprobs": 1}
    by_text = client.post("/v1/completions", json={"prompt": text, **payload}).json()
    by_ids = client.post("/v1/completions", json={"prompt": [ids, ids], **payload}).json()
    assert [c["text"] for c in by_ids["choices"]] == [by_text["choices"][0]["text"]] * 2
    assert by_ids["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(by_text["choices"][0]["logprobs"]["token_logprobs"], abs=1e-5)
    assert by_ids["usage"]["prompt_tokens"] == 2 * by_text["usage"]["prompt_tokens"]


def test_max_tokens_stop_and_finish_reason(client):
    free = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 8, "temperature": 0}).json()
    long = free["choices"][0]
    # The tiny model (seed 0) runs to the limit here; the stop-string cut below needs that.
    assert long["finish_reason"] == "length" and free["usage"]["completion_tokens"] == 8
    assert len(long["text"]) > 2, long["text"]
    stop = long["text"][1:3]
    cut = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 8, "temperature": 0, "stop": [stop]}).json()
    choice = cut["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == long["text"][: long["text"].find(stop)]
    assert cut["usage"]["completion_tokens"] < 8


def test_seeded_sampling_is_repeatable(client):
    def sample(seed):
        payload = {"prompt": "abc", "max_tokens": 12, "temperature": 1.0, "seed": seed}
        return client.post("/v1/completions", json=payload).json()["choices"][0]["text"]

    first = sample(1)
    assert sample(1) == first
    assert len({first, sample(2), sample(3)}) > 1


def test_chat_content_forms_agree_with_answer(server, client):
    _, loaded = server
    as_text = {"messages": [{"role": "user", "content": user_message(QUESTION, PROTEIN)}], "max_tokens": 6, "temperature": 0}
    parts = [{"type": "text", "text": QUESTION + "\nPresented here is a sequence of amino acids in a protein: "}, {"type": "protein", "sequence": PROTEIN}]
    as_parts = {"messages": [{"role": "user", "content": parts}], "max_tokens": 6, "temperature": 0}
    first = client.post("/v1/chat/completions", json=as_text).json()
    second = client.post("/v1/chat/completions", json=as_parts).json()
    answer = client.post("/v1/answer", json={"sequences": [PROTEIN], "question": QUESTION, "max_new_tokens": 6}).json()
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
    assert first["choices"][0]["message"]["content"].strip() == answer["answers"][0]
    prompt = loaded.render_chat([{"role": "user", "content": user_message(QUESTION, PROTEIN)}])
    assert first["usage"]["prompt_tokens"] == len(loaded.processor(text=prompt, add_special_tokens=False)["input_ids"][0])


def read_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_streamed_chat_equals_the_whole_answer(client):
    messages = [{"role": "user", "content": user_message(QUESTION, PROTEIN)}]
    whole = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 12, "temperature": 0}).json()
    payload = {"messages": messages, "max_tokens": 12, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=payload) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == [whole["choices"][0]["finish_reason"]]
    assert chunks[-1]["usage"] == whole["usage"]


def test_unsupported_parameters_are_refused_not_ignored(client):
    for extra in ({"n": 2}, {"presence_penalty": 0.5}, {"logit_bias": {"1": 5}}, {"stream": True}, {"best_of": 3}):
        response = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2, **extra})
        assert response.status_code == 422, extra
        assert response.json()["error"]["code"] == "unsupported"
    response = client.post("/v1/completions", json={"model": "another-model", "prompt": "abc"})
    assert response.status_code == 404 and response.json()["reason"] == "model_not_found"


@pytest.mark.parametrize(
    "body, reason",
    [
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "protein", "sequence": "MKJ"}]}]}, "invalid_residue"),
        ({"messages": [{"role": "user", "content": "x <seq> M K </seq> " + "a" * 3000}], "max_tokens": 16}, "prompt_too_long"),
        ({"messages": []}, "invalid_request"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "invalid_request"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "logprobs"),
    ],
)
def test_bad_chat_requests_are_422(client, body, reason):
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["reason"] == reason
    if reason == "invalid_residue":
        assert "invalid residue 'J' at position 3 in messages[0].content[1]" in response.json()["detail"]


def test_the_openai_client_works_against_the_server(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", http_client=httpx.Client(trust_env=False), max_retries=0)
    assert [model.id for model in client.models.list()] == [MODEL_NAME]
    completion = client.completions.create(model=MODEL_NAME, prompt="abc", max_tokens=4, temperature=0, echo=True, logprobs=1)
    assert completion.choices[0].text.startswith("abc")
    assert completion.choices[0].logprobs.token_logprobs[0] is None
    messages = [{"role": "user", "content": user_message(QUESTION, PROTEIN)}]
    chat = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0)
    streamed = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text == chat.choices[0].message.content
    assert chat.usage.completion_tokens >= 1
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "<seq> M K * </seq>"}])


def test_api_key_is_required_when_set(tiny_answerer):
    with live_server(create_app(tiny_answerer, TEST_LIMITS, model_name=MODEL_NAME, api_key="s3cret")) as url:
        with httpx.Client(base_url=url, trust_env=False, timeout=60) as client:
            assert client.get("/health").status_code == 200  # probes stay open
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                response = client.get("/v1/models", headers=headers)
                assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
            assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
            answer = client.post("/v1/answer", json={"sequences": [PROTEIN], "question": "?"})
            assert answer.status_code == 401
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", http_client=httpx.Client(trust_env=False), max_retries=0)
        assert sdk.completions.create(model=MODEL_NAME, prompt="abc", max_tokens=2).choices[0].text is not None


def test_streamed_text_with_a_stop_string_equals_the_whole_answer(client):
    messages = [{"role": "user", "content": user_message(QUESTION, PROTEIN)}]
    free = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 12, "temperature": 0}).json()
    text = free["choices"][0]["message"]["content"]
    assert len(text) >= 4, f"the tiny model's answer {text!r} is too short to cut with a stop string"
    stop = text[2:4]
    payload = {"messages": messages, "max_tokens": 12, "temperature": 0, "stop": [stop]}
    whole = client.post("/v1/chat/completions", json=payload).json()
    assert whole["choices"][0]["message"]["content"] == text[: text.find(stop)]
    assert whole["choices"][0]["finish_reason"] == "stop"
    with client.stream("POST", "/v1/chat/completions", json={**payload, "stream": True}) as response:
        events = read_events(response)
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-1] if c["choices"])
    assert streamed == whole["choices"][0]["message"]["content"]


def test_streaming_holds_back_what_may_become_a_stop_string():
    from protein_llava.inference.serving.app import _streamable

    assert _streamable("hello wor", ("world",)) == "hello "
    assert _streamable("hello world and more", ("world",)) == "hello "
    assert _streamable("abc\ufffd", ()) == "abc"
    assert _streamable("abc", ("x", "bcd")) == "a"


def stopping_at(loaded, token: int):
    """The same model with `token` as its only stop token (a stand-in for an end-of-turn the model predicts)."""
    stopping = copy.copy(loaded)
    stopping.stop_token_ids = [token]
    return stopping


def test_a_generated_stop_token_stays_in_the_echoed_logprobs(server, client):
    """lm-eval's log-likelihood request (echo, max_tokens=1) takes the reply as prompt + one generated token
    and drops the last: the generated token must be there even when it is a stop token."""
    _, loaded = server
    ids = loaded.processor.tokenizer("The quick brown fox")["input_ids"]
    (greedy,) = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": 0}).json()[
        "choices"
    ][0]["logprobs"]["tokens"]
    token = loaded.processor.tokenizer.convert_tokens_to_ids(loaded.processor.tokenizer.tokenize(greedy))[0]
    with live_server(create_app(stopping_at(loaded, token), TEST_LIMITS, model_name=MODEL_NAME)) as url:
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as stopping_client:
            body = {"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
            choice = stopping_client.post("/v1/completions", json=body).json()["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["finish_reason"] == "stop"
    assert len(logprobs["tokens"]) == len(ids) + 1  # the prompt, then the stop token it generated
    assert logprobs["tokens"][-1] == greedy
    direct = direct_logprobs(loaded, ids + [token])
    assert logprobs["token_logprobs"][1:] == pytest.approx(direct, abs=1e-5)
    assert choice["text"] == "".join(logprobs["tokens"][:-1])  # the text leaves the stop token out


def greedy_ids(loaded, text: str, add_special_tokens: bool, count: int) -> list[int]:
    """The model's first `count` greedy tokens after `text`, by `generate` outside the server."""
    inputs = loaded.processor(text=text, add_special_tokens=add_special_tokens)
    with torch.inference_mode():
        output = loaded.model.generate(**inputs, max_new_tokens=count, do_sample=False, **loaded.generation_options())
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def test_a_stop_in_the_middle_keeps_the_tokens_up_to_it(server, client):
    """max_tokens > 1 with a stop token, then a stop string, mid-answer: logprobs, usage and finish_reason
    cover the generated tokens up to the one that ended generation; the text stops before it. Chat and
    streamed chat give the same logprobs."""
    _, loaded = server
    tokenizer = loaded.processor.tokenizer
    payload = {"prompt": "abc", "max_tokens": 8, "temperature": 0, "logprobs": 0}
    free = client.post("/v1/completions", json=payload).json()["choices"][0]["logprobs"]
    free_ids = greedy_ids(loaded, text="abc", add_special_tokens=True, count=8)
    assert [tokenizer.decode([t]) for t in free_ids] == free["tokens"]
    at = next(i for i in range(2, len(free_ids)) if free_ids[i] not in free_ids[:i])
    messages = [{"role": "user", "content": user_message(QUESTION, PROTEIN)}]
    chat_payload = {"messages": messages, "max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    free_chat = client.post("/v1/chat/completions", json=chat_payload).json()["choices"][0]["logprobs"]["content"]
    chat_ids = greedy_ids(loaded, text=loaded.render_chat(messages), add_special_tokens=False, count=len(free_chat))
    assert [tokenizer.decode([t]) for t in chat_ids] == [entry["token"] for entry in free_chat]
    chat_at = next(i for i in range(1, len(chat_ids)) if chat_ids[i] not in chat_ids[:i])

    with live_server(create_app(stopping_at(loaded, free_ids[at]), TEST_LIMITS, model_name=MODEL_NAME)) as url:
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as stopping_client:
            cut = stopping_client.post("/v1/completions", json=payload).json()
    choice = cut["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["logprobs"]["tokens"] == free["tokens"][: at + 1]
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(free["token_logprobs"][: at + 1], abs=1e-5)
    assert choice["text"] == "".join(free["tokens"][:at])
    assert cut["usage"]["completion_tokens"] == at + 1

    # A stop string that the third token completes: that token is the last one reported.
    stop = free["tokens"][2]
    assert stop and stop not in "".join(free["tokens"][:2]) + free["tokens"][2][:-1], "the stop string must first appear in the third token"
    by_string = client.post("/v1/completions", json={**payload, "stop": [stop]}).json()["choices"][0]
    assert by_string["finish_reason"] == "stop"
    assert by_string["logprobs"]["tokens"] == free["tokens"][:3]
    assert by_string["text"] == "".join(free["tokens"][:2])

    with live_server(create_app(stopping_at(loaded, chat_ids[chat_at]), TEST_LIMITS, model_name=MODEL_NAME)) as url:
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as stopping_client:
            whole = stopping_client.post("/v1/chat/completions", json=chat_payload).json()
            with stopping_client.stream("POST", "/v1/chat/completions", json={**chat_payload, "stream": True}) as response:
                events = read_events(response)
    content = whole["choices"][0]["logprobs"]["content"]
    assert whole["choices"][0]["finish_reason"] == "stop"
    assert [entry["token"] for entry in content] == [entry["token"] for entry in free_chat[: chat_at + 1]]
    assert [entry["logprob"] for entry in content] == pytest.approx([entry["logprob"] for entry in free_chat[: chat_at + 1]], abs=1e-5)
    assert whole["choices"][0]["message"]["content"] == "".join(entry["token"] for entry in free_chat[:chat_at])
    chunks = [event for event in events[:-1] if event["choices"]]
    streamed = [entry for chunk in chunks for entry in ((chunk["choices"][0]["logprobs"] or {}).get("content") or [])]
    assert streamed == content
    assert "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks) == whole["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["stop"]


def test_a_vanishing_temperature_decodes_greedily(client):
    """2.7e-207 (what the fuzz test found) made logits / temperature overflow to inf and sampling fail with a
    500; under GREEDY_BELOW a temperature is greedy, as 0 is."""
    from protein_llava.inference.serving.engine import Sampling
    from protein_llava.loading import GREEDY_BELOW

    assert Sampling(temperature=2.7e-207).greedy and Sampling(temperature=GREEDY_BELOW / 2).greedy
    assert not Sampling(temperature=GREEDY_BELOW).greedy
    greedy = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 6, "temperature": 0}).json()
    for temperature in (2.7e-207, 1e-9):
        response = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 6, "temperature": temperature})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == greedy["choices"][0]["text"]
