"""Load test, on loopback only: llama-server with parallel slots serving the small model to concurrent clients.

Starts `.venv/bin/llama-server --parallel 4` with SmolLM2-135M on 127.0.0.1 (stopped at the end whatever
happens: tests/support/llama_server.py), then in one run: one client alone, then 8 clients x 5 requests at once, each
client its own `helpers.connect` model in its own thread. Every answer must be complete and well-formed
(a finish reason of stop or length, at least one token, the server's token count equal to the client's)
with 0 errors. Prints aggregate tokens/s (all completion tokens / wall time) against the single client,
and p50/p95 time to first token.

Usage: python bench/load_test.py [--clients 8] [--requests 5] [--parallel 4] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers.engine.remote import connect  # noqa: E402
from helpers.generation import generate  # noqa: E402
from helpers.settings import GenerationSettings  # noqa: E402

TOPICS = ["rivers", "mountains", "the moon", "bread", "bicycles", "rain", "libraries", "owls", "tea", "maps"]


@dataclass
class Result:
    client: int
    text: str
    completion_tokens: int
    ttft_s: float
    finish_reason: str


@dataclass
class Report:
    wall_s: float = 0.0
    results: list[Result] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(r.completion_tokens for r in self.results)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def ttft(self, q: float) -> float:
        values = sorted(r.ttft_s for r in self.results)
        return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def well_formed(model, generation) -> str | None:
    """Why an answer is not complete and well-formed, or None."""
    stats, usage = generation.stats, model.last_usage
    if stats.finish_reason not in ("stop", "length"):
        return f"finish reason {stats.finish_reason!r}"
    if stats.completion_tokens < 1 or not generation.text.strip():
        return "empty answer"
    counted = (
        {stats.completion_tokens, stats.completion_tokens + 1}
        if stats.finish_reason == "stop"
        else {stats.completion_tokens}
    )
    if usage.completion_tokens is not None and usage.completion_tokens not in counted:  # +1: the end token
        return f"server counted {usage.completion_tokens} tokens, the client {stats.completion_tokens}"
    return None


def run_load(url: str, *, clients: int, requests: int, max_tokens: int = 64, api_key: str | None = None) -> Report:
    """`clients` threads, each with its own connection, sending `requests` chat requests one after another."""
    report, lock = Report(), threading.Lock()
    models = [connect(url, api_key=api_key) for _ in range(clients)]
    barrier = threading.Barrier(clients)

    def client(index: int) -> None:
        barrier.wait()
        for r in range(requests):
            topic = TOPICS[(index * requests + r) % len(TOPICS)]
            dialog = [{"role": "user", "content": f"Write two sentences about {topic}. (client {index}, #{r})"}]
            settings = GenerationSettings(max_tokens=max_tokens, temperature=0.7, seed=index * 100 + r)
            try:
                g = generate(models[index], dialog, settings)
                problem = well_formed(models[index], g)
            except Exception as error:  # counted and reported: the load test's result is the error count
                problem = f"{type(error).__name__}: {error}"
                g = None
            with lock:
                if problem:
                    report.errors.append(f"client {index} request {r}: {problem}")
                else:
                    s = g.stats
                    report.results.append(
                        Result(index, g.text, s.completion_tokens, s.time_to_first_token_s, s.finish_reason)
                    )

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report.wall_s = time.perf_counter() - started
    for model in models:
        model.close()
    return report


def main(argv: list[str]) -> int:
    from helpers.files.catalogue import offline_model_path
    from tests.support.llama_server import running_server

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=5)
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args(argv)
    with running_server(offline_model_path(), parallel=args.parallel, slot_ctx=1024, lifetime_s=1800) as url:
        alone = run_load(url, clients=1, requests=args.requests, max_tokens=args.max_tokens)
        load = run_load(url, clients=args.clients, requests=args.requests, max_tokens=args.max_tokens)
    print(f"llama-server --parallel {args.parallel}, SmolLM2-135M, {args.max_tokens} tokens at most per answer")
    for name, r in (("1 client", alone), (f"{args.clients} clients", load)):
        print(
            f"{name:>11} x {args.requests} requests: {len(r.results)} answers, {len(r.errors)} errors, "
            f"{r.tokens} tokens in {r.wall_s:.1f} s = {r.tokens_per_second:.1f} tokens/s, "
            f"TTFT p50 {r.ttft(50):.2f} s, p95 {r.ttft(95):.2f} s"
        )
    print(
        f"aggregate tokens/s, {args.clients} clients / 1 client: {load.tokens_per_second / alone.tokens_per_second:.2f}"
    )
    for error in alone.errors + load.errors:
        print("ERROR", error)
    return 1 if alone.errors or load.errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
