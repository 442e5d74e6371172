"""The generation core with the real small model (SmolLM2-135M-Instruct), held against llama-cpp-python's
own `create_completion` on the same token ids, seed and sampling settings."""

import random
import threading

import pytest

from helpers.errors import PromptError, UsageError
from helpers.generation import GenerationStats, StopStrings, generate, stream
from helpers.settings import PRESETS, GenerationSettings
from helpers.templates import encode_chat

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write three sentences about the sea."},
]


def library_text(model, messages, settings, seed=None):
    """llama-cpp-python's own completion on a fresh context (no KV prefix from the previous call)."""
    llm = model.llama
    llm.reset()
    out = llm.create_completion(
        prompt=encode_chat(model, messages),
        max_tokens=settings.max_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        min_p=settings.min_p,
        repeat_penalty=settings.repeat_penalty,
        seed=settings.seed if seed is None else seed,
    )
    return out["choices"][0]["text"], out["choices"][0]["finish_reason"], out["usage"]


@pytest.mark.parametrize("seed,temperature", [(7, 0.6), (123, 1.0), (5, 0.0)])
def test_text_matches_create_completion(smol, seed, temperature):
    settings = GenerationSettings(max_tokens=48, seed=seed, temperature=temperature, cache_prompt=False)
    result = generate(smol, CHAT, settings)
    text, finish, usage = library_text(smol, CHAT, settings)
    assert result.text == text.lstrip()
    assert result.stats.finish_reason == finish
    assert result.stats.prompt_tokens == usage["prompt_tokens"]
    assert result.stats.completion_tokens == usage["completion_tokens"]


def test_same_seed_same_text_and_stream_equals_generate(smol):
    settings = GenerationSettings(max_tokens=40, seed=42, temperature=0.9, cache_prompt=False)
    first = generate(smol, CHAT, settings).text
    pieces = list(stream(smol, CHAT, settings))
    assert len(pieces) > 5
    assert "".join(pieces) == first
    assert generate(smol, CHAT, settings).text == first
    other = generate(smol, CHAT, settings.replace(seed=43)).text
    assert other != first


def test_stats_are_honest(smol):
    settings = GenerationSettings(max_tokens=20, seed=1)
    result = generate(smol, CHAT, settings)
    stats = result.stats
    assert stats.prompt_tokens == len(encode_chat(smol, CHAT))
    assert stats.finish_reason in ("stop", "length")
    if stats.finish_reason == "length":
        assert stats.completion_tokens == 20
    assert stats.time_to_first_token_s > 0 and stats.tokens_per_second > 0
    assert "tokens/s" in stats.line()


def test_max_tokens_gives_length(smol):
    result = generate(smol, CHAT, GenerationSettings(max_tokens=5, seed=3))
    assert (result.stats.finish_reason, result.stats.completion_tokens) == ("length", 5)


def test_stop_string_ends_before_it(smol):
    settings = GenerationSettings(max_tokens=60, seed=11, temperature=0.0, cache_prompt=False)
    full = generate(smol, CHAT, settings).text
    words = full.split()
    stop = " ".join(words[4:6])
    cut = generate(smol, CHAT, settings.replace(stop=(stop,)))
    assert cut.stats.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]
    assert stop not in cut.text


def test_plain_string_is_a_single_user_message(smol):
    settings = GenerationSettings(max_tokens=12, seed=2, cache_prompt=False)
    assert (
        generate(smol, "Name a colour.", settings).text
        == generate(smol, [{"role": "user", "content": "Name a colour."}], settings).text
    )


def test_cancel_within_one_token_then_next_is_unaffected(smol):
    settings = GenerationSettings(max_tokens=64, seed=9, cache_prompt=False)
    fresh = generate(smol, CHAT, settings)

    stop = threading.Event()
    stats = GenerationStats()
    received = 0
    for _ in stream(
        smol, [{"role": "user", "content": "Count from one to fifty."}], settings, stop_event=stop, stats=stats
    ):
        received += 1
        if received == 3:
            stop.set()
    assert stats.finish_reason == "cancelled"
    assert stats.completion_tokens <= 4

    again = generate(smol, CHAT, settings)
    assert again.text == fresh.text
    assert again.stats.completion_tokens == fresh.stats.completion_tokens


def test_cancel_before_start(smol):
    stop = threading.Event()
    stop.set()
    result = generate(smol, CHAT, GenerationSettings(max_tokens=30, seed=1), stop_event=stop)
    assert result.text == "" and result.stats.finish_reason == "cancelled"
    assert (result.stats.completion_tokens, result.stats.tokens_per_second) == (0, 0.0)
    assert "tokens/s" not in result.stats.line() and "first token" not in result.stats.line()


def test_old_turns_dropped_to_fit_context(smol_path):
    from helpers.engine.loading import load_model

    llm = load_model(smol_path, n_ctx=256)
    history = [{"role": "system", "content": "Be brief."}]
    for i in range(12):
        history += [
            {"role": "user", "content": f"Question number {i}: tell me about topic {i} in a few words."},
            {"role": "assistant", "content": f"Topic {i} is interesting for several reasons that I will list."},
        ]
    history.append({"role": "user", "content": "And the last question?"})
    settings = GenerationSettings(max_tokens=64, seed=4)
    result = generate(llm, history, settings)
    stats = result.stats
    assert stats.dropped_turns > 0
    assert stats.prompt_tokens + settings.max_tokens <= 256
    kept = [history[0]] + history[1 + 2 * stats.dropped_turns :]
    assert stats.prompt_tokens == len(encode_chat(llm, kept))
    assert len(encode_chat(llm, [history[0]] + history[1 + 2 * (stats.dropped_turns - 1) :])) + 64 > 256

    with pytest.raises(ValueError, match="exceeds the context of 256 tokens"):
        generate(llm, "word " * 300, settings)
    # Nothing broken: the model still answers.
    assert generate(llm, "Hi", GenerationSettings(max_tokens=4, seed=1)).stats.completion_tokens > 0


# --- settings -----------------------------------------------------------------------------------------

BAD_SETTINGS = [
    ("max_tokens", 0),
    ("max_tokens", 1.5),
    ("temperature", -0.1),
    ("temperature", float("nan")),
    ("top_p", 0.0),
    ("top_p", 1.2),
    ("top_k", -1),
    ("min_p", 2),
    ("repeat_penalty", 0.5),
    ("seed", -1),
    ("seed", True),
    ("seed", 2**32 - 1),  # LLAMA_DEFAULT_SEED: llama.cpp draws a random seed instead
    ("seed", 2**32),
]


@pytest.mark.parametrize("field,value", BAD_SETTINGS)
def test_invalid_setting_names_field_and_range(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be .* in [\[(]"):
        GenerationSettings(**{field: value})


def test_settings_defaults_follow_meta_and_presets_are_valid():
    defaults = GenerationSettings()
    assert (defaults.temperature, defaults.top_p) == (0.6, 0.9)
    assert GenerationSettings(stop="###").stop == ("###",)
    with pytest.raises(ValueError, match="stop must hold non-empty strings"):
        GenerationSettings(stop=("",))
    for bad in (None, 5):
        with pytest.raises(ValueError, match=rf"^stop must be a string or a list of non-empty strings, got {bad}\.$"):
            GenerationSettings(stop=bad)
    assert defaults.cache_prompt is True
    with pytest.raises(ValueError, match="cache_prompt must be True or False, got 1"):
        GenerationSettings(cache_prompt=1)
    assert set(PRESETS) == {"Precise", "Balanced", "Creative"}


def test_largest_seed_reproduces_and_the_next_is_llama_cpps_random(smol):
    largest = GenerationSettings(max_tokens=24, seed=2**32 - 2, temperature=1.0, cache_prompt=False)
    first = generate(smol, CHAT, largest).text
    assert generate(smol, CHAT, largest).text == first == library_text(smol, CHAT, largest)[0]
    # Why 2**32 - 1 is refused: llama-cpp-python passes it to llama.cpp, whose sampler reads it as "random".
    drawn = {library_text(smol, CHAT, largest.replace(seed=None), seed=2**32 - 1)[0] for _ in range(3)}
    assert len(drawn) > 1


def test_a_random_seed_is_in_range_and_reproduces_its_text(smol):
    settings = GenerationSettings(max_tokens=16, temperature=1.0, cache_prompt=False)
    result = generate(smol, CHAT, settings)
    assert 0 <= result.stats.seed <= 2**32 - 2
    assert generate(smol, CHAT, settings.replace(seed=result.stats.seed)).text == result.text


# --- settings as a dict, an empty prompt ---------------------------------------------------------------------


def test_settings_may_be_a_dict_of_their_fields(smol):
    """`generate(model, prompt, settings={...})` raised AttributeError: a dict is read as the dataclass's fields."""
    fields = {"max_tokens": 10, "seed": 3, "temperature": 0.9, "cache_prompt": False}
    assert generate(smol, CHAT, fields).text == generate(smol, CHAT, GenerationSettings(**fields)).text
    assert "".join(stream(smol, CHAT, fields)) == generate(smol, CHAT, GenerationSettings(**fields)).text
    assert smol.generate(CHAT, fields).stats.completion_tokens == 10
    with pytest.raises(UsageError, match=r"^Unknown setting\(s\): max_new_tokens, n; the settings are: max_tokens, "):
        generate(smol, CHAT, {"max_new_tokens": 5, "n": 1})
    with pytest.raises(UsageError, match=r"^temperature must be a number in \[0.0, 2.0\], got 9"):
        generate(smol, CHAT, {"temperature": 9})
    for wrong in ([("max_tokens", 5)], "max_tokens=5", 5):
        with pytest.raises(UsageError, match="settings must be a GenerationSettings .or a dict of its fields, or None"):
            generate(smol, CHAT, wrong)


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_an_empty_prompt_is_refused(smol, prompt):
    with pytest.raises(PromptError, match="^The prompt is empty: write something"):
        generate(smol, prompt)
    assert generate(smol, "Hi", GenerationSettings(max_tokens=3, seed=1)).stats.completion_tokens == 3


# --- stop strings --------------------------------------------------------------------------------------------


def cut_at_first_stop(pieces, stops) -> tuple[str, bool]:
    """The definition: after each token, look for the stop strings in all the text so far (an unfinished character
    left out, leading whitespace dropped); the first time one is there, the text before the earliest-starting
    one is the answer."""
    for k in range(1, len(pieces) + 1):
        text = b"".join(pieces[:k]).decode("utf-8", errors="ignore").lstrip()
        starts = [i for i in (text.find(s) for s in stops) if i >= 0]
        if starts:
            return text[: min(starts)], True
    return b"".join(pieces).decode("utf-8").lstrip(), False


def through_stop_strings(pieces, stops) -> tuple[str, bool]:
    matcher, out = StopStrings(stops), []
    for piece in pieces:
        ready, stopped = matcher.add(piece)
        out.append(ready)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


@pytest.mark.parametrize("seed", range(6))
def test_stop_strings_cut_where_the_definition_cuts(smol, seed):
    """Many stop strings of every kind (inside one token, across tokens, prefixes of each other, overlapping,
    with multi-byte characters split between tokens), fed the real pieces of the small model's tokenizer."""
    rng = random.Random(seed)
    text = "  Der Fluß fließt — 海は広い 🌊. " + " ".join(
        rng.choice(["sea", "tide", "wave", "shore"]) for _ in range(60)
    )
    pieces = [smol.detokenize([t]) for t in smol.tokenize(text)]
    assert b"".join(pieces).decode("utf-8") == text
    for _ in range(20):
        stops = [
            "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(5, 9))) for _ in range(500)
        ]
        for _ in range(rng.randint(0, 4)):  # a few that do occur, some starting inside another
            start = rng.randrange(len(text) - 1)
            stops.append(text[start : start + rng.randint(1, 12)].strip() or "x")
        rng.shuffle(stops)
        assert through_stop_strings(pieces, stops) == cut_at_first_stop(pieces, stops)


def test_nothing_that_could_still_become_a_stop_string_is_shown_early():
    """Each text handed out is final: no later piece can turn its end into the start of a stop string."""
    stops = ["<|end|>", "###", "Observation:"]
    pieces = [b"The ans", b"wer <", b"|en", b"d", b"|> more"]
    matcher, shown = StopStrings(stops), []
    for piece in pieces:
        ready, stopped = matcher.add(piece)
        shown.append(ready)
        if stopped:
            break
    assert shown == ["The ans", "wer ", "", "", ""] and stopped
    pieces = [b"Obs", b"ervation", b" noted: ", b"#", b"#!"]
    matcher = StopStrings(stops)
    assert [matcher.add(p) for p in pieces] == [
        ("", False), ("", False), ("Observation noted: ", False), ("", False), ("##!", False)
    ]  # fmt: skip
