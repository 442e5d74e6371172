"""Chat prompt templates: a conversation turned into the exact text and token ids a model was trained on.

Llama 2 follows Meta's reference `chat_completion` in `llama/generation.py` (facebookresearch/llama):
the system prompt is glued in front of the first user message, every finished user/assistant pair is
encoded as `[INST] {user} [/INST] {answer} ` between a BOS and an EOS *token id*, the last user turn as
`[INST] {user} [/INST]` after a BOS. Hugging Face's Llama-2-chat chat template renders the same as text.

Meta's `chat_completion` also refuses content containing `[INST]`, `[/INST]`, `<<SYS>>` or `<</SYS>>`
(its `SPECIAL_TAGS`): in Llama 2's format they are plain text, so typed ones forge turns or a system prompt.
Here they raise `SpecialTagError` unless the caller passes `allow_special_tags=True`.

Other models use the chat template embedded in their GGUF (`tokenizer.chat_template`), rendered the way
Hugging Face's transformers renders it (same sandbox, extensions and globals), with a time limit: the
sandbox is `helpers.template_sandbox`.

Message content is always tokenized as plain text, so nothing a user types (`</s>`, `<|im_end|>`, ...)
can become a control token; nor can what a template makes of it (`| lower` turns `<|IM_END|>` into
`<|im_end|>`): where a template transforms content, its rendering is checked for control tokens it did not write.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import helpers.template_sandbox as template_sandbox
from helpers.engine.model import as_model
from helpers.errors import ChatTemplateError, DialogError, SpecialTagError, UsageError
from helpers.template_sandbox import render_template

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
BOS_TEXT, EOS_TEXT = "<s>", "</s>"

SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")  # Meta's llama/generation.py

ROLES = ("system", "user", "assistant")

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


def validate_dialog(messages: Sequence[Message]) -> list[Message]:
    """Check the shape Llama 2 chat requires: [system], user, assistant, user, ..., user."""
    if isinstance(messages, (str, bytes)):
        raise DialogError("Pass the dialog as a list of {'role', 'content'} messages, not a string.")
    if not messages:
        raise DialogError(
            "The dialog is empty: pass a list of {'role', 'content'} messages ending with a user message."
        )
    dialog = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DialogError(f"Message {i} must be a dict with 'role' and 'content', got {message!r}.")
        if message["role"] not in ROLES:
            raise DialogError(f"Message {i} has unknown role {message['role']!r}; roles are: {', '.join(ROLES)}.")
        if not isinstance(message["content"], str):
            raise DialogError(f"Message {i} content must be a string, got {type(message['content']).__name__}.")
        dialog.append({"role": message["role"], "content": message["content"]})
    turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
    if not turns:
        raise DialogError("The dialog has only a system prompt: add a user message after it.")
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            where = i + len(dialog) - len(turns)
            raise DialogError(
                f"Message {where} is from {message['role']!r} but {expected!r} was expected: after an optional "
                "system prompt, roles must alternate user/assistant/user/... (a system prompt may only come first)."
            )
    if turns[-1]["role"] != "user":
        raise DialogError("The last message must be from the user: the model answers the last user message.")
    return dialog


def check_special_tags(dialog: Sequence[Message]) -> None:
    """Meta's rule (`chat_completion`): no message may contain `[INST]`, `[/INST]`, `<<SYS>>` or `<</SYS>>`."""
    for i, message in enumerate(dialog):
        found = [tag for tag in SPECIAL_TAGS if tag in message["content"]]
        if found:
            raise SpecialTagError(
                f"Message {i} ({message['role']}) contains {' and '.join(found)}: Llama 2 reads "
                f"{', '.join(SPECIAL_TAGS)} as the marks of its turns and system prompt, so text containing them "
                "can fake a turn, which is why Meta's reference code refuses it. Remove them from the message, or "
                "pass allow_special_tags=True to send them to the model as written."
            )


def merge_system(system: str, first_user: str) -> str:
    """Meta's merge of a system prompt into the first user message."""
    return B_SYS + system + E_SYS + first_user


def _llama2_turns(messages: Sequence[Message], allow_special_tags: bool) -> tuple[list[tuple[str, str]], str]:
    """Meta's merge: ([(user, answer), ...], last_user), contents stripped as Meta strips them."""
    dialog = validate_dialog(messages)
    if not allow_special_tags:
        check_special_tags(dialog)
    if dialog[0]["role"] == "system":
        first = dialog[1]
        dialog = [{"role": "user", "content": merge_system(dialog[0]["content"], first["content"])}] + dialog[2:]
    pairs = [(u["content"].strip(), a["content"].strip()) for u, a in zip(dialog[:-1:2], dialog[1::2])]
    return pairs, dialog[-1]["content"].strip()


def llama2_pair_text(user: str, answer: str) -> str:
    return f"{B_INST} {user} {E_INST} {answer} "


def llama2_last_text(user: str) -> str:
    return f"{B_INST} {user} {E_INST}"


def render_llama2(messages: Sequence[Message], *, allow_special_tags: bool = False) -> str:
    """The prompt as text, as Hugging Face's Llama-2-chat template renders it."""
    pairs, last = _llama2_turns(messages, allow_special_tags)
    text = "".join(BOS_TEXT + llama2_pair_text(u, a) + EOS_TEXT for u, a in pairs)
    return text + BOS_TEXT + llama2_last_text(last)


def llama2_pair_tokens(model, user: str, answer: str) -> list[int]:
    """One finished turn as Meta encodes it: BOS, `[INST] user [/INST] answer `, EOS (contents stripped)."""
    return [model.token_bos(), *_plain(model, llama2_pair_text(user.strip(), answer.strip())), model.token_eos()]


def llama2_last_tokens(model, user: str) -> list[int]:
    """The final user turn as Meta encodes it: BOS, `[INST] user [/INST]`."""
    return [model.token_bos(), *_plain(model, llama2_last_text(user.strip()))]


def encode_llama2(model, messages: Sequence[Message], *, allow_special_tags: bool = False) -> list[int]:
    """The token ids Meta's `chat_completion` feeds Llama 2: one BOS per turn, EOS after each answer."""
    pairs, last = _llama2_turns(messages, allow_special_tags)
    tokens: list[int] = []
    for user, answer in pairs:
        tokens += llama2_pair_tokens(model, user, answer)
    return tokens + llama2_last_tokens(model, last)


def _plain(model, text: str) -> list[int]:
    """Tokenize as plain text: control-token spellings stay text."""
    return model.tokenize(text, special=False)


# --- templates embedded in the GGUF (rendered by helpers/template_sandbox.py as transformers renders them) -----


def _pass_a_template() -> str:
    """The way out that the template errors offer."""
    return f"pass template= one of: {', '.join(available_templates())}."


def _token_text(model, token_id: int) -> str:
    if token_id < 0:
        return ""
    return model.detokenize([token_id], special=True).decode("utf-8", errors="replace")


def _render_embedded(
    model, dialog: Sequence[Message], contents: Sequence[str], *, time_limit: float | None = None
) -> str:
    template = model.metadata.get("tokenizer.chat_template")
    if not template:
        raise UsageError(
            "This model has no chat template in its GGUF metadata; pass template='llama-2' or a known name."
        )
    try:
        return render_template(
            template,
            messages=[{"role": m["role"], "content": c} for m, c in zip(dialog, contents)],
            tools=None,  # as transformers passes them when there are none
            documents=None,
            add_generation_prompt=True,
            bos_token=_token_text(model, model.token_bos()),
            eos_token=_token_text(model, model.token_eos()),
            time_limit=time_limit,
        )
    except ChatTemplateError as e:
        if not getattr(e, "another_template_helps", False):
            raise
        raise ChatTemplateError(f"{e}; {_pass_a_template()}") from None


def render_embedded(model, messages: Sequence[Message]) -> str:
    dialog = validate_dialog(messages)
    return _render_embedded(model, dialog, [m["content"] for m in dialog])


def _placed_contents(rendered: str, texts: list[str], contents: list[str]) -> list[str] | None:
    """How each use of a content appears in `rendered` (as is, or trimmed the way `| trim` / `.strip()` /
    `.lstrip()` / `.rstrip()` trim it), given the template's own texts around the uses; None if the rendering
    is not exactly `texts` with those contents in between."""
    if not rendered.startswith(texts[0]):
        return None
    at, placed = len(texts[0]), []
    for content, after in zip(contents, texts[1:]):
        for candidate in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
            if rendered.startswith(candidate + after, at):
                placed.append(candidate)
                at += len(candidate) + len(after)
                break
        else:
            return None
    return placed if at == len(rendered) else None


def encode_embedded(model, messages: Sequence[Message]) -> list[int]:
    """Token ids of the rendered template: the template's own text with its control tokens parsed, each
    message's content as plain text, whatever the template does with it (moves it, uses it twice, trims it).

    The template is rendered twice: with the real contents, and with a unique sentinel in place of each
    content. The sentinel rendering tells which content the template wrote where; substituting the contents
    (trimmed where the template trims them) must give back the real rendering exactly. Then control tokens are
    looked for only in the template's own text, and the text between two control tokens is tokenized as one
    piece, as llama.cpp tokenizes a prompt. A template that changes content some other way (re-cases, reverses,
    replaces, strips tags, or branches on it) falls back to tokenizing its rendering whole, which is only allowed
    when no content spells a control token, nor turns into one in the rendering (`_encode_rendered_whole`).
    """
    dialog = validate_dialog(messages)
    contents = [m["content"] for m in dialog]
    rendered = _render_embedded(model, dialog, contents)

    nonce = uuid.uuid4().hex
    sentinel = re.compile(f"\ue000{nonce}:(\\d+)\ue001")
    try:
        marked = _render_embedded(model, dialog, [f"\ue000{nonce}:{i}\ue001" for i in range(len(dialog))])
    except ChatTemplateError:  # the template checks content (refuses an empty one, say): no sentinels there
        return _encode_rendered_whole(model, dialog, rendered)
    pieces = sentinel.split(marked)
    texts, uses = pieces[0::2], [int(i) for i in pieces[1::2]]
    placed = None
    if not any(nonce in text for text in texts):  # else the template cut or changed a sentinel
        placed = _placed_contents(rendered, texts, [contents[i] for i in uses])
    if placed is None:
        return _encode_rendered_whole(model, dialog, rendered)

    specials = {}  # the control tokens the template itself writes, by spelling
    for text in set(texts):
        for token in model.tokenize(text, special=True):
            if model.is_control(token) and (spelling := _token_text(model, token)) not in specials:
                specials[spelling] = _Special(
                    token,  # llama.cpp's LSTRIP/RSTRIP attributes (Phi-3's tokens): whitespace beside them is dropped
                    lstrip=model.tokenize(" \n" + spelling, special=True) == [token],
                    rstrip=model.tokenize(spelling + " \n", special=True) == [token],
                )
    pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) or "(?!)")

    tokens: list[int] = []
    run, after = "", None  # plain text since the last control token, and that token
    for i, text in enumerate(texts):
        if i > 0:
            run += placed[i - 1]  # content: always plain text
        position = 0
        for match in pattern.finditer(text):
            special = specials[match.group()]
            tokens += _plain_run(model, run + text[position : match.start()], after, special)
            tokens.append(special.token)
            run, after, position = "", special, match.end()
        run += text[position:]
    tokens += _plain_run(model, run, after, None)
    return _with_bos(model, tokens)


class _Special(NamedTuple):
    token: int
    lstrip: bool
    rstrip: bool


_C_SPACE = " \t\n\v\f\r"  # what llama.cpp's isspace() strips


def _plain_run(model, text: str, after: _Special | None, before: _Special | None) -> list[int]:
    """The text between two control tokens, as llama.cpp tokenizes a fragment of a prompt."""
    if after is not None and after.rstrip:
        text = text.lstrip(_C_SPACE)
    if before is not None and before.lstrip:
        text = text.rstrip(_C_SPACE)
    return _plain(model, text) if text else []


_INERT = "\ue000"  # a private-use character: no case, no tags, no space, no pair to reverse into a control token


def _controls(model, ids: list[int]) -> list[int]:
    return [token for token in ids if model.is_control(token)]


def _encode_rendered_whole(model, dialog: Sequence[Message], rendered: str) -> list[int]:
    """The rendering tokenized whole, with its control tokens parsed: allowed only when no content spells a
    control token, and when no content *makes* one either through what the template does to it (`| lower` turns
    `<|IM_START|>` into `<|im_start|>`; `| reverse`, `| replace(...)`, `| striptags` and joins can too).

    That is checked on the rendering itself: its control tokens must be the ones the template writes with each
    content replaced by an inert character. Where they differ, each message is replaced alone, which names
    the message whose rendered text holds the extra control tokens."""
    for i, message in enumerate(dialog):
        content = message["content"]
        if model.tokenize(content, special=True) != model.tokenize(content, special=False):
            raise ChatTemplateError(
                f"Message {i} ({message['role']}) spells a control token of this model, and this model's chat "
                "template changes message content in a way that cannot be followed token by token, so it could "
                "reach the model as a real control token. Remove the control token from the message, or "
                + _pass_a_template()
            )
    ids = model.tokenize(rendered, special=True)
    found = _controls(model, ids)
    contents = [m["content"] for m in dialog]
    deadline = time.monotonic() + template_sandbox.RENDER_TIME_LIMIT_S  # for all these renders together
    if found != _controls_with(model, dialog, [c and _INERT for c in contents], deadline):
        for i, message in enumerate(dialog):
            if not contents[i]:
                continue  # nothing of the user's to transform
            alone = _controls_with(model, dialog, [*contents[:i], _INERT, *contents[i + 1 :]], deadline)
            if alone is None:
                raise ChatTemplateError(
                    f"Message {i} ({message['role']}): this model's chat template both transforms and checks "
                    "message content, so whether its text turns into a control token cannot be verified: "
                    + _pass_a_template()
                )
            if alone != found:
                raise ChatTemplateError(
                    f"Message {i} ({message['role']}) turns into a control token of this model once this model's "
                    "chat template transforms it (re-casing, reversing, stripping or replacing its text), so it "
                    "could fake a turn. Remove the text that becomes a control token (a control token's spelling "
                    "in another case or order, or in pieces) from the message, or " + _pass_a_template()
                )
    return _with_bos(model, ids)


def _controls_with(model, dialog: Sequence[Message], contents: list[str], deadline: float) -> list[int] | None:
    """The control tokens of the rendering with these contents; None if the template refuses them or runs past
    `deadline` (a template slow on purpose cannot multiply its time limit by the number of messages)."""
    try:
        rendered = _render_embedded(model, dialog, contents, time_limit=max(0.0, deadline - time.monotonic()))
        return _controls(model, model.tokenize(rendered, special=True))
    except ChatTemplateError:
        return None


def _with_bos(model, tokens: list[int]) -> list[int]:
    """A BOS first when the model's tokenizer wants one and the template did not write it (never two)."""
    if model.add_bos and tokens[:1] != [model.token_bos()]:
        return [model.token_bos(), *tokens]
    return tokens


# --- registry -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    render: Callable  # (model, messages) -> str: the prompt as text
    encode: Callable  # (model, messages) -> list[int]: the token ids fed to the model


TEMPLATES = {
    "llama-2": Template(
        render=lambda model, messages, **options: render_llama2(messages, **options), encode=encode_llama2
    ),
    "gguf": Template(
        render=lambda model, messages, **options: render_embedded(model, messages),
        encode=lambda model, messages, **options: encode_embedded(model, messages),
    ),
}


def available_templates() -> list[str]:
    return sorted(TEMPLATES)


def _lookup(template: str) -> Template:
    try:
        return TEMPLATES[template]
    except KeyError:
        raise UsageError(
            f"Unknown template {template!r}; known templates: {', '.join(available_templates())}."
        ) from None


_LLAMA2_NAME = re.compile(r"llama[ _-]*v?2", re.IGNORECASE)


def template_for(llm) -> str:
    """The template a model needs: Llama 2's for Llama 2 models, else the one in its GGUF.

    A Llama 2 model is told by its name (the GGUF's name fields, or the id a server gives it: llama-server
    reports a ChatML template for a Llama 2 GGUF that has none), or by a Llama vocabulary of 32,000 tokens
    with no chat template. A server does not report the architecture, so a missing one counts as Llama."""
    model = as_model(llm)
    meta = model.metadata
    names = [meta.get(key, "") for key in ("general.name", "general.basename", "general.finetune")]
    names.append(getattr(model, "model_id", None) or "")  # a served model's id (RemoteModel)
    is_llama2 = meta.get("general.architecture", "llama") == "llama" and (
        _LLAMA2_NAME.search(" ".join(names)) or ("tokenizer.chat_template" not in meta and model.n_vocab() == 32000)
    )
    if is_llama2:
        return "llama-2"
    if "tokenizer.chat_template" in meta:
        return "gguf"
    raise UsageError(
        "Cannot tell which chat template this model uses (no chat template in its GGUF); " + _pass_a_template()
    )


def render_chat(
    messages: Sequence[Message], template: str | None = None, llm=None, *, allow_special_tags: bool = False
) -> str:
    """The human-readable prompt (Llama 2: identical to Hugging Face's Llama-2-chat template output).
    `template=None` picks the template from `llm`, as `encode_chat` does (Llama 2's without a model).

    `allow_special_tags=True` lets Llama 2 messages contain `[INST]`, `[/INST]`, `<<SYS>>`, `<</SYS>>`."""
    if template is None:
        template = "llama-2" if llm is None else as_model(llm).template
    if template == "llama-2":
        return render_llama2(messages, allow_special_tags=allow_special_tags)
    if llm is None:
        raise UsageError(f"Template {template!r} comes from a model: pass llm=.")
    return _lookup(template).render(as_model(llm), messages, allow_special_tags=allow_special_tags)


def encode_chat(
    llm, messages: Sequence[Message], template: str | None = None, *, allow_special_tags: bool = False
) -> list[int]:
    """The token ids fed to the model; `template=None` picks the template from the model.

    `allow_special_tags=True` lets Llama 2 messages contain `[INST]`, `[/INST]`, `<<SYS>>`, `<</SYS>>`
    (otherwise `SpecialTagError`, as Meta's `chat_completion` refuses them)."""
    model = as_model(llm)
    return _lookup(template or model.template).encode(model, messages, allow_special_tags=allow_special_tags)
