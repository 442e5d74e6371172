"""The Jinja sandbox that renders a GGUF's untrusted chat template as transformers renders it, bounded in time,
size and depth: a template from the Hub cannot hang the kernel or exhaust its memory."""

from __future__ import annotations

import ctypes
import functools
import inspect
import json
import re
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from string import Formatter

from helpers.errors import ChatTemplateError

# transformers' `render_jinja_template` (utils/chat_template_utils.py, `_compile_jinja_template`) renders a chat
# template in an ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the loopcontrols extension
# ({% break %}, {% continue %}), a `{% generation %}` tag, the globals `raise_exception`, `strftime_now`, a
# `dict` and a `namespace` that refuse underscore names, and a `tojson` filter that neither escapes HTML nor
# ASCII. llama-cpp-python's `Jinja2ChatFormatter` has most of that (not the `dict`/`namespace` hardening), but it
# returns one string, which llama-cpp-python tokenizes with special tokens parsed (typed control tokens become
# real ones), and it has no time limit: so the environment is built here, and tests hold it against
# transformers' own renderer.
#
# Jinja's sandbox stops attribute escapes and caps range() at 100,000 items, but not size: `center(10**9)`,
# `'%999999999d' | format(1)` or `str()` of a nested list repeated 30 times at 8 levels are one C call each
# that never returns or takes gigabytes. So every value a template builds (filters, method calls, `*`, `+`,
# `%`, `~`, output) is sized *before* it is built, and refused past `_Render.max_size`; the clock is checked at
# every loop step and call, and a watchdog thread raises the time-out inside long Python-level calls too.

RENDER_TIME_LIMIT_S = 5.0  # a chat renders in milliseconds; a template looping for longer is runaway
MAX_SIZE_BASE = 1_000_000  # characters (or items) any one value, or the output, may have, plus 4x the dialog's
MAX_CALL_DEPTH = 64  # macros calling macros, recursive loops: real templates nest a handful of levels
MAX_INT_BITS = 100_000  # integers a template may compute (`*`, `**`): ~30,000 digits
MAX_INDENT = 100  # tojson(indent=...), as characters
BUILT_FACTOR = 64  # all the values one render builds, together: 64 times what one value may have (many `set`s)


class _RenderTimeout(BaseException):  # a BaseException: a template's own `except Exception` cannot swallow it
    pass


class _TooBig(Exception):
    pass


@dataclass
class _Render:
    """The bounds of one render."""

    deadline: float
    max_size: int
    depth: int = 0
    built: int = 0  # characters and items built so far (charged by `_bounded` and by filter and call results)

    def charge(self, size: int, what: str) -> None:
        self.built += size
        if self.built > BUILT_FACTOR * self.max_size:
            raise _TooBig(f"{what} would take what it builds past {BUILT_FACTOR * self.max_size:,} characters in all")


_render: ContextVar[_Render | None] = ContextVar("chat_template_render", default=None)


def _check_deadline() -> None:
    state = _render.get()
    if state is not None and time.monotonic() > state.deadline:
        raise _RenderTimeout


_FLAT = (str, bytes)
_LISTS = (list, tuple, set, frozenset)


def _size(value, limit: int) -> int:
    """The size `str()` or `tojson` would expand `value` to, counted in characters and items (a list repeated
    inside a list counts each time), counting stops past `limit`."""
    kind = type(value)
    if kind is str:
        return len(value)
    if kind is int or kind is bool or kind is float or value is None:
        return 1 if kind is not int else value.bit_length() // 3 + 1
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is str or kind is bytes:
            total += len(item)
        elif kind is dict:
            total += len(item) + 1
            stack.extend(item.keys())
            stack.extend(item.values())
        elif kind is list or kind is tuple:
            total += len(item) + 1
            stack.extend(item)
        elif kind is int:
            total += item.bit_length() // 3 + 1
        elif kind is bool or kind is float or item is None:
            total += 1
        elif isinstance(item, _FLAT):
            total += len(item)
        elif isinstance(item, dict):
            total += len(item) + 1
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, _LISTS):
            total += len(item) + 1
            stack.extend(item)
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 1
        else:
            attrs = (getattr(item, "__dict__", None) or {}).get("_Namespace__attrs")  # jinja2's namespace()
            if isinstance(attrs, dict):
                stack.append(attrs)
            total += 1
        if total > limit:
            return total
    return total


def _bounded(predicted: int, what: str) -> None:
    """Refuse a value of `predicted` size before it is built."""
    state = _render.get()
    if state is not None:
        if predicted > state.max_size:
            raise _TooBig(f"{what} would build more than {state.max_size:,} characters")
        state.charge(predicted, what)


def _check_size(value, what: str, *, built: bool = False) -> None:
    """Refuse a value past the size bound; `built`: a value just built, charged to the render's total."""
    state = _render.get()
    if state is not None:
        size = _size(value, state.max_size)
        if size > state.max_size:
            raise _TooBig(f"{what} would build more than {state.max_size:,} characters")
        if built:
            state.charge(size, what)


# --- sizes predicted for the operations that take a size ----------------------------------------------

_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[a-zA-Z%]")
_STRFTIME_WIDTH = re.compile(r"%[-_0^#]*(\d+)")
_FORMAT_NUMBERS = re.compile(r"\d+")


def _check_printf(template: str, values) -> None:
    """`'%999999999d' % 1` builds a string of that width: widths and precisions are bounded."""
    for width, precision in _PRINTF_SPEC.findall(template):
        for number in (width, precision):
            if number == "*":
                raise _TooBig("a `*` width in a %-format")
            if number:
                _bounded(int(number), "a %-format width")
    _bounded(len(template) + _size(values, _max_size()), "a %-format")


def _check_format_spec(template: str) -> None:
    """`'{:>999999999}'.format(x)`: the widths in str.format fields are bounded, nested fields refused."""
    try:
        fields = list(Formatter().parse(template))
    except ValueError:
        return  # str.format raises the same error itself
    for _, _, spec, _ in fields:
        if spec and "{" in spec:
            raise _TooBig("a format field whose width is itself a field")
        for number in _FORMAT_NUMBERS.findall(spec or ""):
            _bounded(int(number), "a format width")


def _max_size() -> int:
    state = _render.get()
    return state.max_size if state is not None else 1 << 62


_SIZE_TAKING = frozenset(
    ("center", "indent", "wordwrap", "truncate", "format", "tojson", "replace", "batch", "slice", "sum")
)


def _check_filter(name: str, arguments: dict) -> None:
    """The filters whose output size is set by an argument rather than by their input."""
    value = arguments.get("s", arguments.get("value"))
    text = value if isinstance(value, str) else ""
    if name == "center":
        _bounded(arguments.get("width", 80), "center()")
    elif name == "indent":
        width = arguments.get("width", 4)
        per_line = len(width) if isinstance(width, str) else width
        _bounded(len(text) + (text.count("\n") + 1) * per_line, "indent()")
    elif name == "wordwrap":
        wrap = arguments.get("wrapstring") or "\n"
        lines = len(text) // max(1, arguments.get("width", 79)) + len(text.split()) + text.count("\n") + 1
        _bounded(len(text) + lines * len(wrap), "wordwrap()")
    elif name == "truncate":
        _bounded(len(text) + len(arguments.get("end", "...")), "truncate()")
    elif name == "format":
        _check_printf(text, (arguments.get("args"), arguments.get("kwargs")))
    elif name == "tojson":
        indent = arguments.get("indent")
        if indent is not None and (len(indent) if isinstance(indent, str) else indent) > MAX_INDENT:
            raise _TooBig(f"tojson(indent=...) over {MAX_INDENT}")
    elif name == "replace":
        old, new, count = arguments.get("old", ""), arguments.get("new", ""), arguments.get("count")
        times = text.count(old) if old else len(text) + 1
        if count is not None and count >= 0:
            times = min(times, count)
        _bounded(len(text) + times * len(new), "replace()")
    elif name == "batch":
        _bounded(arguments.get("linecount", 0), "batch()")
    elif name == "slice":
        _bounded(arguments.get("slices", 0), "slice()")
    elif name == "sum":
        if not isinstance(arguments.get("start", 0), (int, float)):
            raise _TooBig("sum() of lists or strings")


def _check_method(method, args) -> None:
    """The str and bytes methods whose output size is set by an argument (`'x'.ljust(10**9)`)."""
    owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
    if not isinstance(owner, (str, bytes)):
        return
    if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        _bounded(args[0], f"{name}()")
    elif name == "expandtabs":
        tab = args[0] if args and isinstance(args[0], int) else 8
        _bounded(len(owner) + owner.count("\t" if isinstance(owner, str) else b"\t") * tab, "expandtabs()")
    elif name == "replace" and len(args) >= 2:
        old, new = args[0], args[1]
        times = owner.count(old) if old else len(owner) + 1
        _bounded(len(owner) + times * len(new), "replace()")
    elif name == "join" and args and isinstance(args[0], (list, tuple)):
        _bounded(_size(args[0], _max_size()) + len(owner) * len(args[0]), "join()")
    elif name in ("translate", "maketrans"):
        raise _TooBig(f"{name}() is not allowed in a chat template")


def _bounded_filter(name: str, function):
    """A filter that checks its arguments' sizes and the clock before it runs, and its result after."""
    signature = inspect.signature(function)
    skip = 1 if getattr(function, "jinja_pass_arg", None) is not None else 0  # context/environment first
    # jinja's async_variant filters (slice, join, sum...) take an eval context their signature does not show
    unshown = skip if getattr(inspect.unwrap(function), "jinja_pass_arg", None) is None else 0

    @functools.wraps(function)
    def bounded(*args, **kwargs):
        _check_deadline()
        if _render.get() is not None:
            if name == "join" and len(args) > skip and not isinstance(args[skip], (str, list, tuple, dict)):
                args = (*args[:skip], list(args[skip]), *args[skip + 1 :])  # sized before join builds it
            limit = _max_size()
            if sum(_size(arg, limit) for arg in args[skip:]) + sum(_size(v, limit) for v in kwargs.values()) > limit:
                raise _TooBig(f"the {name} filter's input would build more than {limit:,} characters")
            if name in _SIZE_TAKING:
                try:
                    arguments = signature.bind(*args[unshown:], **kwargs).arguments
                except TypeError:
                    arguments = {}  # the filter raises its own error for wrong arguments
                _check_filter(name, arguments)
        result = function(*args, **kwargs)
        if isinstance(result, (str, list, tuple, dict)):
            _check_size(result, f"the {name} filter", built=True)
        return result

    return bounded


# --- the hard deadline: a watchdog that raises the time-out inside long calls ---------------------------


class _Watchdog:
    """One daemon thread that raises `_RenderTimeout` in a rendering thread past its deadline, between two
    Python bytecodes: it ends long Python-level calls (textwrap, the JSON encoder, pprint) that check nothing.
    One C call cannot be interrupted: the size bounds keep each short. It looks every `TICK_S` (waking it at
    each render instead costs a thread switch per render) and ends after `IDLE_S` without renders."""

    TICK_S, IDLE_S = 0.05, 10.0

    def __init__(self):
        self._lock = threading.Lock()
        self._watched: dict[object, list] = {}  # key -> [thread id, deadline, fired]
        self._thread: threading.Thread | None = None

    def watch(self, key: object, deadline: float) -> None:
        with self._lock:
            self._watched[key] = [threading.get_ident(), deadline, False]
            if self._thread is None or not self._thread.is_alive():  # also after a fork
                self._thread = threading.Thread(target=self._run, name="chat-template-watchdog", daemon=True)
                self._thread.start()

    def unwatch(self, key: object) -> None:
        with self._lock:
            entry = self._watched.pop(key, None)
            if entry is not None and entry[2]:  # fired but maybe not yet raised: withdraw it
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(entry[0]), None)

    def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            time.sleep(self.TICK_S)
            with self._lock:
                now = time.monotonic()
                for entry in self._watched.values():
                    if not entry[2] and entry[1] <= now:
                        entry[2] = True
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(
                            ctypes.c_ulong(entry[0]), ctypes.py_object(_RenderTimeout)
                        )
                if self._watched:
                    idle_since = now
                elif now - idle_since > self.IDLE_S:
                    self._thread = None
                    return


_WATCHDOG = _Watchdog()


# --- the environment ------------------------------------------------------------------------------------


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
    from jinja2.compiler import CodeGenerator
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

    class BoundedCodeGenerator(CodeGenerator):
        def visit_Concat(self, node, frame):  # `a ~ b`: sized before str() runs on either
            self.write("environment.bounded_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class ChatEnvironment(ImmutableSandboxedEnvironment):
        code_generator_class = BoundedCodeGenerator
        # checked before they run: a template cannot build a giant string, list or number at once
        intercepted_binops = frozenset(["*", "**", "+", "%"])

        def _parse(self, source, name, filename):
            tree = super()._parse(source, name, filename)
            budget = self.extensions[RenderBudget.identifier]
            for loop in tree.find_all(nodes.For):
                loop.iter = budget.call_method("budgeted", [loop.iter], lineno=loop.lineno)
            return tree

        def call(__self, __context, __obj, *args, **kwargs):  # every call in a template: macros, methods, loop()
            _check_deadline()
            state = _render.get()
            if state is None:
                return super().call(__context, __obj, *args, **kwargs)
            if state.depth >= MAX_CALL_DEPTH:
                raise _TooBig(f"calls nested more than {MAX_CALL_DEPTH} deep")
            if getattr(__obj, "__name__", "") == "join" and args and not isinstance(args[0], (list, tuple)):
                args = (list(args[0]), *args[1:])  # sized before str.join builds it
            _check_size((args, kwargs), "a call's arguments")
            _check_method(__obj, args)
            state.depth += 1
            try:
                result = super().call(__context, __obj, *args, **kwargs)
            finally:
                state.depth -= 1
            if isinstance(result, (str, bytes, list, tuple, dict)):
                _check_size(result, "a call", built=True)
            return result

        def call_binop(self, context, operator, left, right):
            if operator == "+" and type(left) is str and type(right) is str:  # most of a chat template's work
                _bounded(len(left) + len(right), "`+`")
                return left + right
            _check_deadline()
            if operator == "*":
                for sequence, count in ((left, right), (right, left)):
                    if isinstance(sequence, (str, list, tuple)) and isinstance(count, int):
                        _bounded(_size(sequence, _max_size()) * max(count, 0), "`*`")
                if isinstance(left, int) and isinstance(right, int):
                    _bounded_int(left.bit_length() + right.bit_length(), "`*`")
            elif operator == "**":
                if isinstance(right, int) and left not in (0, 1, -1):
                    bits = abs(left).bit_length() if isinstance(left, int) else 64
                    _bounded_int(bits * abs(right), "`**`")
            elif operator == "+":
                if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                    _bounded(_size(left, _max_size()) + _size(right, _max_size()), "`+`")
            elif operator == "%" and isinstance(left, str):
                _check_printf(left, right)
            return super().call_binop(context, operator, left, right)

        def wrap_str_format(self, value):  # 'x'.format(...) and format_map(...)
            wrapped = super().wrap_str_format(value)
            if wrapped is None:
                return None
            template = value.__self__

            @functools.wraps(wrapped)
            def bounded(*args, **kwargs):
                _check_deadline()
                if _render.get() is not None:
                    _check_format_spec(template)
                    _check_size((args, kwargs), "format()'s arguments")
                    _bounded(len(template) + _size((args, kwargs), _max_size()), "format()")
                return wrapped(*args, **kwargs)

            return bounded

        def bounded_concat(self, parts):
            if _render.get() is not None:
                _bounded(sum(_size(part, _max_size()) for part in parts), "`~`")
            return "".join(map(str, parts))

    def _bounded_int(bits, what):
        if bits > MAX_INT_BITS:
            raise _TooBig(f"{what} would compute a number over {MAX_INT_BITS:,} bits")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        for width in _STRFTIME_WIDTH.findall(format):
            _bounded(int(width), "a strftime width")
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

    def finalize(value):  # every `{{ ... }}`: sized before str() expands it
        if not isinstance(value, str):
            _check_size(value, "`{{ }}`")
        return value

    env = ChatEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, RenderBudget, loopcontrols], finalize=finalize
    )
    env.filters["tojson"] = tojson
    env.filters = {name: _bounded_filter(name, function) for name, function in env.filters.items()}
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
    except (RecursionError, MemoryError):  # `((((...))))`, `x|trim|trim|...` thousands deep
        raise _error(
            "The chat template in this model's GGUF nests expressions too deeply to compile",
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
    seconds (default `RENDER_TIME_LIMIT_S`): every loop step, call and operator checks the clock, and a
    watchdog ends a long call. No value it builds, nor its output, may pass `MAX_SIZE_BASE` characters plus
    four times the size of `variables`, nor all of them together `BUILT_FACTOR` times that; calls nest at most
    `MAX_CALL_DEPTH` deep.

    The error's `another_template_helps` is True where passing another template is the way out."""
    from jinja2.exceptions import SecurityError, TemplateError

    limit = RENDER_TIME_LIMIT_S if time_limit is None else time_limit
    state = _Render(deadline=time.monotonic() + limit, max_size=MAX_SIZE_BASE + 4 * _size(variables, 1 << 62))
    token, watch = _render.set(state), object()
    try:
        try:
            _WATCHDOG.watch(watch, state.deadline)
            template = _compiled(source)
            parts, length = [], 0
            for part in template.generate(**variables):
                length += len(part)
                if length > state.max_size:
                    raise _TooBig(f"its output would be longer than {state.max_size:,} characters")
                parts.append(part)
            return "".join(parts)
        finally:
            _WATCHDOG.unwatch(watch)
    except ChatTemplateError:  # not valid Jinja (a ValueError too: not to be caught as a template's bug below)
        raise
    except _RenderTimeout:
        _WATCHDOG.unwatch(watch)  # in case the time-out came before the `finally` above had unwatched it
        raise _error(
            f"The chat template in this model's GGUF was still rendering after {limit:g} s and was stopped "
            "(a runaway loop)",
            another_template_helps=True,
        ) from None
    except _TooBig as e:
        raise _error(f"The chat template in this model's GGUF was stopped: {e}", another_template_helps=True) from None
    except (RecursionError, MemoryError):
        raise _error(
            "The chat template in this model's GGUF recursed without end and was stopped", another_template_helps=True
        ) from None
    except SecurityError as e:
        raise _error(
            f"The chat template in this model's GGUF tried something unsafe and was stopped: {e}",
            another_template_helps=True,
        ) from None
    except TemplateError as e:  # raise_exception(...), undefined names, bad filters
        raise _error(f"The chat template in this model's GGUF refused this dialog: {e}") from None
    except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError, AssertionError) as e:  # its bug
        raise _error(
            f"The chat template in this model's GGUF failed on this dialog ({type(e).__name__}: {e})",
            another_template_helps=True,
        ) from None
    finally:
        _render.reset(token)
