"""Chat prompt templates: a conversation turned into the exact text and token ids a model was trained on.

Llama 2 follows Meta's reference `chat_completion` in `llama/generation.py` (facebookresearch/llama):
the system prompt is glued in front of the first user message, every finished user/assistant pair is
encoded as `[INST] {user} [/INST] {answer} ` between a BOS and an EOS *token id*, the last user turn as
`[INST] {user} [/INST]` after a BOS. Hugging Face's Llama-2-chat chat template renders the same as text.

Other models use the chat template embedded in their GGUF (`tokenizer.chat_template`), rendered with
Jinja the way Hugging Face's `apply_chat_template` renders it.

Message content is always tokenized as plain text, so nothing a user types (`</s>`, `<|im_end|>`, ...)
can become a control token.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from helpers.loading import as_model

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
BOS_TEXT, EOS_TEXT = "<s>", "</s>"

ROLES = ("system", "user", "assistant")

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


def validate_dialog(messages: Sequence[Message]) -> list[Message]:
    """Check the shape Llama 2 chat requires: [system], user, assistant, user, ..., user."""
    if isinstance(messages, (str, bytes)):
        raise ValueError("Pass the dialog as a list of {'role', 'content'} messages, not a string.")
    if not messages:
        raise ValueError("The dialog is empty: pass a list of {'role', 'content'} messages ending with a user message.")
    dialog = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"Message {i} must be a dict with 'role' and 'content', got {message!r}.")
        if message["role"] not in ROLES:
            raise ValueError(f"Message {i} has unknown role {message['role']!r}; roles are: {', '.join(ROLES)}.")
        if not isinstance(message["content"], str):
            raise ValueError(f"Message {i} content must be a string, got {type(message['content']).__name__}.")
        dialog.append({"role": message["role"], "content": message["content"]})
    turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
    if not turns:
        raise ValueError("The dialog has only a system prompt: add a user message after it.")
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            where = i + len(dialog) - len(turns)
            raise ValueError(
                f"Message {where} is from {message['role']!r} but {expected!r} was expected: after an optional "
                "system prompt, roles must alternate user/assistant/user/... (a system prompt may only come first)."
            )
    if turns[-1]["role"] != "user":
        raise ValueError("The last message must be from the user: the model answers the last user message.")
    return dialog


def merge_system(system: str, first_user: str) -> str:
    """Meta's merge of a system prompt into the first user message."""
    return B_SYS + system + E_SYS + first_user


def _llama2_turns(messages: Sequence[Message]) -> tuple[list[tuple[str, str]], str]:
    """Meta's merge: ([(user, answer), ...], last_user), contents stripped as Meta strips them."""
    dialog = validate_dialog(messages)
    if dialog[0]["role"] == "system":
        first = dialog[1]
        dialog = [{"role": "user", "content": merge_system(dialog[0]["content"], first["content"])}] + dialog[2:]
    pairs = [(u["content"].strip(), a["content"].strip()) for u, a in zip(dialog[:-1:2], dialog[1::2])]
    return pairs, dialog[-1]["content"].strip()


def llama2_pair_text(user: str, answer: str) -> str:
    return f"{B_INST} {user} {E_INST} {answer} "


def llama2_last_text(user: str) -> str:
    return f"{B_INST} {user} {E_INST}"


def render_llama2(messages: Sequence[Message]) -> str:
    """The prompt as text, as Hugging Face's Llama-2-chat template renders it."""
    pairs, last = _llama2_turns(messages)
    text = "".join(BOS_TEXT + llama2_pair_text(u, a) + EOS_TEXT for u, a in pairs)
    return text + BOS_TEXT + llama2_last_text(last)


def llama2_pair_tokens(model, user: str, answer: str) -> list[int]:
    """One finished turn as Meta encodes it: BOS, `[INST] user [/INST] answer `, EOS (contents stripped)."""
    return [model.token_bos(), *_plain(model, llama2_pair_text(user.strip(), answer.strip())), model.token_eos()]


def llama2_last_tokens(model, user: str) -> list[int]:
    """The final user turn as Meta encodes it: BOS, `[INST] user [/INST]`."""
    return [model.token_bos(), *_plain(model, llama2_last_text(user.strip()))]


def encode_llama2(model, messages: Sequence[Message]) -> list[int]:
    """The token ids Meta's `chat_completion` feeds Llama 2: one BOS per turn, EOS after each answer."""
    pairs, last = _llama2_turns(messages)
    tokens: list[int] = []
    for user, answer in pairs:
        tokens += llama2_pair_tokens(model, user, answer)
    return tokens + llama2_last_tokens(model, last)


def _plain(model, text: str) -> list[int]:
    """Tokenize as plain text: control-token spellings stay text."""
    return model.tokenize(text, special=False)


# --- templates embedded in the GGUF (Hugging Face's Jinja rendering) -----------------------------


def _jinja_environment():
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    # As transformers' `_compile_jinja_template` sets it up.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env


def _token_text(model, token_id: int) -> str:
    if token_id < 0:
        return ""
    return model.detokenize([token_id], special=True).decode("utf-8", errors="replace")


def _render_embedded(model, messages: Sequence[Message], content_of: Callable[[str], str]) -> str:
    template = model.metadata.get("tokenizer.chat_template")
    if not template:
        raise ValueError(
            "This model has no chat template in its GGUF metadata; pass template='llama-2' or a known name."
        )
    dialog = [{"role": m["role"], "content": content_of(m["content"])} for m in messages]
    return (
        _jinja_environment()
        .from_string(template)
        .render(
            messages=dialog,
            add_generation_prompt=True,
            bos_token=_token_text(model, model.token_bos()),
            eos_token=_token_text(model, model.token_eos()),
        )
    )


def render_embedded(model, messages: Sequence[Message]) -> str:
    validate_dialog(messages)
    return _render_embedded(model, messages, content_of=lambda c: c)


def encode_embedded(model, messages: Sequence[Message]) -> list[int]:
    """Tokenize the rendered template as llama.cpp would (control tokens split out first, the text between
    them tokenized as one piece), except that control-token spellings inside message content stay text."""
    dialog = validate_dialog(messages)
    mark = f"\x00{uuid.uuid4().hex}\x00"
    parts = _render_embedded(model, dialog, content_of=lambda c: mark).split(mark)
    # The control tokens the template itself writes, by spelling.
    specials = {}
    for part in parts:
        for token in model.tokenize(part, special=True):
            if model.is_control(token):
                specials[_token_text(model, token)] = token
    pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) or "(?!)")

    tokens: list[int] = []
    text = ""
    contents = iter(m["content"] for m in dialog)
    for i, part in enumerate(parts):
        if i > 0:
            text += next(contents)  # content: always plain text
        position = 0
        for match in pattern.finditer(part):
            text += part[position : match.start()]
            if text:
                tokens += _plain(model, text)
                text = ""
            tokens.append(specials[match.group()])
            position = match.end()
        text += part[position:]
    if text:
        tokens += _plain(model, text)
    if model.add_bos and tokens[:1] != [model.token_bos()]:
        tokens.insert(0, model.token_bos())
    return tokens


# --- registry -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    render: Callable  # (model, messages) -> str: the prompt as text
    encode: Callable  # (model, messages) -> list[int]: the token ids fed to the model


TEMPLATES = {
    "llama-2": Template(render=lambda model, messages: render_llama2(messages), encode=encode_llama2),
    "gguf": Template(render=render_embedded, encode=encode_embedded),
}


def available_templates() -> list[str]:
    return sorted(TEMPLATES)


def _lookup(template: str) -> Template:
    try:
        return TEMPLATES[template]
    except KeyError:
        raise ValueError(
            f"Unknown template {template!r}; known templates: {', '.join(available_templates())}."
        ) from None


_LLAMA2_NAME = re.compile(r"llama[ _-]*v?2", re.IGNORECASE)


def template_for(llm) -> str:
    """The template a model needs: Llama 2's for Llama 2 models, else the one in its GGUF."""
    model = as_model(llm)
    meta = model.metadata
    name = " ".join(meta.get(key, "") for key in ("general.name", "general.basename", "general.finetune"))
    is_llama2 = meta.get("general.architecture") == "llama" and (
        _LLAMA2_NAME.search(name) or ("tokenizer.chat_template" not in meta and model.n_vocab() == 32000)
    )
    if is_llama2:
        return "llama-2"
    if "tokenizer.chat_template" in meta:
        return "gguf"
    raise ValueError(
        "Cannot tell which chat template this model uses (no chat template in its GGUF); "
        f"pass template= one of: {', '.join(available_templates())}."
    )


def render_chat(messages: Sequence[Message], template: str = "llama-2", llm=None) -> str:
    """The human-readable prompt (Llama 2: identical to Hugging Face's Llama-2-chat template output)."""
    if template == "llama-2":
        return render_llama2(messages)
    if llm is None:
        raise ValueError(f"Template {template!r} comes from a model: pass llm=.")
    return _lookup(template).render(as_model(llm), messages)


def encode_chat(llm, messages: Sequence[Message], template: str | None = None) -> list[int]:
    """The token ids fed to the model; `template=None` picks the template from the model."""
    model = as_model(llm)
    return _lookup(template or model.template).encode(model, messages)
