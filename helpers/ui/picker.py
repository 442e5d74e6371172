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
