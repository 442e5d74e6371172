"""The model object with the real small model: what it owns, its lifetime (nothing can crash it), the prompt
cache across turns, and stopping while the prompt is read."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import llama_cpp
import pytest

import helpers
from helpers import GenerationSettings, GenerationStats, Model, ModelUnloadedError, generate, stream
from helpers.engine.loading import load_model
from helpers.engine.model import as_model
from helpers.errors import ModelLoadError
from helpers.templates import encode_chat, render_chat, template_for

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write three sentences about the sea."},
]
ROOT = Path(__file__).resolve().parents[2]
LONG = "Summarise the following notes. " + "The tide rises and falls twice a day along the coast. " * 140


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# --- the object ---------------------------------------------------------------------------------------


def test_load_model_returns_a_model_that_owns_its_llama(smol):
    assert isinstance(smol, Model) and isinstance(smol.llama, llama_cpp.Llama)
    assert smol.template == template_for(smol) == "gguf"
    settings = GenerationSettings(max_tokens=12, seed=3, cache_prompt=False)
    assert smol.generate(CHAT, settings).text == generate(smol, CHAT, settings).text
    assert smol.encode_chat(CHAT) == encode_chat(smol, CHAT)
    assert smol.render_chat(CHAT) == render_chat(CHAT, template="gguf", llm=smol)
    assert render_chat(CHAT, llm=smol) == smol.render_chat(CHAT)  # the model's template, as encode_chat picks it
    assert smol.describe() == helpers.describe_model(smol)
    assert not hasattr(smol.llama, "gpu_layers") and not hasattr(smol.llama, "unloaded")  # nothing patched on


def test_a_plain_llama_is_wrapped_once_and_gives_the_same_text(smol_path, smol):
    settings = GenerationSettings(max_tokens=16, seed=8, cache_prompt=False)
    expected = generate(smol, CHAT, settings).text
    llama = llama_cpp.Llama(model_path=str(smol_path), n_ctx=1024, n_threads=2, verbose=False)
    try:
        assert as_model(llama) is as_model(llama)
        assert generate(llama, CHAT, settings).text == expected
        assert encode_chat(llama, CHAT) == encode_chat(smol, CHAT)
        assert "1024 tokens" in helpers.describe_model(llama)
    finally:
        llama.close()
    # The user closed their Llama: a clear error, not a crash.
    with pytest.raises(ModelUnloadedError, match="closed or deleted"):
        generate(llama, CHAT, settings)
    with pytest.raises(ModelUnloadedError):
        encode_chat(llama, CHAT)


def test_a_vocab_only_llama_tokenizes_but_cannot_generate(llama2_vocab):
    dialog = [{"role": "user", "content": "Hello there"}]
    ids = encode_chat(llama2_vocab, dialog)
    assert ids[0] == 1 and llama2_vocab.detokenize(ids[1:]) == b" [INST] Hello there [/INST]"
    with pytest.raises(ValueError, match="vocab_only"):
        generate(llama2_vocab, dialog, GenerationSettings(max_tokens=2))
    assert encode_chat(llama2_vocab, dialog) == ids  # still usable


def test_not_a_model():
    with pytest.raises(TypeError, match="load_model"):
        generate("model.gguf", "Hi")


# --- lifetime -----------------------------------------------------------------------------------------


def test_close_and_context_manager(smol_path):
    with load_model(smol_path, n_ctx=512) as model:
        assert model.generate("Hi", GenerationSettings(max_tokens=3, seed=1)).stats.completion_tokens > 0
    assert model.closed
    model.close()  # twice is fine
    calls = [
        lambda: generate(model, "Hi"),
        lambda: list(stream(model, "Hi")),
        lambda: encode_chat(model, CHAT),
        lambda: render_chat(CHAT, template="gguf", llm=model),
        lambda: template_for(model),
        lambda: helpers.describe_model(model),
        lambda: model.llama,
        lambda: model.tokenize("hi"),
        lambda: model.cached_tokens(),
    ]
    for call in calls:
        with pytest.raises(ModelUnloadedError, match="closed or replaced"):
            call()


def test_load_while_generating_stops_the_generation_first(smol_path):
    old = load_model(smol_path, n_ctx=1024)
    settings = GenerationSettings(max_tokens=400, seed=2)
    outcome, pieces = {}, []

    def run():
        stats = GenerationStats()
        try:
            for piece in stream(old, "Count from one to two hundred in words.", settings, stats=stats):
                pieces.append(piece)
        except ModelUnloadedError as error:
            outcome["error"] = error
        outcome["stats"] = stats

    worker = threading.Thread(target=run)
    worker.start()
    while len(pieces) < 3:
        time.sleep(0.01)
    new = load_model(smol_path, n_ctx=2048)  # frees `old` while its generation runs
    worker.join(30)
    assert not worker.is_alive()
    assert "while generating" in str(outcome["error"])
    assert outcome["stats"].finish_reason == "cancelled" and outcome["stats"].completion_tokens < 400
    assert old.closed and not new.closed
    with pytest.raises(ModelUnloadedError):
        helpers.describe_model(old)
    assert generate(new, "Hi", GenerationSettings(max_tokens=3, seed=1)).stats.completion_tokens > 0


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"n_gpu_layers": "lots"}, "n_gpu_layers must be"),
        ({"n_gpu_layers": -5}, 'n_gpu_layers must be "auto", -1'),
        ({"n_ctx": -1}, "n_ctx must be an integer from 16"),
        ({"n_threads": 0}, "n_threads must be an integer from 1 to"),
        ({"n_batch": -3}, "n_batch must be an integer from 1 to"),  # llama.cpp itself segfaults on it
        ({"n_ctx_size": 512}, "Unknown load_model setting"),
    ],
)
def test_bad_settings_leave_the_loaded_model_alone(smol_path, bad, message):
    working = load_model(smol_path)
    with pytest.raises(ValueError, match=message):
        load_model(smol_path, **bad)
    assert not working.closed and load_model(smol_path) is working


def unknown_architecture(path, source):
    """A well-formed GGUF of an architecture llama.cpp does not know (so it passes the project's header check
    and fails inside llama.cpp): the small model with every 'llama' in its header renamed 'xllam'."""
    import gguf

    data = source.read_bytes()
    start = gguf.GGUFReader(source).data_offset
    length = len("llama").to_bytes(8, "little")
    head = data[:start].replace(b"llama.", b"xllam.").replace(length + b"llama", length + b"xllam")
    path.write_bytes(head + data[start:])
    return path


def test_a_load_that_fails_in_llama_cpp_brings_the_previous_model_back(smol_path, tmp_path):
    odd = unknown_architecture(tmp_path / "odd.gguf", smol_path)
    working = load_model(smol_path)
    settings = GenerationSettings(max_tokens=10, seed=4, cache_prompt=False)
    before = generate(working, CHAT, settings).text
    with pytest.raises(ModelLoadError, match="Could not load odd.gguf"):
        load_model(odd)
    assert not working.closed and load_model(smol_path) is working
    assert generate(working, CHAT, settings).text == before


def test_a_failed_load_during_a_generation_ends_it_as_cancelled(smol_path, tmp_path):
    odd = unknown_architecture(tmp_path / "odd.gguf", smol_path)
    working = load_model(smol_path)
    stats, started = GenerationStats(), threading.Event()

    def on_progress(done, total):
        if not started.is_set():
            started.set()
            with pytest.raises(ModelLoadError):
                load_model(odd)  # unloads `working` (stopping this generation), fails, loads it again

    pieces = list(stream(working, LONG, GenerationSettings(max_tokens=8), stats=stats, on_progress=on_progress))
    assert pieces == [] and stats.finish_reason == "cancelled"
    assert not working.closed and load_model(smol_path) is working
    assert generate(working, "Hi", GenerationSettings(max_tokens=3, seed=1)).stats.completion_tokens > 0


@pytest.mark.parametrize("cut", [4, 24, 100, 1000, 20_000])
def test_a_file_cut_inside_its_header_is_reported_as_damaged(smol_path, tmp_path, cut):
    from helpers.errors import DamagedModelError

    part = tmp_path / "cut.gguf"
    part.write_bytes(smol_path.read_bytes()[:cut])
    with pytest.raises(DamagedModelError, match="cut.gguf"):
        load_model(part)


def test_a_context_llama_cpp_rounds_up_is_used_as_asked(smol_path):
    model = load_model(smol_path, n_ctx=300)  # llama.cpp makes 512 of it; the token bookkeeping holds 300
    assert model.n_ctx() == 300
    result = generate(model, "word " * 250, GenerationSettings(max_tokens=64, seed=1))
    assert result.stats.prompt_tokens + result.stats.completion_tokens <= 300


def test_the_context_lowers_max_tokens_when_the_message_alone_leaves_less_room(smol_path):
    llama = llama_cpp.Llama(model_path=str(smol_path), verbose=False)  # the library's n_ctx: 512
    try:
        result = generate(llama, "Name a colour.", GenerationSettings(seed=1, temperature=1.5))  # max_tokens 512
        assert result.stats.finish_reason in ("stop", "length")
        assert result.stats.prompt_tokens + result.stats.completion_tokens <= 512
    finally:
        llama.close()


# --- the prompt cache ---------------------------------------------------------------------------------


def test_follow_up_reuses_what_the_kv_cache_holds(smol):
    settings = GenerationSettings(max_tokens=24, seed=5)
    first = generate(smol, CHAT, settings.replace(cache_prompt=False))
    prompt = encode_chat(smol, CHAT)
    held = smol.cached_tokens()
    assert first.stats.cached_tokens == 0
    # The cache holds the prompt and every answer token but the last (sampled, never evaluated).
    assert held[: len(prompt)] == prompt and len(held) == len(prompt) + first.stats.completion_tokens - 1

    follow_up = CHAT + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And rivers?"}]
    second = generate(smol, follow_up, settings)
    expected = common_prefix(encode_chat(smol, follow_up), held)
    assert expected > len(prompt) - 2
    assert second.stats.cached_tokens == expected
    assert f"({expected} from cache)" in second.stats.line()

    # The same prompt again with other sampling settings: everything but the last prompt token is reused.
    again = generate(smol, follow_up, settings.replace(temperature=1.0))
    assert again.stats.cached_tokens == again.stats.prompt_tokens - 1
    # Off: evaluated afresh.
    assert generate(smol, follow_up, settings.replace(cache_prompt=False)).stats.cached_tokens == 0


def test_stop_while_reading_the_prompt_is_quick_and_leaves_an_exact_cache(smol):
    settings = GenerationSettings(max_tokens=16, seed=6, temperature=0.0)
    prompt = encode_chat(smol, [{"role": "user", "content": LONG}])
    assert len(prompt) > 1200  # about 5 s of prompt processing here
    progress, stop, stats = [], threading.Event(), GenerationStats()

    def on_progress(done, total):
        progress.append((done, total))
        if done >= 512 and not stop.is_set():
            stop.set()
            progress.append(("stop", time.perf_counter()))

    pieces = list(
        stream(smol, LONG, settings.replace(cache_prompt=False), stop_event=stop, stats=stats, on_progress=on_progress)
    )
    returned = time.perf_counter()
    assert pieces == [] and stats.finish_reason == "cancelled" and stats.completion_tokens == 0
    stopped_at = next(t for d, t in progress if d == "stop")
    assert returned - stopped_at < 1.0, "stop took effect within the chunk being computed"
    dones = [d for d, _ in progress if d != "stop"]
    assert dones == sorted(dones) and all(t == len(prompt) for d, t in progress if d != "stop")
    assert stats.prompt_read < len(prompt) and "stopped while reading the prompt" in stats.line()

    # The cache holds exactly the chunks that were finished...
    held = smol.cached_tokens()
    assert held == prompt[: len(held)] and len(held) == stats.prompt_read and len(held) % smol.llama.n_batch == 0
    # ...and resuming from it gives what a fresh evaluation gives (same batches, same logits).
    resumed = generate(smol, LONG, settings)
    assert resumed.stats.cached_tokens == len(held)
    fresh = generate(smol, LONG, settings.replace(cache_prompt=False))
    assert fresh.stats.cached_tokens == 0
    assert resumed.text == fresh.text and resumed.stats.completion_tokens == fresh.stats.completion_tokens


def test_a_failed_generation_leaves_the_cache_consistent(smol):
    settings = GenerationSettings(max_tokens=12, seed=7, temperature=0.0)

    def broken(done, total):
        if done >= 256:
            raise RuntimeError("progress display failed")

    with pytest.raises(RuntimeError, match="progress display failed"):
        list(stream(smol, LONG, settings, on_progress=broken))
    prompt = encode_chat(smol, [{"role": "user", "content": LONG}])
    held = smol.cached_tokens()
    assert held == prompt[: len(held)]
    assert generate(smol, LONG, settings).text == generate(smol, LONG, settings.replace(cache_prompt=False)).text


def test_a_llama2_shaped_model_chats_with_the_prompt_cache(llama2_tiny_path):
    """The Llama 2 template, layout and vocabulary end to end (random weights: the text is gibberish)."""
    model = load_model(llama2_tiny_path, n_ctx=512)
    assert model.template == "llama-2"
    settings = GenerationSettings(max_tokens=8, seed=1, temperature=0.0)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    first = generate(model, dialog, settings)
    prompt = encode_chat(model, dialog)
    assert (first.stats.prompt_tokens, first.stats.completion_tokens) == (len(prompt), 8)
    held = model.cached_tokens()
    follow_up = dialog + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Another?"}]
    second = generate(model, follow_up, settings)
    assert second.stats.cached_tokens == common_prefix(encode_chat(model, follow_up), held) >= len(prompt) - 1
    fresh = generate(model, follow_up, settings.replace(cache_prompt=False))
    assert fresh.stats.cached_tokens == 0 and fresh.stats.prompt_tokens == second.stats.prompt_tokens
    fitted = generate(model, history(20, words=30), settings)
    assert fitted.stats.dropped_turns > 0 and fitted.stats.prompt_tokens + 8 <= 512


# --- fitting the context ------------------------------------------------------------------------------


def reference_fit(model, dialog, max_tokens):
    """The definition: drop pairs oldest first until the whole dialog, encoded afresh, fits."""
    head = dialog[:1] if dialog[0]["role"] == "system" else []
    turns = dialog[len(head) :]
    for dropped in range(0, len(turns), 2):
        tokens = encode_chat(model, head + turns[dropped:])
        if len(tokens) + max_tokens <= model.n_ctx():
            return tokens, dropped // 2
    return None


def history(pairs, system=True, words=6):
    dialog = [{"role": "system", "content": "  Be brief.  "}] if system else []
    for i in range(pairs):
        dialog += [
            {"role": "user", "content": f" Question {i}: " + "tell me more " * (1 + i % words)},
            {"role": "assistant", "content": f"Answer {i} " + "is this " * (1 + (i * 7) % words)},
        ]
    return dialog + [{"role": "user", "content": "And the last question?"}]


@pytest.mark.parametrize("system", [True, False])
def test_fitting_equals_dropping_pairs_one_by_one(smol_path, llama2_vocab, system):
    from helpers.context_window import fit_to_context
    from helpers.errors import ContextOverflowError

    small = load_model(smol_path, n_ctx=256)  # its own template (ChatML in the GGUF)
    for model, template in ((as_model(llama2_vocab), "llama-2"), (small, "gguf")):
        for pairs in (0, 1, 3, 12, 40):
            for max_tokens in (16, 64, 200):
                dialog = history(pairs, system)
                n_ctx = model.n_ctx()
                expected = reference_fit(model, dialog, max_tokens)
                if expected is not None:
                    assert fit_to_context(model, dialog, max_tokens, template) == (*expected, max_tokens)
                    continue
                # Not even the last message leaves room for max_tokens: generate in the room there is.
                alone = encode_chat(model, dialog[:1] + dialog[-1:] if system else dialog[-1:], template)
                if len(alone) < n_ctx:
                    assert fit_to_context(model, dialog, max_tokens, template) == (alone, pairs, n_ctx - len(alone))
                else:
                    with pytest.raises(ContextOverflowError, match=f"exceeds the context of {n_ctx} tokens"):
                        fit_to_context(model, dialog, max_tokens, template)


def test_fitting_a_long_history_can_be_stopped(llama2_vocab):
    from helpers.context_window import fit_to_context

    stop = threading.Event()
    stop.set()
    assert fit_to_context(as_model(llama2_vocab), history(400), 64, "llama-2", stop) is None


def test_when_the_previous_file_cannot_be_loaded_again_the_error_says_it_is_closed(smol_path, tmp_path):
    """A failed load brings the previous file back; when that file is gone too, the previous model is closed
    (not left waiting in 'loading') and the error says so."""
    import shutil

    mine = shutil.copy(smol_path, tmp_path / "mine.gguf")
    odd = unknown_architecture(tmp_path / "odd.gguf", smol_path)
    working = load_model(mine)
    Path(mine).unlink()  # the open model keeps its mapping; loading it again cannot work
    with pytest.raises(ModelLoadError, match=r"Could not load odd.gguf.*mine.gguf\) could not be loaded again"):
        load_model(odd)
    assert working.closed and working.state.value == "closed"
    with pytest.raises(ModelUnloadedError):
        generate(working, "Hi", GenerationSettings(max_tokens=2))


# --- what the engine refuses before llama.cpp sees it ---------------------------------------------------


def run_child(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter: a crash there (a segfault, an abort) is a failed test, not a dead run."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_closing_your_own_llama_while_a_helper_streams_with_it_waits_for_the_helper(smol_path):
    """llama_cpp.Llama.close() freed the model under the running computation (a segfault): now it first stops the
    generation and waits for it, which ends as 'unloaded while generating', and the process lives on."""
    code = f"""
import threading, time
import llama_cpp
import helpers
llama = llama_cpp.Llama(model_path={str(smol_path)!r}, n_ctx=1024, n_threads=1, verbose=False)
pieces, outcome = [], {{}}
def work():
    try:
        for piece in helpers.stream(llama, "Write a long story about the sea.", helpers.GenerationSettings(max_tokens=300, seed=1)):
            pieces.append(piece)
        outcome["end"] = "finished"
    except helpers.ModelUnloadedError as error:
        outcome["end"] = "unloaded: " + str(error)[:60]
worker = threading.Thread(target=work)
worker.start()
while len(pieces) < 3 and worker.is_alive():
    time.sleep(0.01)
llama.close()
closed_after = len(pieces)
worker.join(60)
print(outcome["end"])
print(len(pieces) == closed_after, len(pieces) < 300)
try:
    helpers.generate(llama, "Hi")
except helpers.ModelUnloadedError as error:
    print("after:", str(error)[:40])
"""
    done = run_child(code)
    assert done.returncode == 0, done.stderr[-2000:]
    end, counts, after = done.stdout.splitlines()
    assert end.startswith("unloaded: The model was unloaded while generating")
    assert counts == "True True"  # nothing came after close() returned
    assert after.startswith("after: The llama_cpp.Llama behind this model")


def test_an_empty_token_prompt_is_refused_before_llama_cpp(smol_path):
    """An empty prompt reached llama.cpp (a DecodeError blaming memory, then a double free that killed the process)."""
    code = f"""
import helpers
from helpers.engine.loading import load_model
model = load_model({str(smol_path)!r}, n_ctx=512)
settings = helpers.GenerationSettings(max_tokens=4, seed=1, cache_prompt=False)
for prompt in ([], ()):
    try:
        model.complete(prompt, settings, 1)
    except helpers.PromptError as error:
        print(type(error).__name__, str(error)[:40])
print(helpers.generate(model, "Hi", settings).stats.completion_tokens)
"""
    done = run_child(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["PromptError The prompt is empty once tokenized (this"] * 2 + ["4"]


@pytest.mark.parametrize("text", ["\ud800", "ok \udfff then", "end \udcff"])
def test_text_with_a_lone_surrogate_is_refused_clearly(smol, text):
    settings = GenerationSettings(max_tokens=6, seed=2, cache_prompt=False)
    before = generate(smol, CHAT, settings).text
    position = next(i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF)
    with pytest.raises(
        helpers.PromptError, match=rf"The text to tokenize holds a lone surrogate .* at character {position}"
    ):
        smol.tokenize(text)
    with pytest.raises(helpers.PromptError, match=r"Message 1 \(user\) holds a lone surrogate"):
        generate(smol, text, settings)
    with pytest.raises(helpers.PromptError, match=r"Message 1 \(system\) holds a lone surrogate"):
        generate(smol, [{"role": "system", "content": text}, *CHAT[1:]], settings)
    with pytest.raises(helpers.PromptError, match="The answer prefix holds a lone surrogate"):
        generate(smol, CHAT, settings, answer_prefix=text)
    with pytest.raises(ValueError, match="lone surrogate"):  # a PromptError is a ValueError too
        encode_chat(smol, [{"role": "user", "content": text}])
    assert generate(smol, CHAT, settings).text == before  # nothing was left broken
    # The same text, once replaced as the message says, is a prompt like any other.
    replaced = text.encode("utf-8", "replace").decode("utf-8")
    assert replaced == text.replace(text[position], "?")
    assert generate(smol, replaced, settings).stats.completion_tokens > 0


def test_a_wrapped_llama_closed_by_its_owner_closes_its_model():
    from tests.conftest import VOCAB

    llama = llama_cpp.Llama(model_path=str(VOCAB), vocab_only=True, verbose=False)
    model = as_model(llama)
    assert model.tokenize("Hello") == llama.tokenize(b"Hello", add_bos=False)
    llama.close()
    assert model.closed
    with pytest.raises(ModelUnloadedError, match=r"^The llama_cpp.Llama behind this model was closed or deleted"):
        model.tokenize("Hello")
    with pytest.raises(ModelUnloadedError, match=r"^The llama_cpp.Llama behind this model was closed or deleted"):
        model.cached_tokens()
