"""Tokenizing for a served model: through llama-server's `/tokenize` and `/detokenize` (the vocabulary that
generates), or with a local GGUF of the same model (its vocabulary only)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from helpers.engine.http import Endpoint
from helpers.errors import ServerResponseError, UsageError


class ServerTokenizer:
    """Tokenizing with llama-server's `/tokenize` and `/detokenize` (the vocabulary that generates)."""

    def __init__(self, endpoint: Endpoint, props: dict, n_vocab: int):
        self._endpoint = endpoint
        self._n_vocab = n_vocab
        self._control: dict[int, bool] = {}
        name = Path(props.get("model_path") or "").name
        self.metadata = {"general.name": props.get("model_alias") or name, "general.basename": name}
        if props.get("chat_template"):
            self.metadata["tokenizer.chat_template"] = props["chat_template"]
        self._bos = self._single(props.get("bos_token"), "bos_token")
        self._eos = self._single(props.get("eos_token"), "eos_token")
        plain = self._tokens("a", add_special=False)
        self.add_bos = self._tokens("a", add_special=True)[: -len(plain) or None] == [self._bos]

    def _tokens(self, text: str, *, add_special: bool = False, special: bool = False) -> list[int]:
        body = {"content": text, "add_special": add_special, "parse_special": special}
        tokens = self._answer("/tokenize", body).get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise self._wrong(f"/tokenize answered {repr(tokens)[:120]} instead of a list of token ids.")
        return tokens

    def _answer(self, path: str, body: dict) -> dict:
        answer = self._endpoint.json("POST", path, body)
        if not isinstance(answer, dict):
            raise self._wrong(f"{path} answered {repr(answer)[:120]} instead of a JSON object.")
        return answer

    def _wrong(self, message: str) -> ServerResponseError:
        return ServerResponseError(self._endpoint.scrub(message))

    def _single(self, spelling: str | None, what: str) -> int:
        tokens = self._tokens(spelling, special=True) if isinstance(spelling, str) and spelling else []
        if len(tokens) != 1:
            raise self._wrong(f"The server's {what} ({repr(spelling)[:120]}) is not one token: cannot build prompts.")
        return tokens[0]

    def n_vocab(self) -> int:
        return self._n_vocab

    def token_bos(self) -> int:
        return self._bos

    def token_eos(self) -> int:
        return self._eos

    def is_control(self, token: int) -> bool:
        """Whether `token` is a control token: its spelling is that token only when control tokens are parsed
        (`/tokenize` does not report token attributes, so this is how it can tell)."""
        if token not in self._control:
            spelling = self.detokenize([token], special=True).decode("utf-8", "replace")
            parsed = self._tokens(spelling, special=True)
            self._control[token] = parsed == [token] and self._tokens(spelling, special=False) != parsed
        return self._control[token]

    def specials_in(self, text: str) -> list[str]:
        """The spellings in `text` that llama-server reads as tokens once it parses control tokens (as it parses a
        prompt given as text): the tokens parsing adds over plain text. llama.cpp reads a user-defined token's
        text as that token even in plain text, so those are the same ids in both modes and are not listed here
        (a local GGUF lists them too: `LocalTokenizer`)."""
        plain = set(self._tokens(text, special=False))
        added = [token for token in self._tokens(text, special=True) if token not in plain]
        return [self.detokenize([token], special=True).decode("utf-8", "replace") for token in dict.fromkeys(added)]

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        return self._tokens(text, special=special)

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> bytes:
        # llama-server renders control tokens as their spelling (common_token_to_piece, special=true).
        content = self._answer("/detokenize", {"tokens": list(tokens)}).get("content", "")
        if not isinstance(content, str):
            raise self._wrong(f"/detokenize answered {repr(content)[:120]} instead of text.")
        return content.encode("utf-8", "replace")

    def close(self) -> None:
        pass


class LocalTokenizer:
    """Tokenizing with a local GGUF of the same model (its vocabulary only: `vocab_only=True`)."""

    def __init__(self, path: str | Path):
        import llama_cpp

        from helpers.engine.llama_backend import LlamaCppBackend, captured_native_log

        if not Path(path).is_file():
            raise UsageError(f"tokenizer must be a GGUF file of the served model; {str(path)!r} does not exist.")
        with captured_native_log([], echo=False):
            llama = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        self._vocab = LlamaCppBackend(llama, owned=True)
        self.metadata = dict(self._vocab.metadata)
        self.add_bos = self._vocab.add_bos
        for name in ("n_vocab", "token_bos", "token_eos", "is_control", "tokenize", "detokenize", "close"):
            setattr(self, name, getattr(self._vocab, name))
        self._specials: re.Pattern | None = None

    def specials_in(self, text: str) -> list[str]:
        """The spellings in `text` of the vocabulary's control, user-defined and unknown tokens, in order: every
        text llama.cpp reads as a token when it parses control tokens (as a server parses a prompt given as text)."""
        if self._specials is None:
            spellings = sorted(self._vocab.special_spellings(), key=len, reverse=True)  # longest first, as llama.cpp
            self._specials = re.compile("|".join(map(re.escape, spellings)) or "(?!)")
        return self._specials.findall(text)
