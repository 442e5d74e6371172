"""The short table bench/gpu_check.sh ends with, from what its steps printed:

    python bench/gpu_table.py --install install.log --scale scale.txt --gpu "NVIDIA H100 80GB HBM3" --model m.gguf

install.log: `python -m helpers.install`'s output (what was chosen and "Done in N s"); scale.txt: bench/scale.py's
table. Generation is compared with the GPU's memory-bandwidth ceiling: bandwidth / bytes of weights read per
token (the file size). Bandwidths are the makers' data-sheet figures.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

# GB/s, most specific name first (NVIDIA data sheets).
GPU_BANDWIDTH_GBS = (
    ("H200", 4800),
    ("H100 NVL", 3900),
    ("H100 PCIe", 2000),
    ("H100", 3350),
    ("A100-SXM4-80GB", 2039),
    ("A100 80GB PCIe", 1935),
    ("A100", 1555),
    ("L40S", 864),
    ("L40", 864),
    ("A10G", 600),
    ("A10", 600),
    ("L4", 300),
    ("T4", 320),
    ("V100", 900),
    ("RTX 4090", 1008),
    ("RTX 3090", 936),
    ("RTX A6000", 768),
)


def bandwidth_gbs(gpu_name: str) -> float | None:
    return next((gbs for name, gbs in GPU_BANDWIDTH_GBS if name in gpu_name), None)


def scale_rows(text: str) -> dict[str, tuple[str, str]]:
    """bench/scale.py's rows: name -> (value, note). Its lines are `name  value  note`, name padded."""
    rows = {}
    for line in text.splitlines():
        parts = re.split(r"\s{2,}", line.strip(), maxsplit=2)
        if len(parts) >= 2:
            rows[parts[0]] = (parts[1], parts[2] if len(parts) > 2 else "")
    return rows


def install_summary(log: str) -> tuple[str, str]:
    """(what was installed, how long it took) from helpers.install's output (`make setup`'s, then its own
    second run's "nothing to do", when the check starts from a fresh checkout)."""
    # The last install that ran is the one in place (the second run replaces a build the first one left).
    done = ([None] + list(re.finditer(r"Done in (\d+) s \(([^)]*)\)", log)))[-1]
    if done:
        return done.group(2), f"{done.group(1)} s"
    if "nothing to do" in log:
        return "already installed (nothing to do)", "0 s"
    return "install failed (see install.log)", "?"


def table(install_log: str, scale_text: str, gpu_name: str, model_bytes: int) -> list[tuple[str, str]]:
    rows = scale_rows(scale_text)
    what, took = install_summary(install_log)
    layers = re.search(r"(all|\d+) layers on the GPU|on the CPU", rows.get("model", ("", ""))[1])
    generation = rows.get("generation tokens/s, helpers.stream", ("?", ""))[0]
    gbs = bandwidth_gbs(gpu_name)
    ceiling = gbs * 1e9 / model_bytes if gbs else None
    try:
        against = f"{float(generation) / ceiling:.2f} of {ceiling:.0f} tokens/s" if ceiling else "bandwidth unknown"
    except ValueError:
        against = "?"
    return [
        ("GPU", gpu_name + (f" ({gbs} GB/s)" if gbs else "")),
        ("install", f"{what}, {took}"),
        ("layers offloaded", layers.group(0) if layers else "?"),
        ("prompt tokens/s", rows.get("prompt tokens/s, helpers.stream", ("?", ""))[0]),
        ("generation tokens/s", generation),
        ("time to first token, 5th turn, cache off", rows.get("turn 5 first token, cache off", ("?", ""))[0]),
        ("time to first token, 5th turn, cache on", rows.get("turn 5 first token, cache on", ("?", ""))[0]),
        ("generation / bandwidth ceiling", against + f" ({model_bytes / 1e9:.2f} GB per token)"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--install", type=Path, nargs="+", required=True, help="helpers.install's output(s)")
    parser.add_argument("--scale", type=Path, required=True)
    parser.add_argument("--gpu", required=True, help="the GPU's name, as nvidia-smi gives it")
    parser.add_argument("--model", type=Path, required=True)
    args = parser.parse_args()
    install_log = "\n".join(path.read_text() for path in args.install)
    rows = table(install_log, args.scale.read_text(), args.gpu, args.model.stat().st_size)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
