import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protein_llava.sequences import (
    RESIDUES,
    ProteinSequenceError,
    SequenceReason,
    check_sequence,
    find_seq_spans,
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
    assert error.value.reason is SequenceReason.INVALID_RESIDUE
    assert repr(char) in message and f"position {position}" in message and "record 7" in message
    assert hint in message


def test_empty_sequence_rejected():
    with pytest.raises(ProteinSequenceError, match="empty protein sequence in sample 3") as error:
        normalize_sequence("  \n ", record="sample 3")
    assert error.value.reason is SequenceReason.EMPTY


def test_length_policy():
    with pytest.raises(ProteinSequenceError, match="longer than the encoder's limit of 5") as error:
        check_sequence("MKTAYIA", 5, "error")
    assert error.value.reason is SequenceReason.TOO_LONG
    with pytest.warns(UserWarning, match="truncated from 7 to 5 residues"):
        checked = check_sequence("mktay ia", 5, "truncate")
    assert (checked.residues, checked.length, checked.truncated) == ("MKTAY", 7, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_sequence("MKTAYIA", 5, "truncate", warn=False).residues == "MKTAY"
        checked = check_sequence("m k t", 5, "error")
        assert (checked.residues, checked.length, checked.truncated) == ("MKT", 3, False)
    with pytest.raises(ValueError, match="unknown overflow policy 'drop'"):
        check_sequence("MKT", 5, "drop")


def test_reason_codes_are_public_strings_and_survive_pickling():
    import json
    import pickle

    assert [str(r) for r in SequenceReason] == ["empty_sequence", "invalid_residue", "too_long_protein", "bad_markup"]
    error = ProteinSequenceError(SequenceReason.BAD_MARKUP, "</seq> at character 0 has no <seq> before it")
    again = pickle.loads(pickle.dumps(error))
    assert (again.reason, str(again)) == (error.reason, str(error))
    assert json.dumps({error.reason: 1}) == '{"bad_markup": 1}'


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
    with pytest.raises(ProteinSequenceError, match=message) as error:
        find_seq_spans(text)
    assert error.value.reason is SequenceReason.BAD_MARKUP


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


def test_strip_markup_leaves_no_protein_markup_for_the_processor():
    from protein_llava.sequences import find_seq_spans, strip_markup

    reply = "It binds <SEQ> M K </seq> and <protein><protein> here </Seq>"
    stripped = strip_markup(reply, "<protein>")
    assert stripped == "It binds  M K  and  here "
    assert find_seq_spans(stripped) == []
