"""Markdown to safe HTML for the chat panel (markdown-it-py, CommonMark plus tables and strikethrough).

Safe for model output and user text: raw HTML is escaped and shown as text (`html: False`), links and images
whose URL is `javascript:`, `vbscript:`, `file:` or a non-image `data:` are left as text (markdown-it-py's
`validateLink`, the same rule as markdown-it's), and images are not loaded at all (a model could otherwise make
the browser fetch any address). Links open in a new tab without access to this page.
"""

from __future__ import annotations

from functools import cache


@cache
def _parser():
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
    md.enable(["table", "strikethrough"]).disable("image")

    def link_open(renderer, tokens, idx, options, env):
        tokens[idx].attrSet("target", "_blank")
        tokens[idx].attrSet("rel", "noopener noreferrer nofollow")
        return renderer.renderToken(tokens, idx, options, env)

    md.add_render_rule("link_open", link_open)
    return md


def render_markdown(text: str) -> str:
    """The HTML of `text` read as Markdown; nothing in it runs (see the module's docstring)."""
    return _parser().render(text)
