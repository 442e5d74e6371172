"""The interactive chat panel: prompt, system prompt, sampling controls with presets, Generate/Stop/Clear,
the streamed answer, prompt-reading progress, a stats line and the chat history.

Generation runs in a worker thread, so the kernel keeps handling widget events and Stop works; the answer
widget is updated in batches (every `FLUSH_SECONDS`), not per token. Core ipywidgets only, and nothing
that differs between ipywidgets 7.7.1 (Colab) and 8.x.
"""

from __future__ import annotations

import html
import threading
import time

from helpers.generation import GenerationStats, stream
from helpers.settings import PRESETS, GenerationSettings

FLUSH_SECONDS = 0.08

# field: (widget kind, min, max, step, description)
CONTROLS = {
    "max_tokens": ("int", 1, 4096, 1, "Max tokens"),
    "temperature": ("float", 0.0, 2.0, 0.05, "Temperature"),
    "top_p": ("float", 0.05, 1.0, 0.05, "Top p"),
    "top_k": ("int", 0, 200, 1, "Top k"),
    "min_p": ("float", 0.0, 1.0, 0.01, "Min p"),
    "repeat_penalty": ("float", 1.0, 2.0, 0.05, "Repeat penalty"),
}


def _pre(text: str) -> str:
    return f'<pre style="white-space: pre-wrap; margin: 0">{html.escape(text)}</pre>'


class ChatPanel:
    """The panel's widgets and behaviour; `build_ui` returns its `.widget`."""

    def __init__(self, llm, *, system_prompt: str = "", settings: GenerationSettings | None = None, template=None):
        import ipywidgets as w

        self.llm, self.template = llm, template
        settings = settings or GenerationSettings()
        self.history: list[dict] = []
        self.last_stats: GenerationStats | None = None
        self._busy = threading.Lock()  # one generation at a time on one model
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None

        wide = w.Layout(width="100%")
        self.prompt = w.Textarea(placeholder="Ask something...", layout=w.Layout(width="100%", height="80px"))
        self.system = w.Textarea(value=system_prompt, placeholder="System prompt (optional)", layout=wide)
        label = {"style": {"description_width": "110px"}, "layout": w.Layout(width="420px")}
        self.preset = w.Dropdown(options=list(PRESETS), value="Balanced", description="Preset", **label)
        self.controls = {}
        for name, (kind, low, high, step, text) in CONTROLS.items():
            value = getattr(settings, name)
            if name == "max_tokens":
                control = w.IntText(value=value, description=text, **label)
            else:
                slider = w.IntSlider if kind == "int" else w.FloatSlider
                control = slider(value=value, min=low, max=high, step=step, description=text, **label)
            self.controls[name] = control
        seed = "" if settings.seed is None else str(settings.seed)
        self.seed = w.Text(value=seed, description="Seed", placeholder="random", **label)
        self.stop_strings = w.Text(
            value=", ".join(settings.stop), description="Stop", placeholder="comma-separated", **label
        )
        self.cache_prompt = w.Checkbox(
            value=settings.cache_prompt,
            description="Prompt cache: reuse what the last prompt left in the KV cache (faster follow-ups)",
            style={"description_width": "initial"},
            layout=w.Layout(width="auto"),
        )
        self.generate_button = w.Button(description="Generate", button_style="primary", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.clear_button = w.Button(description="Clear", icon="trash")
        self.answer = w.HTML(value=_pre(""))
        self.stats = w.HTML(value="")
        self.error = w.HTML(value="")
        for widget, name in ((self.answer, "answer"), (self.stats, "stats"), (self.error, "error")):
            widget.add_class(f"llama2-textgen-{name}")  # stable handles for styling and the browser test
        self.history_view = w.HTML(value="")

        self.preset.observe(self._apply_preset, names="value")
        self.generate_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self._stop.set())
        self.clear_button.on_click(lambda _: self.clear())

        sampling = w.VBox([self.preset, *self.controls.values(), self.seed, self.stop_strings, self.cache_prompt])
        settings_box = w.Accordion(children=[w.VBox([self.system, sampling])])
        settings_box.set_title(0, "System prompt and sampling")
        settings_box.selected_index = None
        history_box = w.Accordion(children=[self.history_view])
        history_box.set_title(0, "Chat history")
        self.widget = w.VBox(
            [
                self.prompt,
                w.HBox([self.generate_button, self.stop_button, self.clear_button]),
                self.answer,
                self.stats,
                self.error,
                settings_box,
                history_box,
            ]
        )
        self.widget.panel = self

    # --- reading the controls -------------------------------------------------------------------

    def _apply_preset(self, change):
        preset = PRESETS[change["new"]]
        for name, control in self.controls.items():
            if name != "max_tokens":
                control.value = getattr(preset, name)

    def settings(self) -> GenerationSettings:
        seed = self.seed.value.strip()
        if seed and not seed.lstrip("-").isdigit():
            raise ValueError(f"seed must be an integer in [0, {2**32 - 1}] or empty for random, got {seed!r}.")
        stops = tuple(s for s in (part.strip() for part in self.stop_strings.value.split(",")) if s)
        values = {name: control.value for name, control in self.controls.items()}
        return GenerationSettings(
            **values, seed=int(seed) if seed else None, stop=stops, cache_prompt=self.cache_prompt.value
        )

    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system.value}] if self.system.value.strip() else []
        return system + self.history + [{"role": "user", "content": self.prompt.value}]

    # --- actions --------------------------------------------------------------------------------

    def start(self) -> bool:
        """Start a generation in a worker thread; False (and nothing happens) while one runs."""
        if not self._busy.acquire(blocking=False):
            return False
        try:
            self.error.value = ""
            if not self.prompt.value.strip():
                raise ValueError("Type a prompt first.")
            settings, messages = self.settings(), self.messages()
        except ValueError as error:
            self._show_error(error)
            self._busy.release()
            return False
        self._stop.clear()
        self.generate_button.disabled, self.stop_button.disabled = True, False
        self.answer.value = _pre("")
        self.stats.value = "<i>reading the prompt...</i>"
        self.thread = threading.Thread(target=self._run, args=(messages, settings), daemon=True)
        self.thread.start()
        return True

    def _run(self, messages, settings):
        stats, text, shown = GenerationStats(), "", 0.0
        try:
            for piece in stream(
                self.llm,
                messages,
                settings,
                stop_event=self._stop,
                stats=stats,
                template=self.template,
                on_progress=self._show_progress,
            ):
                text += piece
                now = time.perf_counter()
                if now - shown >= FLUSH_SECONDS:
                    self.answer.value, shown = _pre(text), now
            self.answer.value = _pre(text)
            self.stats.value = html.escape(stats.line())
            self.last_stats = stats
            if text.strip():
                self.history += [messages[-1], {"role": "assistant", "content": text}]
                self.prompt.value = ""
                self._show_history()
        except Exception as error:  # shown in the panel, which stays usable
            self.stats.value = ""
            self._show_error(error)
        finally:
            self.generate_button.disabled, self.stop_button.disabled = False, True
            self._busy.release()

    def _show_progress(self, done: int, total: int) -> None:
        if done < total:
            self.stats.value = f"<i>reading the prompt: {done:,} / {total:,} tokens</i>"
        else:
            self.stats.value = "<i>generating...</i>"

    def wait(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    def clear(self) -> None:
        self._stop.set()
        self.wait()
        self.history = []
        self.answer.value, self.stats.value, self.error.value = _pre(""), "", ""
        self._show_history()

    def _show_error(self, error: Exception) -> None:
        self.error.value = (
            f'<span style="color: #b00020"><b>{type(error).__name__}:</b> {html.escape(str(error))}</span>'
        )

    def _show_history(self) -> None:
        self.history_view.value = "".join(f"<p><b>{m['role']}:</b></p>{_pre(m['content'])}" for m in self.history)


def quant_picker(name: str, value: str | None = None):
    """A dropdown of a catalogue model's quantizations, labelled with file size, RAM and the card's note."""
    import ipywidgets as w

    from helpers.catalogue import default_quant, get_model, quantizations

    options = []
    for quant in quantizations(name):
        entry = get_model(name, quant)
        options.append((f"{quant}: {entry.size_gb:.2f} GB file, {entry.ram_gb:.2f} GB RAM - {entry.note}", quant))
    get_model(name, value)  # an unknown quantization raises, listing the known ones
    return w.Dropdown(
        options=options,
        value=value or default_quant(name),
        description="Quantization",
        layout=w.Layout(width="90%"),
        style={"description_width": "initial"},
    )


def build_ui(llm, *, system_prompt: str = "", settings: GenerationSettings | None = None, template=None):
    """The chat panel's widget tree (its controller is `.panel`): display it as a cell's last expression."""
    return ChatPanel(llm, system_prompt=system_prompt, settings=settings, template=template).widget
