"""Speculative decoding by prompt lookup (issue 20), every figure from one run, printed as tables.

    python bench/speculative.py                                    # SmolLM2 tasks, step costs, exactness
    python bench/speculative.py --big quantized/llama2-7b-shaped.Q4_0.gguf   # and the figures at 7B shape

1. Tasks with the bundled SmolLM2-135M-Instruct: a grounded set (summarise, rewrite in another tone, fix a
   bug, answer with quotes, a list as a table) and a free-form set (a story, an explanation). Each round runs
   every task three ways, in an order that rotates each round: speculative off, `speculative="prompt-lookup"`,
   and llama-cpp-python's own `LlamaPromptLookupDecoding` (`Llama(draft_model=...)`, `Llama.generate`) on the
   same file, prompt tokens, sampling settings and seed. Generation tokens/s is tokens after the first / time
   after the first (as `GenerationStats`), summed over the rounds; each run computes on a thread of its own
   that ends with it (as the helpers' engine does). The ratios come from the same run.
2. Exactness: the same prompts at temperature 0, off vs on, and the paired rounds' texts (same seed): how
   many are equal.
3. Step costs, measured inside the engine's own generation loop (the timing `StepCosts` gets, a drafter that
   proposes k = 0..16 tokens in turn): what a step that evaluates the sampled token and k drafted ones costs
   against a step of one token, median of the rounds, for SmolLM2 and (`--big`) the Llama 2 7B-shaped file
   (random weights, from bench/make_llama2_gguf.py). Timed apart from generation, a batch misleads: with
   SmolLM2 a lone 1-token decode took 14 ms against 6.7 ms inside the loop. The bound: the speedup if every
   drafted token were kept, max over k of (k+1) / cost(k+1).
4. Implied speedups. Random weights cannot measure acceptance, so the drafter (the same code, its chance
   estimates learning as in the engine) is replayed on the tokens the "off" runs produced, with the step costs
   of a model fixed to its measured curve: a drafted token is kept when it equals the token the model produced
   there, which is the acceptance rule, and the off runs are samples of the same distribution.
   implied = (tokens - 1) / the sum of the steps' relative costs. On SmolLM2's own curve this checks the
   method against the measured on / off; on the 7B curve it is the figure at that scale (with SmolLM2's
   acceptance: a 7B model probably copies at least as faithfully). Python's drafting time is left out.
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
from helpers.engine.prompt_lookup import PromptLookup, StepCosts  # noqa: E402

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


def task_prompts(model) -> dict[str, list[int]]:
    tasks = {**{f"grounded: {k}": v for k, v in GROUNDED.items()}, **{f"free-form: {k}": v for k, v in FREE.items()}}
    return {name: model.encode_chat([{"role": "user", "content": text}]) for name, text in tasks.items()}


def tasks_table(model, library, rounds: int, max_tokens: int, settings: GenerationSettings, runs=None, first_round=0):
    """Paired rounds over every task (added to `runs`); returns the rows and the runs of each task and mode."""
    prompts = task_prompts(model)
    tasks = list(prompts)
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


def exactness(model, max_tokens: int) -> tuple[int, int, list[str], dict[str, float]]:
    """Off vs on at temperature 0 on every task and the extra prompts: (equal, total, the ones that differ,
    on / off generation tokens/s of the grounded and the free-form tasks at temperature 0, one run each)."""
    texts = [*GROUNDED.values(), *FREE.values(), *EXTRA]
    group = {**dict.fromkeys(GROUNDED.values(), "grounded"), **dict.fromkeys(FREE.values(), "free-form")}
    settings = GenerationSettings(max_tokens=max_tokens, temperature=0.0, seed=1, cache_prompt=False)
    differ, runs = [], {"grounded": ([], []), "free-form": ([], [])}
    for text in texts:
        prompt = model.encode_chat([{"role": "user", "content": text}])
        off = helpers_run(model, prompt, settings)
        on = helpers_run(model, prompt, settings.replace(speculative="prompt-lookup"))
        if text in group:
            runs[group[text]][0].append(off)
            runs[group[text]][1].append(on)
        if off.tokens != on.tokens:
            at = next((i for i, (a, b) in enumerate(zip(off.tokens, on.tokens)) if a != b), None)
            differ.append(f"{text[:40]!r}... differs at token {at} of {len(off.tokens)}")
    speed = {name: rate(on) / rate(off) for name, (off, on) in runs.items()}
    return len(texts) - len(differ), len(texts), differ, speed


class Timings(StepCosts):
    """The engine's `StepCosts`, keeping every step's seconds by its size as well."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[int, list[float]] = {}

    def observe(self, tokens: int, seconds: float) -> None:
        self.seen.setdefault(tokens, []).append(seconds)
        super().observe(tokens, seconds)


class Forced:
    """A drafter that proposes k = `sizes[0]`, `sizes[1]`, ... tokens whatever the context (the k tokens before
    the last one), so that the engine's loop times a step of every size."""

    def __init__(self, context: list[int], sizes: list[int]):
        self.tokens, self.sizes = list(context), sizes  # takes the sizes off the caller's list

    def add(self, tokens) -> None:
        self.tokens.extend(tokens)

    def draft(self, limit: int) -> list[int]:
        k = min(self.sizes.pop(0) if self.sizes else 0, limit)
        return self.tokens[-k - 1 : -1] if k else []


def step_costs(model, rounds: int, largest: int = 16) -> dict[int, float]:
    """Median seconds of a generation step that evaluates n = 1..largest+1 tokens, timed by the engine's loop
    (see the module's docstring) after a 200-odd-token prompt, sizes in an order that rotates each round."""
    backend = model.run(lambda b: b)
    sizes = list(range(largest + 1))
    schedule = [k for r in range(rounds) for k in sizes[r % len(sizes) :] + sizes[: r % len(sizes)]]
    text = "\n\n".join([ARTICLE, EMAIL, "Repeat the two texts above word for word, twice."])
    prompt = model.encode_chat([{"role": "user", "content": text}])
    settings = GenerationSettings(
        max_tokens=1000, temperature=0.6, seed=1, cache_prompt=False, speculative="prompt-lookup"
    )
    saved_costs, timings = backend.step_costs, Timings()
    backend.step_costs = timings
    backend._drafter = lambda llama, _: Forced(llama.input_ids[: llama.n_tokens].tolist(), schedule)
    try:
        while schedule:  # again from the prompt if an answer ends before the schedule does
            completion = model.complete(prompt, settings, settings.seed)
            try:
                for _ in completion.events():
                    if not schedule:  # the step that took the last size has been timed
                        break
            finally:
                completion.close()
    finally:
        del backend._drafter
        backend.step_costs = saved_costs
    return {n: statistics.median(timings.seen[n]) for n in sorted(timings.seen)}


def fixed_costs(cost: dict[int, float]) -> StepCosts:
    """`StepCosts` that hold a measured curve (each size as if timed twice)."""
    costs = StepCosts()
    for n, seconds in cost.items():
        costs.observe(n, seconds)
        costs.observe(n, seconds)
    return costs


def replay(prompt: list[int], tokens: list[int], cost: dict[int, float], max_tokens: int) -> tuple[int, float]:
    """The drafter on tokens a run without drafting produced: (tokens after the first, the steps' summed
    relative cost) on the curve `cost` (see the module's docstring)."""
    costs = fixed_costs(cost)
    lookup = PromptLookup(prompt, costs=costs)
    lookup.add(tokens[:1])
    at, spent = 1, 0.0
    while at < len(tokens):
        left = min(max_tokens - at, max(cost)) - 1
        draft = lookup.draft(left) if left > 0 else []
        kept = next(
            (i for i, (d, t) in enumerate(zip(draft, tokens[at:])) if d != t), min(len(draft), len(tokens) - at)
        )
        spent += costs.relative(len(draft) + 1)
        lookup.add(tokens[at : at + kept + 1])
        at += kept + 1
    return len(tokens) - 1, spent


def implied_speedup(prompts: dict[str, list[int]], runs, names, cost: dict[int, float], max_tokens: int) -> float:
    tokens, spent = 0, 0.0
    for name in names:
        for run in runs[name, "off"]:
            if len(run.tokens) > 1:
                t, s = replay(prompts[name], run.tokens, cost, max_tokens)
                tokens, spent = tokens + t, spent + s
    return tokens / spent if spent else 0.0


def print_costs(title: str, cost: dict[int, float]) -> None:
    print(f"\n{title}")
    print("| k drafted | step of k+1 (ms) | / one token | tokens per cost if all kept |")
    print("|---|---|---|---|")
    for n, seconds in cost.items():
        print(f"| {n - 1} | {1000 * seconds:.1f} | {seconds / cost[1]:.2f} | {n * cost[1] / seconds:.2f} |")
    bound = max(n * cost[1] / s for n, s in cost.items())
    print(f"the bound (every drafted token kept, the best k): {bound:.2f}x", flush=True)


def print_implied(title: str, prompts, runs, rows, cost, max_tokens: int) -> None:
    names = [r[0] for r in rows]
    parts = []
    for group in ("grounded", "free-form"):
        group_names = [n for n in names if n.startswith(group)]
        parts.append(f"{group} {implied_speedup(prompts, runs, group_names, cost, max_tokens):.2f}x")
    each = ", ".join(f"{n.split(': ')[1]} {implied_speedup(prompts, runs, [n], cost, max_tokens):.2f}x" for n in names)
    print(f"{title}: {', '.join(parts)} ({each})", flush=True)


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
    parser.add_argument("--big", type=Path, default=None, help="a Llama-2-7B-shaped GGUF for the step costs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--cost-rounds", type=int, default=5, help="steps timed per size and model")
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

    prompts = task_prompts(model)
    small = step_costs(model, args.cost_rounds)
    print_costs(f"step cost in the engine's loop, {path.name}, median of {args.cost_rounds} rounds:", small)
    print_implied(
        "replayed on that curve (the method's check against on / off above)",
        prompts,
        runs,
        rows,
        small,
        args.max_tokens,
    )
    if args.big is not None:
        unload_model()
        big_model = load_model(args.big, n_ctx=1024)
        try:
            big = step_costs(big_model, args.cost_rounds)
        finally:
            unload_model()
        print_costs(f"step cost at Llama 2 7B shape ({args.big.name}), median of {args.cost_rounds} rounds:", big)
        print_implied(
            "implied at 7B (SmolLM2's answers replayed on the 7B curve)", prompts, runs, rows, big, args.max_tokens
        )
        model = load_model(path)

    equal, total, differ, speed = exactness(model, args.exact_tokens)
    print(f"\nexactness at temperature 0, off vs on: {equal} of {total} texts equal ({args.exact_tokens} tokens each)")
    for line in differ:
        print(f"  {line}")
    print(
        "on / off at temperature 0 (the tasks, one run each): " + ", ".join(f"{k} {v:.2f}x" for k, v in speed.items())
    )


if __name__ == "__main__":
    main()
