"""4-bit inference: `ProteinLLM.from_pretrained(..., quantization_config=...)` quantises the decoder only."""

import json

import bitsandbytes
import pytest
import torch
from torch import nn

from protein_llava import ProteinLLM, ProteinLLMProcessor
from protein_llava.cli import main
from protein_llava.loading import load_protein_llm
from protein_llava.quantization import decoder_only, is_4bit, nf4_config


def test_decoder_only_keeps_encoder_projector_and_head(tiny_folder, one_thread):
    model = ProteinLLM.from_pretrained(tiny_folder, quantization_config=nf4_config()).eval()
    quantized = {name for name, m in model.named_modules() if isinstance(m, bitsandbytes.nn.Linear4bit)}
    assert len(quantized) == 2 * 7 and all(name.startswith("language_model.model.layers.") for name in quantized)
    for part in (model.protein_encoder, model.projector, model.language_model.lm_head):
        assert not is_4bit(part) and all(p.dtype == torch.float32 for p in part.parameters())
    full = ProteinLLM.from_pretrained(tiny_folder).eval()
    for name, tensor in full.protein_encoder.state_dict().items():
        assert torch.equal(model.protein_encoder.state_dict()[name], tensor), name
    processor = ProteinLLMProcessor.from_pretrained(tiny_folder)
    inputs = processor(text=["<seq> M K T A Y I A K Q R </seq> What is it?", "Plain text."])
    with torch.no_grad():
        difference = (model(**inputs).logits - full(**inputs).logits).abs().max()
    assert 0 < difference < 0.5  # 4-bit weights: close, not equal (measured 0.10 on logits of size ~0.7)
    assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 3


def test_user_skip_list_is_kept_and_other_configs_are_refused():
    config = nf4_config()
    config.llm_int8_skip_modules = ["down_proj"]
    assert decoder_only(config).llm_int8_skip_modules == ["down_proj", "protein_encoder", "projector"]
    assert config.llm_int8_skip_modules == ["down_proj"]  # a copy; the caller's config is untouched
    with pytest.raises(TypeError, match="must be a BitsAndBytesConfig"):
        decoder_only({"load_in_4bit": True})


def test_predict_with_load_in_4bit(tiny_folder, capsys, one_thread):
    loaded = load_protein_llm(tiny_folder, device="cpu", load_in_4bit=True)
    assert is_4bit(loaded.model.language_model) and not is_4bit(loaded.model.protein_encoder)
    argv = ["predict", "--model", str(tiny_folder), "--sequence", "MKTAYIAKQR", "--question", "What is it?",
            "--max-new-tokens", "3", "--device", "cpu", "--no-progress", "--load-in-4bit"]
    assert main(argv) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["id"] == "query" and isinstance(row["answer"], str)


QUESTIONS = [
    "What is a protein?",
    "Which amino acid carries a thiol group?",
    "What does an enzyme do?",
    "Name the four bases of DNA.",
    "What is the function of hemoglobin?",
    "Explain what a kinase does.",
    "What is an antibody?",
    "What is the role of ribosomes?",
]


@pytest.mark.slow
def test_smollm2_in_4bit_mostly_agrees_with_full_precision(smollm2, smollm2_folder):
    """Greedy answers of 4-bit NF4 SmolLM2 vs full precision, 8 questions x 12 tokens.

    Teacher-forced on the full-precision answers, the 4-bit model picks the same greedy token at 78 of 96
    positions (81%), and the same first token for 7 of 8 questions (measured on a Xeon with AVX512-BF16,
    where bitsandbytes runs 4-bit inference in bfloat16). Its decoder weighs 159 MiB against 513 MiB.
    """
    _, full, processor = smollm2
    quantized = ProteinLLM.from_pretrained(smollm2_folder, quantization_config=nf4_config()).eval()
    assert is_4bit(quantized.language_model) and not is_4bit(quantized.protein_encoder)
    assert quantized.language_model.get_memory_footprint() < 0.35 * full.language_model.get_memory_footprint()
    assert isinstance(quantized.language_model.lm_head, nn.Linear)

    messages = [[{"role": "user", "content": question}] for question in QUESTIONS]
    prompts = [processor.apply_chat_template(turns, add_generation_prompt=True) for turns in messages]
    inputs = processor(text=prompts, add_special_tokens=False)
    prompt_length = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        answers = full.generate(**inputs, max_new_tokens=12, do_sample=False)  # (8, prompt + 12)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(answers[:, prompt_length:])], dim=1)

        def greedy_choices(model):  # teacher-forced on the full-precision answers: (8, 12) token ids
            return model(input_ids=answers, attention_mask=mask).logits[:, prompt_length - 1 : -1].argmax(-1)

        full_choice, quantized_choice = greedy_choices(full), greedy_choices(quantized)
    assert torch.equal(full_choice, answers[:, prompt_length:])  # the teacher forcing reproduces greedy
    agreement = (quantized_choice == full_choice).float().mean().item()
    first_tokens = (quantized_choice[:, 0] == full_choice[:, 0]).sum().item()
    print(f"4-bit vs full precision: {agreement:.1%} of greedy tokens, first tokens {first_tokens} of {len(QUESTIONS)}")
    assert agreement >= 0.65 and first_tokens >= 5
