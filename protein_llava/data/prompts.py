"""The wording of prompts about a protein: the instruction templates, the protein's input line, and how an
instruction and its input join into one user turn.

Training records (`data.records` joins every flat record's fields by `join_user_turn`; `data.demo` and
`data.scl2205` write their records from these templates) and inference (`predict`, `serving`, through
`user_message`) share this one module, so a question about a protein reaches the model at inference in
exactly the form it was trained on: train/inference prompt skew fails a test instead of going unnoticed.
"""

from __future__ import annotations

from ..sequences import format_sequence

# ProteinLMDataset's UniProt instructions (its SFT template), by the short names the CLI takes.
# "catalytic" has no UniProt template in the dataset; its wording follows the others' form, as does
# "location", the instruction of the SCL2205 records `data.scl2205` writes.
TEMPLATES = {
    "function": "The sequence of the protein is as follows. Please analyze the sequence and describe the functions of this protein.",
    "subunit": "Examine this protein sequence and provide a comprehensive description of its subunit structure, including details on how the subunits are organized and interact with each other.",
    "tissue": "Examine the provided protein sequence and detail its tissue specificity, including which tissues or organ systems the protein is predominantly expressed in.",
    "ptm": "Identify and describe any post-translational modifications in the given protein sequence, including types of modifications and their locations.",
    "induction": "Investigate and describe any known inducers or conditions that lead to the expression of this protein.",
    "disease": "Analyze this protein sequence for any known associations with diseases, including details on the nature of the involvement and relevant diseases.",
    "catalytic": "Examine this protein sequence and describe its catalytic activity, including the chemical reaction it catalyzes and any cofactors it needs.",
    "location": "The sequence of the protein is as follows. Please analyze the sequence and describe its subcellular location.",
}
# ProteinLMDataset's `input` field for a protein.
PROTEIN_INPUT = "Presented here is a sequence of amino acids in a protein: {seq}"


def protein_input(residues: str) -> str:
    """The `input` line that carries a protein: `Presented here is ...: <seq> M K T ... </seq>`."""
    return PROTEIN_INPUT.format(seq=format_sequence(residues))


def join_user_turn(instruction: str, input_text: str) -> str:
    """A flat record's user turn: instruction and input joined by a newline, or whichever one is not blank."""
    if instruction.strip() and input_text.strip():
        return f"{instruction}\n{input_text}"
    return instruction if instruction.strip() else input_text


def user_message(question: str, residues: str | None) -> str:
    """The user turn for a question about a protein (None: no protein), as a training record renders it."""
    if residues is None:
        return question
    return join_user_turn(question, protein_input(residues))


def marked_user_message(question: str, marker: str) -> str:
    """`user_message` with `marker` (the processor's `<protein>`) where the sequence's text would be: the form
    in which inference hands a checked protein to the processor as data (`proteins=`), never as text to be
    parsed again. The processor expands both forms to the same tokens (tested)."""
    return join_user_turn(question, PROTEIN_INPUT.format(seq=marker))


__all__ = ["PROTEIN_INPUT", "TEMPLATES", "join_user_turn", "marked_user_message", "protein_input", "user_message"]
