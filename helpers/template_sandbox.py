"""The Jinja sandbox that renders a GGUF's untrusted chat template as transformers renders it, with a time limit."""

from __future__ import annotations

import json
import time
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache

from helpers.errors import ChatTemplateError

# transformers' `render_jinja_template` (utils/chat_template_utils.py, `_compile_jinja_template`) renders a chat
# template in an ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the loopcontrols extension
# ({% break %}, {% continue %}), a `{% generation %}` tag, the globals `raise_exception`, `strftime_now`, a
# `dict` and a `namespace` that refuse underscore names, and a `tojson` filter that neither escapes HTML nor
# ASCII. llama-cpp-python's `Jinja2ChatFormatter` has most of that (not the `dict`/`namespace` hardening), but it
# returns one string, which llama-cpp-python tokenizes with special tokens parsed (typed control tokens become
# real ones), and it has no time limit: so the environment is built here, and tests hold it against
# transformers' own renderer.

RENDER_TIME_LIMIT_S = 5.0  # a chat renders in milliseconds; a template looping for longer is runaway
_MAX_REPEAT = 1_000_000  # longest string or list `*` may build in a template (the sandbox caps range() at 100,000)


class _RenderTimeout(Exception):
    pass


_deadline: ContextVar[float | None] = ContextVar("chat_template_deadline", default=None)


def _check_deadline() -> None:
    deadline = _deadline.get()
    if deadline is not None and time.monotonic() > deadline:
        raise _RenderTimeout


class _Budgeted:
    """An iterable of a template's `{% for %}` loop that checks the render deadline at each item."""

    __slots__ = ("_items",)

    def __init__(self, items):
        self._items = items

    def __iter__(self):
        for item in self._items:
            _check_deadline()
            yield item

    def __len__(self):  # loop.length, loop.last, loop.revindex
        return len(self._items)


def _build_environment():
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` renders its body (transformers only records where it is)."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class RenderBudget(Extension):
        """Every `{% for %}` iterates through `_Budgeted`, so a loop checks the deadline at each step."""

        def budgeted(self, items):
            return _Budgeted(items)

    class ChatEnvironment(ImmutableSandboxedEnvironment):
        # `*` and `**` are checked before they run: a template cannot build a giant string or number at once.
        intercepted_binops = frozenset(["*", "**"])

        def _parse(self, source, name, filename):
            tree = super()._parse(source, name, filename)
            budget = self.extensions[RenderBudget.identifier]
            for loop in tree.find_all(nodes.For):
                loop.iter = budget.call_method("budgeted", [loop.iter], lineno=loop.lineno)
            return tree

        def call(__self, __context, __obj, *args, **kwargs):  # every call in a template: macros, methods, loop()
            _check_deadline()
            return super().call(__context, __obj, *args, **kwargs)

        def call_binop(self, context, operator, left, right):
            _check_deadline()
            if operator == "*":
                for sequence, count in ((left, right), (right, left)):
                    if isinstance(sequence, (str, list, tuple)) and isinstance(count, int):
                        if len(sequence) * count > _MAX_REPEAT:
                            raise jinja2.exceptions.SecurityError(f"`*` would build more than {_MAX_REPEAT:,} items")
            if operator == "**" and isinstance(right, int) and abs(right) > 1000 and left not in (0, 1, -1):
                raise jinja2.exceptions.SecurityError("`**` with an exponent over 1000")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:  # `dict(...)` without the class itself, as transformers gives it
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):  # no underscore attributes, as in transformers
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a namespace cannot store underscore names ({name!r})")

    env = ChatEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, RenderBudget, loopcontrols])
    env.filters["tojson"] = tojson
    lipsum = env.globals["lipsum"]  # Jinja's filler text: its size is the caller's, so capped

    def capped_lipsum(n=5, html=True, min=20, max=100):
        if n > 100 or max > 1000:
            raise jinja2.exceptions.SecurityError("lipsum() over 100 paragraphs of 1,000 words")
        return lipsum(n, html, min, max)

    env.globals.update(
        raise_exception=raise_exception,
        strftime_now=strftime_now,
        dict=TemplateDict(),
        namespace=TemplateNamespace,
        lipsum=capped_lipsum,
    )
    return env


@lru_cache(maxsize=1)
def _environment():
    return _build_environment()


@lru_cache(maxsize=16)
def _compiled(source: str):
    from jinja2.exceptions import TemplateSyntaxError

    try:
        return _environment().from_string(source)
    except TemplateSyntaxError as e:
        raise _error(
            f"The chat template in this model's GGUF is not valid Jinja (line {e.lineno}: {e.message})",
            another_template_helps=True,
        ) from None


def _error(message: str, *, another_template_helps: bool = False) -> ChatTemplateError:
    """A `ChatTemplateError`. `another_template_helps` marks the template's own faults (not valid Jinja, a runaway
    loop, a bug): the caller knows the other templates and adds them to the message (the sandbox does not)."""
    error = ChatTemplateError(message)
    error.another_template_helps = another_template_helps
    return error


def render_template(source: str, *, time_limit: float | None = None, **variables) -> str:
    """Render a chat template as transformers does, stopped with a `ChatTemplateError` after `time_limit`
    seconds (default `RENDER_TIME_LIMIT_S`): every loop step, call and `*`/`**` checks the clock.

    The error's `another_template_helps` is True where passing another template is the way out."""
    from jinja2.exceptions import SecurityError, TemplateError

    limit = RENDER_TIME_LIMIT_S if time_limit is None else time_limit
    token = _deadline.set(time.monotonic() + limit)
    try:
        return _compiled(source).render(**variables)
    except ChatTemplateError:  # not valid Jinja (a ValueError too: not to be caught as a template's bug below)
        raise
    except _RenderTimeout:
        raise _error(
            f"The chat template in this model's GGUF was still rendering after {limit:g} s and was stopped "
            "(a runaway loop)",
            another_template_helps=True,
        ) from None
    except RecursionError:
        raise _error("The chat template in this model's GGUF recursed without end and was stopped.") from None
    except SecurityError as e:
        raise _error(f"The chat template in this model's GGUF tried something unsafe and was stopped: {e}") from None
    except TemplateError as e:  # raise_exception(...), undefined names, bad filters
        raise _error(f"The chat template in this model's GGUF refused this dialog: {e}") from None
    except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as e:  # a template's own bug
        raise _error(
            f"The chat template in this model's GGUF failed on this dialog ({type(e).__name__}: {e})",
            another_template_helps=True,
        ) from None
    finally:
        _deadline.reset(token)
