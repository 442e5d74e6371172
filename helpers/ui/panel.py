"""The interactive chat panel: a header naming the model, the conversation in the centre (its system prompt
on top, answers rendered from Markdown with their own figures under them, newest at the bottom), a prompt box
that keeps line breaks and sends on Enter, Generate / Stop and icon buttons for Regenerate / Continue / Edit
(any of your messages) / Clear / Export, the prompt reading progress and stats, how much of the context the last
turn used, and the settings built from `GenerationSettings`' field metadata, with Resume (an exported JSON).
What each action does to the conversation is decided by a plain object, `helpers.ui.conversation.Conversation`;
what a change of the prompt box's text means, by `helpers.ui.prompt_box`; this module holds the widgets, the
worker thread and the wiring.

Generation runs in a worker thread, so the kernel keeps handling widget events and Stop works; the
conversation is re-rendered in batches (every `FLUSH_SECONDS`), not per token. One panel per model is live:
building a new one stops and disables the old, and takes over its conversation. Core ipywidgets only, and
nothing that differs between ipywidgets 7.7.1 (Colab) and 8.x.
"""

from __future__ import annotations

import dataclasses
import html
import threading
import time
import weakref
from functools import cache

from helpers.errors import UsageError
from helpers.generation import GenerationStats, stream
from helpers.settings import PRESETS, GenerationSettings, setting_info
from helpers.ui.conversation import Conversation, Request
from helpers.ui.prompt_box import after_sent, sent_by_enter
from helpers.ui.transcript import answer_stats, conversation_html, export, load_conversation

FLUSH_SECONDS = 0.1
# Generate pressed right after typing: the front end may still hold the last letters typed (it sends one value
# update at a time, see helpers.ui.prompt_box); they follow within one round trip to the browser, so the
# prompt is read once the box has been quiet this long. Enter needs no wait: it comes with the text.
SETTLE_SECONDS = 0.5
CUSTOM = "Custom"
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")  # what a preset sets
REOPEN_NOTE = (
    '<div class="llama2-textgen-reopen">Chat panel: it needs the running notebook. Run the cells from the top '
    "(Run &gt; Run All Cells) to chat here.</div>"
)

# The panel that is live for each model (one at a time): a new panel for the same model retires the old one.
_live_panels: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def live_panel(llm):
    """The live chat panel of a model (the last one `build_ui` made for it), or None."""
    model = _model_of(llm)
    return None if model is None else _live_panels.get(model)


def _model_of(llm):
    """The `helpers.Model` behind `llm`, or None when there is none (no model given, or not a model)."""
    if llm is None:
        return None
    from helpers.engine.model import as_model

    try:
        return as_model(llm)
    except TypeError:
        return None


@cache
def _panel_box():
    """A VBox that shows, before itself, a line saying to run the cells: hidden by the live panel's style,
    so it is seen only where the widget cannot be (a saved notebook opened without its kernel)."""
    import ipywidgets as w
    from IPython.display import display

    class ChatPanelBox(w.VBox):
        def _ipython_display_(self, **kwargs):
            display(
                {"text/html": REOPEN_NOTE, "text/plain": "Chat panel: run the notebook's cells to use it."}, raw=True
            )
            if hasattr(w.VBox, "_ipython_display_"):  # ipywidgets 7
                super()._ipython_display_(**kwargs)
            else:  # ipywidgets 8
                display(self._repr_mimebundle_(), raw=True)

    return ChatPanelBox


class ChatPanel:
    """The panel's widgets, its worker thread and the wiring between them; the conversation and what each
    action does to it are `self.conversation` (`helpers.ui.conversation`). `build_ui` returns its `.widget`
    (and `.widget.panel` is this)."""

    def __init__(self, llm, *, system_prompt: str = "", settings: GenerationSettings | None = None, template=None):
        import ipywidgets as w

        self.llm, self.template = llm, template
        self.model = _model_of(llm)
        self.conversation = Conversation(system_prompt)
        self.last_stats: GenerationStats | None = None
        self.last_export = None
        self.retired = False
        self.thread: threading.Thread | None = None
        self._busy = threading.Lock()  # one generation at a time on one panel
        self._stop = threading.Event()
        self._clearing = False  # a Clear stops the answer: its prompt is not put back in the box
        self._applying_preset = False  # a preset is setting the controls: they do not re-pick the preset
        self._typed_at = 0.0  # when the browser last sent the prompt box's text (time.monotonic)
        self._sent_text = ""  # the box's text, Enter included, that the last Enter sent
        self._reading_text = False  # a change from the browser is being read: what the panel sets is not one

        n_ctx = self._n_ctx()
        self._build_outputs(w, n_ctx)
        self._buttons = _button_row(w)
        (
            self.generate_button,
            self.stop_button,
            self.regenerate_button,
            self.continue_button,
            self.edit_button,
            self.clear_button,
            self.export_button,
        ) = self._buttons
        self.edit_choice = w.Dropdown(
            options=[], tooltip="which of your messages Edit takes back", layout=w.Layout(width="150px")
        )
        self.newline_mode = w.ToggleButton(
            value=False,
            description="Enter: new line",
            tooltip="On: Enter types a line break and Generate sends. Off: Enter sends (pasted text keeps its lines).",
            layout=w.Layout(width="auto"),
        )
        settings_box = self._build_settings(w, settings or GenerationSettings(), n_ctx)
        self.widget = self._assemble(w, settings_box)
        self._wire()
        self._update_buttons()
        self._go_live()

    @property
    def history(self) -> list[dict]:
        """The finished turns, oldest first: user, assistant, user, ... (an assistant message may carry its
        "finish" reason). Setting it shows that conversation."""
        return self.conversation.history

    @history.setter
    def history(self, messages: list[dict]) -> None:
        self.conversation.history = list(messages)
        self.conversation.cancel_edit()
        self._refresh()

    # --- building the widgets -----------------------------------------------------------------------

    def _build_outputs(self, w, n_ctx: int | None) -> None:
        """The conversation, the note, error and stats lines, the context bar and the prompt box."""
        self.header = w.HTML(value=self._header_text())
        self.note = w.HTML(value="")
        self.transcript = w.HTML(value=self._conversation_html(), layout=w.Layout(width="100%"))
        self.error = w.HTML(value="")
        self.stats = w.HTML(value="")
        self.context_bar = w.IntProgress(
            value=0, min=0, max=n_ctx or 1, description="Context", style={"description_width": "60px"}
        )
        self.context_label = w.HTML(value=self._context_text(0, n_ctx))
        self.prompt = w.Textarea(
            placeholder="Ask something... (Enter sends; pasted text keeps its line breaks)",
            continuous_update=True,  # every change comes to the kernel in order, Enter's line break last
            rows=2,
            layout=w.Layout(width="100%"),
        )
        for widget, name in (
            (self.header, "header"),
            (self.transcript, "transcript"),
            (self.stats, "stats"),
            (self.error, "error"),
            (self.note, "note"),
        ):
            widget.add_class(f"llama2-textgen-{name}")  # stable handles for styling and the browser test

    def _build_settings(self, w, settings: GenerationSettings, n_ctx: int | None):
        """The settings accordion: system prompt, preset, the number controls, seed, stop strings, cache."""
        label = {"style": {"description_width": "120px"}, "layout": w.Layout(width="460px")}
        self.system = w.Textarea(
            value=self.conversation.system_prompt,
            description="System prompt",
            placeholder="optional",
            layout=w.Layout(width="90%"),
        )
        self.system.style.description_width = "120px"
        self.preset = w.Dropdown(options=[*PRESETS, CUSTOM], value=CUSTOM, description="Preset", **label)
        self.controls = {name: self._control(w, name, getattr(settings, name), n_ctx, label) for name in _numeric()}
        meta = setting_info("seed")
        seed = "" if settings.seed is None else str(settings.seed)
        self.seed = w.Text(value=seed, description=meta["label"], placeholder="random", tooltip=meta["help"], **label)
        meta = setting_info("stop")
        self.stop_strings = w.Text(
            value=", ".join(settings.stop), description=meta["label"], placeholder="comma-separated", **label
        )
        meta = setting_info("cache_prompt")
        self.cache_prompt = w.Checkbox(
            value=settings.cache_prompt,
            description=f"{meta['label']}: {meta['help']}",
            style={"description_width": "initial"},
            layout=w.Layout(width="auto"),
        )
        self.choices = {  # a dropdown per setting with choices; None is spelled "off"
            f.name: w.Dropdown(
                options=[c or "off" for c in f.metadata["choices"]],
                value=getattr(settings, f.name) or "off",
                description=f.metadata["label"],
                tooltip=f.metadata["help"],
                **label,
            )
            for f in dataclasses.fields(GenerationSettings)
            if "choices" in f.metadata
        }
        self.preset.value = self._matching_preset()
        sampling = w.VBox(
            [
                self.system,
                self.preset,
                *self.controls.values(),
                self.seed,
                self.stop_strings,
                self.cache_prompt,
                *self.choices.values(),
            ]
        )
        self.resume_path = w.Text(
            placeholder="chat-....json (written by Export)",
            description="Resume from",
            tooltip="the JSON file that Export wrote",
            **label,
        )
        self.resume_button = w.Button(
            description="Resume", icon="upload", tooltip="load an exported conversation and continue it"
        )
        resume = w.HBox([self.resume_path, self.resume_button], layout=w.Layout(flex_flow="row wrap"))
        box = w.Accordion(children=[w.VBox([sampling, resume])])
        box.set_title(0, "Settings: system prompt, length, sampling, resume")
        box.selected_index = None
        return box

    @staticmethod
    def _control(w, name, value, n_ctx, label):
        meta = setting_info(name)
        low, high = meta["range"]
        if not meta["low_inclusive"]:
            low += meta["step"]
        common = {"value": value, "description": meta["label"], "tooltip": meta["help"], **label}
        if name == "max_tokens":  # unbounded in the browser: the kernel bounds it and says so (_bound_max_tokens)
            control = w.IntText(**common)
            control.range = (low, min(high, n_ctx or high))
            return control
        if isinstance(value, int):
            return w.IntSlider(min=low, max=high, step=meta["step"], **common)
        return w.FloatSlider(min=low, max=high, step=meta["step"], **common)

    def _assemble(self, w, settings_box):
        """The panel, top to bottom; its `.panel` is this controller."""
        row = [*self._buttons[:4], self.edit_button, self.edit_choice, *self._buttons[5:], self.newline_mode]
        widget = _panel_box()(
            [
                self.header,
                self.note,
                self.transcript,
                self.error,
                self.prompt,
                w.HBox(row, layout=w.Layout(flex_flow="row wrap", align_items="center")),
                self.stats,
                w.HBox([self.context_bar, self.context_label]),
                settings_box,
            ]
        )
        widget.panel = self
        widget.add_class("llama2-textgen-panel")
        return widget

    def _wire(self) -> None:
        """The events: Enter in the prompt box, the system prompt, the preset and its controls, the buttons."""
        self.prompt.observe(self._on_prompt_text, names="value")  # Enter: a line break at the end of the text
        self.system.observe(self._on_system_prompt, names="value")
        self.controls["max_tokens"].observe(self._bound_max_tokens, names="value")
        self.preset.observe(self._apply_preset, names="value")
        for name in SAMPLING:
            self.controls[name].observe(self._mark_custom, names="value")
            self.controls[name].observe(self._say_bound, names="value")
        self.generate_button.on_click(lambda _: self._generate_clicked())
        self.stop_button.on_click(lambda _: self._stop.set())
        self.regenerate_button.on_click(lambda _: self.regenerate())
        self.continue_button.on_click(lambda _: self.continue_answer())
        self.edit_button.on_click(lambda _: self._edit_clicked())
        self.resume_button.on_click(lambda _: self.resume(self.resume_path.value))
        self.clear_button.on_click(lambda _: self.clear())
        self.export_button.on_click(lambda _: self.export())

    def _go_live(self) -> None:
        """The live panel of its model: the one built for it before is retired."""
        if self.model is None:
            return
        old = _live_panels.get(self.model)
        if old is not None:
            old.retire()
            if old.history and not self.history:  # the cell was run again: the conversation comes along
                self.history = old.history
                self.note.value = (
                    f"The conversation of the panel this one replaces ({len(old.history)} messages) is carried "
                    "over; Clear starts afresh."
                )
        _live_panels[self.model] = self

    # --- the settings ------------------------------------------------------------------------------

    def _matching_preset(self) -> str:
        for name, preset in PRESETS.items():
            if all(abs(self.controls[f].value - getattr(preset, f)) < 1e-9 for f in SAMPLING):
                return name
        return CUSTOM

    def _apply_preset(self, change):
        if change["new"] == CUSTOM or self._applying_preset:
            return
        preset = PRESETS[change["new"]]
        self._applying_preset = True
        try:
            for name in SAMPLING:
                self.controls[name].value = getattr(preset, name)
        finally:
            self._applying_preset = False

    def _mark_custom(self, _change):
        if not self._applying_preset:
            self._applying_preset = True
            try:
                self.preset.value = self._matching_preset()
            finally:
                self._applying_preset = False

    def _on_system_prompt(self, change) -> None:
        self.conversation.system_prompt = change["new"]  # the one copy: the conversation shows it on top
        self._refresh()

    def _say_bound(self, change) -> None:
        """A slider sets a value typed beyond its range to its end without a word (the browser's readout and
        traitlets alike), so at either end the note says where it stands. Presets are left out."""
        control = change["owner"]
        if self._applying_preset or not hasattr(control, "max"):
            return
        for end, word in ((control.max, "maximum"), (control.min, "minimum")):
            if change["new"] == end:
                self.note.value = html.escape(
                    f"{control.description}: set to {end:g}, its {word} (a value beyond it is set to {end:g})."
                )

    def _bound_max_tokens(self, change) -> None:
        control = self.controls["max_tokens"]
        low, high = control.range
        if not low <= change["new"] <= high:
            control.value = min(max(change["new"], low), high)
            self.note.value = html.escape(
                f"{control.description}: {change['new']:,} is outside {low:,} to {high:,}; set to {control.value:,}."
            )

    def settings(self) -> GenerationSettings:
        """The settings the controls show; ValueError, naming the control, when one cannot be used."""
        seed = self.seed.value.strip()
        low, high = setting_info("seed")["range"]
        if seed and not (seed.isdigit() and low <= int(seed) <= high):
            raise UsageError(f"Seed must be a whole number from {low} to {high:,}, or empty for random; got {seed!r}.")
        stops = tuple(s for s in (part.strip() for part in self.stop_strings.value.split(",")) if s)
        values = {name: control.value for name, control in self.controls.items()}
        values.update({name: None if c.value == "off" else c.value for name, c in self.choices.items()})
        try:
            return GenerationSettings(
                **values, seed=int(seed) if seed else None, stop=stops, cache_prompt=self.cache_prompt.value
            )
        except ValueError as error:  # name the control as the panel labels it
            message = str(error)
            for f in dataclasses.fields(GenerationSettings):
                if message.startswith(f"{f.name} "):
                    message = f.metadata.get("label", f.name) + message[len(f.name) :]
            raise UsageError(message) from None

    def messages(self, prompt: str | None = None) -> list[dict]:
        """The dialog the model is given: system prompt, the finished turns, and `prompt` (default: the box)."""
        return self.conversation.messages(self.prompt.value if prompt is None else prompt)

    # --- actions --------------------------------------------------------------------------------

    def start(self) -> bool:
        """Send the prompt box's text as the next user message; False (and nothing happens) while a
        generation runs, or with the reason shown when it cannot start."""
        return self._launch("new")

    def regenerate(self) -> bool:
        """Replace the last answer by a new one (a new seed, unless the Seed control fixes it)."""
        return self._launch("regenerate")

    def continue_answer(self) -> bool:
        """Extend the last answer where it ended (after Stop or the length limit)."""
        return self._launch("continue")

    def edit(self, turn: int | None = None) -> None:
        """Put user message number `turn` (0 the first; None the last) back in the prompt box: sending it
        replaces that message and drops the ones after it, as the note says until then."""
        if self._busy.locked():
            return
        prompt = self.conversation.edit(turn)
        if prompt is None:
            return
        self.prompt.value = prompt
        self.error.value = ""
        after = self.conversation.edit_drops - 1
        self.note.value = html.escape(
            f"Editing your message {self.conversation.user_turns.index(self.conversation.editing) + 1}: sending "
            "replaces it"
            + (f" and drops the {after} message{'s' if after > 1 else ''} after it." if after else ".")
            + " Press Edit again to keep it as it is."
        )
        self._refresh()

    def _edit_clicked(self) -> None:
        if self.conversation.editing is not None and self.edit_choice.value == self.conversation.editing:
            self.conversation.cancel_edit()  # the second press: nothing is replaced
            self.note.value = ""
            self._refresh()
            return
        turns = self.conversation.user_turns
        self.edit(turns.index(self.edit_choice.value) if self.edit_choice.value in turns else None)

    def resume(self, path) -> bool:
        """Load a conversation that Export wrote and continue it here (its system prompt too); a file that is
        not one is refused with the reason, and the conversation shown stays as it was."""
        if self._busy.locked() or self.retired:
            return False
        try:
            saved = load_conversation(path)
        except ValueError as error:
            self._show_error(error)
            return False
        self.error.value = ""
        self.system.value = saved.system_prompt
        self.history = saved.messages
        model = saved.metadata.get("model")
        self.note.value = html.escape(
            f"Resumed {len(saved.messages)} messages from {path}" + (f" (written with {model})." if model else ".")
        )
        return True

    def clear(self) -> None:
        self._clearing = True
        try:
            self._stop.set()
            self.wait()
        finally:
            self._clearing = False
        self.conversation.clear()
        self._refresh()
        self.stats.value, self.error.value, self.note.value = "", "", ""
        self._set_context(0)

    def export(self):
        """Write the conversation as Markdown and JSON beside the notebook (the working folder); the path is
        shown in the panel and returned."""
        if not self.history:
            self._show_error(UsageError("Nothing to export yet: the conversation is empty."))
            return None
        metadata = {
            "model": str(self.model.path.name) if self.model is not None and self.model.path else None,
            "settings": _settings_record(self),
            "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        try:
            path = export(self.history, system_prompt=self.conversation.system_prompt, metadata=metadata)
        except OSError as error:
            self._show_error(error)
            return None
        self.last_export = path
        self.note.value = html.escape(f"Saved {path} and {path.with_suffix('.json').name}")  # the stats stay
        return path

    def _launch(self, mode: str, prompt: str | None = None) -> bool:
        if self.retired or not self._busy.acquire(blocking=False):
            return False
        try:
            self.error.value = ""
            self._check_usable()
            settings = self.settings()
            request = self.conversation.begin(mode, self.prompt.value if prompt is None else prompt)
        except ValueError as error:
            self._show_error(error)
            self._busy.release()
            return False
        if request.prompt_back:  # a new prompt moves from the box into the conversation
            self.prompt.value = ""
            if hasattr(self.prompt, "focus"):  # ipywidgets 8: the keyboard back in the box after Generate
                self.prompt.focus()
        if self.note.value.startswith("Editing"):
            self.note.value = ""
        self._show(pending=request.pending)
        self._stop.clear()
        self._update_buttons(busy=True)
        self.stats.value = "<i>reading the prompt...</i>"
        self.thread = threading.Thread(target=self._run, args=(request, settings), daemon=True, name="chat-panel")
        self.thread.start()
        return True

    def _run(self, request: Request, settings: GenerationSettings) -> None:
        stats, text, shown = GenerationStats(), request.prefix, 0.0
        try:
            for piece in stream(
                self.llm,
                request.messages,
                settings,
                stop_event=self._stop,
                stats=stats,
                template=self.template,
                on_progress=self._show_progress,
                answer_prefix=request.prefix,
            ):
                text += piece
                now = time.perf_counter()
                if now - shown >= FLUSH_SECONDS:
                    self._show(pending=[request.user, {"role": "assistant", "content": text}])
                    shown = now
            self.last_stats = stats
            self.stats.value = html.escape(stats.line())
            if self.conversation.complete(request, text, stats.finish_reason, answer_stats(stats)):
                self._set_context(stats.prompt_tokens + stats.completion_tokens)  # turns that stay count
            else:
                self._give_prompt_back(request)
        except Exception as error:  # shown in the panel; the conversation stays as it was
            self.stats.value = ""
            self.conversation.restore(request)
            self._give_prompt_back(request)
            self._show_error(error)
        finally:
            self._show()
            self._busy.release()
            self._update_buttons()

    def _give_prompt_back(self, request: Request) -> None:
        """No answer was kept: a new prompt goes back in the box, unless something else was typed there or
        Clear stopped it."""
        if request.prompt_back and not self.prompt.value and not self._clearing:
            self.prompt.value = request.prompt_back

    def wait(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    def retire(self) -> None:
        """Stop this panel's generation and disable it: a newer panel for the same model replaces it."""
        self.retired = True
        self._stop.set()
        self.wait(30)
        self.note.value = (
            "<b>This panel is no longer live:</b> a newer chat panel for the same model was built "
            "(the cell was run again); use that one."
        )
        self._update_buttons()

    # --- showing --------------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self.llm is None:
            raise UsageError("No model: run the cells that download and load the model, then this one.")
        if self.model is not None and self.model.closed:
            raise UsageError(
                "The model was unloaded (closed, or replaced by another load_model() call): run the load cell "
                "again, then this panel's cell."
            )

    def _n_ctx(self) -> int | None:
        if self.model is None or self.model.closed:
            return None
        return self.model.n_ctx()

    def _refresh(self) -> None:
        """Show the conversation as it is now, and the buttons that fit it (unless an answer is coming)."""
        self._show()
        if not self._busy.locked():
            self._update_buttons()

    def _show(self, pending: list[dict] | None = None) -> None:
        self.transcript.value = self._conversation_html(pending)
        choices = [(_turn_label(k, self.history[i]["content"]), i) for k, i in enumerate(self.conversation.user_turns)]
        if list(self.edit_choice.options) != choices:
            self.edit_choice.options = choices
            self.edit_choice.value = choices[-1][1] if choices else None

    def _conversation_html(self, pending: list[dict] | None = None) -> str:
        conversation = self.conversation
        return conversation_html(
            conversation.history + (pending or []),
            streaming=pending is not None,
            system_prompt=conversation.system_prompt,
            editing=None if pending is not None else conversation.editing,
        )

    def _header_text(self) -> str:
        """The model this panel talks to; the offline fallback said plainly."""
        from helpers.files.catalogue import OFFLINE_MODEL

        if self.llm is None:
            return "<b>Chat</b> (no model)"
        path = getattr(self.model, "path", None)
        name = path.name if path else str(getattr(self.llm, "base_url", "") or type(self.llm).__name__)
        text = f"<b>Chat with</b> {html.escape(name)}"
        if path is not None and _is_offline_model(path):
            text += (
                f' <span style="color: #b26a00">(the offline fallback {html.escape(OFFLINE_MODEL)}, a 135M model: '
                "expect weak answers; Llama 2 needs the Hugging Face Hub)</span>"
            )
        return text

    def _show_progress(self, done: int, total: int) -> None:
        if done < total:
            self.stats.value = f"<i>reading the prompt: {done:,} / {total:,} tokens</i>"
        else:
            self.stats.value = "<i>generating...</i>"

    def _show_error(self, error: Exception) -> None:
        kind = "" if type(error) in (ValueError, UsageError) else f"<b>{type(error).__name__}:</b> "
        self.error.value = f'<span style="color: #b00020">{kind}{html.escape(str(error))}</span>'

    def _set_context(self, used: int) -> None:
        n_ctx = self._n_ctx() or self.context_bar.max
        self.context_bar.max = max(n_ctx, 1)
        self.context_bar.value = min(used, self.context_bar.max)
        self.context_label.value = self._context_text(used, n_ctx)

    @staticmethod
    def _context_text(used: int, n_ctx: int | None) -> str:
        return f"{used:,} / {n_ctx:,} tokens of context used by the last turn" if n_ctx else ""

    def _update_buttons(self, busy: bool = False) -> None:
        for button in (*self._buttons, self.resume_button, self.edit_choice):
            button.disabled = self.retired or busy
        self.stop_button.disabled = self.retired or not busy
        self.stop_button.button_style = "" if self.stop_button.disabled else "warning"  # grey when it cannot stop
        if not (self.retired or busy):
            self.regenerate_button.disabled = not self.conversation.answered
            self.continue_button.disabled = not self.conversation.can_continue
            self.edit_button.disabled = self.edit_choice.disabled = not self.conversation.can_edit
        self.prompt.disabled = self.retired

    def _on_prompt_text(self, change) -> None:
        """A change of the box's text: from the browser (typing, a paste, Enter) or set here. Enter sends
        what is before it (`helpers.ui.prompt_box.sent_by_enter`), unless Enter is set to type line breaks."""
        if self._reading_text or self.prompt._property_lock.get("value", None) != change["new"]:
            return  # set here (ipywidgets 8 puts what the kernel sets in the lock too), by a test or a cell
        self._reading_text = True
        try:
            self._read_prompt_text(change)
        finally:
            self._reading_text = False

    def _read_prompt_text(self, change) -> None:
        self._typed_at = time.monotonic()
        text = after_sent(self._sent_text, change["new"])
        self._sent_text = ""
        if text != change["new"]:  # letters typed after Enter, with the sent prompt still before them
            self.prompt.value = text
            return
        prompt = None if self.newline_mode.value else sent_by_enter(change["old"], text)
        if prompt is None:
            return
        if self._busy.locked() or self.retired:  # one answer at a time: the prompt waits in the box
            self.prompt.value = prompt
            self.note.value = "An answer is being written: press Enter again when it ends (or Stop it)."
            return
        self._sent_text = text
        if not self._launch("new", prompt):
            self._sent_text = ""  # nothing went out: the next Enter on the same text must send it
            self.prompt.value = prompt  # refused (the reason is shown): the box keeps it, without the Enter

    def _generate_clicked(self) -> None:
        """Generate: the box's text once the browser has sent all of it (see SETTLE_SECONDS)."""
        wait = SETTLE_SECONDS - (time.monotonic() - self._typed_at)
        if wait <= 0:
            self.start()
            return
        threading.Timer(wait, self._generate_clicked).start()


def _button_row(w) -> list:
    """Generate, Stop, Regenerate, Continue, Edit, Clear, Export, in the order shown: the first two named, the
    others icons whose tooltip (the browser's title) says what they do, so that one row fits Colab's output."""
    icon = {"layout": w.Layout(width="40px")}
    return [
        w.Button(description="Generate", button_style="primary", icon="play", layout=w.Layout(width="auto")),
        w.Button(description="Stop", icon="stop", disabled=True, layout=w.Layout(width="auto")),
        w.Button(icon="refresh", tooltip="Regenerate: a new answer", **icon),
        w.Button(icon="forward", tooltip="Continue: extend the last answer", **icon),
        w.Button(icon="pencil", tooltip="Edit: the chosen message back in the box", **icon),
        w.Button(icon="trash", tooltip="Clear the conversation", **icon),
        w.Button(icon="download", tooltip="Export: Markdown and JSON files", **icon),
    ]


def _turn_label(k: int, text: str) -> str:
    """How the Edit chooser names user message k: its number and first words."""
    words = " ".join(text.split())
    return f"{k + 1}: {words[:18]}…" if len(words) > 18 else f"{k + 1}: {words}"


def _is_offline_model(path) -> bool:
    from helpers.files.catalogue import OFFLINE_FILENAME

    return path.name == OFFLINE_FILENAME


def _numeric() -> list[str]:
    """The settings shown as number controls: those with a range, but the seed (a text box: empty = random)."""
    return [f.name for f in dataclasses.fields(GenerationSettings) if "range" in f.metadata and f.name != "seed"]


def _settings_record(panel: ChatPanel) -> dict | str:
    try:
        return dataclasses.asdict(panel.settings())
    except ValueError as error:
        return str(error)


def build_ui(llm, *, system_prompt: str = "", settings: GenerationSettings | None = None, template=None):
    """The chat panel's widget tree (its controller is `.panel`): display it as a cell's last expression.
    Building a panel for a model stops and disables the panel built for it before."""
    return ChatPanel(llm, system_prompt=system_prompt, settings=settings, template=template).widget


__all__ = ["ChatPanel", "build_ui", "live_panel"]
