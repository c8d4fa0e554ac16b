"""One wording for training records and inference prompts: the same question and protein reach the model as
the same user turn and the same prompt tokens, whichever side built them."""

import random

import pytest

from protein_llava.data.demo import make_protein, protein_records
from protein_llava.data.prompts import (
    TEMPLATES,
    join_user_turn,
    marked_user_message,
    protein_input,
    user_message,
)
from protein_llava.data.records import parse_record
from protein_llava.data.scl2205 import protein_record
from protein_llava.constants import IGNORE_INDEX
from protein_llava.data.tokenize import ConversationTokenizer
from protein_llava.loading import load_protein_llm

pytestmark = pytest.mark.usefixtures("one_thread")

# ProteinLMDataset's UniProt_Function instruction and input line, copied from the dataset.
DATASET_FUNCTION = (
    "The sequence of the protein is as follows. Please analyze the sequence and describe the functions of this protein."
)
DATASET_INPUT = "Presented here is a sequence of amino acids in a protein: "


def test_wording_is_the_datasets():
    assert TEMPLATES["function"] == DATASET_FUNCTION
    assert protein_input("MKT") == DATASET_INPUT + "<seq> M K T </seq>"
    assert user_message("Q?", "MKT") == "Q?\n" + DATASET_INPUT + "<seq> M K T </seq>"
    assert user_message("Q?", None) == "Q?"


@pytest.mark.parametrize(
    ("instruction", "input_text", "joined"),
    [("Q?", "in", "Q?\nin"), ("Q?", "  ", "Q?"), ("", "in", "in"), ("  ", "in", "in")],
)
def test_join_rule(instruction, input_text, joined):
    assert join_user_turn(instruction, input_text) == joined


def _records():
    protein = make_protein(random.Random(0))
    demo = protein_records(protein)[0]  # the function question
    scl = protein_record("P12345", protein["residues"], "nucleus")
    return [(demo, TEMPLATES["function"], protein["residues"]), (scl, TEMPLATES["location"], protein["residues"])]


@pytest.mark.parametrize("index", [0, 1], ids=["demo-function", "scl2205-location"])
def test_training_record_and_inference_prompt_are_the_same_user_turn_and_tokens(index, tiny_folder):
    record, question, residues = _records()[index]
    conversation = parse_record(record, "record-0")
    assert conversation.turns[0].content == user_message(question, residues)

    # The whole path on both sides: the training tokenizer's prompt tokens are the inference prompt's tokens.
    loaded = load_protein_llm(tiny_folder, device="cpu")
    example = ConversationTokenizer(loaded.processor, 4096)(conversation)
    prompt_length = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    prompt = loaded.render_chat([{"role": "user", "content": user_message(question, residues)}])
    inference_ids = loaded.processor(text=[prompt], add_special_tokens=False)["input_ids"][0].tolist()
    assert list(example.input_ids[:prompt_length]) == inference_ids
    assert example.proteins == (residues,)
    # Inference hands the checked residues over as data (predict, chat, /v1/answer): the same tokens and
    # the same encoder input as the text form.
    marked = loaded.render_chat([{"role": "user", "content": marked_user_message(question, loaded.processor.protein_token)}])
    as_data = loaded.processor(text=[marked], proteins=[[residues]], add_special_tokens=False)
    as_text = loaded.processor(text=[prompt], add_special_tokens=False)
    assert as_data["input_ids"][0].tolist() == inference_ids
    assert as_data["protein_input_ids"].tolist() == as_text["protein_input_ids"].tolist()
