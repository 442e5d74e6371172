"""What the browser tests ask of the chat panel's page, whichever notebook front end shows it."""

from __future__ import annotations


def too_wide(panel, cell_class: str) -> list[str]:
    """The panel and the output area around it, up to the cell (`cell_class`: 'jp-Cell' in JupyterLab and
    Notebook 7, 'cell' in the classic notebook), where their content is wider than they are (a scrollbar)."""
    return panel.evaluate(
        """(e, cell) => { const wide = [];
        for (let n = e; n && !n.classList.contains(cell); n = n.parentElement) {
            if (n.scrollWidth > n.clientWidth + 1 && getComputedStyle(n).overflowX !== 'visible')
                wide.push(n.className + ' ' + n.scrollWidth + '>' + n.clientWidth);
        }
        return wide; }""",
        cell_class,
    )
