"""Every exception the helpers raise, in one tree rooted at `HelpersError`. Each is also the builtin a caller
would reach for (the way huggingface_hub's `HfHubHTTPError` is also an `OSError`), so `except ValueError` and
`except helpers.HelpersError` both work. Messages say what happened and what to do next.

    HelpersError
    ├── UsageError (ValueError)                 an argument or setting out of its range, an unknown name
    │   ├── UnknownModelError                   a model or quantization the catalogue does not have
    │   └── PromptError                         the dialog cannot become a prompt
    │       ├── DialogError                     not [system], user, assistant, ..., user
    │       ├── SpecialTagError                 Llama 2 content with [INST], <<SYS>> ... (Meta's rule)
    │       ├── ControlTokenError               content spelling a control token, for a server fed text
    │       ├── TextPromptMismatchError         the prompt as text would be read as other tokens
    │       ├── ChatTemplateError               the GGUF's own chat template fails, runs away or is unsafe
    │       └── ContextOverflowError            the last message alone does not fit the context
    ├── ModelFileError (ValueError)             the file is not a model llama.cpp can load
    │   ├── ModelFileMissingError (FileNotFoundError too)
    │   ├── NotGGUFError                        wrong magic bytes: an old .bin, an HTML page
    │   ├── DamagedModelError                   a header that is cut or breaks llama.cpp's limits
    │   ├── NotAModelError                      a vocabulary-only file
    │   └── UnsupportedModelError               another GGUF version, an unknown architecture
    ├── ModelLoadError (RuntimeError)           llama.cpp could not load it (memory, settings)
    ├── ModelUnloadedError (RuntimeError)       the model was closed or replaced
    ├── DecodeError (RuntimeError)              llama.cpp could not evaluate a batch
    ├── QuantizeError (RuntimeError)            llama.cpp could not quantize a file
    ├── DownloadError (OSError)                 a model could not be downloaded
    │   ├── AccessDeniedError (PermissionError) no token, a wrong one, or a licence not accepted
    │   │   └── GatedModelError
    │   ├── ModelFileNotFoundError (FileNotFoundError)  no such repository, revision or file
    │   ├── RateLimitedError                    HTTP 429; `retry_after` in seconds when known
    │   ├── HubServerError                      HTTP 5xx: the Hub's side
    │   ├── DownloadTimeoutError (TimeoutError)
    │   │   └── DownloadStalledError            too little received for too long
    │   ├── ChecksumMismatchError               the sha256 differs from the Hub's: the file was deleted
    │   ├── HubUnreachableError (ConnectionError)  no connection, and the file is not cached
    │   └── NotEnoughDiskError
    └── ServerError (OSError)                   a model server could not be used
        ├── ServerUnavailableError (ConnectionError)  nothing answers, or it stopped answering
        ├── ServerAuthError (PermissionError)   the API key was refused
        ├── ServerResponseError                 an HTTP error, or an answer that is not the API
        └── TokenPromptsUnsupportedError        the server takes text prompts only
"""

from __future__ import annotations

import base64
import json
import os
import re
from urllib.parse import quote, unquote


class HelpersError(Exception):
    """The root of every error the helpers raise: `except helpers.HelpersError` catches them all."""


# --- usage: arguments, settings, dialogs --------------------------------------------------------------


class UsageError(HelpersError, ValueError):
    """An argument or setting the helpers cannot use; the message names it and what is allowed."""


class UnknownModelError(UsageError):
    """A model name or quantization the catalogue does not have; the message lists the ones it has."""


class PromptError(UsageError):
    """The dialog cannot be made into a prompt for this model."""


class DialogError(PromptError):
    """The messages are not a chat: [system], user, assistant, ..., user, each {"role", "content": str}."""


class SpecialTagError(PromptError):
    """A Llama 2 message contains one of Meta's special tags, which would forge a turn or a system prompt."""


class ControlTokenError(PromptError):
    """A message spells one of the model's control or special tokens (`</s>`, `<|im_end|>`) and the model is on a
    server fed text (`connect(..., prompts="text")`), whose tokenizer would read the spelling as that token."""


class TextPromptMismatchError(PromptError):
    """The prompt as text would be read as other token ids than the ones built here (by this vocabulary, or by the
    server's own tokenizer, checked when connecting), so it is not sent."""


class ChatTemplateError(PromptError):
    """The chat template embedded in the model's GGUF cannot render this dialog, or not safely."""


class ContextOverflowError(PromptError):
    """Even the last user message alone (with the system prompt) does not fit in the context."""


# --- model files -----------------------------------------------------------------------------------------


class ModelFileError(HelpersError, ValueError):
    """The file is not a model this llama-cpp-python can load; the message says why."""


class ModelFileMissingError(ModelFileError, FileNotFoundError):
    """There is no model file at that path (or it is not a regular file)."""


class NotGGUFError(ModelFileError):
    """The file is not a GGUF model (wrong magic bytes): an old GGML .bin, an HTML error page, a partial file."""


class DamagedModelError(ModelFileError):
    """The GGUF header cannot be read, or holds values llama.cpp would crash on: truncated or damaged."""


class NotAModelError(ModelFileError):
    """The GGUF holds no model to run: a vocabulary-only file (a tokenizer without weights), for instance."""


class UnsupportedModelError(ModelFileError):
    """A readable GGUF that this llama-cpp-python cannot run: another GGUF version or an unknown architecture."""


# --- the engine ------------------------------------------------------------------------------------------


class ModelLoadError(HelpersError, RuntimeError):
    """llama.cpp could not load the model; the message gives the likely cause and what to try."""


class ModelUnloadedError(HelpersError, RuntimeError):
    """The model was closed, or replaced by another `load_model`: its memory is freed and it cannot be used."""


class DecodeError(HelpersError, RuntimeError):
    """llama.cpp could not evaluate a batch (no room left in the KV cache, or out of memory)."""


class QuantizeError(HelpersError, RuntimeError):
    """llama.cpp could not quantize a file; the message gives what it logged."""


# --- downloads -------------------------------------------------------------------------------------------


class DownloadError(HelpersError, OSError):
    """A model could not be downloaded; the message says what to do next."""


class AccessDeniedError(DownloadError, PermissionError):
    """The Hub refused access (401/403): the token is missing, wrong or lacks access, or a licence is not accepted."""


class GatedModelError(AccessDeniedError):
    """The repository is gated: its licence must be accepted on the Hub and a token given."""


class ModelFileNotFoundError(DownloadError, FileNotFoundError):
    """The repository, revision or file does not exist on the Hub."""


class RateLimitedError(DownloadError):
    """The Hub answered 429: too many requests from this machine. `retry_after` is in seconds, when known."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self):  # OSError pickles its arguments; keep the message and retry_after
        return type(self), (str(self), self.retry_after)


class HubServerError(DownloadError):
    """The Hub answered with a 5xx status: a problem on its side, to retry later."""


class DownloadTimeoutError(DownloadError, TimeoutError):
    """The Hub accepted the connection but did not answer in time."""


class DownloadStalledError(DownloadTimeoutError):
    """A download received too little for too long and was stopped."""


class ChecksumMismatchError(DownloadError):
    """A downloaded file's sha256 differs from the Hub's: it was deleted from the cache."""


class HubUnreachableError(DownloadError, ConnectionError):
    """The Hub cannot be reached (no connection) and the file is not in the local cache."""


class NotEnoughDiskError(DownloadError):
    """The file would not fit on the disk that holds the cache."""


# --- model servers ---------------------------------------------------------------------------------------


class ServerError(HelpersError, OSError):
    """The server could not be used; the message says what happened and what to do next. `status` is the
    HTTP status when the server answered with one, `detail` the server's own message."""

    status: int | None = None
    detail: str = ""


class ServerUnavailableError(ServerError, ConnectionError):
    """Nothing answers at the address (server down, wrong host or port, or it stopped answering)."""


class ServerAuthError(ServerError, PermissionError):
    """The server refused the API key (HTTP 401 or 403)."""


class ServerResponseError(ServerError):
    """The server answered with an error (HTTP 4xx/5xx), or with something that is not its API (a wrong
    URL, malformed events, a stream cut before the answer ended)."""


class TokenPromptsUnsupportedError(ServerError):
    """The server takes text prompts only (Ollama, LM Studio, llama-cpp-python's `llama_cpp.server`): it would
    tokenize the rendered chat itself and turn a typed `</s>` into a control token. `connect(..., prompts="text")`
    sends text, after checking that no message spells one."""


# --- secrets never shown ----------------------------------------------------------------------------------

_USERINFO = re.compile(r"(?<=://)[^\s/@?#]+@")  # http://user:KEY@host -> http://***@host
# An Authorization value: a scheme, then at least 4 token characters, one of them not a lowercase letter (so
# "Basic credentials" in prose stays).
_AUTH_VALUE = re.compile(r"\b((?i:bearer|basic))(\s+)(?=[a-z]*[^a-z\s])[A-Za-z0-9._~+/=-]{4,}")
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{8,}")
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")  # where huggingface_hub finds a token


_CUT_SECRET = 6  # the shortest start of a cut secret that is still scrubbed


def scrub(text: str, secrets=()) -> str:
    """`text` with every secret replaced by `***`: each of `secrets` (an API key, a token, a password) as written,
    URL-encoded and inside HTTP Basic credentials; the tokens in `HF_TOKEN` and `HUGGING_FACE_HUB_TOKEN`; URL
    userinfo (`http://user:KEY@host`); Authorization values (`Bearer ...`, `Basic ...`) and Hub tokens
    (`hf_...`) whoever wrote them. The one function every message, repr and log line built from a server's
    answer, a URL or an exception passes through, so that what a server echoes is never shown."""
    text = str(text)
    found = {s for s in (*secrets, *(os.environ.get(v) for v in TOKEN_VARIABLES)) if isinstance(s, str) and s}
    forms = set()
    for secret in found:
        forms |= {secret, quote(secret, safe=""), unquote(secret), repr(secret)[1:-1], json.dumps(secret)[1:-1]}
    for secret in list(forms):
        encoded = base64.b64encode(secret.encode()).decode()
        forms |= {encoded, encoded.rstrip("=")}  # padded first (longer), then as a prefix of longer base64
    forms = sorted((f for f in forms if len(f) >= 3), key=len, reverse=True)
    for form in forms:
        text = text.replace(form, "***")
    for form in forms:  # a message cut to length may have cut a secret: its first 6 characters or more go too
        for end in range(len(form) - 1, _CUT_SECRET - 1, -1):
            if form[:end] in text:
                text = text.replace(form[:end], "***")
    text = _USERINFO.sub("***@", text)
    text = _AUTH_VALUE.sub(lambda m: f"{m[1]}{m[2]}***", text)
    return _HF_TOKEN.sub("hf_***", text)


def scrubbed(error: BaseException, secrets=()) -> BaseException:
    """`error` (one of the helpers' own) with its message, and a ServerError's `detail`, scrubbed in place, and
    the exception it was raised from dropped (a library's message would print in the traceback unscrubbed)."""
    error.args = tuple(scrub(a, secrets) if isinstance(a, str) else a for a in error.args)
    if isinstance(getattr(error, "detail", None), str):
        error.detail = scrub(error.detail, secrets)
    error.__cause__, error.__suppress_context__ = None, True
    return error


__all__ = [name for name, value in dict(globals()).items() if isinstance(value, type) and issubclass(value, Exception)]
