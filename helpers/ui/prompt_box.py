"""What the chat panel's prompt box means by each change of its text: Enter (send), a line break, a paste.

Why Enter is read from the text itself: the box is an ipywidgets `Textarea` (pasted text keeps its line
breaks; a one-line `Text` box strips them). Its front end (ipywidgets 7.7.1 and 8, packages/base/src/widget.ts
`sync`) sends one value update at a time per widget and, while one is unanswered, keeps the newer values in a
buffer that it sends only when the kernel reports idle; a custom message (a `Text` box's Enter "submit", a
button's "click") goes out at once, so it can reach the kernel before the last letters typed. A line break
typed at the end of the text arrives in the same ordered stream as those letters: the kernel sees the whole text
followed by it, at any typing speed and however busy the kernel was. No custom widget is needed, so it works on
Colab's widget front end too.

A key cannot be told from Shift+Enter by the kernel (both type a line break), so the panel has a switch:
Enter sends (the default), or Enter types a line break and Generate sends.
"""

from __future__ import annotations


def sent_by_enter(before: str, after: str) -> str | None:
    """The prompt to send when the change `before` -> `after` adds one line break, at the end of the text:
    Enter typed there (the keystrokes before it, corrections inside the text too, may come in the same
    update). None for anything else: typing, a line break typed inside the text, a paste of several lines.
    The prompt has the text's own line breaks, and no line breaks or spaces at its end."""
    if not after.endswith("\n") or after.count("\n") != before.count("\n") + 1:
        return None
    return after.rstrip()


def after_sent(sent_text: str, after: str) -> str:
    """The box's text once a prompt went out: the front end may still send the text with the letters typed
    right after Enter (before the box was emptied); those letters stay, the sent prompt does not."""
    return after[len(sent_text) :] if sent_text and after.startswith(sent_text) else after


__all__ = ["after_sent", "sent_by_enter"]
