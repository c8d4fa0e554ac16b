"""Property-based: any item shape gives a benchmark item or a typed ItemError, never another exception."""

from hypothesis import given, settings
from hypothesis import strategies as st

from protein_llava.evaluation.benchmarks import ItemError, official_prompt, parse_proteinlmbench_item

cells = st.none() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=15) | st.sampled_from(["nan", "", "option 2: x", "option 1", "option 10"])
keys = st.sampled_from(["question", "options", "answer", "explanation", "option 1", "option 2", "option 3", "Option 4"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, cells | st.lists(cells, max_size=11), max_size=6))
def test_arbitrary_items_parse_or_are_flagged(raw):
    try:
        item = parse_proteinlmbench_item(raw, "fuzz-1")
    except ItemError as error:
        assert error.reason
        return
    assert 1 <= item.answer <= len(item.options) and len(item.options) >= 2
    assert official_prompt(item.question, item.options).endswith("\nThe correct option is:")
