"""The chat panel (ipywidgets) and the quantization picker."""

from helpers.ui.panel import ChatPanel, build_ui, live_panel
from helpers.ui.picker import quant_picker

__all__ = ["ChatPanel", "build_ui", "live_panel", "quant_picker"]
