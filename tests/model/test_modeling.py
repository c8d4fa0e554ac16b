import pytest
import torch
from transformers import AutoModelForCausalLM

from protein_llava import ProteinLLM, ProteinLLMProcessor
from protein_llava.builders import build_protein_llm
from protein_llava.model.configuration import ProjectorConfig, ProteinLLMConfig
from protein_llava.text_tokenizer import byte_level_tokenizer

from sample_proteins import P1, P2


def test_splice_puts_projected_features_at_placeholders(tiny):
    model, processor = tiny
    inputs = processor(text=["ab <seq> M K T </seq> c"])
    embeds = model.embed_inputs(inputs["input_ids"], inputs["protein_input_ids"])
    features, mask = model.protein_encoder(inputs["protein_input_ids"])
    expected_rows, _ = model.projector(features, mask)  # (1, 3, hidden): one per residue
    placeholder = inputs["input_ids"][0] == processor.protein_token_id
    torch.testing.assert_close(embeds[0, placeholder], expected_rows[0])
    text_rows = model.get_input_embeddings()(inputs["input_ids"][0, ~placeholder])
    torch.testing.assert_close(embeds[0, ~placeholder], text_rows)


def test_count_mismatch_names_both_counts(tiny):
    model, processor = tiny
    inputs = processor(text=["<seq> M K T </seq>"])
    with pytest.raises(ValueError, match="hold 3 <protein> placeholder tokens but the proteins give 4"):
        model(input_ids=inputs["input_ids"], protein_input_ids=processor.encode_proteins(["MKTA"]))
    with pytest.raises(ValueError, match="hold 3 <protein> placeholder tokens but 0 protein feature rows"):
        model(input_ids=inputs["input_ids"])


@pytest.mark.parametrize("reduction", ["none", "mean_pool", "resampler"])
def test_batch_logits_equal_single_rows(reduction):
    torch.manual_seed(0)
    config = ProteinLLMConfig.from_preset("tiny")
    config.projector_config = ProjectorConfig(token_reduction=reduction, pool_stride=3, num_latents=4, resampler_heads=2)
    model, processor = build_protein_llm(config, byte_level_tokenizer())
    prompts = [f"<seq> {P1} </seq> What?", f"Compare <seq> {P1} </seq> with <seq> {P2} </seq>.", "No protein here."]
    batch = processor(text=prompts)
    with torch.no_grad():
        batched = model(**batch).logits
        for row, prompt in enumerate(prompts):
            single = model(**processor(text=[prompt])).logits[0]
            n = single.shape[0]
            torch.testing.assert_close(batched[row, -n:], single, atol=1e-4, rtol=1e-4)


def test_greedy_generation_batch_equals_single(tiny):
    model, processor = tiny
    prompts = [f"<seq> {P1} </seq> What?", "Which residue carries a thiol group?", f"<seq> {P2} </seq><seq> M K </seq>"]
    batched = model.generate(**processor(text=prompts), max_new_tokens=8, do_sample=False)
    batched_text = processor.batch_decode(batched, skip_special_tokens=True)
    single_text = [
        processor.batch_decode(model.generate(**processor(text=[p]), max_new_tokens=8, do_sample=False), skip_special_tokens=True)[0]
        for p in prompts
    ]
    assert batched_text == single_text


def test_zero_proteins_is_the_plain_decoder(tiny):
    model, processor = tiny
    inputs = processor(text=["Which residue carries a thiol group?"])
    assert "protein_input_ids" not in inputs
    with torch.no_grad():
        ours = model(**inputs).logits
        plain = model.language_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    assert torch.equal(ours, plain)


def test_save_load_identical_logits_and_auto_class(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text().count("ProteinLLM.from_pretrained") == 1
    again = ProteinLLM.from_pretrained(tmp_path).eval()
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(auto, ProteinLLM)
    processor_again = ProteinLLMProcessor.from_pretrained(tmp_path)
    inputs = processor_again(text=[f"<seq> {P1} </seq> What?", "plain"])
    with torch.no_grad():
        reference = model(**inputs).logits
        assert torch.equal(again(**inputs).logits, reference)
        assert torch.equal(auto(**inputs).logits, reference)
    # fair-esm's LM head shares the embedding matrix; loading must keep the tie.
    assert again.protein_encoder.esm.lm_head.weight is again.protein_encoder.esm.embed_tokens.weight


def test_trainable_flags_change_what_a_step_updates(tiny):
    model, processor = tiny
    model.set_trainable(encoder=False, projector=True, llm=False)
    assert model.trainable_parts() == {"encoder": False, "projector": True, "llm": False}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = processor(text=["<seq> M K T A </seq> kinase"], padding_side="right")
    batch["labels"] = batch["input_ids"].masked_fill(batch["input_ids"] == processor.protein_token_id, -100)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("projector.") for k in changed)


def test_flash_attention_without_the_package_fails_at_load(tiny_folder):
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here; the failure path cannot be exercised")
    with pytest.raises(ImportError, match="FlashAttention2"):
        ProteinLLM.from_pretrained(tiny_folder, attn_implementation="flash_attention_2")


def test_lora_adapter_loads_on_top_and_merges(tiny_folder, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = ProteinLLM.from_pretrained(tiny_folder).eval()
    processor = ProteinLLMProcessor.from_pretrained(tiny_folder)
    torch.manual_seed(1)
    adapted = get_peft_model(model.language_model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    adapted.save_pretrained(tmp_path / "adapter")
    inputs = processor(text=[f"<seq> {P1} </seq> What?"])
    model.language_model = adapted
    with torch.no_grad():
        expected = model(**inputs).logits

    fresh = ProteinLLM.from_pretrained(tiny_folder).eval()
    with torch.no_grad():
        base = fresh(**inputs).logits
    fresh.load_language_adapter(tmp_path / "adapter")
    with torch.no_grad():
        with_adapter = fresh(**inputs).logits
    fresh.merge_language_adapter()
    with torch.no_grad():
        merged = fresh(**inputs).logits
    assert not torch.allclose(base, expected)
    torch.testing.assert_close(with_adapter, expected)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no adapter to merge"):
        fresh.merge_language_adapter()


def test_cached_representations_give_the_same_logits(tiny):
    model, processor = tiny
    inputs = processor(text=[f"<seq> {P1} </seq> What?"])
    features, mask = model.protein_encoder(inputs["protein_input_ids"])
    with torch.no_grad():
        online = model(**inputs).logits
        cached = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            protein_representations=features,
            protein_representations_mask=mask,
        ).logits
    assert torch.equal(online, cached)


def test_generation_keeps_proteins_only_at_prefill(tiny):
    model, _ = tiny
    kwargs = {"protein_input_ids": torch.zeros(1, 3, dtype=torch.long), "use_cache": True}
    ids = torch.tensor([[1, 2, 3]])
    first = model.prepare_inputs_for_generation(ids, is_first_iteration=True, **kwargs)
    assert "protein_input_ids" in first
    later = model.prepare_inputs_for_generation(ids, cache=object(), is_first_iteration=False, **kwargs)
    assert "protein_input_ids" not in later


def test_building_the_composite_keeps_fair_esm_init_and_inits_only_the_projector():
    from esm.model.esm2 import ESM2

    from protein_llava.model.encoder import esm2_alphabet

    torch.manual_seed(0)
    reference = ESM2(num_layers=2, embed_dim=32, attention_heads=4, alphabet=esm2_alphabet())
    torch.manual_seed(0)
    model, _ = build_protein_llm(ProteinLLMConfig.from_preset("tiny"), byte_level_tokenizer())
    ours = model.protein_encoder.esm.state_dict()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(ours[name], tensor), name
    first = model.projector.projection[0]
    assert first.bias.abs().max() == 0 and abs(first.weight.std().item() - 0.02) < 0.005
