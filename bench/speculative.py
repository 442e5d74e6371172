"""Speculative decoding by prompt lookup (issue 20), every figure from one run, printed as tables.

    python bench/speculative.py                                    # SmolLM2 tasks, exactness, 7B batch cost
    python bench/speculative.py --big quantized/llama2-7b-shaped.Q4_0.gguf

1. Tasks with the bundled SmolLM2-135M-Instruct: a grounded set (summarise, rewrite in another tone, fix a
   bug, answer with quotes, a list as a table) and a free-form set (a story, an explanation). Each round runs
   every task three ways, in an order that rotates each round: speculative off, `speculative="prompt-lookup"`,
   and llama-cpp-python's own `LlamaPromptLookupDecoding` (`Llama(draft_model=...)`, `Llama.generate`) on the
   same file, prompt tokens, sampling settings and seed. Generation tokens/s is tokens after the first / time
   after the first (as `GenerationStats`), summed over the rounds; each run computes on a thread of its own
   that ends with it (as the helpers' engine does). The ratios come from the same run.
2. Exactness: the same prompts at temperature 0, off vs on, and the paired rounds' texts (same seed): how
   many are equal.
3. At Llama 2 7B shape (`--big`, random weights, from bench/make_llama2_gguf.py): the time to evaluate a batch
   of k+1 tokens (logits for each) after a 256-token prompt, against one token, k = 0..16, median of paired
   rounds. Random weights cannot measure acceptance, so the implied speedup replays the drafts that the
   SmolLM2 runs made (each verification of k drafted tokens costs cost(k+1), each token without a draft
   cost(1)) on the 7B cost curve: implied = tokens x cost(1) / sum of the batches' costs. Python's drafting
   time (microseconds a token) is left out of it; at 7B a token takes about 300 ms here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llama_cpp  # noqa: E402
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding  # noqa: E402

from helpers import GenerationSettings, offline_model_path  # noqa: E402
from helpers.engine.backend import DraftCheck, SampledToken  # noqa: E402
from helpers.engine.loading import load_model, unload_model  # noqa: E402

ARTICLE = (
    "The Great Barrier Reef is the world's largest coral reef system, composed of over 2,900 individual reefs "
    "and 900 islands stretching for over 2,300 kilometres over an area of approximately 344,400 square "
    "kilometres. The reef is located in the Coral Sea, off the coast of Queensland, Australia. It can be seen "
    "from outer space and is the world's biggest single structure made by living organisms. This reef "
    "structure is composed of and built by billions of tiny organisms, known as coral polyps. It supports a "
    "wide diversity of life and was selected as a World Heritage Site in 1981. Climate change, pollution, "
    "crown-of-thorns starfish and fishing are the primary threats to the health of this reef system."
)
EMAIL = (
    "Dear team, the quarterly report is due on Friday. All department heads must submit their figures by "
    "Wednesday at noon. Late submissions will not be accepted. Reports must follow the attached template "
    "exactly. Any questions should be directed to the finance office."
)
CODE = '''def average_word_length(text):
    """The mean length of the words in text."""
    words = text.split()
    total = 0
    for word in words:
        total += len(word)
    return total / len(text)
'''
ITEMS = """- Apples: red, sweet, autumn
- Lemons: yellow, sour, winter
- Cherries: red, sweet, summer
- Plums: purple, sweet, late summer
- Limes: green, sour, all year
- Pears: green, sweet, autumn"""

GROUNDED = {
    "summarise": f"Summarise this text in three sentences:\n\n{ARTICLE}",
    "rewrite": f"Rewrite this email in a warm, friendly tone, keeping every fact:\n\n{EMAIL}",
    "fix bug": f"This function has a bug. Fix it and show the whole corrected function.\n\n{CODE}",
    "quote": f"{ARTICLE}\n\nUsing quotes from the text above, answer: where is the reef and how large is it?",
    "table": f"Reformat this list as a Markdown table with columns Fruit, Colour, Taste, Season:\n\n{ITEMS}",
}
FREE = {
    "story": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "explain": "Explain how a refrigerator keeps food cold, for a ten-year-old.",
}
EXTRA = [  # more prompts for the exactness count only
    f"Translate the first two sentences of this text into simple English:\n\n{ARTICLE}",
    f"List the threats to the reef named in this text:\n\n{ARTICLE}",
    f"Add a docstring example to this function and show it:\n\n{CODE}",
    f"Turn this email into three bullet points:\n\n{EMAIL}",
    "Name five planets and one fact about each.",
    "Write a haiku about autumn rain.",
    "What is the capital of France? Answer in one sentence.",
    "Give three tips for learning to cook.",
]


@dataclass
class Run:
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    drafts: list[tuple[int, int]] = field(default_factory=list)  # (proposed, kept) per verification

    def rate_parts(self) -> tuple[int, float]:
        """(tokens after the first, seconds after the first)."""
        return (len(self.times) - 1, self.times[-1] - self.times[0]) if len(self.times) > 1 else (0, 0.0)


def on_own_thread(job):
    """Run `job` on a thread that ends with it (ggml's OpenMP team goes with its thread)."""
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", job()))
    thread.start()
    thread.join()
    return result["value"]


def helpers_run(model, prompt: list[int], settings: GenerationSettings) -> Run:
    run = Run()
    completion = model.complete(prompt, settings, settings.seed)
    try:
        for event, at in completion.events():
            if isinstance(event, DraftCheck):
                run.drafts.append((event.proposed, event.accepted))
            elif isinstance(event, SampledToken) and not event.end_of_generation:
                run.tokens.append(event.id)
                run.times.append(at)
    finally:
        completion.close()
    return run


def library_run(llama, prompt: list[int], settings: GenerationSettings) -> Run:
    """llama-cpp-python's `Llama.generate` with its `LlamaPromptLookupDecoding` draft model."""

    def job():
        run = Run()
        llama.set_seed(settings.seed)
        tokens = llama.generate(
            prompt,
            top_k=settings.top_k,
            top_p=settings.top_p,
            min_p=settings.min_p,
            temp=settings.temperature,
            repeat_penalty=settings.repeat_penalty,
            reset=True,
        )
        for token in tokens:
            if llama_cpp.llama_vocab_is_eog(llama._model.vocab, token):
                break
            run.tokens.append(token)
            run.times.append(time.perf_counter())
            if len(run.tokens) == settings.max_tokens:
                break
        return run

    return on_own_thread(job)


def rate(runs: list[Run]) -> float:
    tokens, seconds = map(sum, zip(*(r.rate_parts() for r in runs)))
    return tokens / seconds if seconds else 0.0


def tasks_table(model, library, rounds: int, max_tokens: int, settings: GenerationSettings, runs=None, first_round=0):
    """Paired rounds over every task (added to `runs`); returns the rows and the runs of each task and mode."""
    tasks = {**{f"grounded: {k}": v for k, v in GROUNDED.items()}, **{f"free-form: {k}": v for k, v in FREE.items()}}
    prompts = {name: model.encode_chat([{"role": "user", "content": text}]) for name, text in tasks.items()}
    runs = runs or {(name, mode): [] for name in tasks for mode in ("off", "on", "library")}
    for r in range(first_round, first_round + rounds):
        order = ["off", "on", "library"]
        order = order[r % 3 :] + order[: r % 3]
        for name, prompt in prompts.items():
            base = settings.replace(max_tokens=max_tokens, seed=1000 + r, cache_prompt=False)
            for mode in order:
                if mode == "library":
                    runs[name, mode].append(library_run(library, prompt, base) if library is not None else Run())
                else:
                    spec = "prompt-lookup" if mode == "on" else None
                    runs[name, mode].append(helpers_run(model, prompt, base.replace(speculative=spec)))
    rows = []
    for name in tasks:
        off, on, lib = (rate(runs[name, m]) for m in ("off", "on", "library"))
        proposed = sum(p for run in runs[name, "on"] for p, _ in run.drafts)
        kept = sum(k for run in runs[name, "on"] for _, k in run.drafts)
        equal = sum(a.tokens == b.tokens for a, b in zip(runs[name, "off"], runs[name, "on"]))
        rows.append((name, off, on, lib, proposed, kept, equal))
    return rows, runs


def exactness(model, max_tokens: int) -> tuple[int, int, list[str]]:
    """Off vs on at temperature 0 on every task and the extra prompts: (equal, total, the ones that differ)."""
    texts = [*GROUNDED.values(), *FREE.values(), *EXTRA]
    settings = GenerationSettings(max_tokens=max_tokens, temperature=0.0, seed=1, cache_prompt=False)
    differ = []
    for text in texts:
        prompt = model.encode_chat([{"role": "user", "content": text}])
        off = helpers_run(model, prompt, settings)
        on = helpers_run(model, prompt, settings.replace(speculative="prompt-lookup"))
        if off.tokens != on.tokens:
            at = next((i for i, (a, b) in enumerate(zip(off.tokens, on.tokens)) if a != b), None)
            differ.append(f"{text[:40]!r}... differs at token {at} of {len(off.tokens)}")
    return len(texts) - len(differ), len(texts), differ


def batch_costs(path: Path, rounds: int, largest: int, prompt_len: int = 256) -> dict[int, float]:
    """Median seconds to evaluate a batch of n = 1..largest+1 tokens (logits for each) after `prompt_len`
    tokens, on the model's engine thread; the batch's positions are dropped after each measurement."""
    model = load_model(path, n_ctx=1024)

    def measure(backend):
        llama = backend.llama
        llama.reset()
        llama._ctx.kv_cache_clear()
        text = " ".join(GROUNDED.values())
        prompt = ([llama.token_bos()] + llama.tokenize(text.encode(), add_bos=False))[:prompt_len]
        llama.eval(prompt)
        filler = llama.tokenize(ARTICLE.encode(), add_bos=False)
        seconds = {n: [] for n in range(1, largest + 2)}
        sizes = list(seconds)
        for r in range(rounds):
            for n in sizes[r % len(sizes) :] + sizes[: r % len(sizes)]:
                llama._batch.set_batch(batch=filler[:n], n_past=len(prompt), logits_all=True)
                start = time.perf_counter()
                if llama_cpp.llama_decode(llama.ctx, llama._batch.batch) != 0:
                    raise RuntimeError("llama_decode failed")
                seconds[n].append(time.perf_counter() - start)
                llama._ctx.kv_cache_seq_rm(-1, len(prompt), -1)
        llama.n_tokens = len(prompt)
        return {n: statistics.median(s) for n, s in seconds.items()}

    try:
        return model.run(measure)
    finally:
        unload_model()


def implied_speedup(runs: list[Run], cost: dict[int, float]) -> float:
    """Tokens x cost(1) over the cost of the batches the runs evaluated (see the module's docstring)."""
    tokens = sum(len(r.tokens) - 1 for r in runs)
    drafted = sum(cost[min(p, max(cost) - 1) + 1] for r in runs for p, _ in r.drafts)
    batches_with_draft = sum(1 + k for r in runs for _, k in r.drafts)
    singles = max(0, tokens - batches_with_draft)
    return tokens * cost[1] / (singles * cost[1] + drafted) if tokens else 0.0


def print_tasks(rows, runs, rounds: int) -> None:
    print("\n| task | off tokens/s | prompt-lookup | on / off | llama-cpp-python PLD | on / PLD | kept | same text |")
    print("|---|---|---|---|---|---|---|---|")
    for name, off, on, lib, proposed, kept, equal in rows:
        versus = f"{on / lib:.2f}x" if lib else "-"
        share = f"{100 * kept / proposed:.0f} % of {proposed}" if proposed else "no drafts"
        print(
            f"| {name} | {off:.1f} | {on:.1f} | **{on / off:.2f}x** | {lib:.1f} | {versus} | {share} | {equal} of {rounds} |"
        )
    for group in ("grounded", "free-form"):
        names = [r[0] for r in rows if r[0].startswith(group)]
        off = rate([run for n in names for run in runs[n, "off"]])
        on = rate([run for n in names for run in runs[n, "on"]])
        print(f"{group}, all tasks together: {on:.1f} / {off:.1f} tokens/s = {on / off:.2f}x")
    paired_equal = sum(r[6] for r in rows)
    print(f"paired rounds (same seed): {paired_equal} of {len(rows) * rounds} texts equal, off vs on", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--big", type=Path, default=None, help="a Llama-2-7B-shaped GGUF for the batch cost")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--big-rounds", type=int, default=3)
    parser.add_argument("--exact-tokens", type=int, default=128, help="tokens per text in the exactness count")
    parser.add_argument("--no-library", action="store_true", help="leave out llama-cpp-python's prompt lookup")
    args = parser.parse_args()

    path = args.model or offline_model_path()
    model = load_model(path)
    llama = model.llama
    library = None
    if not args.no_library:
        library = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=llama.n_ctx(),
            n_threads=llama.n_threads,
            n_threads_batch=llama.n_threads_batch,
            draft_model=LlamaPromptLookupDecoding(),  # its defaults: 2-grams, 10 tokens; forces logits_all
            verbose=False,
        )
    settings = GenerationSettings()  # the notebook's defaults: temperature 0.6, top_p 0.9, ...
    print(f"model {path.name}, {llama.n_threads} threads, llama-cpp-python {llama_cpp.__version__}")
    print(f"settings: temperature {settings.temperature}, top_p {settings.top_p}, top_k {settings.top_k}, ")
    print(f"  repeat_penalty {settings.repeat_penalty}, max_tokens {args.max_tokens}, {args.rounds} paired rounds")
    rows, runs = [], {}
    for r in range(args.rounds):  # the table so far after each round
        rows, runs = tasks_table(model, library, 1, args.max_tokens, settings, runs=runs, first_round=r)
        print_tasks(rows, runs, r + 1)
    if library is not None:
        library.close()

    if args.big is not None:
        unload_model()
        cost = batch_costs(args.big, args.big_rounds, largest=16)
        print(f"\nbatch cost at Llama 2 7B shape ({args.big.name}), median of {args.big_rounds} rounds:")
        print("| k drafted | batch of k+1 (s) | / one token |")
        print("|---|---|---|")
        for n, seconds in cost.items():
            print(f"| {n - 1} | {seconds:.3f} | {seconds / cost[1]:.2f} |")
        for group in ("grounded", "free-form"):
            group_runs = [run for (n, m), rs in runs.items() if n.startswith(group) and m == "on" for run in rs]
            print(f"implied speedup at 7B, {group}: {implied_speedup(group_runs, cost):.2f}x")
        for name, *_ in rows:
            print(f"  {name}: {implied_speedup(runs[name, 'on'], cost):.2f}x", flush=True)
        model = load_model(path)

    equal, total, differ = exactness(model, args.exact_tokens)
    print(f"\nexactness at temperature 0, off vs on: {equal} of {total} texts equal ({args.exact_tokens} tokens each)")
    for line in differ:
        print(f"  {line}")


if __name__ == "__main__":
    main()
