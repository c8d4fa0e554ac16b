"""protein_llava.inference.chat: the conversation history through the chat template, and the terminal loop."""

import pytest
from sample_proteins import P1, P2

from protein_llava.data.prompts import marked_user_message, user_message
from protein_llava.inference.chat import ChatSession, chat_messages, run_chat
from protein_llava.loading import load_protein_llm
from protein_llava.sequences import ProteinSequenceError

R1, R2 = P1.replace(" ", ""), P2.replace(" ", "")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loaded(tiny_folder):
    return load_protein_llm(tiny_folder, device="cpu")


def test_chat_session_keeps_history_through_the_template(loaded):
    session = ChatSession(loaded, max_new_tokens=4)
    session.load_protein(R1)
    first = session.ask("What does it do?")
    session.ask("Where?")
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    # The protein rides only in the first turn, behind the marker; its residues go to the processor as data.
    assert session.messages[0]["content"] == marked_user_message("What does it do?", "<protein>")
    assert session.messages[2]["content"] == "Where?"
    rendered = loaded.render_chat(session.messages[:3])
    assert rendered.count("<protein>") == 1 and "Where?" in rendered
    # The first answer is the one the text form of the same turn gets.
    text_form = loaded.render_chat([{"role": "user", "content": user_message("What does it do?", R1)}])
    assert first == loaded.answer([text_form], 4)[0]
    assert session.messages[1]["content"].replace("<seq>", "") == first.replace("<seq>", "")

    with pytest.raises(ProteinSequenceError, match="invalid residue 'J' at position 3"):
        session.load_protein("MKJ")
    assert session.residues == R1 and len(session.messages) == 4  # a bad protein changes nothing
    session.load_protein(R2)
    assert session.messages == [] and session.residues == R2


def test_chat_messages_put_the_protein_in_the_first_user_turn_and_strip_replies():
    turns = [
        {"role": "user", "content": "What is it?"},
        {"role": "assistant", "content": "a <seq> M K </seq> <protein> kinase"},
        {"role": "user", "content": "Where?"},
    ]
    assert chat_messages(turns, "MKT", "<protein>") == [
        {"role": "user", "content": marked_user_message("What is it?", "<protein>")},
        {"role": "assistant", "content": "a  M K   kinase"},
        {"role": "user", "content": "Where?"},
    ]


def test_the_terminal_loop_answers_on_stdout_and_talks_on_stderr(loaded, monkeypatch, capsys):
    import io

    session = ChatSession(loaded, max_new_tokens=3)
    session.load_protein(R1)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"What is it?\nAnd <seq> M K </seq>?\n/protein {R2}\n/protein MKJ\n/bogus\n/reset\n/quit\nnever asked\n"))
    run_chat(session, interactive=False)
    out, err = capsys.readouterr()
    expected = ChatSession(loaded, max_new_tokens=3)
    expected.load_protein(R1)
    assert out.splitlines() == [expected.ask("What is it?")]  # one answer; nothing after /quit
    assert f"protein loaded: {len(R2)} residues; new conversation" in err
    assert "error: invalid residue 'J'" in err and "the previous protein stays loaded" in err
    assert "unknown command '/bogus'" in err and "conversation cleared" in err
    assert "mixes inline <seq> spans with an explicit proteins list" in err  # markup in a question: said, loop goes on
    assert session.residues == R2 and session.turns == []
