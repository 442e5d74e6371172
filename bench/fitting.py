"""Context fitting: `helpers.context_window.fit_to_context` against the definition it replaced (drop the oldest pair,
encode the whole dialog again, repeat), on a long Llama 2 chat with the real Llama 2 tokenizer.

    python bench/fitting.py [--pairs 400] [--n-ctx 4096]

Needs the Llama 2 vocabulary that `make test` fetches into tests/data/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llama_cpp  # noqa: E402

from helpers.context_window import fit_to_context  # noqa: E402
from helpers.engine.model import as_model  # noqa: E402
from helpers.templates import encode_chat  # noqa: E402

VOCAB = Path(__file__).resolve().parents[1] / "tests" / "data" / "ggml-vocab-llama-spm.gguf"


def one_by_one(model, dialog, max_tokens):
    head, turns = dialog[:1], dialog[1:]
    for dropped in range(0, len(turns), 2):
        tokens = encode_chat(model, head + turns[dropped:], "llama-2")
        if len(tokens) + max_tokens <= model.n_ctx():
            return tokens, dropped // 2
    raise ValueError("does not fit")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--n-ctx", type=int, default=4096)
    args = parser.parse_args()
    llama = llama_cpp.Llama(model_path=str(VOCAB), vocab_only=True, n_ctx=args.n_ctx, verbose=False)
    model = as_model(llama)
    dialog = [{"role": "system", "content": "Be brief."}]
    for i in range(args.pairs):
        dialog += [
            {"role": "user", "content": f"Question {i}: what happened in chapter {i} of the story, in a few words?"},
            {"role": "assistant", "content": f"In chapter {i} the keeper lit the lamp, and the storm came closer."},
        ]
    dialog.append({"role": "user", "content": "And in the last chapter?"})

    start = time.perf_counter()
    fitted = fit_to_context(model, dialog, 512, "llama-2")
    linear = time.perf_counter() - start
    start = time.perf_counter()
    reference = one_by_one(model, dialog, 512)
    quadratic = time.perf_counter() - start
    assert (fitted.tokens, fitted.dropped) == reference
    print(f"{args.pairs} pairs, n_ctx {args.n_ctx}: {fitted.dropped} dropped, {len(fitted.tokens)} prompt tokens")
    print(f"fit_to_context            {linear:8.3f} s")
    print(f"drop one by one (before)  {quadratic:8.3f} s   ratio {quadratic / linear:.0f}x")
    llama.close()


if __name__ == "__main__":
    main()
