"""The bounded Jinja2 sandbox that prompt templates run in.

Templates are edited through the server by people who are not the server's operators, so a
template is untrusted code. Jinja's `ImmutableSandboxedEnvironment` already refuses internals
(`__class__`, `__globals__`, ...), unsafe callables and mutation of lists and dicts. This module
adds what the sandbox leaves to the embedder: **time** and **size**.

- Time: while a template renders, a per-thread trace hook watches the template's own frames
  and aborts once the render has used its CPU budget, so nested loops, recursion and
  `loop.cycle` tricks end. The clock is the thread's CPU time less the garbage collector's
  pauses: a busy machine, another thread holding the GIL or a collection of a big heap must not
  fail a render that costs a millisecond (it once stopped a GPU training run, BENCHMARKS.md).
- Size: every operator that can amplify (`*`, `**`, `+`, `%`, `~`), every method call and
  every filter is checked *before* it allocates (estimated result size, integer arguments)
  and its result after; the rendered output is capped while it streams.
- Filters and string methods are allow-lists: those whose cost cannot be bounded from their
  arguments (`indent`, `wordwrap`, `center`, `expandtabs`, ...) are simply not there.

Knows nothing of recommendation; `genrec.prompts` builds its templates on this environment.
"""

from __future__ import annotations

import gc
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import wraps
from types import FrameType
from typing import Any

from jinja2.compiler import CodeGenerator, Frame
from jinja2.nodes import Concat
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import Namespace, _PassArg

TEMPLATE_FILENAME = "<template>"
"""The filename Jinja gives code compiled from strings; the trace hook watches only these frames."""


@dataclass(frozen=True)
class RenderLimits:
    max_seconds: float = 0.5
    """CPU-time budget of one render (the rendering thread's, garbage collection left out)."""
    max_chars: int = 65_536
    """Largest rendered prompt, and largest string or list a template may build on the way."""
    max_range: int = 10_000
    """Largest `range()` a template may ask for."""


class TemplateLimitExceeded(SecurityError):
    """A template ran too long or tried to build something too large."""


SAFE_FILTERS = {
    # Output bounded by the input's size, or small.
    "abs", "attr", "batch", "capitalize", "count", "d", "default", "dictsort", "e", "escape",
    "first", "float", "groupby", "int", "items", "join", "last", "length", "list", "lower",
    "map", "max", "min", "reject", "rejectattr", "replace", "reverse", "round", "select",
    "selectattr", "slice", "sort", "string", "striptags", "sum", "title", "tojson", "trim",
    "truncate", "unique", "upper", "wordcount",
}  # fmt: skip
SAFE_STR_METHODS = {
    "capitalize", "casefold", "count", "endswith", "find", "format", "format_map", "isalnum",
    "isalpha", "isdigit", "islower", "isnumeric", "isspace", "istitle", "isupper", "join",
    "ljust", "lower", "lstrip", "partition", "removeprefix", "removesuffix", "replace", "rfind",
    "rjust", "rpartition", "rsplit", "rstrip", "split", "splitlines", "startswith", "strip",
    "swapcase", "title", "upper", "zfill",
}  # fmt: skip
_WIDE_FORMAT = re.compile(r"\d{6,}")
"""A format spec with a six-digit width or precision would allocate megabytes from a few bytes."""


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, list, tuple, dict, set, frozenset)) else 0


class _Codegen(CodeGenerator):
    """Routes the `~` operator through the environment so that its result size is checked."""

    def visit_Concat(self, node: Concat, frame: Frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _BoundedNamespace(Namespace):
    """`namespace()` whose attributes are size-checked as they are set (the usual loop accumulator)."""

    limit = 0

    def __setitem__(self, name: str, value: Any) -> None:
        limit = type(self).limit  # Namespace hides its own attributes from getattr
        if _size(value) > limit:
            raise TemplateLimitExceeded(f"namespace value {name!r} exceeds {limit} items/characters")
        super().__setitem__(name, value)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    code_generator_class = _Codegen
    intercepted_binops = frozenset({"*", "**", "+", "%", "//"})

    def __init__(self, limits: RenderLimits | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.limits = limits or RenderLimits()
        self.filters = {name: self._guard(f) for name, f in self.filters.items() if name in SAFE_FILTERS}
        self.globals["range"] = self._range
        self.globals.pop("lipsum", None)  # generates text from integer arguments
        ns = type("namespace", (_BoundedNamespace,), {"limit": self.limits.max_chars})
        self.globals["namespace"] = ns

    # -- size checks ---------------------------------------------------------------------------
    def check_size(self, value: Any, what: str) -> Any:
        if _size(value) > self.limits.max_chars:
            raise TemplateLimitExceeded(f"{what} would exceed {self.limits.max_chars} items/characters")
        return value

    def _check_args(self, what: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > self.limits.max_chars:
                raise TemplateLimitExceeded(f"{what}: argument {a} exceeds {self.limits.max_chars}")

    def bounded_concat(self, parts: tuple[Any, ...]) -> str:
        strs = [str(p) for p in parts]
        if sum(map(len, strs)) > self.limits.max_chars:
            raise TemplateLimitExceeded(f"'~' would exceed {self.limits.max_chars} characters")
        return "".join(strs)

    def _range(self, *args: int) -> range:
        rng = range(*args)
        if len(rng) > self.limits.max_range:
            raise TemplateLimitExceeded(f"range of {len(rng)} exceeds {self.limits.max_range}")
        return rng

    def call_binop(self, context: Context, operator_: str, left: Any, right: Any) -> Any:
        lim = self.limits.max_chars
        if operator_ == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(n, int) and _size(seq) * max(n, 0) > lim:
                raise TemplateLimitExceeded(f"'*' would build more than {lim} items/characters")
        elif operator_ == "**":
            if (
                isinstance(left, int)
                and isinstance(right, int)
                and (right > 4096 or abs(left).bit_length() * max(right, 0) > 65_536)
            ):
                raise TemplateLimitExceeded("'**' result too large")
        elif operator_ == "+" and _size(left) + _size(right) > lim:
            raise TemplateLimitExceeded(f"'+' would build more than {lim} items/characters")
        elif operator_ == "%" and isinstance(left, str) and _WIDE_FORMAT.search(left):
            raise TemplateLimitExceeded("'%' format with a huge width or precision")
        return self.binop_table[operator_](left, right)

    # -- calls -----------------------------------------------------------------------------------
    def is_safe_callable(self, obj: Any) -> bool:
        if not super().is_safe_callable(obj):
            return False
        owner = getattr(obj, "__self__", None)
        if isinstance(owner, str):
            return getattr(obj, "__name__", "") in SAFE_STR_METHODS
        return True

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        name = getattr(__obj, "__name__", "callable")
        if not __self.is_safe_callable(__obj):
            raise SecurityError(f"calling {name!r} is not allowed in templates")
        if name not in ("format", "format_map"):  # their integers are values; widths are checked below
            __self._check_args(name, args, kwargs)
        owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
        if isinstance(owner, str):
            __self._precheck_str_method(owner, name, args)
        return __self.check_size(__context.call(__obj, *args, **kwargs), f"{name}()")

    def _precheck_str_method(self, s: str, name: str, args: tuple[Any, ...]) -> None:
        if name in ("format", "format_map") and _WIDE_FORMAT.search(s):
            raise TemplateLimitExceeded("format() with a huge width or precision")
        if name == "replace" and len(args) >= 2:
            self._precheck_replace(s, args[0], args[1])
        if name == "join" and args:
            items = list(args[0])
            self.check_size(items, "join()")
            if len(s) * len(items) + sum(_size(x) for x in items) > self.limits.max_chars:
                raise TemplateLimitExceeded(f"join() would exceed {self.limits.max_chars} characters")

    def _precheck_replace(self, s: Any, old: Any, new: Any) -> None:
        if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
            count = len(s) + 1 if old == "" else s.count(old)
            if len(s) + count * (len(new) - len(old)) > self.limits.max_chars:
                raise TemplateLimitExceeded(f"replace() would exceed {self.limits.max_chars} characters")

    def _guard(self, f: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap a filter: integer arguments and the result are size-checked; `join`/`replace` pre-checked."""
        name = getattr(f, "__name__", "filter")
        first_param = 2 if _PassArg.from_obj(f) is not None else 1  # skip (context,) and the input value

        @wraps(f)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            self._check_args(f"filter {name}", args[first_param:], kwargs)
            if name == "do_replace" and len(args) >= 4:  # (eval_ctx, s, old, new)
                self._precheck_replace(args[1], args[2], args[3])
            if name == "do_join" and len(args) >= 2:  # (eval_ctx, value, d='', attribute=None)
                sep = args[2] if len(args) > 2 else kwargs.get("d", "")
                items = list(args[1])
                self.check_size(items, "join")
                if len(str(sep)) * len(items) > self.limits.max_chars:
                    raise TemplateLimitExceeded(f"join would exceed {self.limits.max_chars} characters")
                args = (args[0], items, *args[2:])
            return self.check_size(f(*args, **kwargs), f"filter {name}")

        return guarded

    # -- rendering -------------------------------------------------------------------------------
    def render_bounded(self, chunks: Callable[[], Iterator[str]]) -> str:
        """Join a template's output stream under the time and size limits."""
        out: list[str] = []
        size = 0
        with _cpu_budget(self.limits.max_seconds):
            for chunk in chunks():
                size += len(chunk)
                if size > self.limits.max_chars:
                    raise TemplateLimitExceeded(f"output exceeds {self.limits.max_chars} characters")
                out.append(chunk)
        return "".join(out)


@contextmanager
def _cpu_budget(budget: float) -> Iterator[None]:
    """Abort the template's own frames (loops, macros, recursion) once this thread has spent `budget`
    seconds of CPU on the render, not counting the garbage collector's runs inside it."""
    me = threading.get_ident()
    start = time.thread_time()
    collected = 0.0  # CPU seconds the collector took in this thread during the render
    gc_from: float | None = None

    def on_gc(phase: str, info: dict[str, int]) -> None:
        nonlocal collected, gc_from
        if threading.get_ident() != me:
            return
        if phase == "start":
            gc_from = time.thread_time()
        elif gc_from is not None:
            collected += time.thread_time() - gc_from
            gc_from = None

    ticks = 0

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal ticks
        ticks += 1
        if ticks % 64 == 0 and time.thread_time() - start - collected > budget:
            raise TemplateLimitExceeded(f"rendering took longer than {budget:g} s of CPU time")
        return local

    def global_(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename == TEMPLATE_FILENAME else None

    previous = sys.gettrace()
    gc.callbacks.append(on_gc)
    sys.settrace(global_)
    try:
        yield
    finally:
        sys.settrace(previous)
        gc.callbacks.remove(on_gc)
