"""The conversation as the chat panel shows it (HTML), as Export writes it (Markdown and JSON), and read back
from that JSON to resume it (`load_conversation`).

A conversation is a list of messages `{"role": "user" | "assistant", "content": str}`; an assistant message
may also carry `"finish"` ("stop", "length" or "cancelled", from `GenerationStats.finish_reason`) and `"stats"`
(that answer's figures: `GenerationStats` fields, see `answer_stats`).
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from helpers.errors import DialogError, UsageError
from helpers.generation import GenerationStats
from helpers.ui.markdown import render_markdown

# One stylesheet, scoped to the panel. The scroll box is a reversed flex column, so the browser keeps its
# bottom (the newest message) in view as the answer grows, without any script. Prose wraps between words
# (a word longer than the line breaks only then); code blocks keep their lines and scroll sideways.
STYLE = """<style>
.l2t-chat {max-height: 560px; overflow-y: auto; overflow-x: hidden; display: flex; flex-direction: column-reverse;
  border: 1px solid rgba(128,128,128,.35); border-radius: 6px; padding: 4px 10px; line-height: 1.5;
  white-space: normal; overflow-wrap: anywhere; word-break: normal; hyphens: manual; box-sizing: border-box}
.l2t-chat > div {min-width: 0; max-width: 100%}
.l2t-msg {margin: 8px 0; padding: 6px 12px; border-radius: 10px; max-width: 92%; min-width: 0;
  box-sizing: border-box; overflow-x: auto}
.l2t-user {margin-left: auto; width: fit-content; background: rgba(33,150,243,.14)}
.l2t-user .l2t-text {white-space: pre-wrap}
.l2t-editing {outline: 2px dashed rgba(33,150,243,.8)}
.l2t-system {font-size: .85em; opacity: .8; margin: 6px 0; white-space: pre-wrap}
.l2t-system summary {cursor: pointer; white-space: nowrap; overflow: hidden; text-overflow: ellipsis}
.l2t-answer-stats {font-size: .75em; opacity: .6; margin-top: 2px}
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
.llama2-textgen-panel, .llama2-textgen-panel .widget-hbox, .llama2-textgen-panel .widget-vbox {max-width: 100%;
  min-width: 0; box-sizing: border-box}
.llama2-textgen-panel {overflow-x: hidden}
.llama2-textgen-panel > .jupyter-widgets {max-width: calc(100% - 4px)}  /* width 100% plus its 2px margins */
.llama2-textgen-panel .widget-textarea textarea {min-height: 3.2em; resize: vertical}
.llama2-textgen-panel button:disabled {opacity: .4 !important; cursor: not-allowed; filter: grayscale(1)}
</style>"""
SYSTEM_SHOWN = 90  # characters of a system prompt shown on its one line; the rest when unfolded

ROLE_NAMES = {"user": "You", "assistant": "Assistant"}
FINISH_NOTES = {
    "cancelled": "stopped (Continue extends it)",
    "length": "cut at the length limit (Continue extends it)",
}


def answer_stats(stats) -> dict:
    """The figures kept with an answer (and exported with it): a `GenerationStats` as a plain dict."""
    return dataclasses.asdict(stats)


def stats_text(stats: dict) -> str:
    """One quiet line under an answer: tokens, tokens/s, first token, tokens from cache, how it ended."""
    parts = [f"{stats.get('completion_tokens', 0)} tokens"]
    if stats.get("completion_tokens", 0) > 1:
        parts.append(f"{stats.get('tokens_per_second', 0):.1f} tokens/s")
    parts.append(f"first token {stats.get('time_to_first_token_s', 0):.2f} s")
    if stats.get("cached_tokens"):
        parts.append(f"{stats['cached_tokens']:,} of {stats.get('prompt_tokens', 0):,} prompt tokens from cache")
    parts.append({"stop": "ended", "length": "cut", "cancelled": "stopped"}.get(stats.get("finish_reason"), "?"))
    return " · ".join(parts)


def message_html(message: dict, *, streaming: bool = False, editing: bool = False) -> str:
    role = message["role"]
    if role == "user":
        body = f'<div class="l2t-text">{html.escape(message["content"])}</div>'
    else:
        body = render_markdown(message["content"]) if message["content"] else "<p>…</p>"
    note = "" if streaming else FINISH_NOTES.get(message.get("finish", ""), "")
    note = f'<div class="l2t-finish">{note}</div>' if note else ""
    if message.get("stats") and not streaming:
        note += f'<div class="l2t-answer-stats">{html.escape(stats_text(message["stats"]))}</div>'
    name = ROLE_NAMES.get(role, role) + (" (editing)" if editing else "")
    classes = f"l2t-msg l2t-{role}" + (" l2t-editing" if editing else "")
    return f'<div class="{classes}"><div class="l2t-role">{name}</div>{body}{note}</div>'


def system_html(system_prompt: str) -> str:
    """The system prompt at the top of the conversation: one line, unfolded on a click when it is longer."""
    text = system_prompt.strip()
    if not text:
        return ""
    if len(text) <= SYSTEM_SHOWN and "\n" not in text:
        return f'<div class="l2t-system"><b>System prompt:</b> {html.escape(text)}</div>'
    head = html.escape(text.splitlines()[0][:SYSTEM_SHOWN])
    return f'<details class="l2t-system"><summary><b>System prompt:</b> {head}…</summary>{html.escape(text)}</details>'


def conversation_html(
    messages: list[dict], *, streaming: bool = False, system_prompt: str = "", editing: int | None = None
) -> str:
    """The whole conversation, oldest first, after its system prompt; `streaming`: the last message is still
    growing; `editing`: the index of the message being edited (marked)."""
    if not messages:
        inner = '<div class="l2t-empty">No messages yet: type a prompt below and press Enter or Generate.</div>'
    else:
        last = len(messages) - 1
        inner = "".join(
            message_html(m, streaming=streaming and i == last, editing=i == editing) for i, m in enumerate(messages)
        )
    return f'{STYLE}<div class="l2t-chat"><div>{system_html(system_prompt)}{inner}</div></div>'


def to_markdown(messages: list[dict], system_prompt: str = "", title: str = "Chat") -> str:
    parts = [f"# {title}\n"]
    if system_prompt.strip():
        parts.append(f"**System prompt:** {system_prompt.strip()}\n")
    for m in messages:
        note = FINISH_NOTES.get(m.get("finish", ""), "")
        figures = stats_text(m["stats"]) if m.get("stats") else ""
        parts.append(
            f"## {ROLE_NAMES.get(m['role'], m['role'])}\n\n{m['content']}\n"
            + (f"\n*({note})*\n" if note else "")
            + (f"\n<small>{figures}</small>\n" if figures else "")
        )
    return "\n".join(parts)


def export(messages: list[dict], *, system_prompt: str = "", metadata: dict | None = None, folder=".") -> Path:
    """Write the conversation to `chat-<time>.md` and `.json` in `folder`; returns the Markdown file's path.
    Each file appears whole or not at all (written aside, then renamed); text UTF-8 cannot encode (a lone
    surrogate) is refused before anything is written."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    record = {**(metadata or {}), "messages": system + messages}
    try:
        files = {
            ".json": (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode("utf-8"),
            ".md": to_markdown(messages, system_prompt).encode("utf-8"),
        }
    except UnicodeEncodeError as error:
        where = next((f"message {i + 1}" for i, m in enumerate(record["messages"]) if _unencodable(m)), "metadata")
        raise UsageError(
            f"Nothing was exported: the conversation's {where} holds a lone surrogate "
            f"({error.object[error.start]!r}), which is not text UTF-8 can encode. Edit or remove that message "
            "(or replace it: text.encode('utf-8', 'replace').decode('utf-8')) and export again."
        ) from None
    stem = Path(folder) / time.strftime("chat-%Y%m%d-%H%M%S")
    n = 1
    while stem.with_suffix(".md").exists() or stem.with_suffix(".json").exists():
        n += 1
        stem = stem.with_name(f"{stem.name.split('_')[0]}_{n}")
    made: list[Path] = []
    try:
        for suffix, data in files.items():
            final = stem.with_suffix(suffix)
            part = final.with_name(f".{final.name}.part")
            made.append(part)
            part.write_bytes(data)
            os.replace(part, final)
            made[-1] = final
    except BaseException:  # a full disk, an interrupt: no half export is left behind
        for path in made:
            path.unlink(missing_ok=True)
        raise
    return stem.with_suffix(".md").resolve()


def _unencodable(message) -> bool:
    content = message.get("content") if isinstance(message, dict) else None
    try:
        str(content).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# --- resuming an exported conversation ---------------------------------------------------------------------

MAX_LOAD_BYTES = 20_000_000  # far above any chat a context window holds; a bigger file is not an export
FINISHES = ("stop", "length", "cancelled", None)
STATS_FIELDS = {f.name for f in dataclasses.fields(GenerationStats)}
TEXT_STATS = {f.name for f in dataclasses.fields(GenerationStats) if f.type in (str, "str")}  # the rest are numbers


@dataclass(frozen=True)
class SavedConversation:
    """A conversation read back from Export's JSON: its system prompt, its turns (user, assistant, ...,
    with each answer's finish reason and figures) and the rest of the record (model, settings, time)."""

    system_prompt: str
    messages: list[dict]
    metadata: dict


def load_conversation(path) -> SavedConversation:
    """Read a conversation that Export wrote (`chat-....json`), checked as a dialog: after an optional system
    prompt, user and assistant messages in turn, starting with the user, each with text only. Anything else (not
    JSON, another shape, unknown fields, text that is not valid Unicode, a huge file) raises `DialogError`
    saying what is wrong, and nothing is changed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"{path} is not a file: give the path of a chat-....json file that Export wrote.")
    if path.stat().st_size > MAX_LOAD_BYTES:
        raise DialogError(f"{path} is {path.stat().st_size:,} bytes: not a conversation Export wrote.")
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise DialogError(f"{path.name} is not JSON ({error}): pick the .json file that Export wrote.") from None
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise DialogError(f'{path.name} has no "messages" list: pick the .json file that Export wrote.')
    messages = [_checked_message(i, m) for i, m in enumerate(record["messages"])]
    system = messages.pop(0)["content"] if messages and messages[0]["role"] == "system" else ""
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise DialogError(
                f"{path.name}: message {i + 1} after the system prompt is from {message['role']!r}, {expected!r} "
                "was expected (a system prompt may only come first, then user and assistant in turn)."
            )
    if len(messages) % 2:
        raise DialogError(
            f"{path.name} ends with a message from the user, without its answer: Export writes whole turns."
        )
    metadata = {k: v for k, v in record.items() if k != "messages"}
    return SavedConversation(system_prompt=system, messages=messages, metadata=metadata)


def _checked_message(i: int, message) -> dict:
    where = f"Message {i}"
    if not isinstance(message, dict) or set(message) - {"role", "content", "finish", "stats"}:
        raise DialogError(f"{where} must be an object with role, content and optionally finish and stats.")
    role, content = message.get("role"), message.get("content")
    if role not in ("system", "user", "assistant") or (role == "system" and i != 0):
        raise DialogError(f"{where} has role {role!r}: user or assistant (system only as the first message).")
    if not isinstance(content, str):
        raise DialogError(f"{where} content must be text, got {type(content).__name__}.")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError:
        raise DialogError(f"{where} content is not valid Unicode (a lone surrogate escape).") from None
    checked = {"role": role, "content": content}
    if role != "assistant":
        if set(message) - {"role", "content"}:
            raise DialogError(f"{where}: only an answer carries finish and stats.")
        return checked
    if message.get("finish") not in FINISHES:
        raise DialogError(f"{where} finish is {message.get('finish')!r}: one of stop, length, cancelled.")
    if "finish" in message:
        checked["finish"] = message["finish"]
    stats = message.get("stats")
    if stats is not None:
        numbers = isinstance(stats, dict) and all(
            k in STATS_FIELDS and (isinstance(v, str) if k in TEXT_STATS else _finite(v)) for k, v in stats.items()
        )
        if not numbers:
            raise DialogError(f"{where} stats must be the figures Export wrote ({', '.join(sorted(STATS_FIELDS))}).")
        checked["stats"] = dict(stats)
    return checked


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
