"""The chat panel (ipywidgets), resuming an exported conversation, and the quantization picker."""

from helpers.ui.panel import ChatPanel, build_ui, live_panel
from helpers.ui.picker import fallback_note, quant_picker
from helpers.ui.transcript import load_conversation

__all__ = ["ChatPanel", "build_ui", "fallback_note", "live_panel", "load_conversation", "quant_picker"]
