"""Speculative decoding by prompt lookup (issue 20), held against normal decoding with the real small model
(SmolLM2-135M-Instruct): the same text, Stop, stop strings and max_tokens inside a draft, and a KV cache that
holds exactly what its bookkeeping says (llama.cpp's own view of the cache is asked)."""

import threading

import llama_cpp
import numpy as np
import pytest
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

from helpers.engine.backend import DraftCheck, SampledToken
from helpers.engine.prompt_lookup import PRIOR_SLOPE, PROBE_AFTER, PromptLookup, StepCosts
from helpers.generation import GenerationStats, generate, stream
from helpers.settings import GenerationSettings
from helpers.templates import encode_chat

FOXES = (
    "The red fox is the largest of the true foxes and one of the most widely distributed members of the order "
    "Carnivora, present across the entire Northern Hemisphere including most of North America, Europe and Asia, "
    "plus parts of North Africa. It is listed as least concern by the IUCN."
)
CODE = "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(value)\n"
GROUNDED = [
    [{"role": "user", "content": f"Repeat this text word for word:\n\n{FOXES}"}],
    [{"role": "user", "content": f"Fix the bug in this function and show the whole function:\n\n{CODE}"}],
    [{"role": "user", "content": f"Summarise this text in two sentences:\n\n{FOXES}"}],
    [{"role": "user", "content": "Write the list 'apples, pears, plums, figs' as a Markdown table with one row each."}],
]
FREE = [[{"role": "user", "content": "Tell me a short story about a lighthouse keeper."}]]

ON = GenerationSettings(max_tokens=48, temperature=0.0, seed=1, cache_prompt=False, speculative="prompt-lookup")
OFF = ON.replace(speculative=None)
# The prompts the exactness tests use are ones where batched evaluation decides no near-tie differently on this
# project's machine (docs/performance.md, "Speculative decoding", counts how often it does on more prompts).
# The copied paragraph (GROUNDED[0]) is not one of them: its 33rd token is such a tie (" most" vs " North").
FIX = GROUNDED[1]


def linear_costs(slope: float, kind: type[StepCosts] = StepCosts) -> StepCosts:
    """Step costs measured on a machine where each drafted token costs `slope` of a 1-token step."""
    costs = kind()
    for n in (1, 1, 3, 3):
        StepCosts.observe(costs, n, 0.01 * (1 + slope * (n - 1)))
    return costs


class SteadyCosts(StepCosts):
    """Step costs that are not learnt from this machine's timings (made with `linear_costs`), so the drafts
    the real-model tests see do not depend on how busy the machine is."""

    def observe(self, tokens: int, seconds: float) -> None:
        pass


@pytest.fixture(autouse=True)
def steady_costs(request, monkeypatch):
    """With the real model: drafts sized as on a machine where a batch is cheap (0.02 of a step per token, as on a GPU)."""
    if "smol" in request.fixturenames:
        backend = request.getfixturevalue("smol").run(lambda backend: backend)
        monkeypatch.setattr(backend, "step_costs", linear_costs(0.02, SteadyCosts))


def kv_positions(model) -> int:
    """How many positions llama.cpp's KV cache holds for the sequence (its own count, not the bookkeeping)."""
    return llama_cpp.llama_memory_seq_pos_max(model.llama._ctx.memory, 0) + 1


def common_prefix(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def trace(model, messages, settings):
    """The generated token ids, and for each whether it is a draft token the model kept."""
    completion = model.complete(encode_chat(model, messages), settings, settings.seed)
    tokens, from_draft, pending = [], [], 0
    try:
        for event, _ in completion.events():
            if isinstance(event, DraftCheck):
                pending = event.accepted
            elif isinstance(event, SampledToken) and not event.end_of_generation:
                tokens.append(event.id)
                from_draft.append(pending > 0)
                pending = max(0, pending - 1)
    finally:
        completion.close()
    return tokens, from_draft


# --- the drafter --------------------------------------------------------------------------------------


def test_the_candidate_continues_the_latest_earlier_occurrence_of_the_longest_ngram():
    lookup = PromptLookup([1, 2, 3, 9, 8, 1, 2, 3, 7, 5, 4, 2, 3], ngram_sizes=(3, 2))
    assert lookup.candidate(3) == ([7, 5, 4], 2)  # (2, 3): latest earlier occurrence at 6, not the one at 1
    lookup.add([6, 1, 2, 3])
    assert lookup.candidate(10) == ([7, 5, 4, 2, 3, 6, 1, 2, 3], 3)  # (1, 2, 3) at 5..7: the 3-gram wins
    assert PromptLookup([4, 5, 6], ngram_sizes=(2,)).candidate(5) == ([], 0)
    lookup = PromptLookup([50, 1, 2, 3, 4, 5, 6, 7, 8, 60, 1, 2, 3, 4, 5, 6])
    assert lookup.candidate(2) == ([7, 8], 6)  # the match reaches back past the n-gram: 6 tokens agree


def test_the_candidate_equals_llama_cpp_pythons_prompt_lookup_where_each_ngram_occurs_once():
    rng = np.random.default_rng(0)
    for _ in range(200):
        context = list(rng.permutation(1000)[:40])  # no repeats ...
        at = int(rng.integers(0, 30))
        n = int(rng.integers(1, 4))
        context += context[at : at + n]  # ... but the last n tokens, once earlier
        theirs = LlamaPromptLookupDecoding(max_ngram_size=3, num_pred_tokens=8)(np.array(context, dtype=np.intc))
        ours, _ = PromptLookup(context, ngram_sizes=(3, 2, 1), max_draft=8).candidate(8)
        assert ours == theirs.tolist()


def test_step_costs_are_the_measured_ratio_or_a_line_through_the_measured_ones():
    assert StepCosts().relative(5) == pytest.approx(1 + PRIOR_SLOPE * 4)
    costs = linear_costs(0.25)
    assert costs.relative(3) == pytest.approx(1.5)  # measured (twice)
    assert costs.relative(9) == pytest.approx(3.0)  # not measured: the line
    costs.observe(9, 0.01 * 5)  # once: a single timing does not replace the line
    assert costs.relative(9) == pytest.approx(1 + costs.slope() * 8)
    assert costs.slope() == pytest.approx((0.25 * 2 + 0.5 * 1) / 3)  # count-weighted per-token cost
    costs.observe(9, 0.01 * 5)
    assert costs.relative(9) == pytest.approx(5.0)


def test_the_draft_length_makes_the_most_tokens_per_cost():
    """Against the closed form: with a constant chance p that a drafted token is kept and a cost of 1 + s*k for
    a step with k drafted tokens, a step yields (1 - p^(k+1)) / (1 - p) tokens on average."""
    for slope in (0.05, 0.2, 0.5, 0.9):
        lookup = PromptLookup([], costs=linear_costs(slope))
        lookup._kept = {m: 0.8 * lookup._seen[m] for m in lookup._seen}  # p = 0.8 at every match length
        value = {k: (1 - 0.8 ** (k + 1)) / 0.2 / (1 + slope * k) for k in range(0, 17)}
        best = max(value, key=value.get)
        assert lookup.worth(2, 16) == best
    assert best == 0  # at 0.9 of a step per drafted token no draft pays for itself


def test_cheap_batches_draft_longer_than_dear_ones():
    context = [7, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 1, 2, 3, 4, 5, 6, 7, 8]  # long match
    gpu_like = PromptLookup(context, costs=linear_costs(0.02)).draft(16)
    cpu_like = PromptLookup(context, costs=linear_costs(0.5)).draft(16)
    assert gpu_like == [9, 10, 11, 12, 13, 14, 15, 16, 17, 1, 2, 3, 4, 5, 6, 7]
    assert 0 < len(cpu_like) < len(gpu_like) and gpu_like[: len(cpu_like)] == cpu_like
    assert len(PromptLookup(context, costs=linear_costs(0.02)).draft(3)) == 3  # the room left caps it


def test_drafting_stops_while_drafts_keep_failing_and_resumes_when_they_would_be_kept():
    lookup = PromptLookup([1, 2, 3, 4, 1, 2], ngram_sizes=(2,), costs=linear_costs(0.2))
    assert lookup.draft(4) == [3, 4]  # after a 2-token match, a token is kept half the time before any is seen
    misses = 0
    while lookup.draft(4):  # each time the model produces something else than the proposal ...
        lookup.add([100 + misses, 1, 2])  # ... and the context ends with (1, 2) again
        misses += 1
    # (1 + p) / 1.2 > 1 while p, 2 kept of 4 + misses seen, is over 0.2: six misses
    assert misses == 6 and lookup.kept_chance(2) == pytest.approx(0.2)
    before = lookup.kept_chance(2)
    lookup.add(lookup.candidate(16)[0])  # not drafted, but still watched: here the lookup would have been right
    assert lookup.kept_chance(2) > before
    assert lookup.draft(4)  # drafting again


def test_batches_timed_while_the_machine_was_busy_are_timed_again():
    costs = StepCosts()
    for n, seconds in [(1, 0.01)] * 10 + [(3, 0.032)] * 2:  # a busy moment: a batch of 3 cost 3.2 steps
        costs.observe(n, seconds)
    context = [9, *range(1, 20), 9, *range(1, 10)]  # a long match: a drafted token is likely kept
    assert PromptLookup(context, costs=costs).draft(16) == []  # every draft looks too dear ...
    for _ in range(PROBE_AFTER):
        costs.observe(1, 0.01)
    probe = PromptLookup(context, costs=costs).draft(16)
    assert probe == list(range(10, 10 + len(probe))) and len(probe) > 1  # ... until a batch is timed again
    costs.observe(len(probe) + 1, 0.01 * (1 + 0.2 * len(probe)))
    assert costs.since_batch == 0 and costs.relative(len(probe) + 1) < 1 + 1.1 * len(probe)


def test_one_token_ngrams_are_drafted_and_watched():
    lookup = PromptLookup([5, 9, 7, 5], ngram_sizes=(1,), costs=StepCosts())
    lookup.draft(4)
    lookup.add([9, 7, 5])  # the proposal (9, 7, 5) was right: counted with the shortest match's estimate
    assert lookup.kept_chance(1) == lookup.kept_chance(2) > 0.5


# --- the setting and the stats ------------------------------------------------------------------------


def test_the_setting_and_the_stats_line():
    assert GenerationSettings().speculative is None
    with pytest.raises(ValueError, match="speculative must be None \\(off\\) or 'prompt-lookup', got 'ngram'"):
        GenerationSettings(speculative="ngram")
    line = GenerationStats(prompt_tokens=9, completion_tokens=300, draft_proposed=240, draft_accepted=146).line()
    assert "| 61 % of 240 drafted tokens kept |" in line
    assert "drafted" not in GenerationStats(prompt_tokens=9, completion_tokens=3).line()


def test_the_command_line_has_the_option():
    from helpers.__main__ import parse_args

    assert parse_args(["hi", "--speculative", "prompt-lookup"]).speculative == "prompt-lookup"
    assert parse_args(["hi", "--speculative", "off"]).speculative is None
    assert parse_args(["hi"]).speculative is None
    with pytest.raises(SystemExit):
        parse_args(["hi", "--speculative", "ngram"])


# --- with the real model ------------------------------------------------------------------------------


@pytest.mark.parametrize("messages", [GROUNDED[1], GROUNDED[2]], ids=["fix", "summary"])
def test_same_text_as_normal_decoding_at_temperature_0(smol, messages):
    off = generate(smol, messages, OFF)
    on = generate(smol, messages, ON)
    assert on.text == off.text
    assert (on.stats.completion_tokens, on.stats.finish_reason) == (
        off.stats.completion_tokens,
        off.stats.finish_reason,
    )
    assert off.stats.draft_proposed == 0 and on.stats.draft_accepted > 0


def test_same_text_as_normal_decoding_with_a_fixed_seed(smol):
    settings = ON.replace(temperature=0.7, seed=3)
    on = generate(smol, FIX, settings)
    assert on.text == generate(smol, FIX, settings.replace(speculative=None)).text
    assert on.stats.draft_accepted > 0


def test_a_stop_string_inside_a_kept_draft(smol):
    messages = FIX
    tokens, from_draft = trace(smol, messages, ON)
    # a token in the middle of a kept draft (not its first), whose text appears nowhere before it
    for i in range(4, len(tokens) - 1):
        stop = smol.detokenize(tokens[i : i + 1]).decode().strip()
        before = smol.detokenize(tokens[:i]).decode()
        if all(from_draft[i - 1 : i + 2]) and len(stop) > 2 and stop not in before:
            break
    else:
        pytest.fail("no kept draft with a distinct word in it")
    on = generate(smol, messages, ON.replace(stop=(stop,)))
    off = generate(smol, messages, OFF.replace(stop=(stop,)))
    assert on.text == off.text and stop not in on.text
    assert on.stats.finish_reason == off.stats.finish_reason == "stop" and on.stats.draft_accepted > 0
    assert on.stats.completion_tokens == off.stats.completion_tokens == i + 1  # the token with the stop string


def test_max_tokens_inside_a_draft(smol):
    messages = FIX
    tokens, from_draft = trace(smol, messages, ON)
    runs = [i for i in range(1, len(tokens) - 3) if not from_draft[i - 1] and all(from_draft[i : i + 3])]
    assert runs, "no draft with three kept tokens"
    limit = runs[0] + 2  # ends on the second of three kept draft tokens
    on = generate(smol, messages, ON.replace(max_tokens=limit, cache_prompt=True))
    assert (on.stats.completion_tokens, on.stats.finish_reason) == (limit, "length")
    prompt = encode_chat(smol, messages)
    held = smol.cached_tokens()
    assert held == prompt + tokens[: limit - 1] and kv_positions(smol) == len(held)
    assert on.text == generate(smol, messages, OFF.replace(max_tokens=limit)).text


def test_a_draft_never_outgrows_the_batch(smol_path):
    """llama-cpp-python's batch holds n_batch tokens and writes into it without a bounds check: the token and
    its draft must fit (a draft of 10 in a batch of 4 wrote past it)."""
    from helpers import as_model

    llama = llama_cpp.Llama(model_path=str(smol_path), n_ctx=1024, n_batch=4, n_ubatch=4, verbose=False)
    with as_model(llama) as small_batch:
        small_batch.run(lambda backend: backend).step_costs = linear_costs(0.02, SteadyCosts)
        completion = small_batch.complete(encode_chat(small_batch, FIX), ON, ON.seed)
        try:
            drafts = [event.proposed for event, _ in completion.events() if isinstance(event, DraftCheck)]
        finally:
            completion.close()
    assert drafts and max(drafts) == 3  # drafts were made, each at most n_batch - 1 tokens
    llama.close()


def test_the_prompt_cache_after_a_speculative_turn(smol):
    settings = ON.replace(cache_prompt=True)
    messages = FIX
    first = generate(smol, messages, settings)
    assert first.stats.draft_accepted > 0
    prompt, held = encode_chat(smol, messages), smol.cached_tokens()
    # As without speculation: the prompt and every answer token but the last sampled one (the end-of-turn
    # token, or the token at max_tokens); rejected drafts are gone.
    last = 1 if first.stats.finish_reason == "length" else 0
    assert held[: len(prompt)] == prompt and len(held) == len(prompt) + first.stats.completion_tokens - last
    assert kv_positions(smol) == len(held)

    follow_up = messages + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Shorter."}]
    second = generate(smol, follow_up, settings)
    expected = common_prefix(encode_chat(smol, follow_up), held)
    assert second.stats.cached_tokens == expected > len(prompt)
    assert second.text == generate(smol, follow_up, settings.replace(cache_prompt=False)).text


def test_stop_mid_draft_then_a_normal_generation_equals_a_fresh_one(smol):
    messages = FIX
    settings = ON.replace(cache_prompt=True, max_tokens=64)
    full, _ = trace(smol, messages, settings.replace(cache_prompt=False))
    stop, received, pending = threading.Event(), [], 0
    completion = smol.complete(encode_chat(smol, messages), settings, settings.seed)
    try:
        for event, _ in completion.events(stop):
            if isinstance(event, DraftCheck):
                pending = event.accepted
            elif isinstance(event, SampledToken):
                received.append(event.id)
                if pending >= 2:  # the first of several kept draft tokens: Stop
                    stop.set()
                pending = max(0, pending - 1)
    finally:
        completion.close()
    assert completion.cancelled and stop.is_set()
    assert received == full[: len(received)] and len(received) < len(full)
    prompt, held = encode_chat(smol, messages), smol.cached_tokens()
    assert held[: len(prompt)] == prompt and held[len(prompt) :] == full[: len(held) - len(prompt)]
    assert kv_positions(smol) == len(held)

    after = generate(smol, messages, settings.replace(speculative=None))
    fresh = generate(smol, messages, settings.replace(speculative=None, cache_prompt=False))
    assert after.stats.cached_tokens == len(prompt) - 1
    assert after.text == fresh.text


def test_stop_event_while_streaming_a_speculative_answer(smol):
    stop, stats, pieces = threading.Event(), GenerationStats(), []
    for piece in stream(smol, FIX, ON.replace(cache_prompt=True), stop_event=stop, stats=stats):
        pieces.append(piece)
        if len(pieces) == 12:
            stop.set()
    assert stats.finish_reason == "cancelled" and 12 <= stats.completion_tokens < ON.max_tokens
    assert kv_positions(smol) == len(smol.cached_tokens())


def test_the_engine_times_its_steps_for_the_drafter(smol, monkeypatch):
    costs = StepCosts()
    monkeypatch.setattr(smol.run(lambda backend: backend), "step_costs", costs)
    on = generate(smol, FIX, ON)
    assert on.stats.draft_proposed > 0
    # one timing per step: every token sampled (the answer's and its end-of-turn token) after the first, but
    # the kept draft tokens, which came in the step that checked them
    assert on.stats.finish_reason == "stop"
    steps = sum(costs._count.values())
    assert steps == on.stats.completion_tokens + 1 - 1 - on.stats.draft_accepted
    assert any(n > 1 for n in costs._count) and costs.slope() >= 0
    generate(smol, FIX, OFF)
    assert sum(costs._count.values()) == steps  # without drafting nothing is timed
