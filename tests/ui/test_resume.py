"""Resuming a conversation from Export's JSON (helpers.ui.transcript.load_conversation): what Export writes
reads back equal, and anything else is refused with the reason."""

import json

import pytest

from helpers.errors import DialogError, UsageError
from helpers.generation import GenerationStats
from helpers.ui.transcript import answer_stats, export, load_conversation

STATS = answer_stats(GenerationStats(prompt_tokens=30, cached_tokens=12, completion_tokens=9, finish_reason="stop"))
TURNS = [
    {"role": "user", "content": "Fix this:\nline one\n\tline two  \n"},
    {"role": "assistant", "content": "Done: ```\ncode\n```", "finish": "stop", "stats": STATS},
    {"role": "user", "content": "Unicode: 東京 🚀 é"},
    {"role": "assistant", "content": "Cut here", "finish": "length"},
]


def test_what_export_writes_reads_back_equal(tmp_path):
    path = export(TURNS, system_prompt="Be brief.\nVery.", metadata={"model": "m.gguf"}, folder=tmp_path)
    saved = load_conversation(path.with_suffix(".json"))
    assert (saved.system_prompt, saved.messages) == ("Be brief.\nVery.", TURNS)
    assert saved.metadata["model"] == "m.gguf"


def test_no_system_prompt(tmp_path):
    path = export(TURNS[:2], folder=tmp_path).with_suffix(".json")
    assert load_conversation(path).system_prompt == "" and load_conversation(path).messages == TURNS[:2]


BAD = {
    "not JSON": b"{'messages': []",
    "not UTF-8": b'{"messages": ["\xff"]}',
    "a list": b"[]",
    "no messages": b'{"model": "x"}',
    "messages not a list": b'{"messages": "hi"}',
    "message not an object": b'{"messages": ["hi"]}',
    "unknown role": b'{"messages": [{"role": "tool", "content": "x"}]}',
    "system later": b'{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}',
    "assistant first": b'{"messages": [{"role": "assistant", "content": "a"}]}',
    "two users": b'{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
    "content not text": b'{"messages": [{"role": "user", "content": ["a"]}]}',
    "lone surrogate": b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    "unknown field": b'{"messages": [{"role": "user", "content": "a", "html": "<script>"}]}',
    "finish on a user": b'{"messages": [{"role": "user", "content": "a", "finish": "stop"}]}',
    "bad finish": b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", '
    b'"finish": "<img>"}]}',
    "stats not figures": b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", '
    b'"stats": {"completion_tokens": NaN}}]}',
    "unknown stat": b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", '
    b'"stats": {"evil": 1}}]}',
    "a number stat as text": b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": '
    b'"b", "stats": {"completion_tokens": "5"}}]}',
    "nested too deep": b'{"messages": ' + b"[" * 100_000,
    "a question without its answer": b'{"messages": [{"role": "user", "content": "a"}]}',
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_file_that_is_not_an_export_is_refused(tmp_path, name):
    path = tmp_path / "chat.json"
    path.write_bytes(BAD[name])
    with pytest.raises(DialogError) as error:
        load_conversation(path)
    assert "chat.json" in str(error.value) or "Message" in str(error.value) or "message" in str(error.value)


def test_a_missing_file_or_a_huge_one(tmp_path):
    with pytest.raises(UsageError, match="is not a file"):
        load_conversation(tmp_path / "nothing.json")
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps({"messages": [{"role": "user", "content": "x" * 21_000_000}]}))
    with pytest.raises(DialogError, match="not a conversation Export wrote"):
        load_conversation(huge)
