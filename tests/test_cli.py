"""`python -m helpers`: the generation core on the command line."""

import subprocess
import sys
from pathlib import Path

from helpers.generation import generate
from helpers.settings import GenerationSettings

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "helpers", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
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
