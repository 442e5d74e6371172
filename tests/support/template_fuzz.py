"""Template fuzzing: seeded random chat templates (ChatML turns whose content goes through random compositions of
Jinja filters and size-taking calls) on seeded random content, encoded by `helpers.templates.encode_embedded` with
the real SmolLM2 tokenizer (its `<|im_start|>`, `<|im_end|>`, `<|endoftext|>` control tokens).

    python -m tests.support.template_fuzz [--cases 2000] [--seed 22] [--time-limit 1.0]

Contents are built to become control tokens only after a transform: control-token spellings re-cased, reversed,
cut by tags or `#`, with brackets or HTML entities for angles, mixed with plain text. Filters: lower, upper, title, capitalize,
reverse, striptags, trim, replace, split/join, list/reverse/join, center, indent, wordwrap, truncate, format,
`~` and `*` repetition, tojson, with sizes from small to 10**9.

Each case is `refused` (a `ChatTemplateError`) or `rendered`. Failures: ids holding a control token the
template did not write (counted against the template rendered by transformers' own renderer with every content
replaced by a plain letter), ids that are not llama.cpp's tokenization of transformers' rendering when that
rendering forges nothing, a render that ran past its time limit (+1 s), or any other exception.
Prints the tally; exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import collections
import random
import time
from dataclasses import dataclass, field

SPELLINGS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
WORDS = ("system", "user", "assistant", "you are evil", "hi", "Ok", "\n", " ", "[x]", "<b>", "</b>", "#", "é", "ß")
SIZES = (0, 1, 3, 12, 80, 1000, 10**6, 10**9)


def _disguise(rng: random.Random, spelling: str) -> str:
    """A control token's spelling changed so that some transform gives it back."""
    choice = rng.randrange(7)
    if choice == 0:
        return spelling.upper()
    if choice == 1:
        return spelling[::-1]
    if choice == 2:
        cut = rng.randrange(1, len(spelling))
        return spelling[:cut] + rng.choice(("<b></b>", "#", "<i>")) + spelling[cut:]
    if choice == 3:
        return spelling.replace("<", rng.choice(("[", "&lt;"))).replace(">", rng.choice(("]", "&gt;")))
    if choice == 4:
        return "".join(c.upper() if rng.random() < 0.5 else c for c in spelling)
    if choice == 5:
        return spelling.title()
    return spelling  # as typed: must stay text


def random_content(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randrange(0, 7)):
        if rng.random() < 0.4:
            parts.append(_disguise(rng, rng.choice(SPELLINGS)))
        else:
            parts.append(rng.choice(WORDS))
    return "".join(parts)


def _filter(rng: random.Random) -> str:
    piece = lambda: repr(rng.choice(("[", "<", "]", ">", "#", "", "I", "i", "|", "<|", "x")))  # noqa: E731
    size = lambda: rng.choice(SIZES)  # noqa: E731
    return rng.choice(
        (
            "| lower",
            "| upper",
            "| title",
            "| capitalize",
            "| reverse",
            "| striptags",
            "| trim",
            f"| replace({piece()}, {piece()})",
            f"| replace({piece()}, '')",
            "| list | reverse | join('')",
            f"| center({size()})",
            f"| indent({size()})",
            f"| wordwrap({max(1, size())})",
            f"| truncate({size()}, leeway=0)",
            f"| format({size()})",
            f"* {size()}",
            f"| tojson(indent={rng.choice(SIZES)}) | string",
        )
    )


def random_template(rng: random.Random) -> str:
    expression = "m.content"
    for _ in range(rng.randrange(0, 5)):
        step = _filter(rng)
        if step.startswith("| format"):
            expression = f"('%s' | format({expression}))"
        elif step.startswith("*"):
            expression = f"(({expression}) {step})"
        elif rng.random() < 0.15:
            expression = f"(({expression}) ~ ({expression}))"  # a join of the content with itself
        else:
            expression = f"({expression} {step})"
    if rng.random() < 0.2:
        expression = f"(({expression}).split('#') | join(''))"
    return (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ " + expression + " }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


REASONS = {  # a refusal's kind, by the words of its message
    "turns into a control token": "made a control token",
    "spells a control token": "spelled a control token",
    "would build more than": "size bound",
    "would be longer than": "size bound",
    "would compute a number": "size bound",
    "tojson(indent=...) over": "size bound",
    "still rendering": "time limit",
    "failed on this dialog": "template error",
    "cannot be verified": "unverifiable",
}


def _reason(message: str) -> str:
    return next((kind for words, kind in REASONS.items() if words in message), "other: " + message[:60])


class _Templated:
    """The model with another chat template in its metadata (tokenizer and all else its own)."""

    def __init__(self, model, template: str):
        self._model = model
        self.metadata = {**model.metadata, "tokenizer.chat_template": template}

    def __getattr__(self, name):
        return getattr(self._model, name)


@dataclass
class Tally:
    cases: int = 0
    refused: int = 0
    rendered: int = 0
    failures: list[str] = field(default_factory=list)
    reasons: collections.Counter = field(default_factory=collections.Counter)  # why cases were refused
    slowest_render_s: float = 0.0


def _transformers_render(template: str, dialog) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[dialog], chat_template=template, add_generation_prompt=True, bos_token="", eos_token=""
    )
    return rendered[0]


def run(model, *, cases: int, seed: int, time_limit: float = 1.0) -> Tally:
    """Fuzz `cases` random templates and dialogs on `model` (a `helpers` Model with SmolLM2's vocabulary)."""
    import helpers.template_sandbox as sandbox
    from helpers.errors import ChatTemplateError
    from helpers.templates import encode_embedded

    rng = random.Random(seed)
    controls = {model.tokenize(s, special=True)[0] for s in SPELLINGS}
    count = lambda ids: [t for t in ids if t in controls]  # noqa: E731
    tally = Tally()
    import helpers.templates as templates

    def timed_render(source, **variables):  # every render encode_embedded makes, timed
        started = time.monotonic()
        try:
            return sandbox.render_template(source, **variables)
        finally:
            tally.slowest_render_s = max(tally.slowest_render_s, time.monotonic() - started)

    saved = sandbox.RENDER_TIME_LIMIT_S, templates.render_template
    sandbox.RENDER_TIME_LIMIT_S, templates.render_template = time_limit, timed_render
    try:
        for case in range(cases):
            template = random_template(rng)
            roles = ["system", "user", "assistant", "user"][rng.randrange(0, 2) :]
            dialog = [{"role": role, "content": random_content(rng)} for role in roles]
            tally.cases += 1
            slowest, tally.slowest_render_s = tally.slowest_render_s, 0.0
            try:
                ids = encode_embedded(_Templated(model, template), dialog)
            except ChatTemplateError as e:
                tally.refused += 1
                tally.reasons[_reason(str(e))] += 1
                ids = None
            except Exception as e:  # noqa: BLE001 - any other exception is a finding
                tally.failures.append(f"case {case}: {type(e).__name__}: {e} | {template!r} | {dialog!r}")
                continue
            if tally.slowest_render_s > time_limit + 1.0:  # stopped at the limit, give or take a busy machine
                tally.failures.append(f"case {case}: a render took {tally.slowest_render_s:.1f} s | {template!r}")
            tally.slowest_render_s = max(slowest, tally.slowest_render_s)
            if ids is None:
                continue
            tally.rendered += 1
            plain = [{"role": m["role"], "content": "q" if m["content"] else ""} for m in dialog]
            own = count(model.tokenize(_transformers_render(template, plain), special=True))
            if count(ids) != own:
                tally.failures.append(f"case {case}: control tokens {count(ids)} != {own} | {template!r} | {dialog!r}")
                continue
            whole = model.tokenize(_transformers_render(template, dialog), special=True)
            if count(whole) == own and ids != whole:
                tally.failures.append(f"case {case}: ids differ from llama.cpp's | {template!r} | {dialog!r}")
    finally:
        sandbox.RENDER_TIME_LIMIT_S, templates.render_template = saved
    return tally


def main(argv=None) -> int:
    import llama_cpp

    from helpers.engine.model import as_model
    from helpers.files.catalogue import offline_model_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=22)
    parser.add_argument("--time-limit", type=float, default=1.0)
    args = parser.parse_args(argv)
    llama = llama_cpp.Llama(model_path=str(offline_model_path()), vocab_only=True, verbose=False)
    started = time.monotonic()
    tally = run(as_model(llama), cases=args.cases, seed=args.seed, time_limit=args.time_limit)
    print(
        f"seed {args.seed}: {tally.cases} cases, {tally.refused} refused, {tally.rendered} rendered, "
        f"{len(tally.failures)} failures; slowest render {tally.slowest_render_s:.2f} s (limit {args.time_limit:g} s), "
        f"{time.monotonic() - started:.0f} s in all"
    )
    print("refused: " + ", ".join(f"{kind} {n}" for kind, n in tally.reasons.most_common()))
    for failure in tally.failures[:20]:
        print("  " + failure[:600])
    llama.close()
    return 1 if tally.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
