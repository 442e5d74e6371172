"""Prompts sent as text, for servers that take no token ids (Ollama, LM Studio, llama-cpp-python's
`llama_cpp.server`): `connect(url, prompts="text")`, safe by construction.

Such a server tokenizes the text itself and, like llama.cpp everywhere, reads the spelling of a special token
(`</s>`, `<|im_end|>`) as that token: a typed `</s>` would end the user's turn, a typed `<|im_start|>` forge a
new one. So nothing is sent before three checks:

1. `check_messages`: no message, and no answer prefix (a Continue's start), may spell one of the vocabulary's
   special tokens: control, user-defined and unknown, every text llama.cpp's tokenizer parses as one token
   (`<s>`, `</s>`, `<unk>` for Llama 2). `ControlTokenError` names the message and the token. Meta's rule on
   `[INST]`, `<<SYS>>` ... applies as in-process (`SpecialTagError`). Look-alikes (`< /s>`, `<S>`) pass.
2. `prompt_text`: the text is made from the prompt's token ids, each control token as its spelling and the
   text between two of them as the vocabulary decodes it: the rendered prompt (Llama 2: Hugging Face's
   template text), without the first BOS when the server adds one itself. It is tokenized back here as the
   server will tokenize it (BOS added, control tokens parsed) and sent only if that gives the same ids
   (`TextPromptMismatchError` otherwise).
3. `check_server_reading`: once per connection, where the server can tokenize (llama-server's `/tokenize`,
   llama_cpp.server's `/extras/tokenize`), a test dialog's text must read as the same ids there too; where it
   cannot (Ollama, LM Studio), `describe()` says the check was not possible.
"""

from __future__ import annotations

from collections.abc import Sequence

from helpers.errors import ControlTokenError, ServerResponseError, TextPromptMismatchError

# The dialog checked against the server's tokenizer when connecting: three turns, and look-alikes of control
# tokens that must stay text.
PROBE = [
    {"role": "user", "content": "Hello! Is < /s> or <S> or [/s] plain text?"},
    {"role": "assistant", "content": "Yes: all three are plain text."},
    {"role": "user", "content": "Thanks. Answer in one word: ok?"},
]


def check_messages(tokenizer, messages: Sequence[dict], answer_prefix: str = "") -> None:
    """Refuse a message (or answer prefix) that spells a special token of `tokenizer`'s vocabulary."""
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str) and (found := tokenizer.specials_in(content)):
            _refuse(f"Message {i} ({message.get('role')})", found)
    if answer_prefix and (found := tokenizer.specials_in(answer_prefix)):
        _refuse("The answer so far (Continue)", found)


def _refuse(where: str, found: list[str]) -> None:
    spellings = " and ".join(repr(s) for s in dict.fromkeys(found))
    raise ControlTokenError(
        f"{where} contains {spellings}, which this model's tokenizer reads as a special token. The model is on a "
        "server that takes text (connect(..., prompts='text')) and tokenizes it itself, so that text would reach "
        "the model as the token, not as characters (a typed '</s>' ends the turn). Remove it or write it apart "
        "(for example '< /s>'), or use a server that takes token ids (llama-server, vLLM), where it stays text."
    )


def prompt_text(tokenizer, ids: Sequence[int]) -> str:
    """The text a server tokenizes into exactly `ids` (adding the BOS itself when the model wants one)."""
    ids = list(ids)
    body = ids[1:] if tokenizer.add_bos and ids[:1] == [tokenizer.token_bos()] else ids
    if not body:
        return ""
    whole = tokenizer.detokenize(body, special=True).decode("utf-8", "replace")
    # The control tokens are those that parsing control-token spellings adds: no per-token lookups.
    control = set(tokenizer.tokenize(whole, special=True)) - set(tokenizer.tokenize(whole, special=False))
    # SentencePiece vocabularies (Llama 2) put a space before the text that starts a prompt or follows a control
    # token, and decoding gives it back: drop it, the server's tokenizer puts it there again.
    space = tokenizer.detokenize(tokenizer.tokenize("a"), special=True).startswith(b" ")
    parts: list[str] = []
    run: list[int] = []
    spellings: dict[int, str] = {}
    for token in [*body, None]:
        if token is not None and token not in control:
            run.append(token)
            continue
        if run:
            try:
                text = tokenizer.detokenize(run, special=True).decode("utf-8")
            except UnicodeDecodeError:
                raise TextPromptMismatchError(_mismatch("decodes to bytes that are not UTF-8 text")) from None
            parts.append(text[1:] if space and text.startswith(" ") else text)
            run = []
        if token is not None:
            if token not in spellings:
                spellings[token] = tokenizer.detokenize([token], special=True).decode("utf-8")
            parts.append(spellings[token])
    text = "".join(parts)
    read = ([tokenizer.token_bos()] if tokenizer.add_bos else []) + tokenizer.tokenize(text, special=True)
    if read != ids:
        raise TextPromptMismatchError(_mismatch(_difference(ids, read, "this vocabulary")))
    return text


def _mismatch(what: str) -> str:
    return (
        f"The prompt cannot be sent as text: {what}, so the server would read another prompt than the one built "
        "here. Nothing was sent. Use a server that takes token ids (llama-server, vLLM), or prompts='tokens'."
    )


def _difference(ids: list[int], read: list[int], reader: str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(ids, read)) if a != b), min(len(ids), len(read)))
    return (
        f"{reader} reads its text as {len(read)} tokens where the prompt has {len(ids)}, first differing at "
        f"position {at} ({read[at] if at < len(read) else 'end'} instead of {ids[at] if at < len(ids) else 'end'})"
    )


def check_server_reading(model, server_tokens) -> str:
    """Once per connection: the text of `PROBE`'s prompt, tokenized by the server as it reads a prompt, must be
    the ids built here; and where the server can also tokenize without parsing control tokens (llama-server),
    each message's content must read as the same plain-text ids. `server_tokens(text, special)` gives the
    server's ids (with the BOS it adds when `special`), or None where it cannot. Returns the line `describe()`
    shows."""
    ids = model.encode_chat(PROBE)
    text = prompt_text(model.backend, ids)
    read = server_tokens(text, True)
    if read is None:
        return "whether the server reads the text as the same token ids could not be checked (it cannot tokenize)"
    if read != ids:
        raise TextPromptMismatchError(_wrong_vocabulary(_difference(ids, read, "its tokenizer")))
    for message in PROBE:
        plain = server_tokens(message["content"], False)
        if plain is not None and plain != model.tokenize(message["content"]):
            raise TextPromptMismatchError(_wrong_vocabulary(f"it reads {message['content']!r} as other tokens"))
    return f"the server reads the text as the same token ids (checked on a {len(ids)}-token test dialog)"


def _wrong_vocabulary(what: str) -> str:
    return (
        f"The server reads the prompt text differently from the tokenizer here: {what}. Its vocabulary is not the "
        "one here: pass connect(..., tokenizer=) the GGUF the server runs."
    )


def server_tokens(endpoint, model_id: str, *, llama_server: bool):
    """`server_tokens(text, special)` for `check_server_reading`. llama-server's `/tokenize` both ways (with
    `special`, BOS added and control tokens parsed, as it reads a prompt); llama_cpp.server's `/extras/tokenize`
    only as it reads a prompt (`Llama.tokenize(text, special=True)`); None where the server has neither."""

    def tokens(text: str, special: bool) -> list[int] | None:
        try:
            if llama_server:
                body = {"content": text, "add_special": special, "parse_special": special}
                answer = endpoint.json("POST", "/tokenize", body)
            elif special:
                answer = endpoint.json("POST", "/extras/tokenize", {"input": text, "model": model_id})
            else:
                return None
        except ServerResponseError as error:
            if error.status in (404, 405, 501) or "not answer with JSON" in str(error):
                return None
            raise
        read = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(read, list) or not all(isinstance(t, int) for t in read):
            return None
        return read

    return tokens


__all__ = ["PROBE", "check_messages", "prompt_text", "check_server_reading", "server_tokens"]
