"""The bounded Jinja2 sandbox that prompt templates run in.

Templates are edited through the server by people who are not the server's operators, so a
template is untrusted code. Jinja's `ImmutableSandboxedEnvironment` already refuses internals
(`__class__`, `__globals__`, ...), unsafe callables and mutation of lists and dicts. This module
adds what the sandbox leaves to the embedder: **time** and **size**.

- Size: every operator that can amplify (`*`, `**`, `+`, `%`, `~`), every method call and
  every filter is checked *before* it allocates (estimated result size, integer arguments)
  and its result after; the rendered output is capped while it streams; what a comparison or a
  hash would walk is checked before it runs (`reach`).
- Filters and string methods are allow-lists: those whose cost cannot be bounded from their
  arguments (`indent`, `wordwrap`, `center`, `expandtabs`, ...) are simply not there.
- Time: a render has a CPU budget (`RenderLimits.max_seconds`): the rendering thread's CPU time less
  the garbage collector's pauses, so that a busy machine, another thread holding the GIL or a
  collection of a big heap does not fail a render that costs a millisecond (it once stopped a GPU
  training run, BENCHMARKS.md). It is enforced two ways (`BoundedSandbox.render_bounded(traced=...)`):
  - *ticks* (always on, the hot path's only clock): the code generator puts a tick at the top of every
    loop body, and every call (macros, recursive `loop(...)`, methods, globals), intercepted operator and
    filter ticks too; every `TICKS_PER_CHECK` ticks the budget is read. That costs O(iterations + calls),
    not O(lines), and it is enough, because a template can only repeat work through loops and calls:
    between two ticks runs straight-line template code, at most as long as the template (64 KiB), whose
    every step is bounded by the size limits.
  - *a line trace* (`traced=True`): a per-thread `sys.settrace` hook also checks the budget every 64 lines
    of the template's own frames. It costs about four times the render itself; templates nobody has
    checked (editor drafts, a save's own check, files) keep it, and render in the killable worker
    process (genrec.templates.prompt_worker) besides.

Threat model. The adversary holds an admin key and writes any template text; the server's operators,
the run's catalogue and the request's history (items of that catalogue, up to `ServeLimits.max_history`)
are trusted as data but not as small: a history can be longer, and a title larger, than any the template
was checked on. Saving or activating a version renders it in the worker for sample users of the run
(genrec.templates.prompt_store.TemplateChecker), which refuses templates that fail, blow up or overrun
*there*; a checked version then renders in-process with ticks only (PromptTemplate.checked). The save
check cannot be the guard: a template can branch on the user, the history's length or an item's text,
so every limit above (output size, range size, values built, CPU budget) holds at request time for every
render, checked or not, and a breach is the request's `TemplateLimitExceeded` (a 4xx), never a hang or a
5xx. What neither clock can stop is one C-level operation that runs long by itself (the trace cannot
either: it fires between Python lines, and the GIL is held throughout, so the whole server stalls). The
size limits bound those that build (`*`, `join`, `format`, ...); comparisons and hashes are bounded by
`reach` (every operand of `==`, `<`, `in`, dict-literal keys, the comparing filters and tests, filter
arguments, methods of lists and dicts): a value that shares references, `[a, a]` nested forty deep, is
forty small lists and 2**40 steps to compare. Values that may be written into an error message (an index
not found, a filter or test name, a method's argument) are weighed like output. The worker's wall-clock
kill backs all of it up for templates never checked.

Knows nothing of recommendation; `genrec.templates.prompts` builds its templates on this environment.
"""

from __future__ import annotations

import gc
import re
import string
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import wraps
from types import FrameType
from typing import Any

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame, operators
from jinja2.runtime import Context, LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import Namespace, _PassArg

TEMPLATE_FILENAME = "<template>"
"""The filename Jinja gives code compiled from strings; the trace hook watches only these frames."""
TICKS_PER_CHECK = 64
"""Ticks (loop iterations, calls, intercepted operators, filters) between two readings of the CPU clock: a
reading costs about 0.6 µs, a tick about 0.1 µs."""


@dataclass(frozen=True)
class RenderLimits:
    max_seconds: float = 0.5
    """CPU-time budget of one render (the rendering thread's, garbage collection left out)."""
    max_chars: int = 65_536
    """Largest rendered prompt, and largest string or list a template may build on the way."""
    max_range: int = 10_000
    """Largest `range()` a template may ask for."""
    max_int_bits: int = 65_536
    """Largest integer a template may compute (bits): `*` and `**` are checked before they multiply."""


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


_FORMATTER = string.Formatter()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, list, tuple, dict, set, frozenset)) else 0


def weight(value: Any, budget: int) -> int:
    """Characters `value` takes once written out (`str()`, `~`, `join`, `tojson`, `%s`), counted only until
    past `budget`, so the count costs at most O(budget) whatever the value.

    Length is not enough: `['x' * 60000] * 60000` is a list of 60,000 references to one string, small in
    memory and in `length`, and 3.6 GB once serialised. Integers count their digits, so repeated squaring
    is seen too."""
    stack, total = [value], 0
    while stack and total <= budget:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, bool) or v is None:
            total += 5
        elif isinstance(v, int):
            total += v.bit_length() // 3 + 1
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 2 * len(v) + 2
            if total <= budget:
                stack.extend(v)
        elif isinstance(v, dict):
            total += 4 * len(v) + 2
            if total <= budget:
                stack.extend(v.keys())
                stack.extend(v.values())
        elif isinstance(v, Namespace):  # its repr shows its attributes
            stack.append(v._Namespace__attrs)  # type: ignore[attr-defined]
        else:
            total += 32  # numbers, undefined, loop and macro objects: short reprs
    return total


def reach(value: Any, budget: int) -> int:
    """Steps a comparison or a hash of `value` may take (`==`, `<`, `in`, a dict key, `sort`, `unique`): one per
    element reached, a container's elements counted once per path to them, a string one per 4 KiB; counted
    only until past `budget`.

    Size and weight are not enough here: `[a, a]` nested forty deep (a statement per level) is forty small
    lists, and compared with a copy built alike, or hashed as a tuple, it is 2**40 steps of C that no clock
    can interrupt, while the GIL is held. The check costs at most O(budget) steps, and nothing for scalars."""
    stack, total = [value], 0
    while stack and total <= budget:
        v = stack.pop()
        total += 1
        if isinstance(v, str):
            total += len(v) >> 12
        elif isinstance(v, (list, tuple, set, frozenset)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
    return total


_CONTAINERS = (list, tuple, set, frozenset, dict)

NAMING_FILTERS = {"attr", "map", "reject", "rejectattr", "select", "selectattr"}
"""Filters whose first argument names a filter, test or attribute: it is hashed and, when unknown, written into the
error message, so it is weighed."""
COMPARING_FILTERS = {
    "dictsort", "groupby", "max", "min", "reject", "rejectattr", "select", "selectattr", "sort", "unique",
}  # fmt: skip
"""Filters that compare or hash their input's elements (with each other, or with an argument): reach-checked."""


_PERCENT_SPEC = re.compile(r"%(?:\(([^)]*)\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?([a-zA-Z%])")
"""One conversion of printf-style formatting: (mapping key, width, precision, type)."""


SERIALISING_FILTERS = {
    "capitalize", "e", "escape", "join", "lower", "replace", "string", "striptags", "sum", "title",
    "tojson", "trim", "truncate", "upper", "wordcount",
}  # fmt: skip
"""Filters that write their input out as text (or, `sum`, concatenate its items): checked by weight first."""


def _tick_statement(lineno: int) -> nodes.ExprStmt:
    """`environment.tick()`, the statement the code generator puts first in every loop body. Jinja allows
    no new node types; the template parser never makes an EnvironmentAttribute, so this call is ours."""
    return nodes.ExprStmt(nodes.Call(nodes.EnvironmentAttribute("tick"), [], [], None, None), lineno=lineno)


class _Codegen(CodeGenerator):
    """Routes `~` and the buffers of macros, `{% set %}` blocks and `{% filter %}` blocks through the
    environment, so that their sizes are checked as they grow (the output cap sees only the top level), and
    ticks once per loop iteration (recursive loops included: each level's body is the same body)."""

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        node.body = [_tick_statement(node.lineno), *node.body]
        super().visit_For(node, frame)

    def visit_Call(self, node: nodes.Call, frame: Frame, forward_caller: bool = False) -> None:
        if isinstance(node.node, nodes.EnvironmentAttribute) and node.node.name == "tick":
            self.write("environment.tick()")  # not through the sandbox's call(): it is not the template's
            return
        super().visit_Call(node, frame, forward_caller=forward_caller)

    def visit_Compare(self, node: nodes.Compare, frame: Frame) -> None:
        """Every operand of `==`, `<`, `in`, ... through `environment.comparable` (see `reach`)."""
        self.write("(environment.comparable(")
        self.visit(node.expr, frame)
        self.write(")")
        for op in node.ops:
            self.write(f" {operators[op.op]} environment.comparable(")
            self.visit(op.expr, frame)
            self.write(")")
        self.write(")")

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        """A dict literal's keys are hashed: through `environment.comparable` too."""
        self.write("{")
        for idx, item in enumerate(node.items):
            if idx:
                self.write(", ")
            self.write("environment.comparable(")
            self.visit(item.key, frame)
            self.write("): ")
            self.visit(item.value, frame)
        self.write("}")

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def buffer(self, frame: Frame) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.output_buffer()")


class _BoundedBuffer(list[Any]):
    """An inner output buffer that refuses to grow past `limit` characters."""

    __slots__ = ("size",)
    limit = 0

    def append(self, item: Any) -> None:
        self._grow(len(item) if isinstance(item, str) else 0)
        super().append(item)

    def extend(self, items: Any) -> None:
        items = tuple(items)
        self._grow(sum(len(x) for x in items if isinstance(x, str)))
        super().extend(items)

    def _grow(self, n: int) -> None:
        self.size = getattr(self, "size", 0) + n
        if self.size > self.limit:
            raise TemplateLimitExceeded(f"a macro or block's output exceeds {self.limit} characters")


class _BoundedNamespace(Namespace):
    """`namespace()` whose attributes are size-checked as they are set (the usual loop accumulator)."""

    limit = 0

    def __setitem__(self, name: str, value: Any) -> None:
        limit = type(self).limit  # Namespace hides its own attributes from getattr
        if _size(value) > limit or weight(value, limit) > limit:
            raise TemplateLimitExceeded(f"namespace value {name!r} exceeds {limit} items/characters")
        super().__setitem__(name, value)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    code_generator_class = _Codegen
    intercepted_binops = frozenset({"*", "**", "+", "%", "//"})

    def __init__(self, limits: RenderLimits | None = None, **kwargs: Any) -> None:
        super().__init__(finalize=self._finalize_output, **kwargs)
        self.limits = limits or RenderLimits()
        self.filters = {name: self._guard(f) for name, f in self.filters.items() if name in SAFE_FILTERS}
        self.tests = {name: self._guard_test(f) for name, f in self.tests.items()}
        self.globals["range"] = self._range
        self.globals.pop("lipsum", None)  # generates text from integer arguments
        ns = type("namespace", (_BoundedNamespace,), {"limit": self.limits.max_chars})
        self.globals["namespace"] = ns
        self._buffer_class = type("buffer", (_BoundedBuffer,), {"limit": self.limits.max_chars})

    # -- size checks ---------------------------------------------------------------------------
    def check_size(self, value: Any, what: str) -> Any:
        if _size(value) > self.limits.max_chars:
            raise TemplateLimitExceeded(f"{what} would exceed {self.limits.max_chars} items/characters")
        return value

    def getitem(self, obj: Any, argument: Any) -> Any:
        """`obj[argument]`: a container or slice index is weighed first, since it is hashed and, when missing,
        written into the undefined value's message (`{}[key]`, `[][a:]`)."""
        if isinstance(argument, slice):
            self.check_weight((argument.start, argument.stop, argument.step), "an index")
        elif isinstance(argument, _CONTAINERS):
            self.check_weight(argument, "an index")
        return super().getitem(obj, argument)

    def comparable(self, value: Any) -> Any:
        """`value`, once it is known that comparing or hashing it is bounded (`reach`); scalars pass at once."""
        if isinstance(value, _CONTAINERS) and reach(value, self.limits.max_chars) > self.limits.max_chars:
            raise TemplateLimitExceeded(
                f"comparing or hashing a value of more than {self.limits.max_chars} elements"
            )
        return value

    def check_weight(self, value: Any, what: str) -> Any:
        """Refuse `value` before it is written out when its text would exceed the limit (see `weight`)."""
        if weight(value, self.limits.max_chars) > self.limits.max_chars:
            raise TemplateLimitExceeded(f"{what} would write more than {self.limits.max_chars} characters")
        return value

    def output_buffer(self) -> list[Any]:
        return self._buffer_class()  # type: ignore[no-any-return]

    def _finalize_output(self, value: Any) -> Any:
        """Every `{{ expression }}` before it is turned into text."""
        return value if isinstance(value, str) else self.check_weight(value, "output")

    def _check_args(self, what: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > self.limits.max_chars:
                raise TemplateLimitExceeded(f"{what}: argument {a} exceeds {self.limits.max_chars}")

    def bounded_concat(self, parts: tuple[Any, ...]) -> str:
        budget = self.limits.max_chars
        if sum(weight(p, budget) for p in parts) > budget:
            raise TemplateLimitExceeded(f"'~' would exceed {budget} characters")
        return "".join(str(p) for p in parts)

    def _range(self, *args: int) -> range:
        rng = range(*args)
        if len(rng) > self.limits.max_range:
            raise TemplateLimitExceeded(f"range of {len(rng)} exceeds {self.limits.max_range}")
        return rng

    def call_binop(self, context: Context, operator_: str, left: Any, right: Any) -> Any:
        self.tick()
        lim, bits = self.limits.max_chars, self.limits.max_int_bits
        ints = _is_int(left) and _is_int(right)
        if operator_ == "*" and ints:
            if left.bit_length() + right.bit_length() > bits:
                raise TemplateLimitExceeded(f"'*' would build an integer of more than {bits} bits")
        elif operator_ == "*":
            seq, n = (left, right) if _is_int(right) else (right, left)
            if _is_int(n) and weight(seq, lim) * max(n, 0) > lim:
                raise TemplateLimitExceeded(f"'*' would build more than {lim} items/characters")
        elif operator_ == "**" and ints:
            if right > bits or abs(left).bit_length() * max(right, 0) > bits:
                raise TemplateLimitExceeded(f"'**' would build an integer of more than {bits} bits")
        elif operator_ == "+" and not ints:
            if weight(left, lim) + weight(right, lim) > lim:
                raise TemplateLimitExceeded(f"'+' would build more than {lim} items/characters")
        elif operator_ == "%" and isinstance(left, str):
            self._precheck_percent(left, right)
        return self.binop_table[operator_](left, right)

    def _precheck_percent(self, fmt: str, args: Any) -> None:
        """`fmt % args` bounded before it runs: widths and precisions, written or taken from the arguments
        (`'%*s' % (600000000, 'a')`), and the text of the arguments each conversion may write."""
        lim = self.limits.max_chars
        positional = list(args) if isinstance(args, tuple) else [args]
        widest = weight(args, lim)  # any one conversion writes at most this much of the arguments
        total, k = len(fmt), 0
        for m in _PERCENT_SPEC.finditer(fmt):
            for part in (m.group(2), m.group(3)):
                if part == "*":
                    width = positional[k] if k < len(positional) else 0
                    k += 1
                    total += abs(width) if _is_int(width) else 0
                elif part:
                    total += int(part) if len(part) < 12 else lim + 1
            k += m.group(4) != "%" and m.group(1) is None
            total += widest
            if total > lim:
                raise TemplateLimitExceeded(f"'%' formatting would write more than {lim} characters")

    def _precheck_format(self, fmt: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """`str.format` bounded the same way; a width taken from an argument (`{:{}}`) is refused."""
        lim = self.limits.max_chars
        widest = weight(args, lim) + weight(kwargs, lim)
        total = len(fmt)
        try:
            fields = list(_FORMATTER.parse(fmt))
        except ValueError:
            return  # str.format raises the same error itself, before it writes anything
        for _, field, spec, _ in fields:
            if field is None:
                continue
            if spec and "{" in spec:
                raise TemplateLimitExceeded("format(): a width or precision taken from an argument")
            total += widest + sum(int(d) if len(d) < 12 else lim + 1 for d in re.findall(r"\d+", spec or ""))
            if total > lim:
                raise TemplateLimitExceeded(f"format() would write more than {lim} characters")

    # -- calls -----------------------------------------------------------------------------------
    def is_safe_callable(self, obj: Any) -> bool:
        if not super().is_safe_callable(obj):
            return False
        owner = getattr(obj, "__self__", None)
        if isinstance(owner, str):
            return getattr(obj, "__name__", "") in SAFE_STR_METHODS
        return True

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        __self.tick()
        name = getattr(__obj, "__name__", "callable")
        if not __self.is_safe_callable(__obj):
            raise SecurityError(f"calling {name!r} is not allowed in templates")
        if name not in ("format", "format_map"):  # their integers are values; widths are checked below
            __self._check_args(name, args, kwargs)
        owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
        if isinstance(owner, str):
            __self._precheck_str_method(owner, name, args, kwargs)
        elif isinstance(owner, (*_CONTAINERS, LoopContext)):  # `count`, `index`, `get`, `loop.changed`
            __self.comparable(owner)  # compare what they hold with the arguments
            for a in (*args, *kwargs.values()):  # and write what they did not find into the error
                if isinstance(a, _CONTAINERS):
                    __self.check_weight(a, f"{name}()")
        return __self.check_size(__context.call(__obj, *args, **kwargs), f"{name}()")

    def _precheck_str_method(self, s: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if name == "format":
            self._precheck_format(s, args, kwargs)
        if name == "format_map":
            self._precheck_format(s, (), args[0] if args and isinstance(args[0], dict) else {})
        if name == "replace" and len(args) >= 2:
            self._precheck_replace(s, args[0], args[1])
        if name == "join" and args:
            items = list(args[0])
            self.check_size(items, "join()")
            if len(s) * len(items) + weight(items, self.limits.max_chars) > self.limits.max_chars:
                raise TemplateLimitExceeded(f"join() would exceed {self.limits.max_chars} characters")

    def _precheck_replace(self, s: Any, old: Any, new: Any) -> None:
        if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
            count = len(s) + 1 if old == "" else s.count(old)
            if len(s) + count * (len(new) - len(old)) > self.limits.max_chars:
                raise TemplateLimitExceeded(f"replace() would exceed {self.limits.max_chars} characters")

    def _guard(self, f: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap a filter: integer arguments and the result are size-checked; filters that write their input
        out are weighed first (SERIALISING_FILTERS); `join`/`replace` pre-checked."""
        name = getattr(f, "__name__", "filter")
        first_param = 2 if _PassArg.from_obj(f) is not None else 1  # skip (context,) and the input value
        serialises = name.removeprefix("do_") in SERIALISING_FILTERS
        compares = name.removeprefix("do_") in COMPARING_FILTERS
        names = name.removeprefix("do_") in NAMING_FILTERS

        @wraps(f)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            self.tick()
            self._check_args(f"filter {name}", args[first_param:], kwargs)
            if serialises and len(args) >= first_param:
                self.check_weight(args[first_param - 1], f"filter {name}")
            for a in (*args[first_param:], *kwargs.values()):  # an argument may be hashed (a lookup, a set)
                if isinstance(a, _CONTAINERS):
                    self.comparable(a)
            if names and len(args) > first_param:
                self.check_weight(args[first_param], f"filter {name}")
            if compares and len(args) >= first_param:
                value = args[first_param - 1]
                if not isinstance(value, (str, *_CONTAINERS)):  # a generator (`map`, `select`): its elements
                    value = list(value)
                    args = (*args[: first_param - 1], value, *args[first_param:])
                for a in (value, *args[first_param:], *kwargs.values()):
                    self.comparable(a)
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

    def _guard_test(self, f: Any) -> Callable[..., bool]:
        """Wrap a test (`is in`, `is eq`, ...): its container arguments reach-checked, as a comparison's."""

        @wraps(f)
        def guarded(*args: Any, **kwargs: Any) -> bool:
            for a in (*args, *kwargs.values()):
                if isinstance(a, _CONTAINERS):
                    self.comparable(a)
            return f(*args, **kwargs)

        return guarded

    # -- rendering -------------------------------------------------------------------------------
    @staticmethod
    def tick() -> None:
        """One step of a render (a loop iteration, a call, an operator, a filter): every TICKS_PER_CHECK
        steps, stop the render once it is past its CPU budget. Outside a bounded render, nothing."""
        budget: _Budget | None = getattr(_render, "budget", None)
        if budget is not None:
            budget.left -= 1
            if budget.left <= 0:
                budget.check()

    def render_bounded(self, chunks: Callable[[], Iterator[str]], *, traced: bool = True) -> str:
        """Join a template's output stream under the time and size limits. `traced`: check the time at
        every 64 lines of the template's frames too (a `sys.settrace` hook, about 4x the render's cost),
        for templates not checked yet; False: by ticks alone, for checked templates (the module's docstring)."""
        budget = _Budget(self.limits.max_seconds)
        outer = getattr(_render, "budget", None)  # a render inside a helper of another render
        _render.budget = budget
        try:
            if not traced:
                return self._join(chunks)
            with _line_trace(budget):
                return self._join(chunks)
        finally:
            _render.budget = outer

    def _join(self, chunks: Callable[[], Iterator[str]]) -> str:
        out: list[str] = []
        size = 0
        for chunk in chunks():
            size += len(chunk)
            if size > self.limits.max_chars:
                raise TemplateLimitExceeded(f"output exceeds {self.limits.max_chars} characters")
            out.append(chunk)
        return "".join(out)


_render = threading.local()
"""`budget`: the _Budget of the render running in this thread (None: none)."""


class _Budget:
    """One render's CPU budget: this thread's CPU time since the render started, less the garbage
    collector's share of it (_gc_seconds)."""

    __slots__ = ("gc_start", "left", "seconds", "start")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.gc_start = _gc_seconds()
        self.start = time.thread_time()
        self.left = TICKS_PER_CHECK  # ticks until the clock is read again

    def spent(self) -> float:
        return time.thread_time() - self.start - (_gc_seconds() - self.gc_start)

    def check(self) -> None:
        self.left = TICKS_PER_CHECK
        if self.spent() > self.seconds:
            raise TemplateLimitExceeded(f"rendering took longer than {self.seconds:g} s of CPU time")


_gc_clock = threading.local()
"""`spent`: CPU seconds the garbage collector has taken in this thread; `began`: when the running one began."""
_gc_installed = False
_gc_install_lock = threading.Lock()


def _on_gc(
    phase: str, info: dict[str, int], _clock: Callable[[], float] = time.thread_time, _at: Any = _gc_clock
) -> None:
    # bound as defaults: a collection during interpreter shutdown may run after module globals are cleared
    if phase == "start":
        _at.began = _clock()
        return
    began = getattr(_at, "began", None)
    if began is not None:
        _at.spent = getattr(_at, "spent", 0.0) + _clock() - began
        _at.began = None


def _gc_seconds() -> float:
    """CPU seconds the collector has taken in this thread since the first bounded render: a callback in
    `gc.callbacks` from then on (two clock readings per collection), rather than one added and removed
    around every render."""
    global _gc_installed
    if not _gc_installed:
        with _gc_install_lock:
            if not _gc_installed:
                gc.callbacks.append(_on_gc)
                _gc_installed = True
    spent: float = getattr(_gc_clock, "spent", 0.0)
    return spent


@contextmanager
def _line_trace(budget: _Budget) -> Iterator[None]:
    """Check `budget` every 64 lines run in the template's own frames (loops, macros, recursion)."""
    lines = 0

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal lines
        lines += 1
        if lines % 64 == 0:
            budget.check()
        return local

    def global_(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename == TEMPLATE_FILENAME else None

    previous = sys.gettrace()
    sys.settrace(global_)
    try:
        yield
    finally:
        sys.settrace(previous)
