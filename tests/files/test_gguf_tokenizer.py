"""Tokenizer metadata, header values and model paths that llama.cpp aborts on or cannot use (issue 22).

The reference is llama.cpp itself, run in a child process: where it dies by SIGABRT, or loads the file and then
cannot spell text, the project's check must refuse the file first, with a message that names the cause."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.engine.loading import load_model
from helpers.errors import DamagedModelError, ModelFileMissingError, UnsupportedModelError
from helpers.settings import GenerationSettings
from tests.conftest import VOCAB
from tests.support.header_fuzz import ARRAY, I32, STRING, HeaderMap, kv_entry, patch, tiny_base, with_kvs, write_base

TEXT = "Hello, world!\nHow are you?"
# Loads each file with llama.cpp alone and prints what its own tokenizer makes of a text (one JSON line per file).
LLAMA_CPP = """
import json, sys, llama_cpp
text = sys.argv[1].encode()
for path in sys.argv[2:]:
    model = llama_cpp.Llama(model_path=path, n_ctx=64, n_threads=1, verbose=False)
    tokens = model.tokenize(text, add_bos=False, special=False)
    print(json.dumps({"tokens": len(tokens), "text": model.detokenize(tokens).decode(errors="replace")}), flush=True)
"""


def llama_cpp_alone(text: str, *paths: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, GGML_NO_BACKTRACE="1")  # a GGML_ASSERT would otherwise attach gdb for a backtrace
    return subprocess.run(
        [sys.executable, "-c", LLAMA_CPP, text, *map(str, paths)], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_path):
    """SmolLM2's header (a byte-level BPE vocabulary) with 2 tiny layers of random weights, built once."""
    return tiny_base(tmp_path_factory.getbasetemp(), smol_path)


@pytest.fixture(scope="module")
def spm_tiny(tmp_path_factory, smol_path, llama2_vocab):
    """The same tiny model with Llama 2's SentencePiece vocabulary (32,000 tokens, <0x00>..<0xFF> at 3..258)."""
    from bench.make_llama2_gguf import read_kv

    spm = {key: value for key, value in read_kv(VOCAB).items() if key.startswith("tokenizer.")}

    def use_spm(kv):
        for key in [key for key in kv if key.startswith("tokenizer.")]:
            del kv[key]
        kv.update(spm)
        kv["llama.vocab_size"] = (len(spm["tokenizer.ggml.tokens"][0]), kv["llama.vocab_size"][1], None)

    path = write_base(tmp_path_factory.mktemp("spm") / "spm.gguf", smol_path, use_spm)
    return path, path.read_bytes(), HeaderMap(path)


def edited(base, tmp_path: Path, name: str, **changes) -> Path:
    """A copy of the base file with tokenizer metadata changed: model=b"llama", tokens={index: text},
    token_type={index: type}, merges={index: text}, pre=b"...", all_tokens=callable(list) -> list, or
    add={key: kv_entry(...)}."""
    path, data, header = base
    meta, entries = header.tokenizer, {}
    for key in ("model", "pre"):
        if key in changes:
            entries[f"tokenizer.ggml.{key}"] = kv_entry(f"tokenizer.ggml.{key}", changes[key], STRING)
    for key, item_type in (("tokens", STRING), ("token_type", I32), ("merges", STRING)):
        if f"tokenizer.ggml.{key}" not in meta:
            continue
        items = list(meta[f"tokenizer.ggml.{key}"])
        for i, value in changes.get(key, {}).items():
            items[i] = value
        if key == "tokens" and "all_tokens" in changes:
            items = changes["all_tokens"](items)
        if items != meta[f"tokenizer.ggml.{key}"]:
            entries[f"tokenizer.ggml.{key}"] = kv_entry(f"tokenizer.ggml.{key}", items, ARRAY, item_type)
    entries.update(changes.get("add", {}))
    out = tmp_path / f"{name}.gguf"
    out.write_bytes(with_kvs(data, header, entries))
    return out


def _refused(path: Path, error, message: str):
    with pytest.raises(error, match=message) as raised:
        load_model(path)
    assert path.name in str(raised.value)
    return raised.value


# --- what llama.cpp aborts on ---------------------------------------------------------------------------------

ABORTS = {  # name: (the edit, a text that llama.cpp then cannot survive, the project's message)
    "llama on a BPE vocabulary": (
        dict(model=b"llama"),
        TEXT,  # SentencePiece spells the unknown "\n" with byte_to_token: std::out_of_range, std::terminate
        r"tokenizer.ggml.model is 'llama' \(SPM\), but its vocabulary has no token for 162 of the 256 bytes "
        r"SentencePiece falls back to \(<0x00> first\); llama.cpp would abort .*look like a byte-level BPE",
    ),
    "a NUL byte that makes a token a copy of another": (
        dict(tokens={300: b"ab\0cd", 301: b"ab"}),  # read as C strings: two "ab", GGML_ASSERT at load
        TEXT,
        r"token 300 of tokenizer.ggml.tokens \(b'ab\\x00cd'\) holds a NUL byte",
    ),
    "a NUL byte and invalid UTF-8 (the issue's token)": (
        dict(tokens={300: b"a\0\xff"}),
        TEXT,
        r"token 300 of tokenizer.ggml.tokens \(b'a\\x00\\xff'\) holds a NUL byte",
    ),
}


@pytest.mark.parametrize("case", list(ABORTS))
def test_tokenizer_metadata_llama_cpp_aborts_on_is_refused_first(tiny, tmp_path, case):
    edit, text, message = ABORTS[case]
    bad = edited(tiny, tmp_path, "bad", **edit)
    assert llama_cpp_alone(text, bad).returncode == -signal.SIGABRT
    _refused(bad, DamagedModelError, message)


def test_a_byte_token_that_is_not_0x_hex_is_named(tiny, tmp_path):
    # token_to_byte reads text.substr(3, 2) of "2": llama.cpp's load fails with a C++ message about substr.
    bad = edited(tiny, tmp_path, "bad", token_type={34: 6})
    done = llama_cpp_alone(TEXT, bad)
    assert done.returncode == 1 and "Failed to load model" in done.stderr
    _refused(bad, DamagedModelError, r"vocabulary marks token 34 \(b'2'\) as a byte token, which is not <0xXX>")


def test_a_model_without_a_tokenizer_is_refused_before_llama_cpp_asserts(tiny, tmp_path):
    bad = edited(tiny, tmp_path, "none", model=b"none")
    assert llama_cpp_alone(TEXT, bad).returncode == -signal.SIGABRT  # llama-vocab.cpp: tokenizer not initialized
    error = _refused(bad, UnsupportedModelError, r"has no tokenizer \(tokenizer.ggml.model is 'none'\)")
    assert "damaged" not in str(error)


SPM_ABORTS = {
    "bert on a SentencePiece vocabulary": (
        dict(model=b"bert"),  # its <0xXX> byte tokens: token_to_byte has no WPM case, GGML_ABORT at load
        TEXT,
        r"'bert' \(WPM\), but its vocabulary marks token 3 \(b'<0x00>'\) as a byte token, which WPM has none of; "
        r"its tokens look like a SentencePiece \('llama'\) vocabulary",
    ),
    "a SentencePiece vocabulary without <0x01>": (
        dict(tokens={4: b"no-byte-1"}, token_type={4: 1}),
        "a\x01b",  # loads, then the first \x01 in a text aborts
        r"no token for 1 of the 256 bytes SentencePiece falls back to \(<0x01> first\)",
    ),
}


@pytest.mark.parametrize("case", list(SPM_ABORTS))
def test_sentencepiece_vocabularies_llama_cpp_aborts_on_are_refused_first(spm_tiny, tmp_path, case):
    edit, text, message = SPM_ABORTS[case]
    bad = edited(spm_tiny, tmp_path, "bad", **edit)
    assert llama_cpp_alone(text, bad).returncode == -signal.SIGABRT
    _refused(bad, DamagedModelError, message)


# --- what llama.cpp loads but cannot tokenize with ----------------------------------------------------------------

MERGES = kv_entry("tokenizer.ggml.merges", ["\u2581 t".encode(), b"h e"], ARRAY, STRING)
LOSSY = {  # name: (base, the edit, the project's message)
    "every token empty": (
        "tiny",
        dict(all_tokens=lambda tokens: [b""] * len(tokens)),
        "all 49,152 token strings of its vocabulary are empty",
    ),
    "bert on a BPE vocabulary": ("tiny", dict(model=b"bert"), "has no token starting with the escaped space U\\+2581"),
    "t5 on a BPE vocabulary": ("tiny", dict(model=b"t5"), r"'t5' \(UGM\), but .* escaped space U\+2581"),
    "gemma4 on a BPE vocabulary": ("tiny", dict(model=b"gemma4"), r"no token for 2 of the printable ASCII"),
    "the gemma4 pre-tokenizer on a byte-level vocabulary": (
        "tiny",
        dict(pre=b"gemma4"),
        r"'gpt2' \(BPE\), but its vocabulary has no token for 2 of the printable ASCII characters and the newline",
    ),
    "gpt2 on a SentencePiece vocabulary": (
        "spm_tiny",
        dict(model=b"gpt2", pre=b"default", add={"tokenizer.ggml.merges": MERGES}),
        r"'gpt2' \(BPE\), but .*\(b'\\n' first\).* look like a SentencePiece",
    ),
}


def test_vocabularies_llama_cpp_loads_but_cannot_spell_text_with_are_refused(tiny, spm_tiny, tmp_path):
    bases = {"tiny": tiny, "spm_tiny": spm_tiny}
    files = {
        case: edited(bases[base], tmp_path, f"lossy-{i}", **edit)
        for i, (case, (base, edit, _)) in enumerate(LOSSY.items())
    }
    done = llama_cpp_alone(TEXT, tiny[0], spm_tiny[0], *files.values())
    assert done.returncode == 0, done.stderr[-2000:]
    good_bpe, good_spm, *read = [json.loads(line) for line in done.stdout.splitlines()]
    assert good_bpe["text"] == TEXT and good_spm["text"].strip() == TEXT  # the unedited files spell it
    for case, result in zip(files, read):
        assert result["text"] != TEXT, case  # llama.cpp loads each, and loses characters or the whole text
        _refused(files[case], DamagedModelError, LOSSY[case][2])


# --- strings the GGUF format does not allow, and what is allowed ----------------------------------------------


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            dict(tokens={300: b"\xff\xfeab"}),
            r"token 300 of tokenizer.ggml.tokens \(b'\\xff\\xfeab'\) is not valid UTF-8",
        ),
        (dict(all_tokens=lambda tokens: [b"\xff" + t for t in tokens]), r"token 0 of .* is not valid UTF-8"),
        (dict(merges={7: b"a\0 b"}), r"merge 7 of tokenizer.ggml.merges \(b'a\\x00 b'\) holds a NUL byte"),
        (dict(merges={7: b"\xed\xa0\x80 b"}), r"merge 7 of tokenizer.ggml.merges .* is not valid UTF-8"),
        (dict(model=b"gpt3"), r"uses the tokenizer 'gpt3', which this llama-cpp-python does not know"),
    ],
)
def test_strings_gguf_does_not_allow_are_refused(tiny, tmp_path, edit, message):
    # GGUF strings are UTF-8 (ggml/docs/gguf.md); the check uses Python's decoder, independent of the file's reader.
    error = UnsupportedModelError if "model" in edit else DamagedModelError
    _refused(edited(tiny, tmp_path, "bad", **edit), error, message)


def test_one_empty_token_is_accepted_as_llama_cpp_renames_it(tiny, tmp_path):
    # llama-vocab.cpp renames an empty token [EMPTY_<id>] and warns: the file works, so it is not refused.
    ok = edited(tiny, tmp_path, "one-empty", tokens={300: b""})
    model = load_model(ok, n_ctx=256)
    assert model.detokenize(model.tokenize(TEXT)) == TEXT.encode()
    assert model.generate("Hi", GenerationSettings(max_tokens=2, seed=1), template="llama-2").stats.completion_tokens


# --- header values llama.cpp takes without a word -------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("llama.rope.freq_base", 0.0, "llama.rope.freq_base is 0; a rope base is positive and at most 1e"),
        ("llama.rope.freq_base", -1.0, "llama.rope.freq_base is -1;"),
        ("llama.rope.freq_base", 3.4e38, r"llama.rope.freq_base is 3.4e\+38;"),
        ("llama.rope.freq_base", float("inf"), "llama.rope.freq_base is inf, not a finite number"),
        ("llama.attention.layer_norm_rms_epsilon", 0.0, "layer_norm_rms_epsilon is 0; a normalisation epsilon is"),
        ("llama.attention.layer_norm_rms_epsilon", 5.0, "layer_norm_rms_epsilon is 5;"),
        ("llama.vocab_size", 0, "llama.vocab_size is 0, but its vocabulary lists 49,152 tokens"),
        ("llama.vocab_size", 2**32 - 1, "llama.vocab_size is 4,294,967,295, but"),
        ("llama.vocab_size", 49153, "llama.vocab_size is 49,153, but"),
    ],
)
def test_header_values_llama_cpp_takes_but_cannot_use_are_refused(tiny, tmp_path, field, value, message):
    path, base, header = tiny
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(patch(base, header, field, value))
    if value != float("inf"):  # llama.cpp alone loads it without a word (the finding)
        done = llama_cpp_alone(TEXT, bad)
        assert done.returncode == 0, done.stderr[-2000:]
    _refused(bad, DamagedModelError, message)


# --- paths that are not model files ---------------------------------------------------------------------------

LOAD = """
import sys
from helpers.engine.loading import load_model
from helpers.errors import ModelFileMissingError
try:
    load_model(sys.argv[1])
except ModelFileMissingError as error:
    print(error)
"""


def test_a_fifo_is_named_without_being_opened(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    # In a child with a deadline: opening a FIFO for reading would block until a writer comes.
    done = subprocess.run([sys.executable, "-c", LOAD, str(fifo)], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == f"{fifo} is a FIFO (named pipe), not a model file. Give the path of a .gguf file."


def test_paths_that_are_not_model_files_say_what_they_are(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
    (tmp_path / "dangling.gguf").symlink_to(tmp_path / "gone.gguf")
    cases = {
        folder: f"{folder} is a directory, not a model file. Give the path of a .gguf file (it holds a.gguf).",
        tmp_path / "loop-a": "loop-a is a symbolic link loop (it leads, through links, back to itself), not a model",
        tmp_path
        / "dangling.gguf": f"dangling.gguf is a symbolic link to '{tmp_path / 'gone.gguf'}', which does not exist",
        Path("/dev/zero"): "/dev/zero is a character device, not a model file.",
        tmp_path / "missing.gguf": "Model file not found: ",  # only what is not there is "not found"
        Path("model\0.gguf"): "holds a NUL character: it cannot name a file",  # os.stat's raw ValueError before
    }
    for path, message in cases.items():
        with pytest.raises(ModelFileMissingError) as raised:
            load_model(path)
        assert message in str(raised.value)
        assert ("download_model" in str(raised.value)) == (path.name == "missing.gguf")
