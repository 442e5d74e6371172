"""Benchmark: every figure measured in one run, on one model and one machine, printed as a table.

    python bench/run.py [--model PATH] [--tokens 128] [--rounds 5] [--gpu]

- helper vs raw: tokens/s of `helpers.stream` and of a bare `llm.create_completion(..., stream=True)` loop
  on the same token ids, seed and sampling settings (so the same tokens), alternated over several rounds;
- UI path vs helper: the chat panel (worker thread, batched widget updates) against `helpers.stream`;
- threads: the helper's default (physical cores) against llama-cpp-python's (cpu_count() // 2);
- time to first token for a 512-token prompt;
- generation speed as a fraction of the memory-bandwidth ceiling (bandwidth measured here with numpy,
  weights read per token = the file size).

Tokens/s is counted the same way for every path: (tokens - 1) / (time of last token - time of first).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from helpers.engine.loading import load_model, unload_model  # noqa: E402
from helpers.files.catalogue import offline_model_path  # noqa: E402
from helpers.generation import GenerationStats, stream  # noqa: E402
from helpers.settings import GenerationSettings  # noqa: E402
from helpers.templates import encode_chat  # noqa: E402

STORY = [{"role": "user", "content": "Write a long, detailed story about a lighthouse keeper and a storm."}]


def rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")


def helper_rate(llm, settings, messages=STORY) -> tuple[float, int]:
    stats = GenerationStats()
    for _ in stream(llm, messages, settings, stats=stats):
        pass
    return stats.tokens_per_second, stats.completion_tokens


def raw_rate(model, settings, messages=STORY) -> tuple[float, int]:
    # On the thread that runs the model's llama.cpp work, as helpers.stream does (see helpers/engine/model.py).
    prompt = encode_chat(model, messages)
    return model.run(lambda backend: _raw_rate(backend.llama, settings, prompt))


def _raw_rate(llm, settings, prompt):
    llm.reset()  # the helper evaluates the prompt afresh too
    times = []
    for chunk in llm.create_completion(
        prompt=prompt,
        max_tokens=settings.max_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        min_p=settings.min_p,
        repeat_penalty=settings.repeat_penalty,
        seed=settings.seed,
        stream=True,
    ):
        if chunk["choices"][0]["finish_reason"] is None:  # the closing chunk carries no token
            times.append(time.perf_counter())
    return rate(times), len(times)


def ui_rate(llm, settings) -> tuple[float, int]:
    from helpers.ui import build_ui

    panel = build_ui(llm, settings=settings).panel
    panel.clear()  # a new panel takes the last one's conversation over: each round answers the one question
    panel.prompt.value = STORY[0]["content"]
    panel.start()
    panel.wait()
    return panel.last_stats.tokens_per_second, panel.last_stats.completion_tokens


def memory_bandwidth_gbs() -> float:
    """Read bandwidth: summing a 1 GiB array (best of 5)."""
    data = np.ones(2**27, dtype=np.float64)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


def paired(rounds, first, second):
    """Run two measures in turn, `rounds` times: (median rate, tokens) of each, and the median of the
    per-round ratios first/second (pairs cancel this VM's slow drifts; single runs vary by +-10 %)."""
    a, b = [], []
    for _ in range(rounds):
        a.append(first())
        b.append(second())
    ratio = statistics.median(x[0] / y[0] for x, y in zip(a, b))
    return (statistics.median(r for r, _ in a), a[0][1]), (statistics.median(r for r, _ in b), b[0][1]), ratio


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the bundled SmolLM2)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--gpu", action="store_true", help="offload all layers (the GPU table)")
    args = parser.parse_args()

    path = args.model or offline_model_path()
    layers = -1 if args.gpu else 0
    settings = GenerationSettings(max_tokens=args.tokens, seed=1234, cache_prompt=False)
    rows = []

    llm = load_model(path, n_gpu_layers=layers)
    (helper, n_helper), (raw, n_raw), ratio = paired(
        args.rounds, lambda: helper_rate(llm, settings), lambda: raw_rate(llm, settings)
    )
    rows += [
        ("helpers.stream tokens/s", f"{helper:.1f}", f"{n_helper} tokens, median of {args.rounds}"),
        ("raw create_completion tokens/s", f"{raw:.1f}", f"{n_raw} tokens"),
        ("helper / raw", f"{ratio:.3f}", "median of paired rounds; goal >= 0.98"),
    ]

    (ui, n_ui), _, ui_ratio = paired(args.rounds, lambda: ui_rate(llm, settings), lambda: helper_rate(llm, settings))
    rows += [
        ("chat panel tokens/s", f"{ui:.1f}", f"{n_ui} tokens, worker thread + batched widget updates"),
        ("panel / helpers.stream", f"{ui_ratio:.3f}", "median of paired rounds; goal >= 0.95"),
    ]

    long_prompt = [{"role": "user", "content": "word " * 2000}]
    ids = encode_chat(llm, long_prompt)
    words = int(2000 * 512 / len(ids))
    long_prompt = [{"role": "user", "content": "word " * words}]
    ttft = []
    for _ in range(args.rounds):
        stats = GenerationStats()
        for _ in stream(llm, long_prompt, GenerationSettings(max_tokens=1, seed=1, cache_prompt=False), stats=stats):
            pass
        ttft.append(stats.time_to_first_token_s)
    rows.append(
        (
            "time to first token, 512-token prompt",
            f"{statistics.median(ttft):.3f} s",
            f"{stats.prompt_tokens} prompt tokens",
        )
    )

    bandwidth = memory_bandwidth_gbs()
    ceiling = bandwidth * 1e9 / path.stat().st_size
    rows += [
        ("memory bandwidth (numpy sum)", f"{bandwidth:.1f} GB/s", "this machine, CPU"),
        (
            "bandwidth ceiling for this file",
            f"{ceiling:.1f} tokens/s",
            f"{path.stat().st_size / 1e6:.0f} MB read per token",
        ),
        ("generation / ceiling", f"{helper / ceiling:.2f}", "good runtimes reach 0.5-0.7 on large models"),
    ]
    threads, n_ctx = llm.n_threads, llm.n_ctx()
    unload_model()

    if not args.gpu:
        import llama_cpp

        library_default = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, verbose=False)
        lib_rate = statistics.median(helper_rate(library_default, settings)[0] for _ in range(args.rounds))
        lib_threads = library_default.n_threads
        library_default.close()
        ours = load_model(path)
        our_rate = statistics.median(helper_rate(ours, settings)[0] for _ in range(args.rounds))
        rows += [
            (f"helper threads ({threads}) tokens/s", f"{our_rate:.1f}", "physical cores"),
            (f"library default threads ({lib_threads}) tokens/s", f"{lib_rate:.1f}", "cpu_count() // 2"),
            ("helper threads / library default", f"{our_rate / lib_rate:.2f}", ""),
        ]

    width = max(len(r[0]) for r in rows)
    print(f"model: {path.name}   tokens: {args.tokens}   rounds: {args.rounds}   gpu: {args.gpu}")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>14}  {note}")


if __name__ == "__main__":
    main()
