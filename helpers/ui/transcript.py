"""The conversation as the chat panel shows it (HTML) and as Export writes it (Markdown and JSON).

A conversation is a list of messages `{"role": "user" | "assistant", "content": str}`; an assistant message
may also carry `"finish"` ("stop", "length" or "cancelled", from `GenerationStats.finish_reason`).
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

from helpers.ui.markdown import render_markdown

# One stylesheet, scoped to the panel. The scroll box is a reversed flex column, so the browser keeps its
# bottom (the newest message) in view as the answer grows, without any script. Prose wraps between words
# (a word longer than the line breaks only then); code blocks keep their lines and scroll sideways.
STYLE = """<style>
.l2t-chat {max-height: 560px; overflow-y: auto; display: flex; flex-direction: column-reverse;
  border: 1px solid rgba(128,128,128,.35); border-radius: 6px; padding: 4px 10px; line-height: 1.5;
  white-space: normal; overflow-wrap: break-word; word-break: normal; hyphens: manual}
.l2t-msg {margin: 8px 0; padding: 6px 12px; border-radius: 10px; max-width: 92%; box-sizing: border-box}
.l2t-user {margin-left: auto; width: fit-content; background: rgba(33,150,243,.14)}
.l2t-user .l2t-text {white-space: pre-wrap}
.l2t-assistant {background: rgba(128,128,128,.09)}
.l2t-role {font-size: .78em; font-weight: 600; opacity: .7}
.l2t-msg pre {overflow-x: auto; white-space: pre; padding: 8px; border-radius: 4px; background: rgba(128,128,128,.15)}
.l2t-msg code {font-family: var(--jp-code-font-family, monospace); font-size: .92em}
.l2t-msg table {border-collapse: collapse; display: block; overflow-x: auto}
.l2t-msg th, .l2t-msg td {border: 1px solid rgba(128,128,128,.5); padding: 2px 8px}
.l2t-msg p {margin: .35em 0}
.l2t-finish {font-size: .8em; color: #b26a00}
.l2t-empty {opacity: .6; font-style: italic; padding: 8px 0}
.llama2-textgen-reopen {display: none}
</style>"""

ROLE_NAMES = {"user": "You", "assistant": "Assistant"}
FINISH_NOTES = {
    "cancelled": "stopped (Continue extends it)",
    "length": "cut at the length limit (Continue extends it)",
}


def message_html(message: dict, *, streaming: bool = False) -> str:
    role = message["role"]
    if role == "user":
        body = f'<div class="l2t-text">{html.escape(message["content"])}</div>'
    else:
        body = render_markdown(message["content"]) if message["content"] else "<p>…</p>"
    note = "" if streaming else FINISH_NOTES.get(message.get("finish", ""), "")
    note = f'<div class="l2t-finish">{note}</div>' if note else ""
    name = ROLE_NAMES.get(role, role)
    return f'<div class="l2t-msg l2t-{role}"><div class="l2t-role">{name}</div>{body}{note}</div>'


def conversation_html(messages: list[dict], *, streaming: bool = False) -> str:
    """The whole conversation, oldest first; `streaming`: the last message is still growing."""
    if not messages:
        inner = '<div class="l2t-empty">No messages yet: type a prompt below and press Enter or Generate.</div>'
    else:
        last = len(messages) - 1
        inner = "".join(message_html(m, streaming=streaming and i == last) for i, m in enumerate(messages))
    return f'{STYLE}<div class="l2t-chat"><div>{inner}</div></div>'


def to_markdown(messages: list[dict], system_prompt: str = "", title: str = "Chat") -> str:
    parts = [f"# {title}\n"]
    if system_prompt.strip():
        parts.append(f"**System prompt:** {system_prompt.strip()}\n")
    for m in messages:
        note = FINISH_NOTES.get(m.get("finish", ""), "")
        parts.append(
            f"## {ROLE_NAMES.get(m['role'], m['role'])}\n\n{m['content']}\n" + (f"\n*({note})*\n" if note else "")
        )
    return "\n".join(parts)


def export(messages: list[dict], *, system_prompt: str = "", metadata: dict | None = None, folder=".") -> Path:
    """Write the conversation to `chat-<time>.md` and `.json` in `folder`; returns the Markdown file's path."""
    stem = Path(folder) / time.strftime("chat-%Y%m%d-%H%M%S")
    n = 1
    while stem.with_suffix(".md").exists() or stem.with_suffix(".json").exists():
        n += 1
        stem = stem.with_name(f"{stem.name.split('_')[0]}_{n}")
    system = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    record = {**(metadata or {}), "messages": system + messages}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    stem.with_suffix(".md").write_text(to_markdown(messages, system_prompt), encoding="utf-8")
    return stem.with_suffix(".md").resolve()
