"""What the prompt box's text changes mean (helpers.ui.prompt_box), on the sequences of values a browser sends:
one update per keystroke when the kernel keeps up, or many keystrokes merged into one when it does not."""

import pytest

from helpers.ui.prompt_box import after_sent, sent_by_enter


def updates(text, merged):
    """The values the front end sends while `text` is typed: every `merged` keystrokes become one update."""
    return [text[: i + merged] for i in range(0, len(text), merged)]


@pytest.mark.parametrize("merged", [1, 3, 7, 1000])  # 1000: the kernel was busy for the whole question
def test_enter_sends_the_whole_text_however_the_keystrokes_were_merged(merged):
    typed = "What is the capital of France?\n"
    before, sent = "", []
    for value in updates(typed, merged):
        prompt = sent_by_enter(before, value)
        if prompt is not None:
            sent.append(prompt)
        before = value
    assert sent == ["What is the capital of France?"]


def test_a_pasted_block_keeps_its_lines_and_the_enter_after_it_sends():
    pasted = "line one\nline two\nline three\n"
    assert sent_by_enter("", "Fix this:\n") == "Fix this:"  # typed, then Enter
    assert sent_by_enter("Fix: ", "Fix: " + pasted) is None  # a paste of several lines is not Enter
    assert sent_by_enter("Fix: " + pasted, "Fix: " + pasted + "\n") == "Fix: line one\nline two\nline three"


def test_a_correction_merged_with_enter_still_sends_what_the_box_shows():
    """A slow front end merges the keystrokes of a fix inside the text with the Enter after it."""
    assert sent_by_enter("What is th capital", "What is the capital\n") == "What is the capital"
    assert sent_by_enter("hello wor", "hello\n") == "hello"
    assert sent_by_enter("a\nb", "a\nbc\n") == "a\nbc"


def test_a_line_break_inside_the_text_or_a_deletion_is_not_enter():
    assert sent_by_enter("ab", "a\nb") is None
    assert sent_by_enter("abc\n", "abc") is None
    assert sent_by_enter("abc\n", "ab\n") is None
    assert sent_by_enter("", "") is None


def test_the_letters_typed_after_enter_stay_and_the_sent_prompt_goes():
    assert after_sent("Q1\n", "Q1\nAnd wh") == "And wh"
    assert after_sent("Q1\n", "") == "" and after_sent("", "abc") == "abc"
    assert after_sent("Q1\n", "Something else") == "Something else"
