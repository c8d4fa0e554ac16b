"""The model worker's echo scoring: prompts that share a context (lm-eval's one request per option) run it
once, and every row's log-probabilities equal the same prompt scored alone."""

import torch

from protein_llava.inference.serving.engine import MIN_SHARED_PROMPT_PREFIX, Job, _prompt_logprobs, _shared_prefix_groups
from protein_llava.inference.serving.prompts import prepare_text_prompt

INSTRUCTION = "Answer the multiple-choice question about the protein below with the number of the right option. "
CONTEXT_A = INSTRUCTION + "Which residue is most common in a protein rich in lysine? 1. alanine 2. lysine 3. serine. Answer:"
CONTEXT_B = INSTRUCTION + "Where does a protein with a KDEL motif at its end stay? 1. nucleus 2. membrane. Answer:"
WITH_PROTEIN = "Here is a protein from a soil bacterium that we sequenced last week: <seq> M K T A Y I A K Q R Q I S F V K </seq> is it an enzyme? Reply yes or no:"


def echo_job(processor, text: str) -> Job:
    return Job(prepare_text_prompt(processor, text, "prompt"), max_new_tokens=1, echo_logprobs=True, logprobs=2)


def test_prompts_with_a_common_context_run_it_once_and_score_as_alone(tiny_answerer):
    processor = tiny_answerer.processor
    texts = [
        *(CONTEXT_A + f" {n}" for n in (1, 2, 3)),
        *(CONTEXT_B + f" {n}" for n in (1, 2)),
        *(WITH_PROTEIN + answer for answer in (" yes", " no")),
        "Hello",
    ]
    jobs = [echo_job(processor, text) for text in texts]

    groups = dict((tuple(rows), shared) for shared, rows in _shared_prefix_groups(jobs, processor.protein_token_id))
    ids = [job.prompt.input_ids for job in jobs]
    context_a, context_b = len(ids[0]) - 1, len(ids[3]) - 1  # each option here is one token after its context
    assert all(ids[row][:context_a] == ids[0][:context_a] for row in (1, 2)) and ids[0][:context_a] != ids[3][:context_a]
    # Each item's options share their whole context, not just the instruction every item starts with.
    assert groups[(0, 1, 2)] == context_a and groups[(3, 4)] == context_b
    assert groups[(5, 6)] == ids[5].index(processor.protein_token_id) >= MIN_SHARED_PROMPT_PREFIX  # stops before the protein
    assert groups[(7,)] == 0  # nothing to share: the plain forward

    with torch.inference_mode():
        batched, batched_next = _prompt_logprobs(tiny_answerer, jobs)
        for row, job in enumerate(jobs):
            alone, alone_next = _prompt_logprobs(tiny_answerer, [job])  # one row: one plain forward
            torch.testing.assert_close(batched_next[row], alone_next[0], rtol=1e-4, atol=1e-5)
            assert len(batched[row]) == len(alone[0]) == job.prompt.num_tokens
            for position, (grouped, single) in enumerate(zip(batched[row], alone[0])):
                if single is None:  # the first token, and placeholder positions
                    assert grouped is None, (row, position)
                    continue
                assert grouped.token_id == single.token_id
                assert abs(grouped.logprob - single.logprob) < 1e-5, (row, position)
                assert grouped.top.keys() == single.top.keys(), (row, position)
