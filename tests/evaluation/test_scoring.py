"""Tests for protein_llava.evaluation.scoring: the cached loglik path equals the per-option reference, and
multi-token option numbers ("10") are scored as the number the model writes."""

from __future__ import annotations

import math

import pytest
import torch

from protein_llava.builders import build_tiny
from protein_llava.loading import LoadedModel
from protein_llava.evaluation.benchmarks import OFFICIAL_INSTRUCTION, official_prompt
from protein_llava.evaluation.scoring import (
    digit_token_mask,
    generate_answers,
    label_token_ids,
    score_options,
    score_options_reference,
    shared_prefix,
)

# The tiny model's byte-level tokenizer: 4 specials, then id = 4 + byte value.
SPACE, ZERO, ONE, TWO, COLON = 4 + ord(" "), 4 + ord("0"), 4 + ord("1"), 4 + ord("2"), 4 + ord(":")


def options(count: int) -> list[str]:
    return [f"option {n}: answer text {n}" for n in range(1, count + 1)]


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny(seed=0)
    return model, processor


@pytest.fixture(scope="module")
def arms(tiny):
    model, processor = tiny
    return {
        "multimodal": LoadedModel(model, processor.tokenizer, processor, name="model", source="tiny"),
        "text": LoadedModel(model.language_model, processor.tokenizer, None, name="baseline", source="tiny"),
    }


PROMPTS = [
    (official_prompt("Which fits <seq> M K T A Y I A K Q R </seq>?", options(10)), 10),
    (official_prompt("Short?", options(2)), 2),
    (official_prompt("A somewhat longer question with more words in it?", options(6)), 6),
    (official_prompt("Another protein <seq> G D S L </seq> here", options(4)), 4),
]


def test_label_ids_are_pinned_for_the_byte_tokenizer(tiny):
    tokenizer = tiny[1].tokenizer
    assert label_token_ids(tokenizer, 1) == [SPACE, ONE]
    assert label_token_ids(tokenizer, 10) == [SPACE, ONE, ZERO]  # a multi-token label
    mask = digit_token_mask(tokenizer, 260)
    assert mask.nonzero().flatten().tolist() == list(range(ZERO, ZERO + 10))


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("kind", ["multimodal", "text"])
def test_fast_scores_equal_per_option_reference(arms, kind, share_prefix):
    arm = arms[kind]
    texts, counts = [t for t, _ in PROMPTS], [k for _, k in PROMPTS]
    # batch_size 3: one padded batch of three different lengths, and one batch of one.
    fast = score_options(arm, texts, counts, batch_size=3, share_prefix=share_prefix)
    for text, count, scores in zip(texts, counts, fast):
        reference = score_options_reference(arm, text, count)
        assert len(scores) == count
        assert scores == pytest.approx(reference, abs=1e-4)


def test_eager_attention_takes_the_same_masks():
    model, processor = build_tiny(seed=0)
    model.set_attn_implementation("eager")
    arm = LoadedModel(model, processor.tokenizer, processor, name="model", source="tiny")
    assert arm.decoder_config._attn_implementation == "eager"
    texts, counts = [t for t, _ in PROMPTS], [k for _, k in PROMPTS]
    for text, count, scores in zip(texts, counts, score_options(arm, texts, counts, batch_size=4)):
        assert scores == pytest.approx(score_options_reference(arm, text, count), abs=1e-4)


def test_shared_prefix_is_the_instruction_and_stops_before_proteins(arms):
    arm = arms["multimodal"]
    texts = [t for t, _ in PROMPTS]
    prefix = shared_prefix(arm, [arm.encode(texts[:2], True), arm.encode(texts[2:], True)])
    # Byte-level: one token per byte of the instruction and "\n Question: \n"; the questions differ at once.
    assert prefix.length == len((OFFICIAL_INSTRUCTION + "\n Question: \n").encode())
    same_protein = ["Seq <seq> M K T </seq> first?", "Seq <seq> M K T </seq> second?"]
    assert shared_prefix(arm, [arm.encode(same_protein, True)]) is None  # "Seq " is under 8 tokens
    longer = ["A longer shared start: <seq> M K T </seq> a", "A longer shared start: <seq> M K T </seq> b"]
    assert shared_prefix(arm, [arm.encode(longer, True)]).length == len("A longer shared start: ")


def test_fast_scores_do_not_depend_on_batching(arms):
    arm = arms["multimodal"]
    texts, counts = [t for t, _ in PROMPTS], [k for _, k in PROMPTS]
    one_batch = score_options(arm, texts, counts, batch_size=8)
    singles = score_options(arm, texts, counts, batch_size=1)
    for a, b in zip(one_batch, singles):
        assert a == pytest.approx(b, abs=1e-4)
    assert score_options(arm, texts, counts, batch_size=8) == one_batch  # bit-identical on a rerun


def bigram_arm(probabilities: dict[int, dict[int, float]], vocab: int = 260) -> tuple[LoadedModel, dict]:
    """A tiny Llama turned into a bigram model: the next-token distribution depends only on the current token.

    Attention and MLP outputs are zeroed, so the final hidden state is the normalised token embedding; each
    "slot" token gets its own one-hot embedding, and the LM head's column for that slot holds log-probabilities.
    `probabilities[token]` lists the explicit probabilities after `token` (key -1: after any other token); the
    remaining mass is spread evenly over the rest of the vocabulary. Returns the arm and the full tables.
    """
    model, processor = build_tiny(seed=1)
    decoder = model.language_model
    hidden = decoder.config.hidden_size
    tables = {}
    with torch.no_grad():
        for layer in decoder.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = decoder.get_input_embeddings().weight
        head = decoder.get_output_embeddings().weight
        embed.zero_()
        head.zero_()
        slots = {token: slot for slot, token in enumerate(sorted(k for k in probabilities if k >= 0))}
        other_slot = len(slots)
        for token in range(embed.shape[0]):
            embed[token, slots.get(token, other_slot)] = 1.0
        for token, explicit in probabilities.items():
            table = torch.full((vocab,), (1 - sum(explicit.values())) / (vocab - len(explicit)), dtype=torch.float64)
            for target, p in explicit.items():
                table[target] = p
            tables[token] = table
            # RMSNorm scales a one-hot vector by sqrt(hidden): divide it back out.
            head[:, slots.get(token, other_slot)] = (table.log() / math.sqrt(hidden)).float()
    return LoadedModel(decoder, processor.tokenizer, None, name="bigram", source="tiny"), tables


def test_ten_outscores_one_when_the_model_writes_ten():
    # After the prompt's ":" comes " " (0.9); after " ": "1" 0.5, "2" 0.3; after "1": "0" 0.9 (so the model
    # mostly writes 10, rarely a bare 1); after "0": " " 0.95.
    arm, tables = bigram_arm({-1: {SPACE: 0.9}, SPACE: {ONE: 0.5, TWO: 0.3}, ONE: {ZERO: 0.9}, ZERO: {SPACE: 0.95}})
    digits = list(range(ZERO, ZERO + 10))

    def expected(tokens: list[int]) -> float:
        previous, total = COLON, 0.0
        for token in tokens:
            total += math.log(tables.get(previous, tables[-1])[token])
            previous = token
        return total + math.log(1 - float(tables.get(previous, tables[-1])[digits].sum()))

    text = official_prompt("Pick one.", options(10))
    scores = score_options(arm, [text], [10])[0]
    assert scores == pytest.approx(score_options_reference(arm, text, 10), abs=1e-4)
    for n in range(1, 11):
        assert scores[n - 1] == pytest.approx(expected(label_token_ids(arm.tokenizer, n)), abs=1e-3)
    # Label tokens alone would prefer 1 (0.9·0.5 > 0.9·0.5·0.9); the number written is 10 far more often.
    assert 0.9 * 0.5 > 0.9 * 0.5 * 0.9
    assert max(range(10), key=lambda j: scores[j]) + 1 == 10
    assert scores[9] > scores[1] > scores[0]  # P(10) ≈ .40 > P(2) ≈ .27 > P(1) ≈ .045


def test_generation_is_repeatable_greedy_and_sampled(arms):
    arm = arms["multimodal"]
    texts = [t for t, _ in PROMPTS[:3]]
    greedy = generate_answers(arm, texts, max_new_tokens=4, batch_size=2)
    assert greedy == generate_answers(arm, texts, max_new_tokens=4, batch_size=2)
    sampled = generate_answers(arm, texts, max_new_tokens=4, temperature=0.1, seed=3, batch_size=2)
    assert sampled == generate_answers(arm, texts, max_new_tokens=4, temperature=0.1, seed=3, batch_size=2)
    assert all(isinstance(output, str) for output in greedy + sampled)


def test_generation_stops_where_every_other_path_stops():
    """Eval's generate mode ends an answer at the stops predict, chat and the server use (here ChatML's
    end of turn, which the tiny model's generation config does not list) and never emits a placeholder."""
    from protein_llava import build_tiny
    from protein_llava.loading import stop_token_ids

    model, processor = build_tiny(seed=0)
    model.eval()
    arm = LoadedModel(model, processor.tokenizer, processor, name="model", source="tiny")
    end_of_turn = processor.tokenizer.get_vocab()["<|im_end|>"]
    assert end_of_turn not in (model.generation_config.eos_token_id or [])
    text = PROMPTS[0][0]
    encoding = arm.encode([text], True)
    prompt_length = encoding["input_ids"].shape[1]

    def greedy(**options):
        return model.generate(**encoding, max_new_tokens=8, do_sample=False, **options)[0, prompt_length:].tolist()

    # Make the end of turn the greedy choice where the third token was (a scaled copy of its output row).
    third = greedy()[2]
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[end_of_turn] = head[third] * 1.05
    plain = greedy()
    stops = stop_token_ids(processor.tokenizer, model.generation_config)
    cut = next(i for i, token in enumerate(plain) if token in stops)
    assert plain[cut] == end_of_turn and 0 < cut < len(plain) - 1, plain  # a stop mid-answer, tokens after it
    answer = generate_answers(arm, [text], max_new_tokens=8)[0]
    assert answer == processor.tokenizer.decode(plain[:cut], skip_special_tokens=True)


@pytest.mark.parametrize("kind", ["multimodal", "text"])
def test_description_scores_equal_a_full_forward_per_option(arms, kind):
    from protein_llava.evaluation.scoring import score_continuations

    arm = arms[kind]
    prompts = [
        arm.render("Describe <seq> M K T A Y I A K Q R </seq>", "chat"),
        arm.render("Describe <seq> G D S L A A </seq> briefly please", "chat"),
    ]
    candidates = [["A kinase.", "A much longer description of a lipase.", "Zinc"], ["Short.", "Another one"]]
    fast = score_continuations(arm, prompts, candidates, add_special_tokens=False, batch_size=2)
    for prompt, options_, scores in zip(prompts, candidates, fast):
        for option, score in zip(options_, scores):
            prompt_ids = arm.encode([prompt], add_special_tokens=False)
            option_ids = arm.tokenizer(option, add_special_tokens=False)["input_ids"]
            full = dict(prompt_ids)
            full["input_ids"] = torch.cat([prompt_ids["input_ids"], torch.tensor([option_ids])], 1)
            full["attention_mask"] = torch.ones_like(full["input_ids"])
            with torch.no_grad():
                logp = arm.model(**full).logits[0].float().log_softmax(-1)
            start = prompt_ids["input_ids"].shape[1]
            expected = sum(logp[start - 1 + j, token].item() for j, token in enumerate(option_ids)) / len(option_ids)
            assert score == pytest.approx(expected, abs=1e-4)
