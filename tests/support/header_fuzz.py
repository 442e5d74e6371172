"""Header fuzzing: seeded random corruptions of a small Llama GGUF, each loaded through `helpers.load_model` in a
child process, so that a crash in llama.cpp (a signal) is seen and counted instead of ending the run.

    python -m tests.support.header_fuzz [--cases 1000] [--seed 13] [--jobs 2]

The file fuzzed is SmolLM2-135M-Instruct's header (its real BPE vocabulary, merges and chat template, from the
bundled offline model) with 2 tiny layers of random Q4_0 weights, written by bench/make_llama2_gguf.py's writer:
about 4 MB, so a copy per case is cheap. Corruptions: truncations, flipped bits, extreme values of the header's
numbers (block_count 0 / 513 / 0xffff, context_length 0x7fffffff, head counts...), forged string and array
lengths, value types, tensor shapes, types and offsets, and the header's counts and version.

Each child loads the file (address space capped at 4 GiB, so a multi-GB allocation fails instead of passing
unseen), tokenizes, and generates 2 tokens. Outcomes: `loaded`, `error:<class>` for the project's errors, and the
failures: `signal:<name>`, `timeout`, `unexpected:<class>`. Prints the tally; exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import resource
import signal
import struct
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np

from bench.make_llama2_gguf import TensorSpec, read_kv, write_q4_0

Q4_0, F32 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.F32
U32, STRING = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.STRING
TINY = {"block_count": 2, "context_length": 2048, "embedding_length": 64, "feed_forward_length": 128}
HEADS, HEADS_KV = 4, 2
ADDRESS_SPACE_LIMIT = 4 << 30
CASE_TIMEOUT_S = 60


def write_base(out: Path, source: Path) -> Path:
    """`source`'s metadata (vocabulary, merges, template) with a 2-layer, 64-wide Llama of random Q4_0 weights."""
    kv = read_kv(source)
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


# --- where the header's fields are --------------------------------------------------------------------------


class HeaderMap:
    """Byte positions of the header's fields in the base file, from the gguf package's reader (independent of
    the project's own reader)."""

    def __init__(self, path: Path):
        reader = gguf.GGUFReader(path)
        self.data_start = int(reader.data_offset)
        self.scalars, self.lengths, self.types, self.tensor_fields = [], [], [], []
        for name, field in reader.fields.items():
            starts = np.cumsum([0] + [part.nbytes for part in field.parts]) + field.offset
            if name.startswith("GGUF."):
                self.scalars.append((name, int(starts[0]), field.parts[0].dtype.str))
                continue
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
        for tensor in reader.tensors:
            parts = tensor.field.parts
            starts = np.cumsum([0] + [part.nbytes for part in parts]) + tensor.field.offset
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


# --- corruptions ------------------------------------------------------------------------------------------------

HOT = ("block_count", "context_length", "embedding_length", "feed_forward_length", "head_count", "head_count_kv",
       "rope.dimension_count", "vocab_size", "_token_id", "alignment", "GGUF.")  # fmt: skip


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
    kind = rng.choices(["truncate", "flip", "number", "length", "type", "tensor"], weights=[2, 3, 4, 2, 1, 2])[0]
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
    from helpers.engine.loading import load_model
    from helpers.generation import generate
    from helpers.settings import GenerationSettings

    try:
        model = load_model(path, n_threads=1)
        tokens = model.tokenize("Hello, world!\nHow are you?")
        model.detokenize(tokens)
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
    plans = [corrupt(base, header, rng) for _ in range(n_cases)]
    results, running, queue = [], {}, list(enumerate(plans))
    while queue or running:
        while queue and len(running) < jobs:
            i, (what, data) = queue.pop(0)
            path = work / f"case-{i}.gguf"
            path.write_bytes(data)
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read_fd)
                _child(str(path), write_fd)
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
