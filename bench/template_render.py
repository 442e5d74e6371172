"""What the bounded sandbox costs: the real chat templates (tests/support/chat_templates/) rendered by
helpers/template_sandbox.py as it is and as it was before the bounds (read from git), in one run.

    .venv/bin/python bench/template_render.py [--before ab7f035] [--repeat 2000]

Prints CPU microseconds per render (rounds interleaved, the median) for each template, before and after, and the ratio; transformers' own renderer
(`render_jinja_template`, unbounded) for scale.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DIALOG = [  # no system prompt: Gemma and Mistral v0.1 refuse one
    {"role": "user", "content": "Hello! Can you tell me what the capital of France is?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And how many people live there?"},
]
VARIABLES = dict(
    messages=DIALOG, tools=None, documents=None, add_generation_prompt=True, bos_token="<s>", eos_token="</s>"
)


def sandbox_at(revision: str) -> types.ModuleType:
    source = subprocess.run(
        ["git", "show", f"{revision}:helpers/template_sandbox.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    module = types.ModuleType(f"template_sandbox_{revision}")
    exec(compile(source, f"template_sandbox@{revision}", "exec"), module.__dict__)
    return module


def per_render_us(renderers: dict, template: str, repeat: int, rounds: int = 9) -> dict[str, float]:
    """CPU microseconds per render for each renderer: rounds interleaved, the median round (this process's CPU
    time, so that other work on the machine does not count)."""
    runs = {name: [] for name in renderers}
    for render in renderers.values():
        render(template)  # compiled and cached
    for _ in range(rounds):
        for name, render in renderers.items():
            started = time.process_time()
            for _ in range(repeat // rounds):
                render(template)
            runs[name].append((time.process_time() - started) / (repeat // rounds) * 1e6)
    return {name: statistics.median(times) for name, times in runs.items()}


def main() -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    import helpers.template_sandbox as after

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="ab7f035", help="the commit whose template_sandbox.py is the baseline")
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    before = sandbox_at(args.before)
    renderers = {
        "before": lambda t: before.render_template(t, **VARIABLES),
        "after": lambda t: after.render_template(t, **VARIABLES),
        "transformers": lambda t: render_jinja_template(
            conversations=[DIALOG], chat_template=t, add_generation_prompt=True, bos_token="<s>", eos_token="</s>"
        ),
    }
    print(f"{'template':28} {'before µs':>10} {'after µs':>10} {'ratio':>6} {'transformers µs':>16}")
    totals = {name: 0.0 for name in renderers}
    for path in sorted((ROOT / "tests" / "support" / "chat_templates").glob("*.jinja")):
        template = path.read_text(encoding="utf-8")
        assert renderers["before"](template) == renderers["after"](template)
        times = per_render_us(renderers, template, args.repeat)
        for name in totals:
            totals[name] += times[name]
        print(
            f"{path.stem:28} {times['before']:10.1f} {times['after']:10.1f} {times['after'] / times['before']:6.2f} "
            f"{times['transformers']:16.1f}"
        )
    print(
        f"{'all (sum)':28} {totals['before']:10.1f} {totals['after']:10.1f} "
        f"{totals['after'] / totals['before']:6.2f} {totals['transformers']:16.1f}"
    )
    print(
        f"encode_chat, SmolLM2's own ChatML template (2 renders + llama.cpp's tokenizer): {encode_chat_ratio(before, args)}"
    )


def encode_chat_ratio(before: types.ModuleType, args) -> str:
    """End to end, as a user meets it: helpers.templates.encode_chat with the sandbox before and after."""
    import llama_cpp

    import helpers.templates as templates
    from helpers.engine.model import as_model
    from helpers.files.catalogue import offline_model_path

    llama = llama_cpp.Llama(model_path=str(offline_model_path()), vocab_only=True, verbose=False)
    model, after = as_model(llama), templates.render_template

    def with_sandbox(render):
        def encode(_template):
            templates.render_template = render
            try:
                return templates.encode_chat(model, DIALOG)
            finally:
                templates.render_template = after

        return encode

    renderers = {"before": with_sandbox(before.render_template), "after": with_sandbox(after)}
    assert renderers["before"](None) == renderers["after"](None)
    times = per_render_us(renderers, None, args.repeat // 2)
    llama.close()
    return (
        f"{times['before']:.1f} µs before, {times['after']:.1f} µs after, ratio {times['after'] / times['before']:.2f}"
    )


if __name__ == "__main__":
    main()
