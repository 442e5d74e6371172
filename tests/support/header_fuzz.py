"""Header fuzzing: seeded random corruptions of a small Llama GGUF, each loaded through `helpers.load_model` in a
child process, so that a crash in llama.cpp (a signal) is seen and counted instead of ending the run.

    python -m tests.support.header_fuzz [--cases 1000] [--seed 13] [--jobs 2]

The file fuzzed is SmolLM2-135M-Instruct's header (its real BPE vocabulary, merges and chat template, from the
bundled offline model) with 2 tiny layers of random Q4_0 weights, written by bench/make_llama2_gguf.py's writer:
about 4 MB, so a copy per case is cheap. Corruptions: truncations, flipped bits, extreme values of the header's
numbers (block_count 0 / 513 / 0xffff, context_length 0x7fffffff, head counts, rope base, norm epsilon...),
forged string and array lengths, value types, tensor shapes, types and offsets, the header's counts and version,
and the tokenizer's metadata re-serialised with another tokenizer or pre-tokenizer name, token and merge strings
with NUL or invalid UTF-8 bytes, empty, cut or duplicate tokens, a whole vocabulary emptied or made unreadable,
byte-typed tokens that are not <0xXX>, merges removed or of a wrong type (`corrupt_tokenizer`).

Each child loads the file (address space capped at 4 GiB, so a multi-GB allocation fails instead of passing
unseen), tokenizes a plain text and one that needs byte fallback (NUL, control bytes, accents, CJK, an emoji),
and generates 2 tokens. Outcomes: `loaded`, `error:<class>` for the project's errors, and the
failures: `signal:<name>`, `timeout`, `unexpected:<class>`. Prints the tally; exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import random
import resource
import signal
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from bench.make_llama2_gguf import TensorSpec, read_kv, write_q4_0

Q4_0, F32 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.F32
U32, STRING = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.STRING
TINY = {"block_count": 2, "context_length": 2048, "embedding_length": 64, "feed_forward_length": 128}
HEADS, HEADS_KV = 4, 2
TRICKY_TEXT = "tab\there \x00\x01\x7f caf\u00e9 \u6f22\u5b57 \U0001f642 \u2581 <0x0A> [EMPTY_5] <|im_end|>"
ADDRESS_SPACE_LIMIT = 4 << 30
CASE_TIMEOUT_S = 60


def write_base(out: Path, source: Path, edit: Callable[[dict], None] | None = None) -> Path:
    """`source`'s metadata (vocabulary, merges, template) with a 2-layer, 64-wide Llama of random Q4_0 weights;
    `edit` may change the metadata (a dict of `bench.make_llama2_gguf.read_kv` triples) before it is written."""
    kv = read_kv(source)
    if edit is not None:
        edit(kv)
    n_vocab = len(kv["tokenizer.ggml.tokens"][0])
    head = TINY["embedding_length"] // HEADS
    for key, value in {**TINY, "attention.head_count": HEADS, "attention.head_count_kv": HEADS_KV}.items():
        kv[f"llama.{key}"] = (value, U32, None)
    kv["llama.rope.dimension_count"] = (head, U32, None)
    kv["general.name"] = ("SmolLM2 header, tiny random weights (header fuzzing only)", STRING, None)
    n_embd, n_ff, n_kv = TINY["embedding_length"], TINY["feed_forward_length"], head * HEADS_KV
    plan = [TensorSpec("token_embd.weight", (n_vocab, n_embd), Q4_0), TensorSpec("output_norm.weight", (n_embd,), F32)]
    for i in range(TINY["block_count"]):
        plan += [
            TensorSpec(f"blk.{i}.attn_norm.weight", (n_embd,), F32),
            TensorSpec(f"blk.{i}.attn_q.weight", (n_embd, n_embd), Q4_0),
            TensorSpec(f"blk.{i}.attn_k.weight", (n_kv, n_embd), Q4_0),
            TensorSpec(f"blk.{i}.attn_v.weight", (n_kv, n_embd), Q4_0),
            TensorSpec(f"blk.{i}.attn_output.weight", (n_embd, n_embd), Q4_0),
            TensorSpec(f"blk.{i}.ffn_norm.weight", (n_embd,), F32),
            TensorSpec(f"blk.{i}.ffn_gate.weight", (n_ff, n_embd), Q4_0),
            TensorSpec(f"blk.{i}.ffn_up.weight", (n_ff, n_embd), Q4_0),
            TensorSpec(f"blk.{i}.ffn_down.weight", (n_embd, n_ff), Q4_0),
        ]
    write_q4_0(out, plan, kv, seed=0)
    return out


@functools.cache
def tiny_base(directory: Path, source: Path) -> tuple[Path, bytes, HeaderMap]:
    """`write_base` once per directory (a test session's): the file, its bytes and where its fields are."""
    path = write_base(directory / "tiny.gguf", source)
    return path, path.read_bytes(), HeaderMap(path)


# --- where the header's fields are --------------------------------------------------------------------------


class HeaderMap:
    """Byte positions of the header's fields in the base file, from the gguf package's reader (independent of
    the project's own reader)."""

    def __init__(self, path: Path):
        reader = gguf.GGUFReader(path)
        self.data_start, self.alignment = int(reader.data_offset), int(reader.alignment)
        self.scalars, self.lengths, self.types, self.tensor_fields = [], [], [], []
        self.spans = {}  # metadata key -> (start, end) of its whole entry, in file order
        self.tokenizer = {}  # the tokenizer's metadata values: strings as bytes, arrays as lists
        for name, field in reader.fields.items():
            starts = np.cumsum([0] + [part.nbytes for part in field.parts]) + field.offset
            if name.startswith("GGUF."):
                self.scalars.append((name, int(starts[0]), field.parts[0].dtype.str))
                continue
            self.spans[name] = (int(starts[0]), int(starts[-1]))
            if name.startswith("tokenizer.ggml."):
                values = [bytes(field.parts[i]) if field.types[-1] == STRING else field.parts[i][0].item()
                          for i in field.data]  # fmt: skip
                self.tokenizer[name] = values if field.types[0] == gguf.GGUFValueType.ARRAY else values[0]
            self.lengths.append((f"{name} (name length)", int(starts[0])))
            self.types.append((name, int(starts[2])))
            kind = gguf.GGUFValueType(field.types[0])
            if kind == gguf.GGUFValueType.STRING:
                self.lengths.append((f"{name} (length)", int(starts[3])))
            elif kind == gguf.GGUFValueType.ARRAY:
                self.types.append((f"{name} (items)", int(starts[3])))
                self.lengths.append((f"{name} (item count)", int(starts[4])))
                if field.types[1] == gguf.GGUFValueType.STRING and len(field.parts) > 6:
                    some = random.Random(name).sample(range(5, len(field.parts) - 1, 2), k=min(3, len(field.data)))
                    self.lengths += [(f"{name} (an item's length)", int(starts[i])) for i in some]
            else:
                self.scalars.append((name, int(starts[3]), field.parts[3].dtype.str))
        self.infos = (int(reader.tensors[0].field.offset), 0)
        for tensor in reader.tensors:
            parts = tensor.field.parts
            starts = np.cumsum([0] + [part.nbytes for part in parts]) + tensor.field.offset
            self.infos = (self.infos[0], int(starts[-1]))
            self.lengths.append((f"{tensor.name} (name length)", int(starts[0])))
            self.tensor_fields.append((f"{tensor.name} n_dims", int(starts[2]), "<u4"))
            for d in range(parts[3].size):  # the dimensions are one part
                self.tensor_fields.append((f"{tensor.name} ne[{d}]", int(starts[3]) + 8 * d, "<u8"))
            self.tensor_fields.append((f"{tensor.name} type", int(starts[-3]), "<u4"))
            self.tensor_fields.append((f"{tensor.name} offset", int(starts[-2]), "<u8"))


def patch(base: bytes, header: HeaderMap, field: str, value) -> bytes:
    """`base` with one numeric header field (a metadata key, or a `GGUF.*` / tensor field name) set to `value`."""
    for name, pos, dtype in header.scalars + header.tensor_fields:
        if name == field:
            dtype = "|u1" if dtype in ("|b1", "bool") else dtype
            data = bytearray(base)
            data[pos : pos + int(dtype[2:])] = _pack(dtype, value)
            return bytes(data)
    raise KeyError(field)


def patch_length(base: bytes, header: HeaderMap, field: str, value: int) -> bytes:
    """`base` with one length field (as HeaderMap names them: "general.name (length)") set to `value`."""
    pos = dict(header.lengths)[field]
    return base[:pos] + struct.pack("<Q", value) + base[pos + 8 :]


def kv_entry(key: str, value, vtype: int, item_type: int | None = None) -> bytes:
    """One metadata entry as GGUF writes it (ggml/docs/gguf.md): the key, its type, its value."""
    return _string(key.encode()) + struct.pack("<I", vtype) + _value(value, vtype, item_type)


_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _string(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def _value(value, vtype: int, item_type: int | None) -> bytes:
    if vtype == STRING:
        return _string(value)
    if vtype == gguf.GGUFValueType.ARRAY:
        if item_type == STRING:
            items = b"".join(_string(v) for v in value)
        else:
            items = struct.pack(f"<{len(value)}{_FORMATS[item_type]}", *value)
        return struct.pack("<IQ", item_type, len(value)) + items
    return struct.pack("<" + _FORMATS[vtype], value)


def with_kvs(base: bytes, header: HeaderMap, changes: dict[str, bytes | None]) -> bytes:
    """`base` with metadata entries replaced (a `kv_entry`), removed (None) or added (a new key), the tensor
    descriptions and data unchanged (their offsets count from the data section, which is re-aligned)."""
    entries, n_kv = [], len(header.spans)
    for name, (start, end) in header.spans.items():
        if name not in changes:
            entries.append(base[start:end])
        elif changes[name] is not None:
            entries.append(changes[name])
        else:
            n_kv -= 1
    added = [entry for name, entry in changes.items() if name not in header.spans and entry is not None]
    first = min(start for start, _ in header.spans.values())
    head = base[:16] + struct.pack("<Q", n_kv + len(added)) + base[24:first]  # magic, version, counts
    out = head + b"".join(entries + added) + base[header.infos[0] : header.infos[1]]
    return out + b"\0" * (-len(out) % header.alignment) + base[header.data_start :]


# --- corruptions ------------------------------------------------------------------------------------------------

HOT = ("block_count", "context_length", "embedding_length", "feed_forward_length", "head_count", "head_count_kv",
       "rope.dimension_count", "rope.freq_base", "epsilon", "vocab_size", "_token_id", "alignment",
       "GGUF.")  # fmt: skip
ARRAY = gguf.GGUFValueType.ARRAY
I32 = gguf.GGUFValueType.INT32
TOKENIZERS = (b"llama", b"bert", b"t5", b"rwkv", b"plamo2", b"gemma4", b"whitespace", b"hybriddna", b"none",
              b"no_vocab", b"", b"gpt3", b"gpt2\0x", b"LLAMA")  # fmt: skip
PRE_TOKENIZERS = (b"gemma4", b"sarvam-moe", b"whitespace", b"granite-embed-multi-311m", b"default", b"llama3",
                  b"qwen2", b"", b"no-such-pre")  # fmt: skip
# Bytes that break a string: NUL (llama.cpp reads C strings), a lone continuation byte, a cut 2-byte sequence, an
# encoded surrogate, 0xFF (never UTF-8).
BAD_BYTES = (b"\0", b"\x80", b"\xc3", b"\xed\xa0\x80", b"\xff")


def _break_string(text: bytes, others: list[bytes], rng: random.Random) -> tuple[str, bytes]:
    how = rng.choice(["bad byte", "bad byte", "empty", "duplicate", "cut", "prefix"])
    if how == "bad byte":
        bad, at = rng.choice(BAD_BYTES), rng.randrange(len(text) + 1)
        return f"{bad!r} at {at}", text[:at] + bad + text[at:]
    if how == "empty":
        return "emptied", b""
    if how == "duplicate":
        return "a copy of another", rng.choice(others)
    if how == "cut":
        return "cut in half", text[: len(text) // 2]
    return "0xff prefixed", b"\xff" + text


def corrupt_tokenizer(base: bytes, header: HeaderMap, rng: random.Random) -> tuple[str, bytes]:
    """The tokenizer's metadata made inconsistent, the way llama.cpp's vocabulary loader is hurt by: another
    tokenizer or pre-tokenizer name, token or merge strings with NUL or invalid bytes, empty or duplicate
    tokens, a whole vocabulary emptied, byte-typed tokens that are not <0xXX>, merges missing or of a wrong type."""
    meta, changes, done = header.tokenizer, {}, []
    tokens, merges = list(meta["tokenizer.ggml.tokens"]), list(meta["tokenizer.ggml.merges"])
    types = list(meta["tokenizer.ggml.token_type"])
    for what in rng.sample(["model", "pre", "tokens", "all tokens", "types", "merges"], k=rng.choice([1, 1, 1, 2])):
        if what == "model":
            name = rng.choice(TOKENIZERS)
            changes["tokenizer.ggml.model"] = kv_entry("tokenizer.ggml.model", name, STRING)
            done.append(f"model {name!r}")
        elif what == "pre":
            name = rng.choice(PRE_TOKENIZERS)
            changes["tokenizer.ggml.pre"] = kv_entry("tokenizer.ggml.pre", name, STRING)
            done.append(f"pre {name!r}")
        elif what in ("tokens", "merges"):
            items = tokens if what == "tokens" else merges
            for i in rng.sample(range(len(items)), k=rng.choice([1, 1, 3, 50])):
                how, items[i] = _break_string(items[i], items, rng)
                if len(done) < 8:
                    done.append(f"{what[:-1]} {i} {how}")
            if what == "merges" and rng.random() < 0.2:
                changes["tokenizer.ggml.merges"] = rng.choice(
                    [None, kv_entry("tokenizer.ggml.merges", [1, 2], ARRAY, I32)]
                )
                done.append("merges " + ("removed" if changes["tokenizer.ggml.merges"] is None else "of int32"))
        elif what == "all tokens":
            how = rng.choice(["empty", "0xff prefixed", "NUL prefixed", "byte-level characters renamed"])
            if how == "byte-level characters renamed":  # the 1-character tokens GPT-2's byte fallback needs
                tokens = [t + b"_" if len(t.decode("utf-8", "replace")) == 1 else t for t in tokens]
            else:
                tokens = [b"" if how == "empty" else (b"\xff" if how[0] == "0" else b"\0") + t for t in tokens]
            done.append(f"all tokens {how}")
        else:
            for i in rng.sample(range(len(types)), k=rng.choice([1, 3, 50])):
                types[i] = rng.choice([6, 6, 6, 0, 2, 3, 4, 5, 7, -1, 255])
            done.append("token types changed")
    if tokens != meta["tokenizer.ggml.tokens"]:
        changes["tokenizer.ggml.tokens"] = kv_entry("tokenizer.ggml.tokens", tokens, ARRAY, STRING)
    if merges != meta["tokenizer.ggml.merges"] and "tokenizer.ggml.merges" not in changes:
        changes["tokenizer.ggml.merges"] = kv_entry("tokenizer.ggml.merges", merges, ARRAY, STRING)
    if types != meta["tokenizer.ggml.token_type"]:
        changes["tokenizer.ggml.token_type"] = kv_entry("tokenizer.ggml.token_type", types, ARRAY, I32)
    return "tokenizer: " + ", ".join(done), with_kvs(base, header, changes)


def _extremes(dtype: str, old: int | float, rng: random.Random) -> list:
    if dtype[1] == "f":
        return [0.0, -1.0, float("nan"), float("inf"), 1e30, old * 1000]
    bits = int(dtype[2:]) * 8
    top = (1 << bits) - 1
    values = [0, 1, 2, 3, 513, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, top, top >> 1, old + 1, old - 1, old * 2]
    values += [rng.randrange(0, top + 1)]
    return [v & top for v in values if v >= 0]


def _pack(dtype: str, value) -> bytes:
    fmt = {"<u1": "<B", "<i1": "<b", "<u2": "<H", "<i2": "<h", "<u4": "<I", "<i4": "<i", "<u8": "<Q", "<i8": "<q"}
    if dtype in ("<f4", "<f8"):
        return struct.pack("<f" if dtype == "<f4" else "<d", value)
    if dtype in ("|b1", "|u1", "|i1", "bool"):
        return struct.pack("<B", value & 0xFF)
    kind = fmt[dtype]
    size = struct.calcsize(kind)
    return struct.pack("<" + kind[1].upper(), value & ((1 << (8 * size)) - 1))


def corrupt(base: bytes, header: HeaderMap, rng: random.Random) -> tuple[str, bytes]:
    """One random corruption of `base`: (what was done, the new bytes)."""
    data = bytearray(base)
    kinds = ["truncate", "flip", "number", "length", "type", "tensor", "tokenizer"]
    kind = rng.choices(kinds, weights=[2, 3, 4, 2, 1, 2, 4])[0]
    if kind == "tokenizer":
        return corrupt_tokenizer(base, header, rng)
    if kind == "truncate":
        end = rng.randrange(0, header.data_start + 4096) if rng.random() < 0.8 else rng.randrange(len(base))
        return f"truncate at {end:,}", bytes(data[:end])
    if kind == "flip":
        where = [rng.randrange(4, header.data_start) for _ in range(rng.randint(1, 4))]
        for pos in where:
            data[pos] ^= 1 << rng.randrange(8)
        return f"flip bits at {where}", bytes(data)
    if kind == "number":
        hot = [s for s in header.scalars if any(h in s[0] for h in HOT)]
        name, pos, dtype = rng.choice(hot if rng.random() < 0.75 else header.scalars)
    elif kind == "length":
        (name, pos), dtype = rng.choice(header.lengths), "<u8"
    elif kind == "type":
        (name, pos), dtype = rng.choice(header.types), "<u4"
    else:
        name, pos, dtype = rng.choice(header.tensor_fields)
    dtype = "|u1" if dtype in ("|b1", "bool") else dtype
    size = int(dtype[2:])
    old = struct.unpack_from("<" + {"f": "f" if size == 4 else "d", "u": "BHIQ"[size.bit_length() - 1]}.get(
        dtype[1], "bhiq"[size.bit_length() - 1]), base, pos)[0]  # fmt: skip
    if kind == "type":
        value = rng.choice([0, 4, 5, 6, 7, 8, 9, 10, 12, 13, 255, 0xFFFFFFFF])
    else:
        value = rng.choice(_extremes(dtype, old, rng))
    data[pos : pos + size] = _pack(dtype, value)
    return f"{kind}: {name} {old!r} -> {value!r}", bytes(data)


# --- running one case in a child ----------------------------------------------------------------------------


def _child(path: str, out_fd: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))
    try:
        from helpers.engine.loading import load_model
        from helpers.generation import generate
        from helpers.settings import GenerationSettings

        model = load_model(path, n_threads=1)
        for text in ("Hello, world!\nHow are you?", TRICKY_TEXT):  # the second needs byte fallback
            model.detokenize(model.tokenize(text))
        generate(model, "Hi", GenerationSettings(max_tokens=2, seed=1), template="llama-2")
        outcome = "loaded"
    except BaseException as error:  # every outcome is reported to the parent, which judges it
        ours = type(error).__module__.startswith("helpers.")  # one of the project's own error classes
        outcome = f"{'error' if ours else 'unexpected'}:{type(error).__name__}: {str(error)[:400]}"
    os.write(out_fd, outcome.encode())
    os._exit(0)


def run_cases(work: Path, base_path: Path, n_cases: int, seed: int, jobs: int = 2) -> list[dict]:
    """Corrupt `base_path` `n_cases` times (seeded) and load each copy in a forked child, `jobs` at a time."""
    import llama_cpp  # noqa: F401

    import helpers.engine.loading  # noqa: F401  (imported once here; the forked children share it)

    os.environ["GGML_NO_BACKTRACE"] = "1"  # a GGML_ASSERT would otherwise attach gdb to print a backtrace
    base, header, rng = base_path.read_bytes(), HeaderMap(base_path), random.Random(seed)
    results, running, made = [], {}, 0
    while made < n_cases or running:
        while made < n_cases and len(running) < jobs:  # each case made when it starts: one file in memory at a time
            i, (what, data) = made, corrupt(base, header, rng)
            made += 1
            path = work / f"case-{i}.gguf"
            path.write_bytes(data)
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child never returns into this loop, whatever happens in it
                try:
                    os.close(read_fd)
                    _child(str(path), write_fd)
                finally:
                    os._exit(1)
            os.close(write_fd)
            running[pid] = (i, what, path, read_fd, time.monotonic())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for other, (_, _, _, _, started) in list(running.items()):
                if time.monotonic() - started > CASE_TIMEOUT_S:
                    os.kill(other, signal.SIGKILL)
                    running[other] = running[other][:4] + (float("inf"),)
            time.sleep(0.01)
            continue
        i, what, path, read_fd, started = running.pop(pid)
        message = os.read(read_fd, 4096).decode(errors="replace")
        os.close(read_fd)
        path.unlink()
        if started == float("inf"):
            outcome = "timeout"
        elif os.WIFSIGNALED(status):
            outcome = f"signal:{signal.Signals(os.WTERMSIG(status)).name}"
        else:
            outcome = message or f"unexpected:exit {os.waitstatus_to_exitcode(status)} without a result"
        outcome, _, message = outcome.partition(": ")
        results.append({"case": i, "corruption": what, "outcome": outcome, "message": message})
    return sorted(results, key=lambda r: r["case"])


def is_failure(outcome: str) -> bool:
    return not (outcome == "loaded" or outcome.startswith("error:"))


def tally(results: list[dict]) -> collections.Counter:
    return collections.Counter(r["outcome"] for r in results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the results as JSON (for the test)")
    parser.add_argument("--show", default=None, help="print every case whose outcome starts with this")
    args = parser.parse_args(argv)
    from helpers.files.catalogue import offline_model_path

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="header-fuzz-") as tmp:
        base = write_base(Path(tmp) / "base.gguf", offline_model_path())
        results = run_cases(Path(tmp), base, args.cases, args.seed, args.jobs)
    counts = tally(results)
    failures = [r for r in results if is_failure(r["outcome"])]
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            if args.show and r["outcome"].startswith(args.show):
                print(f"case {r['case']}: {r['corruption']} -> {r['outcome']}: {r['message']}")
        for r in failures:
            print(f"FAIL case {r['case']}: {r['corruption']} -> {r['outcome']}: {r['message']}")
        print(f"{len(results)} cases, seed {args.seed}, {time.monotonic() - started:.0f} s:")
        for outcome, n in counts.most_common():
            print(f"  {n:5d}  {outcome}")
        print(f"failures (signals, timeouts, unexpected exceptions): {len(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
