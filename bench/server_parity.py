"""How often llama-server's answer equals the in-process model's, by server setting (why `make serve` uses
`--flash-attn off` and why the README says repeat_penalty 1.0 for identical answers).

Serves the small model with flash attention off and on `auto` (llama-server's default), and counts the
dialogs whose greedy answer is the same text as `generate(load_model(path), ...)`, at repeat_penalty 1.0 and
1.1, and with a seed and sampling. Prompt cache off, so each answer is read afresh on both sides.

Usage: python bench/server_parity.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers.engine.loading import load_model  # noqa: E402
from helpers.engine.remote import connect  # noqa: E402
from helpers.files.catalogue import offline_model_path  # noqa: E402
from helpers.generation import generate  # noqa: E402
from helpers.settings import GenerationSettings  # noqa: E402
from tests.support.llama_server import running_server  # noqa: E402

DIALOGS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."}, {"role": "user", "content": "Name three colours."}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "user", "content": "Give me two tips for learning to cook."}],
    [{"role": "user", "content": "Why do cats purr?"}],
]
SETTINGS = {
    "greedy, repeat_penalty 1.0": GenerationSettings(
        temperature=0, repeat_penalty=1.0, cache_prompt=False, max_tokens=48
    ),
    "greedy, repeat_penalty 1.1": GenerationSettings(
        temperature=0, repeat_penalty=1.1, cache_prompt=False, max_tokens=48
    ),
    "temperature 0.6, seed 42": GenerationSettings(seed=42, repeat_penalty=1.0, cache_prompt=False, max_tokens=48),
}


def main() -> int:
    path = offline_model_path()
    local = load_model(path)
    expected = {name: [generate(local, d, s).text for d in DIALOGS] for name, s in SETTINGS.items()}
    print(f"{path.name}, {len(DIALOGS)} dialogs, 48 tokens at most: answers equal to the in-process model's")
    for flash in ("off", "auto"):
        with running_server(path, parallel=1, slot_ctx=2048, extra=["--flash-attn", flash]) as url:
            remote = connect(url)
            for name, settings in SETTINGS.items():
                same = sum(generate(remote, d, settings).text == e for d, e in zip(DIALOGS, expected[name]))
                print(f"  --flash-attn {flash:<4}  {name:<28} {same}/{len(DIALOGS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
