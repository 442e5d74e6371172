"""Stop strings: `helpers.generation.StopStrings` against the matcher it replaced (each stop string searched and
its prefixes compared in turn, for every token), on the pieces of a real text tokenized by the small model,
with many stop strings; then whole generations with and without them.

    python bench/stop_strings.py [--stops 100000] [--tokens 512] [--generate 64]

Both matchers get the same pieces and must give the same text; the figures are from one run.
"""

from __future__ import annotations

import argparse
import codecs
import random
import string
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.engine.loading import load_model  # noqa: E402
from helpers.files.catalogue import offline_model_path  # noqa: E402
from helpers.generation import StopStrings, generate  # noqa: E402
from helpers.settings import GenerationSettings  # noqa: E402


class OldStopStrings:
    """The matcher as it was (helpers/generation.py before issue 22)."""

    def __init__(self, stops):
        self.stops = stops
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""
        self.started = False

    def add(self, piece: bytes):
        self.pending += self.decoder.decode(piece)
        if not self.started:
            self.pending = self.pending.lstrip()
            self.started = bool(self.pending)
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            ready, self.pending = self.pending[: min(hits)], ""
            return ready, True
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(stop[:n]):
                    longest = n
                    break
        ready, self.pending = self.pending[: len(self.pending) - longest], self.pending[len(self.pending) - longest :]
        return ready, False

    def flush(self):
        rest, self.pending = self.pending + self.decoder.decode(b"", final=True), ""
        return rest


def run(matcher, pieces):
    out, stopped = [], False
    for piece in pieces:
        ready, stopped = matcher.add(piece)
        out.append(ready)
        if stopped:
            break
    if not stopped:
        out.append(matcher.flush())
    return "".join(out), stopped


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stops", type=int, default=100_000)
    parser.add_argument("--tokens", type=int, default=512, help="pieces fed to the two matchers")
    parser.add_argument("--generate", type=int, default=64, help="max_tokens of the whole generations")
    args = parser.parse_args()

    model = load_model(offline_model_path())
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    tokens = model.tokenize(text)[: args.tokens]
    pieces = [model.detokenize([t]) for t in tokens]
    rng = random.Random(0)
    whole = b"".join(pieces).decode("utf-8", errors="replace")
    stops = []  # words of 6-14 lowercase letters that the text does not hold, then one it reaches near its end
    while len(stops) < args.stops - 1:
        stop = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(6, 14)))
        stops += [stop] if stop not in whole else []
    stops.append(whole[-40:-25])
    print(f"{len(pieces)} pieces ({len(whole):,} characters), {len(stops):,} stop strings")

    started = time.perf_counter()
    old = run(OldStopStrings(stops), pieces)
    old_s = time.perf_counter() - started
    started = time.perf_counter()
    new = run(StopStrings(stops), pieces)
    new_s = time.perf_counter() - started
    assert new == old, "the two matchers disagree"
    print(f"old matcher {old_s:.2f} s, new {new_s:.3f} s: {old_s / new_s:.0f}x faster, same text (stopped={new[1]})")

    settings = GenerationSettings(max_tokens=args.generate, seed=1, temperature=0.0, cache_prompt=False)
    prompt = "Write a long story about the sea."
    generate(model, prompt, settings)  # warm up: the first generation after a load is slower
    runs = {"none": ([], ()), "many": ([], tuple(stops[:-1]))}
    for _ in range(3):  # alternated, the fastest of each kept: a busy machine slows one run, not both kinds
        for times, stop in runs.values():
            started = time.perf_counter()
            text = generate(model, prompt, settings.replace(stop=stop)).text
            times.append((time.perf_counter() - started, text))
    (plain_s, plain), (many_s, many) = (min(times) for times, _ in runs.values())
    assert plain == many, "stop strings that never occur changed the text"
    print(
        f"generate(), {args.generate} tokens at most: {plain_s:.2f} s without stop strings, {many_s:.2f} s with "
        f"{len(stops) - 1:,} ({many_s / plain_s:.2f}x)"
    )


if __name__ == "__main__":
    main()
