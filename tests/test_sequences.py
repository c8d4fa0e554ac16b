import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protein_llava.sequences import (
    RESIDUES,
    ProteinSequenceError,
    find_seq_spans,
    fit_to_limit,
    format_sequence,
    normalize_sequence,
)


def test_normalize_removes_whitespace_and_uppercases():
    assert normalize_sequence(" m k t\nA y ") == "MKTAY"


@pytest.mark.parametrize(
    ("sequence", "char", "position", "hint"),
    [
        ("MKJT", "J", 3, ""),
        ("MKT*", "*", 4, "stop codon"),
        ("MK-T", "-", 3, "gap"),
        ("M1KT", "1", 2, "digits"),
        ("M K . T", ".", 3, "gap"),
    ],
)
def test_invalid_residue_named_with_position(sequence, char, position, hint):
    with pytest.raises(ProteinSequenceError) as error:
        normalize_sequence(sequence, record="record 7")
    message = str(error.value)
    assert repr(char) in message and f"position {position}" in message and "record 7" in message
    assert hint in message


def test_empty_sequence_rejected():
    with pytest.raises(ProteinSequenceError, match="empty protein sequence in sample 3"):
        normalize_sequence("  \n ", record="sample 3")


def test_length_policy():
    with pytest.raises(ProteinSequenceError, match="longer than the encoder's limit of 5"):
        fit_to_limit("MKTAYIA", 5, "error")
    with pytest.warns(UserWarning, match="truncated from 7 to 5 residues"):
        assert fit_to_limit("MKTAYIA", 5, "truncate") == "MKTAY"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fit_to_limit("MKT", 5, "error") == "MKT"


def test_seq_spans_in_order():
    text = "A <seq> M K </seq> and <SEQ>T A</SEQ>."
    spans = find_seq_spans(text)
    assert [s.inner for s in spans] == [" M K ", "T A"]
    assert text[spans[0].start : spans[0].end] == "<seq> M K </seq>"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<seq> M K", "at character 0 .*never closed"),
        ("M K </seq>", "</seq> at character 4 has no <seq>"),
        ("<seq> M <seq> K </seq></seq>", "nested <seq> at character 8"),
    ],
)
def test_bad_tags(text, message):
    with pytest.raises(ProteinSequenceError, match=message):
        find_seq_spans(text)


def test_format_round_trip():
    assert format_sequence("MKT") == "<seq> M K T </seq>"
    (span,) = find_seq_spans(format_sequence("MKT"))
    assert normalize_sequence(span.inner) == "MKT"


@given(st.text(max_size=40))
def test_normalize_arbitrary_text_gives_residues_or_typed_error(text):
    try:
        residues = normalize_sequence(text)
    except ProteinSequenceError:
        return
    assert residues and set(residues) <= RESIDUES


@given(st.text(alphabet=st.sampled_from(list("<>/seqMKT ")), max_size=40))
def test_find_spans_arbitrary_markup_gives_spans_or_typed_error(text):
    try:
        spans = find_seq_spans(text)
    except ProteinSequenceError:
        return
    assert all(text[s.start : s.end].lower().startswith("<seq>") for s in spans)
