"""Bounded work on a live server: the queue refuses with 503 at once, deadlines answer 504 and free the slot,
a client that goes away cancels its work, and a cancelled row stops generating at the next token."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from live_server import MODEL_NAME, live_server

from protein_llava.inference.serving import ServerLimits, create_app
from protein_llava.inference.serving.engine import Engine, Job, form_batches, run_batch
from protein_llava.inference.serving.prompts import PreparedPrompt, prepare_text_prompt

ANSWER = {"sequences": ["MKTAYIAKQR"], "question": "ok?", "max_new_tokens": 2}


def serve(loaded, **limits):
    return live_server(create_app(loaded, ServerLimits(**limits), model_name=MODEL_NAME))


def stats(client) -> dict:
    return client.get("/health").json()["batching"]


def test_a_full_queue_answers_503_with_retry_after(tiny_answerer):
    with serve(tiny_answerer, max_queued=2, max_wait_ms=800, max_new_tokens=4) as url, httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
        too_many = client.post("/v1/answer", json={**ANSWER, "sequences": ["MKT"] * 3})
        assert too_many.status_code == 503 and too_many.headers["retry-after"] == "1"
        assert too_many.json()["reason"] == "queue_full"
        # Five one-prompt requests inside one 800 ms gathering window: two fit, three are refused at once.
        started = time.monotonic()
        with ThreadPoolExecutor(5) as pool:
            codes = sorted(pool.map(lambda _: client.post("/v1/answer", json=ANSWER).status_code, range(5)))
        assert codes == [200, 200, 503, 503, 503]
        assert time.monotonic() - started < 10
        assert client.post("/v1/answer", json=ANSWER).status_code == 200  # the slots were freed


def test_past_the_deadline_is_504_and_the_job_is_dropped(tiny_answerer):
    with serve(tiny_answerer, request_timeout_s=0.2, max_wait_ms=1500, max_new_tokens=4) as url, httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
        response = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2})
        assert response.status_code == 504 and response.json()["reason"] == "deadline"
        deadline = time.monotonic() + 10
        while stats(client)["cancelled"] < 1:
            assert time.monotonic() < deadline, stats(client)
            time.sleep(0.1)
        assert client.get("/health").json()["waiting"] == 0


def test_a_client_that_disconnects_cancels_its_work(tiny_answerer):
    with serve(tiny_answerer, max_wait_ms=2500, max_new_tokens=4) as url, httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
        with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=url, timeout=0.3, trust_env=False) as impatient:
            impatient.post("/v1/answer", json=ANSWER)
        deadline = time.monotonic() + 15
        while stats(client)["cancelled"] < 1:
            assert time.monotonic() < deadline, stats(client)
            time.sleep(0.2)
        assert stats(client)["prompts"] == 0  # it never reached the model


def test_a_cancelled_row_stops_at_the_next_token_and_spares_the_others(tiny_answerer):
    processor = tiny_answerer.processor
    prompts = [prepare_text_prompt(processor, text, "p") for text in ("abc", "xyz")]
    reference = run_batch(tiny_answerer, [Job(prompt, 12) for prompt in prompts])
    seen = []
    jobs = [Job(prompts[0], 12), Job(prompts[1], 12)]

    def cancel_after_two(token):
        seen.append(token)
        if len(seen) == 2:
            jobs[0].cancel()

    jobs[0].stream = cancel_after_two
    completions = run_batch(tiny_answerer, jobs)
    assert len(completions[0].token_ids) <= 3  # of 12 allowed
    assert completions[1].token_ids == reference[1].token_ids  # the other row is untouched
    assert len(reference[0].token_ids) == 12  # uncancelled, the row runs to its limit
    assert completions[0].finish_reason == "cancelled"


def test_batches_group_similar_lengths(tiny_answerer):
    processor = tiny_answerer.processor
    lengths = [5, 6, 7, 400, 6]
    jobs = [Job(prepare_text_prompt(processor, "a" * n, "p"), 4) for n in lengths]
    batches = form_batches(jobs, max_padding=2.0)
    long_batch = next(batch for batch in batches if jobs[3] in batch)
    assert long_batch == [jobs[3]]  # the long prompt does not pad the short ones to its length
    assert sum(len(batch) for batch in batches) == len(jobs)


def test_one_failing_prompt_does_not_fail_its_batch(tiny_answerer):
    """A batch that raises is retried job by job: only the broken job fails, the other is answered."""
    processor = tiny_answerer.processor
    good = prepare_text_prompt(processor, "abc", "p")
    # Placeholders without their protein: the model refuses this prompt (counts differ).
    broken = PreparedPrompt(input_ids=[*good.input_ids, processor.protein_token_id], proteins=[])
    expected = run_batch(tiny_answerer, [Job(good, 3)])[0]

    async def main():
        engine = Engine(tiny_answerer, max_batch_size=4, max_wait_s=0.2, max_queued=8)
        engine.start()
        try:
            futures = engine.submit([Job(good, 3), Job(broken, 3)])
            return await asyncio.gather(*futures, return_exceptions=True), engine.stats
        finally:
            await engine.stop()

    (answered, failed), engine_stats = asyncio.run(main())
    assert answered.token_ids == expected.token_ids
    assert isinstance(failed, ValueError) and "placeholder" in str(failed)
    assert engine_stats.failed_batches >= 1 and engine_stats.largest_batch == 2


def test_a_short_answer_does_not_wait_inside_a_long_one(tiny_answerer):
    processor = tiny_answerer.processor
    prompt = prepare_text_prompt(processor, "abc", "p")
    short, other_short, long = Job(prompt, 4), Job(prompt, 6), Job(prompt, 400)
    batches = form_batches([long, short, other_short], max_padding=2.0)
    assert batches == [[short, other_short], [long]]  # the cheap batch runs first, without the long row


def test_a_stream_whose_client_hangs_up_stops_generating(tiny_answerer):
    body = {"messages": [{"role": "user", "content": "hi <seq> M K T </seq>"}], "max_tokens": 3000, "stream": True, "temperature": 0}
    with serve(tiny_answerer, max_new_tokens=3000, max_wait_ms=0) as url, httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
        started = time.monotonic()
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if '"content": "' in line and '"role"' not in line:
                    break  # the first generated text: now the client goes away
        deadline = time.monotonic() + 30
        while stats(client)["cancelled"] < 1:
            assert time.monotonic() < deadline, stats(client)
            time.sleep(0.1)
        # The row stopped long before 3000 tokens: the server is free again at once.
        assert client.post("/v1/answer", json=ANSWER).status_code == 200
        assert time.monotonic() - started < 30


def test_a_stream_refused_by_a_full_queue_is_a_real_503(tiny_answerer):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
    with serve(tiny_answerer, max_queued=1, max_wait_ms=4000, max_new_tokens=4) as url, httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.post, "/v1/answer", json=ANSWER)
            # Until the first prompt waits in its 4 s gathering window (asked, not assumed after a fixed sleep:
            # on a loaded machine the request took longer than 0.4 s to reach the queue).
            deadline = time.monotonic() + 3
            while client.get("/health").json()["waiting"] < 1:
                assert time.monotonic() < deadline, "the first prompt never reached the queue"
                time.sleep(0.02)
            refused = client.post("/v1/chat/completions", json=body)
            assert first.result().status_code == 200
        assert refused.status_code == 503 and refused.json()["reason"] == "queue_full"
