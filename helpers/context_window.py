"""Fitting a dialog into the context window: drop the oldest user/assistant pairs, keeping the system prompt
and the last user message, until prompt + max_tokens fit; when even the last message leaves less room than
max_tokens, generate in the room there is (the context lowers max_tokens).

Llama 2's prompt is a concatenation of separately encoded turns (Meta's `chat_completion`), so each turn is
encoded once, newest first, and only as far back as fits; the system prompt is merged into the first kept
user message as Meta merges it. Other templates are encoded whole, O(log n) times (binary search on the
number of dropped pairs). Both check `stop_event` between encodings, so fitting a long history can be stopped.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import NamedTuple

from helpers.errors import ContextOverflowError
from helpers.templates import (
    check_special_tags,
    encode_chat,
    llama2_last_tokens,
    llama2_pair_tokens,
    merge_system,
    validate_dialog,
)


class Fitted(NamedTuple):
    tokens: list[int]  # the prompt
    dropped: int  # user/assistant pairs left out
    max_tokens: int  # what may be generated: the setting, or the room left when that is less


def fit_to_context(
    model,
    messages: Sequence[dict],
    max_tokens: int,
    template: str | None = None,
    stop_event: threading.Event | None = None,
    *,
    allow_special_tags: bool = False,
) -> Fitted | None:
    """The prompt that fits, or None if `stop_event` was set meanwhile. Llama 2 messages containing Meta's
    special tags raise `SpecialTagError` unless `allow_special_tags` (see `helpers.templates`)."""
    dialog = validate_dialog(messages)
    n_ctx = model.n_ctx()
    template = template or model.template
    if template == "llama-2" and not allow_special_tags:
        check_special_tags(dialog)
    fit = _fit_llama2 if template == "llama-2" else _fit_by_search
    result = fit(model, dialog, n_ctx - max_tokens, template, stop_event)
    if result is None:
        return None
    tokens, dropped = result  # over the budget only when every pair is dropped: then the room left is less
    room = min(max_tokens, n_ctx - len(tokens))
    if room < 1:
        raise ContextOverflowError(
            f"The last message alone needs {len(tokens)} prompt tokens, which exceeds the context of {n_ctx} "
            "tokens. Shorten the message or the system prompt, or load the model with a larger n_ctx."
        )
    return Fitted(tokens, dropped, room)


def _split(dialog: list[dict]) -> tuple[str | None, list[tuple[str, str]], str]:
    system = dialog[0]["content"] if dialog[0]["role"] == "system" else None
    turns = dialog[1:] if system is not None else dialog
    pairs = [(u["content"], a["content"]) for u, a in zip(turns[:-1:2], turns[1::2])]
    return system, pairs, turns[-1]["content"]


def _fit_llama2(model, dialog, budget, template, stop_event):
    system, pairs, last = _split(dialog)
    with_system = (lambda user: merge_system(system, user)) if system is not None else (lambda user: user)
    kept: list[list[int]] = []  # newest first, without the system prompt
    used = len(llama2_last_tokens(model, last))
    for user, answer in reversed(pairs):
        if stop_event is not None and stop_event.is_set():
            return None
        tokens = llama2_pair_tokens(model, user, answer)
        if used + len(tokens) > budget:
            break
        kept.append(tokens)
        used += len(tokens)
    # The system prompt joins the oldest kept pair (or the last message): drop pairs until that fits too.
    while True:
        if kept:
            user, answer = pairs[len(pairs) - len(kept)]
            first = llama2_pair_tokens(model, with_system(user), answer)
            rest = [t for tokens in reversed(kept[:-1]) for t in tokens]
            prompt = first + rest + llama2_last_tokens(model, last)
        else:
            prompt = llama2_last_tokens(model, with_system(last))
        if len(prompt) <= budget or not kept:
            return prompt, len(pairs) - len(kept)
        kept.pop()


def _fit_by_search(model, dialog, budget, template, stop_event):
    system, pairs, _ = _split(dialog)
    head = dialog[:1] if system is not None else []
    turns = dialog[len(head) :]

    def encode(dropped: int) -> list[int]:
        return encode_chat(model, head + turns[2 * dropped :], template)

    low, high, best = 0, len(pairs), None  # find the fewest dropped pairs that fit
    while low <= high:
        if stop_event is not None and stop_event.is_set():
            return None
        middle = (low + high) // 2
        tokens = encode(middle)
        if len(tokens) <= budget:
            best, high = (tokens, middle), middle - 1
        else:
            low = middle + 1
    return best if best is not None else (encode(len(pairs)), len(pairs))
