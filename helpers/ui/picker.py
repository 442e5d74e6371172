"""The quantization picker: a dropdown of a catalogue model's files, each labelled with its size, the RAM it
needs and its model card's note."""

from __future__ import annotations

from helpers.files.catalogue import default_quant, get_model, quantizations


def quant_picker(name: str, value: str | None = None):
    """A dropdown of a catalogue model's quantizations, labelled with file size, RAM and the card's note."""
    import ipywidgets as w

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


def fallback_note(model_path, picker=None) -> str:
    """When `model_path` is the bundled offline model (the Hub could not be reached, or OFFLINE): a plain
    warning that it is not the model picked, and the picker marked as not used; "" otherwise."""
    from pathlib import Path

    from helpers.files.catalogue import OFFLINE_FILENAME, OFFLINE_MODEL

    if model_path is None or Path(model_path).name != OFFLINE_FILENAME:
        return ""
    picked = f" {picker.value}" if picker is not None else ""
    if picker is not None:
        picker.description, picker.disabled = "Not used (offline model)", True
    return (
        f"Note: this is the offline fallback {OFFLINE_MODEL} (135M parameters), not Llama 2{picked}. Its prompt "
        "format is ChatML, not Llama 2's [INST], and its answers are far weaker: use it to try the notebook, "
        "not to judge Llama 2."
    )
