"""Soak: many generations in a row on one loaded model, with cancels mixed in.

    python bench/soak.py [--runs 200] [--model PATH]

Checks that resident memory grows by less than 5 % (measured after the first 10 runs, then at the end)
and that every generation that follows a cancelled one is identical to a fresh one with the same seed.
Exits 1 if either fails.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.engine.loading import load_model  # noqa: E402
from helpers.files.catalogue import offline_model_path  # noqa: E402
from helpers.generation import GenerationStats, generate, stream  # noqa: E402
from helpers.settings import GenerationSettings  # noqa: E402

PROMPTS = [
    "Tell me about the moon.",
    "Write a haiku about rain.",
    "List three uses of copper.",
    "Why do cats purr?",
]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cancelled_run(llm, prompt, settings, after_pieces=3) -> GenerationStats:
    stop, stats = threading.Event(), GenerationStats()
    for i, _ in enumerate(stream(llm, prompt, settings, stop_event=stop, stats=stats)):
        if i + 1 == after_pieces:
            stop.set()
    return stats


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()

    llm = load_model(args.model or offline_model_path())
    settings = GenerationSettings(max_tokens=32, seed=77, cache_prompt=False)  # each run comparable with a fresh one
    fresh = {p: generate(llm, p, settings).text for p in PROMPTS}

    baseline = None
    cancels = mismatches = 0
    after_cancel = False
    for run in range(args.runs):
        if run == 10:
            baseline = rss_bytes()
        prompt = PROMPTS[run % len(PROMPTS)]
        if run % 5 == 4:
            stats = cancelled_run(llm, PROMPTS[(run + 1) % len(PROMPTS)], settings.replace(max_tokens=200))
            cancels += stats.finish_reason == "cancelled"
            after_cancel = True
            continue
        text = generate(llm, prompt, settings).text
        if after_cancel and text != fresh[prompt]:
            mismatches += 1
        after_cancel = False
    growth = rss_bytes() / baseline - 1
    print(f"runs: {args.runs}   cancelled: {cancels}   after-cancel mismatches: {mismatches}")
    print(f"resident memory: {baseline / 2**20:.1f} MiB after 10 runs -> {rss_bytes() / 2**20:.1f} MiB ({growth:+.2%})")
    ok = mismatches == 0 and growth < 0.05 and cancels == args.runs // 5
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
