"""`python -m helpers`: the generation core on the command line."""

import os
import subprocess
import sys
from pathlib import Path

from helpers.files.catalogue import OFFLINE_MODEL
from helpers.generation import generate
from helpers.settings import GenerationSettings

ROOT = Path(__file__).resolve().parents[1]


def run(*args, env=None):
    """The CLI in a child process, its stdout and stderr captured apart."""
    return subprocess.run(
        [sys.executable, "-m", "helpers", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_streams_the_answer_then_the_stats(smol, smol_path):
    done = run(
        "Name a fruit.", "--system", "Answer briefly.", "--model", str(smol_path), "--max-tokens", "20", "--seed", "3"
    )
    assert done.returncode == 0, done.stderr
    expected = generate(
        smol,
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a fruit."}],
        GenerationSettings(max_tokens=20, seed=3, cache_prompt=False),  # the CLI starts with an empty cache
    )
    assert done.stdout == expected.text + "\n"
    assert "tokens/s" in done.stderr and "finish:" in done.stderr


def test_bad_setting_is_a_clear_error(smol_path):
    done = run("hi", "--model", str(smol_path), "--temperature", "5")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: temperature must be a number in [0.0, 2.0], got 5.0."


def test_unknown_model_lists_the_catalogue():
    done = run("hi", "--model", "gpt-5")
    assert done.returncode == 2 and "available: llama-2-7b-chat" in done.stderr
    assert done.stdout == ""


def test_only_the_answer_reaches_stdout_when_the_hub_cannot_be_reached(smol, tmp_path):
    """A piped answer holds the answer alone: the offline notice and the stats line go to stderr."""
    offline = {
        "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens there: no connection, so the offline model is used
        "HF_HUB_CACHE": str(tmp_path),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    done = run("Name a fruit.", "--model", "llama-2-13b-chat", "--max-tokens", "16", "--seed", "5", env=offline)
    assert done.returncode == 0, done.stderr
    expected = generate(smol, "Name a fruit.", GenerationSettings(max_tokens=16, seed=5, cache_prompt=False))
    assert done.stdout == expected.text + "\n"
    notice, stats = done.stderr.strip().splitlines()
    assert notice.startswith("The Hugging Face Hub cannot be reached") and OFFLINE_MODEL in notice
    assert "tokens/s" in stats and "finish:" in stats


def test_a_missing_file_is_named_as_missing(tmp_path):
    for model in (str(tmp_path / "nope.gguf"), str(tmp_path)):
        done = run("Hi", "--model", model)
        assert done.returncode == 2 and done.stdout == ""
        assert (
            done.stderr.strip()
            == f"error: No GGUF file at {model}: check the path, or give a catalogue name or a Hub repo id."
        )
    done = run("Hi", "--offline", "--n-gpu-layers", "abc")
    assert done.returncode == 2 and "--n-gpu-layers must be auto or a whole number" in done.stderr


def test_an_empty_server_url_is_an_error_not_a_local_model():
    done = run("hi", "--server", "")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.strip() == "error: --server needs the server's URL, e.g. --server http://127.0.0.1:8080/v1"


def test_offline_with_a_model_or_quantization_it_does_not_have_fails_naming_the_ones_there_are():
    """They quietly ran the bundled model with exit 0."""
    from helpers.files.catalogue import available_models, quantizations

    done = run("hi", "--model", "no-such-model", "--offline")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.strip() == (
        f"error: Model 'no-such-model' not found; available: {', '.join(available_models())}."
    )
    done = run("hi", "--quant", "Q99", "--offline")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.strip() == (
        f"error: {OFFLINE_MODEL} has no quantization 'Q99'; available: {', '.join(quantizations(OFFLINE_MODEL))}."
    )
    done = run("hi", "--model", "llama-2-13b-chat", "--offline")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith(f"error: --offline runs the bundled model {OFFLINE_MODEL}, not llama-2-13b-chat")


def test_offline_with_the_bundled_model_named_runs_it(smol):
    done = run(
        "Name a fruit.", "--offline", "--model", OFFLINE_MODEL, "--quant", "Q4_1", "--max-tokens", "8", "--seed", "4"
    )
    assert done.returncode == 0, done.stderr
    expected = generate(smol, "Name a fruit.", GenerationSettings(max_tokens=8, seed=4, cache_prompt=False))
    assert done.stdout == expected.text + "\n"
