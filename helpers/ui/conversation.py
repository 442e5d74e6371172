"""The chat panel's conversation as a plain object: the finished turns, the system prompt, the dialog the model
is given, and what Generate, Regenerate, Continue and Edit do to them. No widgets and no threads: the panel
(`helpers.ui.panel`) shows it and runs the model; this decides.

A turn is asked with `begin(mode, prompt)`, which checks it can be (a `UsageError` with the reason when not),
keeps the turns that stay while the answer comes and returns a `Request`. The answer comes back through
`complete(request, text, finish, stats)`: kept when it has text (with its figures), else the turns as they were
(`restore`). Editing any user message (`edit(turn)`) drops nothing until the edited prompt is sent: then that
message is replaced and the turns after it are dropped, so the prompt before it is unchanged and the model's
prompt cache reuses it.
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
        self.editing: int | None = None  # the index in `history` of the user message being edited

    @property
    def user_turns(self) -> list[int]:
        """The indexes in `history` of the user messages, oldest first (turn k is `user_turns[k]`)."""
        return [i for i, m in enumerate(self.history) if m["role"] == "user"]

    @property
    def edit_drops(self) -> int:
        """How many messages sending the edited prompt drops: the one edited and every one after it."""
        return 0 if self.editing is None else len(self.history) - self.editing

    def messages(self, prompt: str) -> list[dict]:
        """The dialog the model is given: the system prompt (when not blank), the finished turns without their
        finish reasons and figures (those before the message being edited, when one is), and `prompt` as the
        next user message."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt.strip() else []
        kept = self.history if self.editing is None else self.history[: self.editing]  # an edit replaces the rest
        turns = [{"role": m["role"], "content": m["content"]} for m in kept]
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
        """There is a user message to take back into the prompt box."""
        return bool(self.user_turns)

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
            user, kept = prompt, list(self.history if self.editing is None else self.history[: self.editing])
        else:
            if not self.answered:
                raise UsageError(f"Nothing to {mode} yet: send a prompt first.")
            user, kept = self.history[-2]["content"], self.history[:-2]
            if mode == "continue":
                prefix = self.history[-1]["content"].rstrip()
                if not prefix:
                    raise UsageError("The last answer is empty: use Regenerate.")
        previous, self.history, self.editing = self.history, kept, None
        return Request(mode=mode, messages=self.messages(user), prefix=prefix, previous=previous)

    def complete(self, request: Request, text: str, finish: str | None, stats: dict | None = None) -> bool:
        """The answer came back (with the prefix it extends): kept with its finish reason and its figures
        (`stats`, shown under it and exported with it) when it has text (True); when it is empty, the
        conversation as it was before the request (False)."""
        if not text.strip():
            self.restore(request)
            return False
        answer = {"role": "assistant", "content": text, "finish": finish, **({"stats": stats} if stats else {})}
        self.history = self.history + [request.user, answer]
        return True

    def restore(self, request: Request) -> None:
        """Nothing new came (an empty answer, an error): the turns as they were before the request (an edit
        that was sent is undone too: its prompt goes back in the box)."""
        self.history = list(request.previous)

    def edit(self, turn: int | None = None) -> str | None:
        """Give back user message number `turn` (0 the first, None the last) to edit and send again; nothing is
        dropped yet (`edit_drops` says how much sending it will drop). None when there is no user message (an
        empty conversation, or a lone answer set by hand); `UsageError` for a turn that is not there."""
        turns = self.user_turns
        if not turns:
            return None
        if turn is not None and not 0 <= turn < len(turns):
            raise UsageError(
                f"There is no user message {turn + 1}: the conversation has {len(turns)}; pick one of them."
            )
        self.editing = turns[-1 if turn is None else turn]
        return self.history[self.editing]["content"]

    def cancel_edit(self) -> None:
        self.editing = None

    def clear(self) -> None:
        self.history, self.editing = [], None


__all__ = ["MODES", "Conversation", "Request"]
