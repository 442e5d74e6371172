"""Extract the real Llama 2 tokenizer vocabulary (and llama.cpp's own tokenizer cases for it) from the
llama-cpp-python source distribution: vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf{,.inp,.out}.

Usage: python tests/support/fetch_vocab.py DEST_DIR
"""

import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

MEMBER = "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"


def main(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        requirement = f"llama-cpp-python=={version('llama-cpp-python')}"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                tmp,
                requirement,
            ],
            check=True,
        )
        (sdist,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                if member.name.split("/", 1)[-1] in (MEMBER, MEMBER + ".inp", MEMBER + ".out"):
                    target = dest / Path(member.name).name
                    part = target.with_suffix(target.suffix + ".part")
                    part.write_bytes(tar.extractfile(member).read())
                    part.replace(target)  # never leave a half-written file under the final name
    print(f"Llama 2 vocabulary in {dest}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
