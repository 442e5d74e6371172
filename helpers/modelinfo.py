"""Facts about a GGUF file read from its header, without loading the weights (GGUF spec: ggml/docs/gguf.md)."""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

GGUF_MAGIC = b"GGUF"


class NotGGUFError(ValueError):
    """The file is not a GGUF model (wrong magic bytes): an old GGML .bin, an HTML error page, a partial file."""


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


class DamagedModelError(ValueError):
    """The GGUF header cannot be read: the file is truncated or damaged."""


def check_gguf(path: str | os.PathLike) -> Path:
    """The path, if it exists and starts with the GGUF magic; else a clear error."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Model file not found: {path}. Download it with helpers.download_model(...) first.")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise NotGGUFError(
            f"{path} is not a GGUF model (it starts with {magic!r}, not b'GGUF'). It may be an old GGML .bin "
            "(convert it or download the GGUF version) or an incomplete download (delete it and download again)."
        )
    return path


# GGUF value types: struct format of the scalars; 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Header:
    """A fast reader of the GGUF header: metadata scalars (arrays skipped) and tensor shapes."""

    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, fmt):
        (value,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self):
        n = self.take("Q")
        self.pos += n
        return bytes(self.data[self.pos - n : self.pos]).decode("utf-8", errors="replace")

    def value(self, kind):
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = self.take("I"), self.take("Q")
            if item in _SCALARS:
                self.pos += n * struct.calcsize(_SCALARS[item])
            else:
                for _ in range(n):
                    self.value(item)
            return None  # arrays (the vocabulary) are not needed here
        raise ValueError(f"unknown GGUF value type {kind}")


def _tensor_bytes(kind: int, shape: tuple[int, ...], sizes: dict) -> int:
    """Bytes of a tensor of ggml type `kind` (0 for a type the gguf package's `sizes` table does not know)."""
    block, size = sizes.get(kind, (1, 0))
    return math.prod(shape) // block * size


def read_header(path: Path) -> tuple[dict, list[tuple[str, tuple[int, ...]]]]:
    """(metadata scalars, [(tensor name, shape), ...]) of a GGUF file."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        header = _Header(memoryview(data))
        try:
            if bytes(header.data[:4]) != GGUF_MAGIC:
                raise NotGGUFError(f"{path} is not a GGUF model.")
            header.pos = 4
            version, n_tensors, n_kv = header.take("I"), header.take("Q"), header.take("Q")
            if version < 2:
                raise DamagedModelError(f"{path} is GGUF version {version}; only versions 2 and later are supported.")
            metadata = {}
            for _ in range(n_kv):
                key = header.string()
                metadata[key] = header.value(header.take("I"))
            from gguf.constants import GGML_QUANT_SIZES

            sizes = {int(kind): block_and_size for kind, block_and_size in GGML_QUANT_SIZES.items()}
            tensors, data_end = [], 0
            for _ in range(n_tensors):
                name = header.string()
                shape = tuple(header.take("Q") for _ in range(header.take("I")))
                kind, offset = header.take("I"), header.take("Q")
                tensors.append((name, shape))
                data_end = max(data_end, offset + _tensor_bytes(kind, shape, sizes))
            alignment = int(metadata.get("general.alignment") or 32)
            needed = -(-header.pos // alignment) * alignment + data_end
            if n_tensors and needed > len(data):
                raise DamagedModelError(
                    f"{path} is truncated: its tensors need {needed:,} bytes but the file has {len(data):,}. "
                    "Delete it and download it again."
                )
        except (struct.error, ValueError, UnicodeError) as error:
            if isinstance(error, NotGGUFError | DamagedModelError):
                raise
            raise DamagedModelError(
                f"{path} looks damaged or incomplete ({error}); delete it and download it again."
            ) from error
        finally:
            header.data.release()  # even while an exception's traceback still refers to it: mmap can close
    return metadata, tensors


def read_info(path: str | os.PathLike) -> ModelInfo:
    path = check_gguf(path)
    meta, tensors = read_header(path)
    arch = meta.get("general.architecture") or "llama"
    n_head = int(meta.get(f"{arch}.attention.head_count") or 1)
    return ModelInfo(
        path=path,
        size_bytes=path.stat().st_size,
        architecture=arch,
        name=meta.get("general.name") or path.stem,
        n_layers=int(meta.get(f"{arch}.block_count") or 0),
        n_embd=int(meta.get(f"{arch}.embedding_length") or 0),
        n_head=n_head,
        n_head_kv=int(meta.get(f"{arch}.attention.head_count_kv") or n_head),
        ctx_train=int(meta.get(f"{arch}.context_length") or 4096),
        n_params=sum(math.prod(shape) for _, shape in tensors),
        file_type=meta.get("general.file_type"),
    )
