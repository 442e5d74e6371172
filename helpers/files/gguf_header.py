"""Facts about a GGUF file read from its header, without loading the weights (GGUF spec: ggml/docs/gguf.md)."""

from __future__ import annotations

import errno
import math
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from helpers.errors import DamagedModelError, ModelFileMissingError, NotGGUFError, UnsupportedModelError

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    size_bytes: int
    architecture: str
    name: str
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    ctx_train: int
    n_params: int
    file_type: int | None

    @property
    def kv_bytes_per_token(self) -> int:
        """f16 K and V for every layer: 2 x n_layers x n_embd x (n_head_kv / n_head) x 2 bytes."""
        return 2 * self.n_layers * (self.n_embd * self.n_head_kv // self.n_head) * 2

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.size_bytes / self.n_params if self.n_params else float("nan")


def check_gguf(path: str | os.PathLike) -> Path:
    """The path, if it is a regular file that starts with the GGUF magic; else a clear error that says what the
    path is (a directory, a FIFO, a device, a symbolic link loop). Never opens anything but a regular file, so
    a FIFO cannot block and /dev/zero is not read."""
    path = Path(path).expanduser()
    _check_regular_file(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise NotGGUFError(
            f"{path} is not a GGUF model (it starts with {magic!r}, not b'GGUF'). It may be an old GGML .bin "
            "(convert it or download the GGUF version) or an incomplete download (delete it and download again)."
        )
    return path


_NOT_FILES = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _check_regular_file(path: Path) -> None:
    """ModelFileMissingError saying what `path` is when it is not a regular file (stat only: nothing is opened)."""
    try:
        mode = os.stat(path).st_mode
    except ValueError:  # a NUL character, which no file name can hold
        raise ModelFileMissingError(f"{str(path)!r} holds a NUL character: it cannot name a file.") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            what = "a symbolic link loop (it leads, through links, back to itself)"
        elif os.path.islink(path):
            raise ModelFileMissingError(
                f"{path} is a symbolic link to {os.readlink(path)!r}, which does not exist. Download the model "
                "again, or give the path of the .gguf file itself."
            ) from None
        elif error.errno in (errno.ENOENT, errno.ENOTDIR):
            raise ModelFileMissingError(
                f"Model file not found: {path}. Download it with helpers.download_model(...) first."
            ) from None
        else:
            what = f"a path that cannot be read ({error.strerror})"
        raise ModelFileMissingError(f"{path} is {what}, not a model file. Give the path of a .gguf file.") from None
    for test, what in _NOT_FILES:
        if test(mode):
            inside = sorted(p.name for p in path.glob("*.gguf"))[:5] if what == "a directory" else []
            hint = f" (it holds {', '.join(inside)})" if inside else ""
            raise ModelFileMissingError(f"{path} is {what}, not a model file. Give the path of a .gguf file{hint}.")


# GGUF value types: struct format of the scalars; 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_UINT32 = 4
_U64 = struct.Struct("<Q")

# Limits of llama.cpp's GGUF reader (ggml/src/gguf.cpp, ggml/include/ggml.h in llama-cpp-python 0.3.35's
# vendor/llama.cpp): arrays of at most 2^30 items, tensor names under 64 bytes, at most 4 dimensions.
GGUF_VERSIONS = (2, 3)
GGUF_MAX_ARRAY_ELEMENTS = 1 << 30
GGML_MAX_NAME = 64
GGML_MAX_DIMS = 4
GGUF_DEFAULT_ALIGNMENT = 32
_SHORT_ARRAY = 1024  # numeric arrays up to this length (per-layer values) keep their items
_KEEP_ITEMS = ("tokenizer.ggml.token_type",)  # long numeric arrays whose items are checked (one int32 per token)


@dataclass(frozen=True)
class GGUFArray:
    """A metadata array: its item type, length and items (strings as bytes; numeric arrays only when short)."""

    item_type: int
    length: int
    items: tuple | None


class TensorInfo(NamedTuple):
    name: str
    shape: tuple[int, ...]  # GGUF order: ne[0] (the row length) first
    kind: int  # ggml type
    offset: int  # from the start of the data section


class _Header:
    """A reader of the GGUF header that checks every length against the bytes left in the file, so a damaged
    header gives a clear error, never a huge allocation or a long loop. Reads the mmap directly: no memoryview
    is kept (one that outlived an exception's traceback made closing the mmap raise BufferError)."""

    def __init__(self, data, describe):
        self.data, self.pos, self.describe = data, 0, describe

    def damaged(self, what: str) -> DamagedModelError:
        return DamagedModelError(f"{self.describe} is damaged or truncated: {what}. Delete it and download it again.")

    def need(self, n: int, what: str) -> None:
        if n > len(self.data) - self.pos:
            left = len(self.data) - self.pos
            raise self.damaged(f"{what} at byte {self.pos:,} needs {n:,} bytes, only {left:,} are left in the file")

    def take(self, fmt, what="a value"):
        size = struct.calcsize("<" + fmt)
        self.need(size, what)
        (value,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return value

    def raw_string(self, what="a string") -> bytes:
        n = self.take("Q", f"the length of {what}")
        self.need(n, f"{what} of {n:,} bytes")
        self.pos += n
        return self.data[self.pos - n : self.pos]  # mmap slicing copies: no exported buffer

    def strings(self, n: int, key: str) -> tuple[bytes, ...]:
        """n length-prefixed strings (the vocabulary: tens of thousands, so one tight loop)."""
        self.need(n * 8, f"the {n:,} strings of {key}")  # each has an 8-byte length
        data, pos, end, length, items = self.data, self.pos, len(self.data), _U64.unpack_from, []
        for i in range(n):
            if end - pos < 8 or length(data, pos)[0] > end - pos - 8:
                self.pos = pos
                raise self.damaged(f"string {i} of {key} runs past the end of the file")
            (k,) = length(data, pos)
            items.append(data[pos + 8 : pos + 8 + k])
            pos += 8 + k
        self.pos = pos
        return tuple(items)

    def string(self, what="a string") -> str:
        return self.raw_string(what).decode("utf-8", errors="replace")

    def value(self, kind, key):
        if kind in _SCALARS:
            return self.take(_SCALARS[kind], f"the value of {key}")
        if kind == _STRING:
            return self.string(f"the value of {key}")
        if kind == _ARRAY:
            item, n = self.take("I", f"the item type of {key}"), self.take("Q", f"the length of {key}")
            if n > GGUF_MAX_ARRAY_ELEMENTS:
                raise self.damaged(f"{key} claims {n:,} items (llama.cpp reads at most {GGUF_MAX_ARRAY_ELEMENTS:,})")
            if item in _SCALARS:
                size = struct.calcsize("<" + _SCALARS[item])
                self.need(n * size, f"the {n:,} items of {key}")
                items = None
                if n <= _SHORT_ARRAY or key in _KEEP_ITEMS:
                    items = struct.unpack_from(f"<{n}{_SCALARS[item]}", self.data, self.pos)
                self.pos += n * size
                return GGUFArray(item, n, items)
            if item == _STRING:
                return GGUFArray(item, n, self.strings(n, key))
            raise self.damaged(f"{key} is an array of unknown GGUF type {item}")
        raise self.damaged(f"{key} has unknown GGUF type {kind}")


def _tensor_bytes(kind: int, shape: tuple[int, ...], sizes: dict) -> int:
    """Bytes of a tensor of ggml type `kind` (its (block, bytes per block) in the gguf package's `sizes` table)."""
    block, size = sizes[kind]
    return math.prod(shape) // block * size


def read_header(path: Path) -> tuple[dict, list[TensorInfo]]:
    """(metadata, tensors) of a GGUF file. Every count, length, shape and offset is checked against the file and
    against what llama.cpp's own reader (gguf.cpp) accepts; anything else is a DamagedModelError saying what."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < len(GGUF_MAGIC):
            raise NotGGUFError(f"{path} is not a GGUF model (it is shorter than the 4-byte GGUF magic).")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _parse(_Header(data, str(path)))


def _parse(header: _Header) -> tuple[dict, list[TensorInfo]]:
    from gguf.constants import GGML_QUANT_SIZES

    if header.data[:4] != GGUF_MAGIC:
        raise NotGGUFError(f"{header.describe} is not a GGUF model.")
    header.pos = 4
    version = header.take("I", "the GGUF version")
    if version == 1 or (version > GGUF_VERSIONS[-1] and version & 0xFFFF):
        raise UnsupportedModelError(
            f"{header.describe} is GGUF version {version}; llama-cpp-python reads versions 2 and 3. "
            + ("Download a newer conversion of the model." if version == 1 else "Upgrade llama-cpp-python.")
        )
    if version not in GGUF_VERSIONS:
        raise header.damaged(f"its GGUF version is {version} (2 or 3 expected; a wrong byte order, or damage)")
    n_tensors, n_kv = header.take("Q", "the tensor count"), header.take("Q", "the metadata count")
    room = len(header.data) - header.pos
    # The smallest metadata entry takes 14 bytes (name length, a 1-byte name, type, 1-byte value), the smallest
    # tensor description 25 (name length, a 1-byte name, dimension count, type, offset).
    if n_kv * 14 + n_tensors * 25 > room:
        raise header.damaged(
            f"its header claims {n_kv:,} metadata entries and {n_tensors:,} tensors, more than its {room:,} bytes hold"
        )
    metadata, types = {}, {}
    for i in range(n_kv):
        key = header.string(f"the name of metadata entry {i}")
        if not key:
            raise header.damaged(f"metadata entry {i} has an empty name")
        if key in metadata:
            raise header.damaged(f"metadata entry {key!r} appears twice")
        types[key] = header.take("I", f"the type of {key}")
        metadata[key] = header.value(types[key], key)
    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if "general.alignment" in metadata and types["general.alignment"] != _UINT32:
        raise header.damaged(f"general.alignment has GGUF type {types['general.alignment']}, not uint32")
    if alignment <= 0 or alignment & (alignment - 1):
        raise header.damaged(f"general.alignment is {alignment}, not a power of 2")
    sizes = {int(kind): block_and_size for kind, block_and_size in GGML_QUANT_SIZES.items()}
    tensors, names = [], set()
    for i in range(n_tensors):
        raw = header.raw_string(f"the name of tensor {i}")
        name = raw.decode("utf-8", errors="replace")
        if len(raw) >= GGML_MAX_NAME or name in names:
            raise header.damaged(
                f"tensor {i}'s name {name[:80]!r} is " + ("too long" if name not in names else "a duplicate")
            )
        names.add(name)
        n_dims = header.take("I", f"the dimension count of {name}")
        if n_dims > GGML_MAX_DIMS:
            raise header.damaged(f"tensor {name} has {n_dims:,} dimensions (at most {GGML_MAX_DIMS})")
        shape = tuple(header.take("Q", f"the shape of {name}") for _ in range(n_dims))
        kind, offset = header.take("I", f"the type of {name}"), header.take("Q", f"the offset of {name}")
        if kind not in sizes:
            raise header.damaged(f"tensor {name} has ggml type {kind}, which is not a known tensor type")
        if math.prod(shape) >= 2**63 or any(n >= 2**63 for n in shape):
            raise header.damaged(f"tensor {name} has shape {shape}, too large for any file")
        if (shape[0] if shape else 1) % sizes[kind][0]:
            raise header.damaged(f"tensor {name}'s rows of {shape[0]} values are not whole blocks of its type")
        tensors.append(TensorInfo(name, shape, kind, offset))
    data_start = -(-header.pos // alignment) * alignment
    expected = data_end = 0
    for tensor in tensors:  # llama.cpp requires each tensor right after the previous one, padded to the alignment
        if tensor.offset != expected:
            raise header.damaged(f"tensor {tensor.name} starts at offset {tensor.offset:,} instead of {expected:,}")
        nbytes = _tensor_bytes(tensor.kind, tensor.shape, sizes)
        data_end = expected + nbytes
        expected += -(-nbytes // alignment) * alignment
    needed = data_start + data_end
    if tensors and needed > len(header.data):
        raise DamagedModelError(
            f"{header.describe} is truncated: its tensors need {needed:,} bytes but the file has {len(header.data):,}. "
            "Delete it and download it again."
        )
    return metadata, tensors


def _count(meta: dict, key: str, default: int) -> int:
    """An integer hyper-parameter: the value, the first layer's of a per-layer array, else `default`."""
    value = meta.get(key)
    if isinstance(value, GGUFArray) and value.items and value.item_type != _STRING:
        value = value.items[0]
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) and value == value else default


def read_info(path: str | os.PathLike) -> ModelInfo:
    path = check_gguf(path)
    meta, tensors = read_header(path)
    return model_info(path, meta, tensors)


def model_info(path: Path, meta: dict, tensors: list[TensorInfo]) -> ModelInfo:
    """The ModelInfo of a header read by `read_header` (values of a wrong type count as missing)."""
    arch = meta.get("general.architecture")
    arch = arch if isinstance(arch, str) and arch else "llama"
    name = meta.get("general.name")
    n_head = _count(meta, f"{arch}.attention.head_count", 0) or 1
    return ModelInfo(
        path=path,
        size_bytes=path.stat().st_size,
        architecture=arch,
        name=name if isinstance(name, str) and name else path.stem,
        n_layers=_count(meta, f"{arch}.block_count", 0),
        n_embd=_count(meta, f"{arch}.embedding_length", 0),
        n_head=n_head,
        n_head_kv=_count(meta, f"{arch}.attention.head_count_kv", 0) or n_head,
        ctx_train=_count(meta, f"{arch}.context_length", 0) or 4096,
        n_params=sum(math.prod(tensor.shape) for tensor in tensors),
        file_type=_count(meta, "general.file_type", -1) if "general.file_type" in meta else None,
    )
