"""Benchmarks at Llama 2 7B scale, every figure from one run on one file, printed as a table.

    python bench/make_llama2_gguf.py /tmp/llama2-7b.Q4_K_M.gguf --quant Q4_K_M   # once, about 4 minutes
    python bench/scale.py --model /tmp/llama2-7b.Q4_K_M.gguf

The file has Llama 2 7B's exact architecture and vocabulary with random weights: its text is gibberish, but
its speed, memory and cache behaviour are the real model's. Figures:

- time to first token of the fifth chat turn (prompt >= 1,000 tokens), prompt cache on vs off. For the
  cached run the KV cache holds what the fourth turn left there in a chat: its prompt, then its answer
  evaluated one token at a time as generation does (a real Llama 2 answers in English that tokenizes back
  to the same ids; this file's random answers would not, so the answer is a fixed English text);
- seconds from a stop request to `stream` returning, while a 2,000-token prompt is read;
- prompt and generation tokens/s of `helpers.stream` against a bare `Llama.eval` / `Llama.sample` loop on
  the same model and thread, paired rounds;
- generation against the memory-bandwidth ceiling (bandwidth from numpy sums on every core at once);
- resident memory after load and after a long prompt, against the catalogue's RAM figure, with and
  without mmap (llama.cpp's CPU weight repacking copies repacked tensors out of the mapped file).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from helpers import GenerationSettings, GenerationStats, generate, stream  # noqa: E402
from helpers.engine.loading import load_model, unload_model  # noqa: E402
from helpers.machine.cpu import physical_cores  # noqa: E402

ANSWER = (
    "Here is a short overview. The tide is the regular rise and fall of the sea, caused mostly by the pull of "
    "the moon and, to a lesser degree, the sun. Most coasts see two high tides and two low tides every day. "
)


def rss() -> dict[str, float]:
    """Resident memory now and at its peak, in GB (the catalogue's unit)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(status[key].split()[0]) * 1024 / 1e9 for key in ("VmRSS", "VmHWM")}


def chat(turns: int, words: int) -> list[dict]:
    """A system prompt and `turns` user messages (of about `words` words, the last one a short follow-up),
    with answers between them."""
    dialog = [{"role": "system", "content": "You are a helpful assistant who answers in detail."}]
    for turn in range(turns - 1):
        question = f"Question {turn + 1}: " + " ".join(f"tell me about tides, part {i}." for i in range(words // 6))
        dialog += [{"role": "user", "content": question}, {"role": "assistant", "content": ANSWER * 2}]
    return dialog + [{"role": "user", "content": "And what does the moon have to do with it?"}]


def leave_turn_in_cache(model, dialog: list[dict]) -> None:
    """The KV cache as a chat's previous turn leaves it: that turn's prompt, then its answer one token at a
    time (as generation evaluates it)."""
    previous = dialog[:-2]
    generate(model, previous, GenerationSettings(max_tokens=1, seed=1, cache_prompt=False))
    prompt = model.encode_chat(previous)
    answer = model.tokenize(dialog[-2]["content"].strip())  # as sampled after "[/INST]": "▁Here", "▁is", ...

    def evaluate(backend):
        llama = backend.llama
        assert llama.input_ids[: len(prompt)].tolist() == prompt
        for token in answer:
            llama.eval([token])

    model.run(evaluate)


def time_to_first_token(model, dialog, cache_prompt: bool) -> GenerationStats:
    stats = GenerationStats()
    for _ in stream(model, dialog, GenerationSettings(max_tokens=1, seed=1, cache_prompt=cache_prompt), stats=stats):
        pass
    return stats


def stop_latency(model, words: int, after_s: float) -> tuple[float, GenerationStats]:
    stop, stats, asked = threading.Event(), GenerationStats(), []

    def request():
        asked.append(time.perf_counter())
        stop.set()

    timer = threading.Timer(after_s, request)
    timer.start()
    prompt = "Summarise: " + "The tide rises and falls twice a day along the coast. " * (words // 11)
    for _ in stream(model, prompt, GenerationSettings(max_tokens=8, cache_prompt=False), stop_event=stop, stats=stats):
        pass
    returned = time.perf_counter()
    timer.cancel()
    if not asked:  # the whole answer came before the stop was due (a GPU reads the prompt in a second)
        return 0.0, stats
    return returned - asked[0], stats


def helper_rates(model, dialog, tokens: int) -> tuple[float, float]:
    """(prompt tokens/s, generation tokens/s) of helpers.stream, the prompt read afresh."""
    stats, marks = GenerationStats(), {}

    def progress(done, total):
        marks.setdefault("start", time.perf_counter())
        marks["end"] = time.perf_counter()

    settings = GenerationSettings(max_tokens=tokens, seed=3, cache_prompt=False)
    for _ in stream(model, dialog, settings, stats=stats, on_progress=progress):
        pass
    return stats.prompt_tokens / (marks["end"] - marks["start"]), stats.tokens_per_second


def bare_rates(model, dialog, tokens: int) -> tuple[float, float]:
    """The same with llama-cpp-python alone: `Llama.eval` of the prompt, then `Llama.sample` + `Llama.eval`
    per token, on the model's engine thread."""
    prompt = model.encode_chat(dialog)
    settings = GenerationSettings()

    def run(backend):
        llama = backend.llama
        llama.reset()
        start = time.perf_counter()
        llama.eval(prompt)
        prompt_rate = len(prompt) / (time.perf_counter() - start)
        llama.set_seed(3)
        times = []
        for _ in range(tokens):
            token = llama.sample(
                top_k=settings.top_k,
                top_p=settings.top_p,
                min_p=settings.min_p,
                temp=settings.temperature,
                repeat_penalty=settings.repeat_penalty,
            )
            times.append(time.perf_counter())
            llama.eval([token])
        return prompt_rate, (len(times) - 1) / (times[-1] - times[0])

    return model.run(run)


def bandwidth_gbs() -> float:
    """Read bandwidth with every core summing its own 512 MiB array at once (numpy releases the GIL)."""
    cores = physical_cores()
    arrays = [np.ones(2**26, dtype=np.float64) for _ in range(cores)]
    best = float("inf")
    for _ in range(5):
        threads = [threading.Thread(target=a.sum) for a in arrays]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        best = min(best, time.perf_counter() - start)
    return sum(a.nbytes for a in arrays) / best / 1e9


def memory_probe(path: Path, use_mmap: bool, words: int) -> dict:
    """In a fresh process: resident memory after load and after reading a long prompt, and generation speed."""
    start = time.perf_counter()
    model = load_model(path, use_mmap=use_mmap)
    loaded = rss() | {"load_s": time.perf_counter() - start}
    prompt = "Summarise: " + "The tide rises and falls twice a day along the coast. " * (words // 11)
    result = generate(model, prompt, GenerationSettings(max_tokens=32, seed=1, cache_prompt=False))
    return {
        "after_load_gb": loaded["VmRSS"],
        "load_s": loaded["load_s"],
        "peak_gb": rss()["VmHWM"],
        "tokens_per_s": result.stats.tokens_per_second,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--model", type=Path, required=True, help="a Llama-2-7B-shaped GGUF (bench/make_llama2_gguf.py)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32, help="generated tokens per speed round")
    parser.add_argument("--probe", choices=["mmap", "no-mmap"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(memory_probe(args.model, args.probe == "mmap", 500)))
        return

    rows = []
    model = load_model(args.model)
    rows.append(("model", args.model.name, model.describe()))

    five = chat(turns=5, words=110)
    leave_turn_in_cache(model, five)
    cached = time_to_first_token(model, five, cache_prompt=True)
    fresh = time_to_first_token(model, five, cache_prompt=False)
    rows += [
        ("turn 5 prompt tokens", f"{fresh.prompt_tokens}", f"{cached.cached_tokens} reused from turn 4's KV cache"),
        ("turn 5 first token, cache on", f"{cached.time_to_first_token_s:.2f} s", ""),
        ("turn 5 first token, cache off", f"{fresh.time_to_first_token_s:.2f} s", ""),
        (
            "cache off / cache on",
            f"{fresh.time_to_first_token_s / cached.time_to_first_token_s:.1f}x",
            "goal >= 20x",
        ),
    ]

    latencies = [stop_latency(model, 2000, after_s) for after_s in (3.0, 7.0, 11.0)]
    rows += [
        (
            "stop -> stream returns, 2,000-token prompt",
            f"{max(s for s, _ in latencies):.2f} s",
            "worst of 3 ("
            + ", ".join(f"{s:.2f} s at {st.prompt_read}/{st.prompt_tokens}" for s, st in latencies)
            + "); goal <= 1 s",
        )
    ]

    dialog = [{"role": "user", "content": chat(turns=2, words=330)[1]["content"]}]
    helper, bare = [], []
    for _ in range(args.rounds):
        helper.append(helper_rates(model, dialog, args.tokens))
        bare.append(bare_rates(model, dialog, args.tokens))
    for i, name in enumerate(("prompt", "generation")):
        ratio = statistics.median(h[i] / b[i] for h, b in zip(helper, bare))
        rows += [
            (
                f"{name} tokens/s, helpers.stream",
                f"{statistics.median(h[i] for h in helper):.2f}",
                f"{len(model.encode_chat(dialog))}-token prompt"
                if i == 0
                else f"{args.tokens} tokens, median of {args.rounds}",
            ),
            (f"{name} tokens/s, bare Llama loop", f"{statistics.median(b[i] for b in bare):.2f}", ""),
            (f"{name}: helper / bare", f"{ratio:.3f}", "median of paired rounds; goal >= 0.97"),
        ]

    generation = statistics.median(h[1] for h in helper)
    size = args.model.stat().st_size
    bandwidth = bandwidth_gbs()
    rows += [
        ("memory bandwidth, all cores", f"{bandwidth:.1f} GB/s", f"numpy sums on {physical_cores()} threads"),
        (
            "generation / bandwidth ceiling",
            f"{generation / (bandwidth * 1e9 / size):.2f}",
            f"{size / 1e9:.2f} GB per token",
        ),
    ]
    unload_model()

    from helpers.files.catalogue import get_model

    quant = args.model.name.split(".")[-2]
    try:
        ram = f"catalogue: {get_model('llama-2-7b-chat', quant).ram_gb:.2f} GB for {quant}"
    except ValueError:
        ram = ""
    for probe in ("mmap", "no-mmap"):
        out = subprocess.run(
            [sys.executable, __file__, "--model", str(args.model), "--probe", probe],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        m = json.loads(out.strip().splitlines()[-1])
        rows += [
            (
                f"resident memory, {probe}",
                f"{m['after_load_gb']:.2f} GB",
                f"after load ({m['load_s']:.1f} s); peak {m['peak_gb']:.2f} GB after a 500-token prompt; "
                f"{m['tokens_per_s']:.2f} tokens/s; {ram}",
            )
        ]

    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>12}  {note}")


if __name__ == "__main__":
    main()
