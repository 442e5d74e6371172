"""Export: both files whole or none at all, and text UTF-8 cannot encode refused before anything is written."""

import json
import os

import pytest

from helpers.errors import UsageError
from helpers.ui import transcript
from helpers.ui.transcript import export, to_markdown

CHAT = [
    {"role": "user", "content": "Name a sea creature. 🐙"},
    {"role": "assistant", "content": "An octopus — «pieuvre».", "finish": "stop"},
]


def test_an_export_writes_both_files_whole(tmp_path):
    md = export(CHAT, system_prompt="Be brief.", metadata={"model": "smol"}, folder=tmp_path)
    record = json.loads(md.with_suffix(".json").read_text(encoding="utf-8"))
    assert record == {"model": "smol", "messages": [{"role": "system", "content": "Be brief."}, *CHAT]}
    assert md.read_text(encoding="utf-8") == to_markdown(CHAT, "Be brief.")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([md.name, md.with_suffix(".json").name])


@pytest.mark.parametrize(  # the system prompt is the record's message 1
    "where, named",
    [("user", "message 2"), ("assistant", "message 3"), ("system", "message 1"), ("metadata", "metadata")],
)
def test_a_lone_surrogate_is_refused_and_nothing_is_left(tmp_path, where, named):
    """It raised a raw UnicodeEncodeError and left an empty chat-*.json behind."""
    messages = [dict(m) for m in CHAT]
    system, metadata = "Be brief.", {"model": "smol"}
    if where == "user":
        messages[0]["content"] = "bad \ud800 text"
    elif where == "assistant":
        messages[1]["content"] = "\udcff"
    elif where == "system":
        system = "sys \udfff"
    else:
        metadata["model"] = "smol \ud83d"
    with pytest.raises(UsageError, match=rf"^Nothing was exported: the conversation's {named} holds a lone surrogate"):
        export(messages, system_prompt=system, metadata=metadata, folder=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_write_that_fails_midway_leaves_no_half_export(tmp_path, monkeypatch):
    """A full disk or an interrupt while the second file is written: the first one is taken back too."""
    real_replace = os.replace

    def full_disk_on_markdown(source, target):
        if str(target).endswith(".md"):
            raise OSError(28, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(transcript.os, "replace", full_disk_on_markdown)
    with pytest.raises(OSError, match="No space left"):
        export(CHAT, folder=tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    md = export(CHAT, folder=tmp_path)  # and the next export works
    assert md.is_file() and md.with_suffix(".json").is_file()
