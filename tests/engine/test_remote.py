"""`helpers.connect`: a model on a server, held against the same model loaded in-process.

The real llama-server (built from the llama.cpp that llama-cpp-python 0.3.35 vendors, `make llama-server`)
serves the small model on 127.0.0.1 (tests/support/llama_server.py: its own process group, killed at teardown,
plus a watchdog). Failures a real server does not produce on demand come from tests/support/fake_openai_server.py.
"""

from __future__ import annotations

import html
import json
import re
import statistics
import threading
import time

import pytest

from helpers.engine.remote import connect
from helpers.errors import (
    ServerAuthError,
    ServerError,
    ServerResponseError,
    ServerUnavailableError,
    TokenPromptsUnsupportedError,
)
from helpers.generation import GenerationStats, generate, stream
from helpers.machine.serve import server_binary
from helpers.settings import GenerationSettings
from tests.support.dialogs import DIALOGS, GREEDY
from tests.support.fake_openai_server import FakeServer
from tests.support.llama_server import free_port, get_json, running_server

needs_server = pytest.mark.skipif(
    not server_binary().is_file(), reason=f"{server_binary()} is missing: run `make llama-server`"
)


@pytest.fixture
def remote(server_url):
    return connect(server_url)


# --- parity with the in-process model ------------------------------------------------------------------


@needs_server
def test_prompt_ids_match_the_local_encoding(remote, smol):
    """Tokenized by the server's /tokenize, the prompt is the same token ids as encode_chat on the loaded
    model, typed control-token spellings included (they stay text)."""
    assert remote.template == smol.template == "gguf"
    for dialog in DIALOGS:
        assert remote.encode_chat(dialog) == smol.encode_chat(dialog)
    assert remote.token_bos() == smol.token_bos() and remote.token_eos() == smol.token_eos()
    assert remote.add_bos == smol.add_bos and remote.n_vocab() == smol.n_vocab()


@needs_server
def test_greedy_answers_match_the_in_process_model(remote, smol):
    for dialog in DIALOGS:
        local = generate(smol, dialog, GREEDY)
        served = generate(remote, dialog, GREEDY)
        assert served.text == local.text, dialog
        assert served.stats.prompt_tokens == local.stats.prompt_tokens
        assert served.stats.completion_tokens == local.stats.completion_tokens
        assert served.stats.finish_reason == local.stats.finish_reason
        # ...and the server's own counts agree (it counts the end-of-generation token, the helpers do not)
        usage = remote.last_usage
        assert usage.prompt_tokens == local.stats.prompt_tokens
        assert usage.completion_tokens == local.stats.completion_tokens + (local.stats.finish_reason == "stop")
        assert served.stats.time_to_first_token_s > 0 and served.stats.tokens_per_second > 0


@needs_server
def test_stop_string_ends_both_at_the_same_place(remote, smol):
    dialog = DIALOGS[2]
    full = generate(smol, dialog, GREEDY).text
    words = full.split()
    assert len(words) >= 4, full
    settings = GREEDY.replace(stop=(words[len(words) // 2],))
    local, served = generate(smol, dialog, settings), generate(remote, dialog, settings)
    assert served.text == local.text and len(served.text) < len(full)
    assert served.stats.finish_reason == local.stats.finish_reason == "stop"
    assert served.stats.completion_tokens == local.stats.completion_tokens


@needs_server
def test_same_seed_same_text_on_the_server(remote):
    settings = GenerationSettings(temperature=0.9, top_p=0.95, cache_prompt=False, max_tokens=30, seed=1234)
    first = generate(remote, DIALOGS[0], settings)
    second = generate(remote, DIALOGS[0], settings)
    assert first.text == second.text and first.stats.seed == second.stats.seed == 1234
    request_seeds = {generate(remote, DIALOGS[0], settings.replace(seed=s)).text for s in (1, 2, 3)}
    assert len(request_seeds | {first.text}) > 1  # the seed reaches the server's sampler


@needs_server
def test_prompt_cache_is_reported(remote):
    settings = GREEDY.replace(cache_prompt=True, max_tokens=8)
    generate(remote, DIALOGS[2], settings)
    again = generate(remote, DIALOGS[2], settings)
    assert again.stats.cached_tokens > 0 and again.stats.cached_tokens == remote.last_usage.cached_tokens
    assert "from cache" in again.stats.line()


# --- cancel ---------------------------------------------------------------------------------------------


def _busy_slots(server_url) -> list[dict]:
    root = server_url.removesuffix("/v1")
    return [slot for slot in get_json(root + "/slots") if slot.get("is_processing")]


@needs_server
def test_stop_ends_the_stream_and_frees_the_server(remote, server_url):
    """One slot only: while the stopped request still ran, the next one would have to wait for it."""
    long = GenerationSettings(temperature=0, repeat_penalty=1.0, cache_prompt=False, max_tokens=1500, seed=1)
    dialog = [{"role": "user", "content": "Count from 1 to 1000, one number per line."}]
    stop, stats, pieces = threading.Event(), GenerationStats(), []
    after_stop = 0
    for piece in stream(remote, dialog, long, stop_event=stop, stats=stats):
        pieces.append(piece)
        if stop.is_set():
            after_stop += 1
        if len(pieces) == 5:
            stop.set()
    assert stats.finish_reason == "cancelled" and after_stop <= 1 and stats.completion_tokens <= 6
    deadline = time.monotonic() + 2
    while _busy_slots(server_url) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _busy_slots(server_url) == [], "the server kept generating after the stream was closed"
    started = time.perf_counter()
    nxt = generate(remote, DIALOGS[0], GREEDY.replace(max_tokens=4))
    assert nxt.stats.completion_tokens >= 1 and time.perf_counter() - started < 5


@needs_server
def test_stop_while_the_prompt_is_read(remote):
    stop, stats = threading.Event(), GenerationStats()
    long_dialog = [{"role": "user", "content": "word " * 1500}]
    started = time.perf_counter()
    stop_timer = threading.Timer(0.2, stop.set)
    stop_timer.start()
    text = "".join(stream(remote, long_dialog, GREEDY, stop_event=stop, stats=stats))
    assert text == "" and stats.finish_reason == "cancelled" and time.perf_counter() - started < 3


# --- errors ---------------------------------------------------------------------------------------------


def test_server_down_is_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ServerUnavailableError, match="Is the server running"):
        connect(url, timeout=5)


def test_bad_base_url_is_a_value_error():
    with pytest.raises(ValueError, match="base_url must be an http"):
        connect("127.0.0.1:8080")


@needs_server
def test_wrong_url_is_a_clear_error(server_url):
    with pytest.raises(ServerResponseError, match="HTTP 404.*ending in /v1"):
        connect(server_url.removesuffix("/v1") + "/api/v1")


@needs_server
def test_api_key_sent_and_never_shown(smol_path):
    key = "s3cret-key-for-test"
    with running_server(smol_path, parallel=1, slot_ctx=512, api_key=key, threads=1) as url:
        with pytest.raises(ServerAuthError, match="HTTP 401") as bad:
            connect(url, api_key="wrong-key")
        assert "wrong-key" not in str(bad.value)
        with pytest.raises(ServerAuthError, match="without an API key"):
            connect(url)
        model = connect(url, api_key=key)
        assert generate(model, "Hi", GREEDY.replace(max_tokens=3)).stats.completion_tokens >= 1
        shown = repr(model) + model.describe() + repr(model.backend.endpoint)
        assert key not in shown


def test_server_errors_are_clear_and_the_panel_stays_usable():
    from helpers.ui import build_ui

    with FakeServer() as fake:
        model = connect(fake.url, template="llama-2")
        assert generate(model, "hello").text == "Hi there!"
        expected = {
            "error-500": (ServerResponseError, "HTTP 500.*model crashed"),
            "cut": (ServerResponseError, "without finishing the answer"),
            "malformed": (ServerResponseError, "not JSON"),
            "error-event": (ServerResponseError, "error in the middle of the answer: slot crashed"),
        }
        for mode, (kind, message) in expected.items():
            fake.state.mode = mode
            with pytest.raises(kind, match=message):
                generate(model, "hello")

        panel = build_ui(model).panel
        fake.state.mode = "cut"
        panel.prompt.value = "hello"
        panel.generate_button.click()
        panel.wait(30)
        assert "ServerResponseError" in panel.error.value and not panel.generate_button.disabled
        fake.state.mode = "ok"
        panel.generate_button.click()
        panel.wait(30)
        assert panel.error.value == "" and [m["content"] for m in panel.history] == ["hello", "Hi there!"]
        assert "Hi there!" in html.unescape(re.sub(r"<[^>]+>", "", panel.transcript.value))


def test_text_only_server_is_refused_at_connect():
    """Like llama-cpp-python's llama_cpp.server: a token-id prompt is rejected, so connect says so."""
    with FakeServer() as fake:
        fake.state.mode = "text-only"
        with pytest.raises(TokenPromptsUnsupportedError, match="token ids.*llama_cpp.server takes text only"):
            connect(fake.url)
        assert all(isinstance(r["prompt"], list) for r in fake.state.requests)  # never sent text


def test_requests_carry_the_settings():
    with FakeServer() as fake:
        model = connect(fake.url, template="llama-2")
        settings = GenerationSettings(
            temperature=0.3, top_p=0.8, top_k=12, min_p=0.1, repeat_penalty=1.2, seed=99, stop=("END",),
            max_tokens=17, cache_prompt=False,
        )  # fmt: skip
        generate(model, "hello", settings)
        sent = fake.state.requests[-1]
        expected = {"temperature": 0.3, "top_p": 0.8, "top_k": 12, "min_p": 0.1, "repeat_penalty": 1.2}
        assert {k: sent[k] for k in expected} == expected
        assert sent["seed"] == 99 and sent["stop"] == ["END"] and sent["max_tokens"] == 17
        assert sent["cache_prompt"] is False and sent["stream"] is True
        assert sent["prompt"] == model.encode_chat([{"role": "user", "content": "hello"}])


# --- several users at once (the load test's short version; bench/load_test.py is the full one) ----------


@needs_server
def test_parallel_slots_serve_concurrent_clients(smol_path):
    from bench.load_test import run_load

    with running_server(smol_path, parallel=4, slot_ctx=1024) as url:
        report = run_load(url, clients=4, requests=2, max_tokens=16)
    assert report.errors == [] and len(report.results) == 8
    assert all(r.finish_reason in ("stop", "length") and r.completion_tokens >= 1 for r in report.results)
    assert statistics.median(r.ttft_s for r in report.results) > 0


# --- the notebook ---------------------------------------------------------------------------------------


@needs_server
def test_notebook_uses_the_server_instead_of_loading(server_url):
    from pathlib import Path

    from helpers.demo import run_notebook

    notebook = Path(__file__).resolve().parents[2] / "llama2_textgen.ipynb"
    parameters = {
        "SERVER_URL": server_url,
        "OFFLINE": True,
        "MAX_TOKENS": 24,
        "SEED": 7,
        "COMPARE_QUANTIZATIONS": False,
        "INSTALL": False,  # never replace the test environment's llama-cpp-python (a GPU host's plan may)
    }
    nb = run_notebook(notebook, parameters)
    printed = {
        cell.source.splitlines()[0]: "".join(o.get("text", "") for o in cell.get("outputs", []))
        for cell in nb.cells
        if cell.cell_type == "code" and cell.source
    }
    assert printed["# connect to a server (optional)"].startswith("Connected to ")
    assert printed["# download the model"].strip() == "None"  # nothing downloaded
    assert "<helpers.RemoteModel" in printed["# load the model"]  # nothing loaded in the kernel
    assert "tokens/s" in printed["# generate"] and "finish:" in printed["# generate"]
    panel = [c for c in nb.cells if "build_ui" in c.source][0]
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in panel.outputs)


def test_llama2_template_chosen_by_the_served_file_name():
    """llama-server reports ChatML for a GGUF without a chat template (TheBloke's Llama 2 files): the file name
    decides, as for a loaded model."""
    with FakeServer() as fake:
        fake.state.model_path = "/models/llama-2-7b-chat.Q4_K_M.gguf"
        assert connect(fake.url).template == "llama-2"
        fake.state.model_path = "/models/other.gguf"
        with pytest.raises(ValueError, match="template"):
            _ = connect(fake.url).template


def test_local_tokenizer_for_servers_without_tokenize(llama2_vocab):
    """vLLM has no llama-server /tokenize: connect says so, and tokenizer= a local Llama 2 GGUF (here the
    vocabulary alone) gives the exact Llama 2 prompt, sent as token ids."""
    from tests.conftest import VOCAB

    with FakeServer() as fake:
        fake.state.props = False
        with pytest.raises(ServerResponseError, match="tokenizer="):
            connect(fake.url)
        model = connect(fake.url, tokenizer=VOCAB)
        dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say </s> and <s> as text."}]
        assert model.template == "llama-2"
        assert model.encode_chat(dialog) == helpers_encode(llama2_vocab, dialog)
        generate(model, dialog, GenerationSettings(max_tokens=5))
        assert fake.state.requests[-1]["prompt"] == helpers_encode(llama2_vocab, dialog)


def helpers_encode(llm, dialog):
    from helpers.templates import encode_chat

    return encode_chat(llm, dialog, "llama-2")


@needs_server
def test_command_line_uses_the_server(server_url, smol):
    import subprocess
    import sys

    args = ["Say hello.", "--server", server_url, "--max-tokens", "12", "--temperature", "0", "--repeat-penalty", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "helpers", *args, "--no-cache-prompt"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    expected = generate(smol, "Say hello.", GREEDY.replace(max_tokens=12, seed=None))
    assert done.stdout.strip() == expected.text.strip() and "finish:" in done.stderr


def test_command_line_says_when_the_server_is_down():
    import subprocess
    import sys

    url = f"http://127.0.0.1:{free_port()}/v1"
    done = subprocess.run(
        [sys.executable, "-m", "helpers", "Hi", "--server", url], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "error: No answer from" in done.stderr


def test_the_remote_wing_loads_no_engine_and_no_story():
    """`import helpers.engine.remote` loads neither llama_cpp (a local tokenizer imports it when asked for) nor
    the templates: `RemoteModel.template` reaches `template_for` through the public face, on first use."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, helpers.engine.remote; print(sorted(m for m in sys.modules if m.startswith(('helpers', 'llama'))))"
    )
    root = Path(__file__).resolve().parents[2]
    loaded = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    names = set(ast.literal_eval(loaded.stdout))
    assert {"helpers.engine.http", "helpers.engine.tokenizers"} <= names
    assert not any(name.startswith("llama_cpp") for name in names) and "helpers.templates" not in names, names


# --- hostile servers: secrets, deadlines, bounds (issue 22) ----------------------------------------------

KEY, PASSWORD = "sk-test-4f9a1c0e77d2", "pw-7c1e93b2aa05"


def _with_userinfo(url: str) -> str:
    return url.replace("://", f"://alice:{PASSWORD}@")


def _everything_shown(error: BaseException) -> str:
    """All a person could see of an error: its message, detail, repr and the whole printed traceback."""
    import traceback

    return "".join([str(error), repr(error), str(getattr(error, "detail", "")), *traceback.format_exception(error)])


def _secret_forms() -> list[str]:
    import base64

    return [KEY, PASSWORD, base64.b64encode(f"alice:{PASSWORD}".encode()).decode().rstrip("=")]


@pytest.mark.parametrize("mode,kind", [("echo-500", ServerResponseError), ("echo-401", ServerAuthError)])
@pytest.mark.parametrize("api_key", [KEY, None])
def test_a_server_echoing_the_credentials_never_shows_them(mode, kind, api_key):
    """The server's error body repeats the request's headers, Authorization included; the URL carries a password."""
    with FakeServer() as fake:
        fake.state.mode = mode
        with pytest.raises(kind) as raised:
            connect(_with_userinfo(fake.url), api_key=api_key, template="llama-2")
    sent = fake.state.headers[-1]["Authorization"]
    assert sent.startswith(f"Bearer {KEY}" if api_key else "Basic " + _secret_forms()[2])  # the echo held a secret
    shown = _everything_shown(raised.value)
    assert "rejected request with headers" in shown and "Authorization: " in shown
    assert not [secret for secret in _secret_forms() if secret in shown], shown


def test_a_failure_during_generation_never_shows_the_key():
    with FakeServer() as fake:
        model = connect(_with_userinfo(fake.url), api_key=KEY, template="llama-2")
        fake.state.mode = "echo-500"
        with pytest.raises(ServerResponseError, match=r"HTTP 500.*Bearer \*\*\*") as raised:
            generate(model, "hello")
        shown = _everything_shown(raised.value) + repr(model) + model.describe() + repr(model.backend.endpoint)
    assert not [secret for secret in _secret_forms() if secret in shown], shown


def test_userinfo_is_sent_as_basic_credentials_and_never_shown():
    import base64

    with FakeServer() as fake:
        model = connect(_with_userinfo(fake.url), template="llama-2")
        assert generate(model, "hello").text == "Hi there!"
        expected = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
        assert {h["Authorization"] for h in fake.state.headers} == {expected}
        assert model.base_url == fake.url and PASSWORD not in repr(model) + model.describe()
    down = f"http://alice:{PASSWORD}@127.0.0.1:{free_port()}/v1"
    with pytest.raises(ServerUnavailableError, match=r"No answer from http://127\.0\.0\.1:\d+/v1 ") as raised:
        connect(down, timeout=5)
    assert PASSWORD not in _everything_shown(raised.value)


def test_stop_ends_a_wait_on_a_server_gone_silent():
    """The server sends its headers, then nothing: Stop closes the socket from the stopping thread."""
    with FakeServer() as fake:
        model = connect(fake.url, template="llama-2")
        fake.state.mode = "silent"
        stop, stats = threading.Event(), GenerationStats()
        threading.Timer(1.0, stop.set).start()
        started = time.monotonic()
        assert "".join(stream(model, "hello", stop_event=stop, stats=stats)) == ""
        assert stats.finish_reason == "cancelled" and time.monotonic() - started < 3
        fake.state.mode = "ok"
        assert generate(model, "hello").text == "Hi there!"  # the model is usable again


def test_stop_ends_a_wait_on_a_server_gone_silent_after_a_token():
    """One token, then nothing: Stop is seen between tokens too, not only before the first."""
    with FakeServer() as fake:
        model = connect(fake.url, template="llama-2")
        fake.state.mode = "silent-after-token"
        stop, stats = threading.Event(), GenerationStats()
        threading.Timer(1.0, stop.set).start()
        started = time.monotonic()
        text = "".join(stream(model, "hello", stop_event=stop, stats=stats))
        assert stats.finish_reason == "cancelled" and time.monotonic() - started < 3
        assert text and stats.completion_tokens == 1
        fake.state.mode = "ok"
        assert generate(model, "hello").text == "Hi there!"


def test_speculative_is_ignored_by_a_server_with_one_notice(capsys):
    """The server's requests take no speculative options: the answer is the same, and the notice comes once."""
    with FakeServer() as fake:
        model = connect(fake.url, template="llama-2")
        plain = generate(model, "hello").text
        speculative = GenerationSettings(speculative="prompt-lookup")
        assert [generate(model, "hello", speculative).text for _ in range(2)] == [plain, plain]
    notices = [line for line in capsys.readouterr().err.splitlines() if "is ignored with a server" in line]
    assert len(notices) == 1 and "--spec-type" in notices[0]


def test_stream_timeout_bounds_a_whole_completion():
    with FakeServer() as fake:
        model = connect(fake.url, template="llama-2", stream_timeout=1)
        fake.state.mode = "silent"
        started = time.monotonic()
        with pytest.raises(ServerUnavailableError, match="within the stream_timeout of 1 s"):
            generate(model, "hello")
        assert time.monotonic() - started < 3
    with pytest.raises(ValueError, match="stream_timeout must be a positive number"):
        connect("http://127.0.0.1:1/v1", stream_timeout=0)


def test_a_server_dripping_bytes_cannot_outlast_the_timeout():
    """One byte every 0.3 s: each read gets a byte in time, but the call as a whole has one deadline."""
    with FakeServer() as fake:
        fake.state.mode, fake.state.drip_seconds = "drip", 0.3
        started = time.monotonic()
        with pytest.raises(ServerUnavailableError, match=r"did not finish answering /v1/models within 2 s"):
            connect(fake.url, timeout=2)
        assert time.monotonic() - started < 4


@pytest.mark.parametrize("mode", ["many-tokens", "endless"])
def test_max_tokens_holds_whatever_the_server_claims_or_sends(mode):
    with FakeServer() as fake:
        model = connect(fake.url, template="llama-2")
        fake.state.mode = mode
        started = time.monotonic()
        result = generate(model, "hello", GenerationSettings(max_tokens=7))
        assert result.stats.completion_tokens == 7 and result.stats.finish_reason == "length"
        assert time.monotonic() - started < 5
        fake.state.mode = "ok"
        assert generate(model, "hello").text == "Hi there!"


@pytest.mark.parametrize("mode,message", [("nested", "JSON nested too deep"), ("huge-event", "line of over 4 MiB")])
def test_events_too_deep_or_too_large_are_server_errors(mode, message):
    with FakeServer() as fake:
        model = connect(fake.url, template="llama-2")
        fake.state.mode = mode
        with pytest.raises(ServerResponseError, match=message):
            generate(model, "hello")


@pytest.mark.parametrize(
    "mode,message",
    [("many-headers", "not HTTP.*HTTPException: got more than 100 headers"), ("redirect-loop", "not answer with JSON")],
)
def test_answers_that_are_not_the_api_are_server_errors(mode, message):
    with FakeServer() as fake:
        fake.state.mode = mode
        with pytest.raises(ServerResponseError, match=message):
            connect(fake.url, timeout=5)


def test_deep_json_is_refused_before_parsing():
    from helpers.engine.http import MAX_JSON_DEPTH, bounded_json

    fine = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert bounded_json(fine) == json.loads(fine)
    assert bounded_json('{"a": "[[[[' + "[" * 10_000 + '"}') == {"a": "[[[[" + "[" * 10_000}  # brackets in a string
    with pytest.raises(ValueError, match="nested deeper"):
        bounded_json("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))


def test_a_secret_cut_by_a_shortened_message_or_escaped_by_repr_is_scrubbed():
    """Messages quote a server's answer cut to a length, and reprs double backslashes: neither leaves a part."""
    from helpers.errors import scrub

    key = "sk-live-0123456789abcdefSECRETKEYtail"
    said = f"Incorrect API key provided: {'x' * 250} {key} ..."[:300]
    assert key[:19] in said and "0123456789" not in scrub(f"The server said: {said}). Pass the key", [key])
    password = "pa'ss\\w0rd"
    assert "w0rd" not in scrub(repr(f"echo {password}"), [password])
    assert scrub("sk-li: a start too short to be a secret", [key]) == "sk-li: a start too short to be a secret"


def test_every_form_of_a_secret_is_scrubbed():
    """As written, URL-encoded, inside Basic credentials (base64 of user:password), as a URL's userinfo."""
    import base64
    from urllib.parse import quote

    from helpers.engine.http import Endpoint

    secret = "p@ss:w/rd-9"
    endpoint = Endpoint.parse(f"http://alice:{quote(secret, safe='')}@example.org:8080/v1", None, 5)
    assert endpoint.base_url == "http://example.org:8080/v1" and endpoint.userinfo == f"alice:{secret}"
    basic = endpoint.headers(None)["Authorization"]
    assert basic == "basic ".title() + base64.b64encode(f"alice:{secret}".encode()).decode()
    text = f"{secret} | {quote(secret, safe='')} | {basic} | basic {basic.split()[1]} | http://bob:x@h/v1"
    shown = endpoint.scrub(text)
    assert shown == "*** | *** | Basic *** | basic *** | http://***@h/v1", shown


def _random_event(rng) -> str:
    """A completion chunk with each field possibly of a wrong type or shape, or not JSON at all."""
    odd = [None, True, -1, 10**30, 1.5, "x", [], {}, [None], {"a": [1]}, "\ud800", float("inf")]

    def pick(good):
        return good if rng.random() < 0.6 else rng.choice(odd)

    choice = {"text": pick("tok"), "index": 0, "finish_reason": pick(rng.choice([None, "stop", "length"]))}
    event = {
        "choices": pick([pick(choice)]),
        "__verbose": pick({"tokens": pick([pick(5)]), "tokens_predicted": pick(rng.randrange(0, 9)),
                           "stop_type": pick("eos")}),
        "usage": pick({"prompt_tokens": pick(3), "completion_tokens": pick(2),
                       "prompt_tokens_details": pick({"cached_tokens": pick(1)})}),
        "prompt_progress": pick({"processed": pick(1), "total": pick(2), "cache": pick(0)}) if rng.random() < 0.2 else None,
        "timings": pick({"predicted_ms": 1.0}),
    }  # fmt: skip
    event = {k: v for k, v in event.items() if v is not None or rng.random() < 0.5}
    if rng.random() < 0.05:
        return rng.choice(["[DONE]", "{", "[1, 2]", '"text"', "null", '{"error": "boom"}'])
    return json.dumps(event, allow_nan=True)


def test_random_events_end_in_an_answer_or_a_server_error():
    """300 streams of 1-6 chunks with fields of random types (seed 22): each ends in a result or a ServerError,
    never in a TypeError, KeyError or anything else of Python's."""
    import random

    rng = random.Random(22)
    outcomes = {"answer": 0, "server error": 0}
    with FakeServer() as fake:
        model = connect(fake.url, template="llama-2")
        fake.state.mode = "scripted"
        for _ in range(300):
            fake.state.events = [_random_event(rng) for _ in range(rng.randrange(1, 7))]
            try:
                result = generate(model, "hello", GenerationSettings(max_tokens=5))
                assert result.stats.completion_tokens <= 5
                outcomes["answer"] += 1
            except ServerError:
                outcomes["server error"] += 1
    assert outcomes["answer"] > 10 and outcomes["server error"] > 10, outcomes
