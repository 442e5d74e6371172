"""The chat panel's conversation as a plain object: no widgets, no model, no threads. Each test holds it to what
tests/ui/test_panel.py asserts of the panel, on hand-built histories."""

import ast
from pathlib import Path

import pytest

from helpers.errors import UsageError
from helpers.ui.conversation import Conversation

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def user(text):
    return {"role": "user", "content": text}


def answer(text, finish="stop"):
    return {"role": "assistant", "content": text, "finish": finish}


def chat(*turns, system="You are a helpful assistant."):
    return Conversation(system, list(turns))


def answered(c, text, finish="stop", mode="new", prompt=""):
    """One turn asked and answered, as the panel does it."""
    request = c.begin(mode, prompt)
    assert c.complete(request, text, finish) is True
    return request


# --- the dialog the model is given ---------------------------------------------------------------------------


def test_messages_are_the_system_prompt_the_turns_and_the_prompt():
    c = chat(user("My name is Ada. Say hello."), answer("Hello Ada!"))
    messages = c.messages("What is my name?")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0] == SYSTEM and messages[2] == {"role": "assistant", "content": "Hello Ada!"}  # no "finish"
    assert messages[-1] == user("What is my name?")
    assert c.history[-1]["finish"] == "stop"  # the turns themselves keep it


@pytest.mark.parametrize("system", ["", "   \n"])
def test_a_blank_system_prompt_is_left_out(system):
    assert chat(system=system).messages("Hi") == [user("Hi")]


def test_the_system_prompt_is_the_current_one():
    c = chat(user("Hi"), answer("Hello"))
    c.system_prompt = "Be brief."
    assert c.messages("Bye")[0] == {"role": "system", "content": "Be brief."}


# --- a new prompt --------------------------------------------------------------------------------------------


def test_a_new_prompt_keeps_the_turns_and_is_answered_after_them():
    c = Conversation("You are a helpful assistant.")
    request = c.begin("new", "My name is Ada. Say hello.")
    assert request.messages == [SYSTEM, user("My name is Ada. Say hello.")] and request.prefix == ""
    assert request.pending == [user("My name is Ada. Say hello.")]  # the question shows at once
    assert request.prompt_back == "My name is Ada. Say hello."  # it leaves the box, and returns if nothing comes
    assert c.complete(request, "Hello Ada!", "stop")
    answered(c, "Your name is Ada.", prompt="What is my name?")
    assert c.history == [
        user("My name is Ada. Say hello."),
        answer("Hello Ada!"),
        user("What is my name?"),
        answer("Your name is Ada."),
    ]


@pytest.mark.parametrize("prompt", ["", "  \n "])
def test_a_blank_prompt_is_refused(prompt):
    c = chat(user("Hi"), answer("Hello"))
    before = list(c.history)
    with pytest.raises(UsageError, match=r"^Type a prompt first\.$"):
        c.begin("new", prompt)
    assert c.history == before


def test_the_finish_reason_is_kept_with_the_answer():
    c = chat()
    answered(c, "One, two, three", finish="cancelled", prompt="Count.")
    assert c.history[-1] == answer("One, two, three", "cancelled")


# --- nothing kept --------------------------------------------------------------------------------------------


def test_an_empty_answer_restores_the_conversation_and_gives_the_prompt_back():
    """Stopped while the prompt was read: no turn added, the question back in the box."""
    c = chat()
    request = c.begin("new", "Summarise: the tide rises.")
    assert c.complete(request, "", "cancelled") is False
    assert c.history == [] and request.prompt_back == "Summarise: the tide rises."


def test_an_error_leaves_the_conversation_as_it_was():
    c = chat(user("Say hi."), answer("Hi!"))
    before = list(c.history)
    request = c.begin("new", "word " * 50)
    c.restore(request)
    assert c.history == before and request.prompt_back.startswith("word word")


def test_an_empty_regeneration_puts_the_old_answer_back_and_no_prompt():
    c = chat(user("Name a colour."), answer("Blue."))
    before = list(c.history)
    request = c.begin("regenerate")
    assert c.history == []  # the pair being redone is not shown as finished meanwhile
    assert c.complete(request, "  \n", "stop") is False
    assert c.history == before and request.prompt_back == ""


# --- Regenerate and Continue -----------------------------------------------------------------------------------


def test_regenerate_asks_the_last_prompt_again_and_replaces_the_answer():
    c = chat(user("Say hi."), answer("Hi!"), user("Name a colour."), answer("Blue."))
    request = c.begin("regenerate", "text in the box is not used")
    assert request.messages == [
        SYSTEM,
        user("Say hi."),
        {"role": "assistant", "content": "Hi!"},
        user("Name a colour."),
    ]
    assert request.prefix == "" and request.pending == [user("Name a colour.")]
    assert c.history == [user("Say hi."), answer("Hi!")]
    assert c.complete(request, "Green.", "stop")
    assert c.history == [user("Say hi."), answer("Hi!"), user("Name a colour."), answer("Green.")]


def test_continue_extends_the_last_answer_from_where_it_ended():
    c = chat(user("Write a short poem about the sea."), answer("The sea is wide, \n", "length"))
    request = c.begin("continue")
    assert request.prefix == "The sea is wide,"  # without the trailing space: the model picks the next token
    assert request.messages == [SYSTEM, user("Write a short poem about the sea.")]
    assert request.pending == [
        user("Write a short poem about the sea."),
        {"role": "assistant", "content": "The sea is wide,"},
    ]
    assert request.prompt_back == ""
    assert c.complete(request, "The sea is wide, and deep.", "stop")
    assert c.history == [user("Write a short poem about the sea."), answer("The sea is wide, and deep.")]


@pytest.mark.parametrize("mode", ["regenerate", "continue"])
@pytest.mark.parametrize("turns", [[], [user("Hello")], [user("Hi"), answer("Hello"), user("Bye")]])
def test_regenerate_and_continue_need_an_answer(mode, turns):
    c = chat(*turns)
    with pytest.raises(UsageError, match=rf"^Nothing to {mode} yet: send a prompt first\.$"):
        c.begin(mode)
    assert c.history == turns


@pytest.mark.parametrize("empty", ["", "  \n"])
def test_continue_refuses_an_empty_answer(empty):
    c = chat(user("Hi"), answer(empty, "cancelled"))
    before = list(c.history)
    with pytest.raises(UsageError, match=r"^The last answer is empty: use Regenerate\.$"):
        c.begin("continue")
    assert c.history == before
    c.begin("regenerate")  # what the message says to use instead


def test_refusals_are_value_errors_and_an_unknown_mode_is_one():
    with pytest.raises(ValueError, match="Type a prompt first"):
        chat().begin("new")
    with pytest.raises(UsageError, match="Unknown mode 'again'"):
        chat(user("Hi"), answer("Hello")).begin("again")


# --- Edit, Clear -----------------------------------------------------------------------------------------------


def test_edit_gives_a_prompt_back_and_drops_nothing_until_it_is_sent():
    turns = [user("Say hi."), answer("Hi!"), user("Say bye."), answer("Bye!"), user("Say why."), answer("Why?")]
    c = chat(*turns)
    assert c.edit() == "Say why." and c.editing == 4 and c.edit_drops == 2
    assert c.edit(0) == "Say hi." and c.editing == 0 and c.edit_drops == 6
    assert c.history == turns  # shown whole until the edit is sent
    assert c.messages("Say hello.") == [SYSTEM, user("Say hello.")]  # the dialog without what it replaces
    answered(c, "Hello!", prompt="Say hello.")
    assert c.history == [user("Say hello."), answer("Hello!")] and c.editing is None


def test_edit_of_turn_k_keeps_the_turns_before_it():
    turns = [user("A"), answer("a"), user("B"), answer("b"), user("C"), answer("c")]
    c = chat(*turns)
    assert c.edit(1) == "B" and c.edit_drops == 4
    request = c.begin("new", "B2")
    assert request.messages == [SYSTEM, user("A"), {"role": "assistant", "content": "a"}, user("B2")]
    c.complete(request, "b2", "stop")
    assert c.history == turns[:2] + [user("B2"), answer("b2")]


def test_an_edit_that_gets_no_answer_puts_every_turn_back():
    turns = [user("A"), answer("a"), user("B"), answer("b")]
    c = chat(*turns)
    c.edit(0)
    request = c.begin("new", "A2")
    assert c.complete(request, "  ", "stop") is False and c.history == turns


def test_edit_can_be_cancelled_and_regenerate_ends_it():
    turns = [user("A"), answer("a"), user("B"), answer("b")]
    c = chat(*turns)
    c.edit(0)
    c.cancel_edit()
    assert c.messages("C")[-2:] == [{"role": "assistant", "content": "b"}, user("C")]
    c.edit(0)
    request = c.begin("regenerate")
    assert c.editing is None and request.messages[-1] == user("B")


def test_edit_of_a_turn_that_is_not_there_is_refused():
    c = chat(user("A"), answer("a"))
    with pytest.raises(UsageError, match="no user message 3"):
        c.edit(2)
    assert c.editing is None


def test_an_answer_keeps_its_figures():
    c = chat()
    request = c.begin("new", "Hi")
    c.complete(request, "Hello", "stop", {"completion_tokens": 2, "finish_reason": "stop"})
    assert c.history[-1]["stats"] == {"completion_tokens": 2, "finish_reason": "stop"}
    assert c.messages("Bye")[-2] == {"role": "assistant", "content": "Hello"}  # the model never sees them


def test_edit_with_nothing_to_edit_changes_nothing():
    c = chat()
    assert c.edit() is None and c.history == [] and c.editing is None


def test_clear_empties_the_turns_and_keeps_the_system_prompt():
    c = chat(user("Hi"), answer("Hello"))
    c.clear()
    assert c.history == [] and c.messages("Hi")[0] == SYSTEM


# --- which buttons make sense ------------------------------------------------------------------------------------


def buttons(c):
    return {"regenerate": c.answered, "continue": c.can_continue, "edit": c.can_edit}


def test_an_empty_conversation_offers_none():
    assert buttons(chat()) == {"regenerate": False, "continue": False, "edit": False}


@pytest.mark.parametrize(
    ("finish", "can_continue"),
    [("stop", False), ("length", True), ("cancelled", True), (None, True)],
)
def test_continue_only_for_an_answer_that_did_not_end_by_itself(finish, can_continue):
    last = answer("Once upon", finish) if finish else {"role": "assistant", "content": "Once upon"}
    c = chat(user("Tell me a story."), last)
    assert buttons(c) == {"regenerate": True, "continue": can_continue, "edit": True}


def test_a_prompt_without_an_answer_can_be_edited_only():
    assert buttons(chat(user("Hi"))) == {"regenerate": False, "continue": False, "edit": True}


def test_the_buttons_follow_the_turns():
    c = chat()
    answered(c, "One, two", finish="cancelled", prompt="Count.")
    assert buttons(c) == {"regenerate": True, "continue": True, "edit": True}
    answered(c, "One, two, three.", finish="stop", mode="continue")
    assert buttons(c) == {"regenerate": True, "continue": False, "edit": True}
    c.clear()
    assert buttons(c) == {"regenerate": False, "continue": False, "edit": False}


# --- a plain object --------------------------------------------------------------------------------------------


def test_the_conversation_imports_no_widgets_and_no_threads():
    source = Path(__file__).resolve().parents[2] / "helpers" / "ui" / "conversation.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported <= {"__future__", "dataclasses", "helpers.errors"}, imported


@pytest.mark.parametrize("mode", ["regenerate", "continue"])
def test_a_lone_answer_set_by_hand_has_nothing_to_redo(mode):
    """A history that starts with an answer (set through panel.history) was an IndexError that left the panel
    busy for good; it is refused like an empty conversation, and nothing changes."""
    c = chat(answer("Hello."))
    with pytest.raises(UsageError, match=f"Nothing to {mode} yet"):
        c.begin(mode)
    assert c.history == [answer("Hello.")] and not c.answered and not c.can_continue


def test_a_lone_answer_is_not_put_back_in_the_box_by_edit():
    c = chat(answer("Hello."))
    assert not c.can_edit and c.edit() is None and c.history == [answer("Hello.")]
