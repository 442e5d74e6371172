"""The chat panel's conversation as a plain object: the finished turns, the system prompt, the dialog the model
is given, and what Generate, Regenerate, Continue and Edit do to them. No widgets and no threads: the panel
(`helpers.ui.panel`) shows it and runs the model; this decides.

A turn is asked with `begin(mode, prompt)`, which checks it can be (a `UsageError` with the reason when not),
keeps the turns that stay while the answer comes and returns a `Request`. The answer comes back through
`complete(request, text, finish)`: kept when it has text, else the turns as they were (`restore`).
"""

from __future__ import annotations

from dataclasses import dataclass

from helpers.errors import UsageError

MODES = ("new", "regenerate", "continue")  # a new prompt; a new last answer; the last answer extended


@dataclass(frozen=True)
class Request:
    """One turn on its way to the model: `messages` is the dialog it is given (its last is `user`), `prefix`
    the start of the answer it extends (Continue; "" otherwise), `previous` the turns before it began."""

    mode: str
    messages: list[dict]
    prefix: str
    previous: list[dict]

    @property
    def user(self) -> dict:
        return self.messages[-1]

    @property
    def pending(self) -> list[dict]:
        """What is shown while the first words come: the question, and the answer Continue extends."""
        return [self.user] + ([{"role": "assistant", "content": self.prefix}] if self.prefix else [])

    @property
    def prompt_back(self) -> str:
        """What goes back in the prompt box when no answer is kept: a new prompt, nothing for the others."""
        return self.user["content"] if self.mode == "new" else ""


class Conversation:
    """The finished turns, oldest first: user, assistant, user, ... (an assistant message may carry its
    "finish" reason), and the system prompt that comes before them."""

    def __init__(self, system_prompt: str = "", history: list[dict] | tuple = ()):
        self.system_prompt = system_prompt
        self.history: list[dict] = list(history)

    def messages(self, prompt: str) -> list[dict]:
        """The dialog the model is given: the system prompt (when not blank), the finished turns without their
        finish reasons, and `prompt` as the next user message."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt.strip() else []
        turns = [{"role": m["role"], "content": m["content"]} for m in self.history]
        return system + turns + [{"role": "user", "content": prompt}]

    # --- what the buttons can do ------------------------------------------------------------------

    @property
    def answered(self) -> bool:
        """The last turn is an answer to a user message: Regenerate can replace it (a history set by hand may
        start with a lone answer, which has no question to ask again)."""
        return len(self.history) >= 2 and self.history[-1]["role"] == "assistant" and self.history[-2]["role"] == "user"

    @property
    def can_continue(self) -> bool:
        """An answer that did not end by itself (stopped, or cut at the length limit) can be extended."""
        return self.answered and self.history[-1].get("finish") != "stop"

    @property
    def can_edit(self) -> bool:
        last_user = len(self.history) - (2 if self.history and self.history[-1]["role"] == "assistant" else 1)
        return last_user >= 0 and self.history[last_user]["role"] == "user"

    # --- asking, and what comes back ----------------------------------------------------------------

    def begin(self, mode: str, prompt: str = "") -> Request:
        """Start a turn: "new" asks `prompt`, "regenerate" asks the last user message again for a new answer,
        "continue" asks it again to extend the last answer. The turns that stay while it runs are kept (the
        last pair is dropped for the two that redo it). `UsageError` when the turn cannot be asked; then
        nothing changes."""
        if mode not in MODES:
            raise UsageError(f"Unknown mode {mode!r}: one of {', '.join(MODES)}.")
        prefix = ""
        if mode == "new":
            if not prompt.strip():
                raise UsageError("Type a prompt first.")
            user, kept = prompt, list(self.history)
        else:
            if not self.answered:
                raise UsageError(f"Nothing to {mode} yet: send a prompt first.")
            user, kept = self.history[-2]["content"], self.history[:-2]
            if mode == "continue":
                prefix = self.history[-1]["content"].rstrip()
                if not prefix:
                    raise UsageError("The last answer is empty: use Regenerate.")
        previous, self.history = self.history, kept
        return Request(mode=mode, messages=self.messages(user), prefix=prefix, previous=previous)

    def complete(self, request: Request, text: str, finish: str | None) -> bool:
        """The answer came back (with the prefix it extends): kept with its finish reason when it has text
        (True); when it is empty, the conversation as it was before the request (False)."""
        if not text.strip():
            self.restore(request)
            return False
        self.history = self.history + [request.user, {"role": "assistant", "content": text, "finish": finish}]
        return True

    def restore(self, request: Request) -> None:
        """Nothing new came (an empty answer, an error): the turns as they were before the request."""
        self.history = list(request.previous)

    def edit(self) -> str | None:
        """Drop the last turn and give back its user message (to edit and send again); None when there is no
        user message to edit (an empty conversation, or a lone answer set by hand)."""
        if not self.can_edit:
            return None
        at = len(self.history) - (2 if self.history[-1]["role"] == "assistant" else 1)
        prompt = self.history[at]["content"]
        self.history = self.history[:at]
        return prompt

    def clear(self) -> None:
        self.history = []


__all__ = ["MODES", "Conversation", "Request"]
