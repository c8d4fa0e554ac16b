"""protein_llava.inference.webdemo: the protein box checked as `predict` checks it, streamed answers equal to the
greedy `LoadedModel.answer` ones, the conversation equal to `ChatSession`'s, Stop, the app and the CLI entry; and
one end-to-end run in headless Chromium (a visible skip where the system has none)."""

import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from sample_proteins import P1, P2

from protein_llava.cli import build_parser, main
from protein_llava.data.prompts import TEMPLATES, marked_user_message, user_message
from protein_llava.inference.chat import ChatSession
from protein_llava.inference.predict import FastaRecord, check_records
from protein_llava.loading import load_protein_llm
from protein_llava.sequences import ProteinSequenceError
from protein_llava.inference.webdemo import (
    EXAMPLE_PROTEINS,
    AnswerStream,
    DemoSettings,
    LoadedProtein,
    ProteinChat,
    choose_protein,
    model_messages,
    read_protein_text,
)

R1, R2 = P1.replace(" ", ""), P2.replace(" ", "")
README_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "webdemo.png"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loaded(tiny_folder):
    return load_protein_llm(tiny_folder, device="cpu")


@pytest.fixture
def own_loaded(tiny_folder):
    """A loaded model whose processor a test may change (max_residues, overflow)."""
    return load_protein_llm(tiny_folder, device="cpu")


def final(turns: list) -> tuple:
    """The last yield of `ProteinChat.respond`: (history, loaded, status, question box, summary, prompt)."""
    assert turns, "respond yielded nothing"
    return turns[-1]


# --- the protein box


def test_read_protein_text_takes_raw_residues_or_fasta():
    assert read_protein_text("  mkt ay\n") == [FastaRecord("query", "mkt ay")]
    assert read_protein_text(" \n ") == []
    fasta = f">sp|P1|ONE first\n{R1[:20]}\n{R1[20:]}\n>two\n{R2}\n>empty\n"
    assert read_protein_text(fasta) == [FastaRecord("sp|P1|ONE", R1), FastaRecord("two", R2), FastaRecord("empty", "")]


def test_choose_protein_gives_predicts_messages():
    records = read_protein_text(">ok\nMKTAY\n>stop\nMKTJ*\n>long\n" + "M" * 11 + "\n>empty\n")
    assert choose_protein(records, None, 10, "error").residues == "MKTAY"
    assert choose_protein(records, "ok", 10, "error").id == "ok"
    for record_id in ("stop", "long", "empty"):
        chosen = [r for r in records if r.id == record_id]
        (problem,) = check_records(chosen, 10, "error")[1]
        with pytest.raises(ProteinSequenceError) as error:
            choose_protein(records, record_id, 10, "error")
        assert str(error.value) == problem.detail
    with pytest.raises(ProteinSequenceError, match="invalid residue 'J' at position 4 in record 'stop'"):
        choose_protein(records, "stop", 10, "error")
    with pytest.raises(ProteinSequenceError, match="protein of 11 residues in record 'long' is longer than the encoder's limit of 10"):
        choose_protein(records, "long", 10, "error")
    cut = choose_protein(records, "long", 10, "truncate")
    assert (cut.residues, cut.length, cut.truncated) == ("M" * 10, 11, True)
    with pytest.raises(ProteinSequenceError, match="no record 'missing'"):
        choose_protein(records, "missing", 10, "error")
    assert choose_protein([], None, 10, "error") is None


def test_protein_status_names_the_record_its_size_and_errors(own_loaded):
    chat = ProteinChat(own_loaded)
    tokens = own_loaded.processor.num_protein_tokens
    assert chat.protein_status(R1) == (["query"], f"Record `query`: {len(R1)} residues → {tokens(len(R1))} protein tokens.")
    ids, line = chat.protein_status(f">a\n{R1}\n>b\n{R2}", "b")
    assert ids == ["a", "b"] and line == f"2 FASTA records; Record `b`: {len(R2)} residues → {tokens(len(R2))} protein tokens."
    assert chat.protein_status("MKTJAY") == (
        ["query"],
        "**Error:** invalid residue 'J' at position 4 in record 'query'; allowed: the 20 standard amino acids and X B U Z O",
    )
    assert chat.protein_status("")[1] == "No protein: questions go to the decoder alone."
    own_loaded.processor.max_residues = 20
    assert "is longer than the encoder's limit of 20" in chat.protein_status(R1)[1]
    own_loaded.processor.overflow = "truncate"
    assert chat.protein_status(R1)[1].endswith(f"(truncated from {len(R1)}: residues 21-{len(R1)} are cut).")


def test_every_example_protein_passes_the_check(loaded):
    chat = ProteinChat(loaded)
    for label, text in EXAMPLE_PROTEINS:
        ids, query = chat.check_protein(text)
        assert query is not None and len(query.residues) > 20, label
    assert chat.check_protein(EXAMPLE_PROTEINS[2][1])[0] == ["insulin_A", "insulin_B"]


def test_settings_are_checked():
    with pytest.raises(ValueError, match="max_new_tokens must be in 1..max_new_tokens_limit"):
        DemoSettings(max_new_tokens=600)
    with pytest.raises(ValueError, match="temperature must be in 0..max_temperature"):
        DemoSettings(temperature=-0.1)


# --- generation


def test_greedy_stream_equals_the_loaded_models_answer(loaded):
    for question, residues, limit in (("What does it do?", R1, 12), ("Where?", R2, 5), ("Hi", None, 9)):
        prompt = loaded.render_chat([{"role": "user", "content": user_message(question, residues)}])
        stream = AnswerStream(loaded, prompt, limit)
        pieces = list(stream)
        assert pieces and all(later.startswith(earlier) for earlier, later in zip(pieces, pieces[1:]))
        assert pieces[-1].strip() == loaded.answer([prompt], limit)[0]
        assert 1 <= stream.new_tokens <= limit and not stream.stopped
        assert stream.prompt_tokens == loaded.processor(text=[prompt], add_special_tokens=False)["input_ids"].shape[1]


def test_a_set_stop_event_ends_after_one_token(loaded):
    prompt = loaded.render_chat([{"role": "user", "content": user_message("What does it do?", R1)}])
    event = threading.Event()
    event.set()
    stream = AnswerStream(loaded, prompt, 50, stop_event=event)
    text = "".join(list(stream)[-1:])
    assert (stream.new_tokens, stream.stopped) == (1, True)
    assert text.strip() == loaded.answer([prompt], 1)[0]


def test_temperature_samples_reproducibly_under_a_seed(loaded):
    prompt = loaded.render_chat([{"role": "user", "content": user_message("What does it do?", R1)}])
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(list(AnswerStream(loaded, prompt, 24, temperature=1.5))[-1])
    greedy = loaded.answer([prompt], 24)[0]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert greedy not in (runs[0].strip(), runs[2].strip())


# --- the conversation


def test_model_messages_put_the_protein_in_the_first_turn_only():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "What is it?"}]},  # as Gradio hands it back
        {"role": "assistant", "content": "a <seq> M K </seq> kinase<protein>"},
        {"role": "user", "content": "Where?"},
    ]
    assert model_messages(history, "MKT", "<protein>") == [
        {"role": "user", "content": marked_user_message("What is it?", "<protein>")},  # its residues go as data
        {"role": "assistant", "content": "a  M K  kinase"},
        {"role": "user", "content": "Where?"},
    ]
    assert model_messages(history[:1], None, "<protein>") == [{"role": "user", "content": "What is it?"}]


def test_markup_in_the_question_is_an_error_that_changes_nothing(loaded):
    chat = ProteinChat(loaded)
    history, protein, *_ = final(list(chat.respond(R1, None, "What is it?", [], None, 3, 0.0)))
    for question in ("And <seq> M K T </seq>?", "And <protein>?"):
        outputs = list(chat.respond(R1, None, question, history, protein, 3, 0.0))
        assert len(outputs) == 1 and outputs[0][:2] == (history, protein)
        assert outputs[0][2].startswith("**Error:**") and outputs[0][3] == question


def test_the_conversation_is_chat_sessions(loaded):
    chat, session = ProteinChat(loaded), ChatSession(loaded, max_new_tokens=6)
    session.load_protein(R1)
    history, protein = [], None
    for question in ("What does this protein do?", "Is it an enzyme?", "Where is it found?"):
        expected = session.ask(question)
        history, protein, status, box, summary, prompt = final(list(chat.respond(R1, None, question, history, protein, 6, 0.0)))
        assert history[-1] == {"role": "assistant", "content": expected}
        assert model_messages(history, R1, "<protein>") == session.messages
        assert prompt == loaded.render_chat(session.messages[:-1])
        assert box == "" and status.startswith("Record `query`")
    turns = [m["content"] for m in history if m["role"] == "user"]
    assert turns == ["What does this protein do?", "Is it an enzyme?", "Where is it found?"]
    assert "turn 3 of the conversation" in summary and "greedy" in summary
    assert f"{len(R1)} residues → {loaded.processor.num_protein_tokens(len(R1))} protein tokens" in summary


def test_another_protein_starts_a_new_conversation_and_a_bad_one_changes_nothing(loaded):
    chat = ProteinChat(loaded)
    history, protein, *_ = final(list(chat.respond(R1, None, "What is it?", [], None, 3, 0.0)))
    assert protein == LoadedProtein(check_records([FastaRecord("query", R1)], 1022)[0][0])
    bad = list(chat.respond("MKTJAY", None, "Again?", history, protein, 3, 0.0))
    assert bad == [(history, protein, "**Error:** invalid residue 'J' at position 4 in record 'query'; "
                    "allowed: the 20 standard amino acids and X B U Z O", "Again?", None, None)]
    assert final(list(chat.respond(R1, None, "  ", history, protein, 3, 0.0)))[2].startswith("**Error:** the question is empty")
    fasta = f">one\n{R1}\n>two\n{R2}\n"
    new_history, new_protein, status, *_ = final(list(chat.respond(fasta, "two", "And this?", history, protein, 3, 0.0)))
    assert [m["content"] for m in new_history if m["role"] == "user"] == ["And this?"]
    assert new_protein.query.id == "two" and new_protein.query.residues == R2 and status.startswith("2 FASTA records; Record `two`")
    prompt = final(list(chat.respond(fasta, "two", "And this?", [], None, 3, 0.0)))[5]
    assert prompt == loaded.render_chat([{"role": "user", "content": marked_user_message("And this?", "<protein>")}])


def test_stop_keeps_the_partial_answer(loaded):
    chat = ProteinChat(loaded)
    turns = chat.respond(R1, None, "What does it do?", [], None, 400, 0.0, session="s1")
    for history, *_ in turns:
        if history[-1]["role"] == "assistant" and history[-1]["content"]:
            chat.stop("s1")
            break
    history, _, _, _, summary, _ = final(list(turns))
    assert chat._stops == {}  # the finished turn's stop flag is gone
    answer = history[-1]["content"]
    assert "stopped by the user" in summary
    new_tokens = int(summary.split("- answer: ")[1].split()[0])
    assert 1 <= new_tokens < 400
    prompt = loaded.render_chat([{"role": "user", "content": user_message("What does it do?", R1)}])
    assert answer == loaded.answer([prompt], new_tokens)[0]


# --- the app and the command


def test_build_app_has_the_widgets(loaded):
    from protein_llava.inference.webdemo import build_app

    app = build_app(loaded, model_name="tiny")
    ids = {block.elem_id for block in app.blocks.values() if getattr(block, "elem_id", None)}
    assert {"sequence", "record", "protein-status", "template", "max-new-tokens", "temperature", "chat", "question",
            "ask", "stop", "clear", "model-input", "seen", "prompt"} <= ids


def test_demo_command_binds_this_machine_and_refuses_a_folder_that_is_no_model(tmp_path, capsys):
    args = build_parser().parse_args(["demo", "--model", str(tmp_path)])
    assert (args.host, args.port, args.max_new_tokens, args.overflow) == ("127.0.0.1", 7860, None, None)  # None: DemoSettings'
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    defaults = DemoSettings()  # the help's numbers are the settings' own
    assert f"(default: the demo's, {defaults.max_new_tokens})" in shown and f"(default: the demo's, {defaults.max_new_tokens_limit})" in shown
    assert main(["demo", "--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["demo", "--model", str(tmp_path), "--max-new-tokens", "600"]) == 2
    assert "max_new_tokens must be in 1..max_new_tokens_limit (512)" in capsys.readouterr().err


# --- in a real browser


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def chromium() -> tuple[str, str]:
    """(browser, driver) paths of the system Chromium, or a visible skip."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("no system Chromium and chromedriver (Debian: apt-get install chromium chromium-driver; `make browser`)")
    return browser, driver


@pytest.mark.slow
def test_in_a_headless_browser(tiny_folder, tmp_path):
    """Type a protein and a question, read the streamed answer; type a bad protein, read the error.

    PROTEIN_LLAVA_DEMO_MODEL names another model folder (the README screenshot uses the demo export);
    PROTEIN_LLAVA_DEMO_SCREENSHOT=1 writes the screenshot to docs/webdemo.png.
    """
    browser, driver_path = chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from protein_llava.inference.webdemo import build_app, launch

    folder = Path(os.environ.get("PROTEIN_LLAVA_DEMO_MODEL", tiny_folder))
    loaded = load_protein_llm(folder, device="cpu")
    protein, follow_up = EXAMPLE_PROTEINS[0][1], "Which amino acid is this protein most enriched in?"
    session = ChatSession(loaded, max_new_tokens=32)
    session.load_protein(protein)
    expected = [session.ask(TEMPLATES["function"]), session.ask(follow_up)]

    app = build_app(loaded, DemoSettings(max_new_tokens=32), model_name=f"{folder.parent.name}/{folder.name}")
    port = free_port()
    launch(app, port=port, prevent_thread_lock=True, quiet=True)
    assert app.server_name == "127.0.0.1"
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1040"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    wait = WebDriverWait(driver, 60)

    def text_of(selector: str) -> str:
        return driver.find_element(By.CSS_SELECTOR, selector).get_attribute("textContent")

    def answers_after(turn: int) -> list[str]:
        """The answers shown once turn `turn` has finished streaming (its ending line is in the panel)."""

        def finished(d):
            seen = text_of("#seen")
            return f"turn {turn} of the conversation" in seen and "…" not in seen

        wait.until(finished)
        bubbles = driver.find_elements(By.CSS_SELECTOR, '#chat [data-testid="bot"] .message-content')
        return [" ".join(b.get_attribute("textContent").split()) for b in bubbles]  # whitespace as laid out

    def shown_prompt() -> str:
        """The rendered prompt as the code box shows it, control characters (the tiny model's replies
        have some; the box draws them as symbols U+2400-U+243F) left out."""
        lines = driver.find_elements(By.CSS_SELECTOR, "#prompt .cm-line")
        return re.sub("[\u2400-\u243f]", "", "\n".join(line.get_attribute("textContent") for line in lines))

    def rendered(messages: list[dict]) -> str:
        # The code box also drops the template's final newline.
        return re.sub("[\x00-\x08\x0b-\x1f\x7f]", "", loaded.render_chat(messages)).rstrip("\n")

    try:
        driver.get(f"http://127.0.0.1:{port}/")
        sequence = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#sequence textarea"))
        sequence.send_keys(protein)
        wait.until(lambda d: "76 residues" in text_of("#protein-status"))
        # Open "What the model saw": a closed accordion's content is not in the page.
        driver.find_element(By.CSS_SELECTOR, "#model-input button.label-wrap").click()
        template = driver.find_element(By.CSS_SELECTOR, "#template input")
        template.click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, 'li[role="option"][aria-label="function"]')).click()
        question = driver.find_element(By.CSS_SELECTOR, "#question textarea")
        wait.until(lambda d: question.get_attribute("value") == TEMPLATES["function"])
        driver.find_element(By.CSS_SELECTOR, "#ask").click()
        assert answers_after(1) == [" ".join(expected[0].split())]
        seen = text_of("#seen")
        tokens = loaded.processor.num_protein_tokens(len(protein))
        assert f"record query, 76 residues → {tokens} protein tokens" in seen and "greedy" in seen
        assert shown_prompt() == rendered(session.messages[:1])

        question.send_keys(follow_up + Keys.ENTER)
        assert answers_after(2) == [" ".join(answer.split()) for answer in expected]
        assert shown_prompt() == rendered(session.messages[:3])  # the protein in the first turn only
        if os.environ.get("PROTEIN_LLAVA_DEMO_SCREENSHOT"):
            from PIL import Image

            README_SCREENSHOT.parent.mkdir(exist_ok=True)
            driver.save_screenshot(str(README_SCREENSHOT))
            # 64 colours keep the committed PNG small; the page is flat UI colours and text.
            Image.open(README_SCREENSHOT).convert("RGB").quantize(colors=64).save(README_SCREENSHOT, optimize=True)

        sequence.clear()
        sequence.send_keys("MKTJAYIAK")
        wait.until(lambda d: "Error" in text_of("#protein-status"))
        assert "invalid residue 'J' at position 4 in record 'query'" in text_of("#protein-status")
        assert driver.find_elements(By.CSS_SELECTOR, '#chat [data-testid="user"]') == []  # another protein, a new chat
        question.send_keys("And now?")
        driver.find_element(By.CSS_SELECTOR, "#ask").click()
        time.sleep(1)  # the refused turn must not reach the chat
        assert "invalid residue 'J' at position 4" in text_of("#protein-status")
        assert driver.find_elements(By.CSS_SELECTOR, '#chat [data-testid="user"]') == []

        driver.find_element(By.XPATH, f"//button[contains(., '{EXAMPLE_PROTEINS[2][0]}')]").click()
        wait.until(lambda d: "2 FASTA records" in text_of("#protein-status"))
        assert "Record insulin_A: 21 residues" in text_of("#protein-status")
        assert driver.find_element(By.CSS_SELECTOR, "#record").is_displayed()
    finally:
        driver.quit()
        app.close()
