"""Hostile templates: every one is refused or bounded in time and size, never runs code or hangs."""

import time

import pytest

from genrec.ids import atomic_ids
from genrec.templates.prompts import PromptBuilder, TemplateProblem, parse_template
from genrec.templates.sandbox import RenderLimits

HOSTILE = {
    # sandbox escapes / SSTI
    "mro": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "globals": "{{ history.__class__.__init__.__globals__ }}",
    "cycler_os": "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "joiner_os": "{{ joiner.__init__.__globals__['os'] }}",
    "self_module": "{{ self._TemplateReference__context.environment }}",
    "attr_filter": "{{ history | attr('__class__') }}",
    "format_escape": "{{ '{0.__class__.__mro__}'.format('') }}",
    "lipsum_globals": "{{ lipsum.__globals__ }}",
    "request_config": "{{ config.items() }}",
    # mutation of the caller's data
    "mutate_list": "{% set _ = history.append(1) %}x",
    "mutate_dict": "{% set _ = history[0].update({'sid': 'x'}) %}x",
    # time
    "nested_loops": "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
    "loop_over_string": "{% for a in 'x' * 60000 %}{% for b in 'x' * 60000 %}{% endfor %}{% endfor %}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "recursive_loop": "{% for x in [[1]] recursive %}{{ loop([x]) }}{% endfor %}",
    "huge_range": "{% for i in range(10 ** 9) %}{% endfor %}",
    # size
    "str_mul": "{{ 'x' * 10 ** 9 }}",
    "list_mul": "{{ [1] * 10 ** 8 }}",
    "pow_bomb": "{{ 7 ** 100000000 }}",
    "concat_doubling": "{% macro d(s, n) %}{{ d(s ~ s, n - 1) if n else s }}{% endmacro %}{{ d('ab', 40) }}",
    "namespace_doubling": (
        "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
    ),
    "plus_doubling": "{% macro d(s, n) %}{{ d(s + s, n - 1) if n else s }}{% endmacro %}{{ d('ab', 40) }}",
    "center": "{{ 'x'.center(10 ** 9) }}",
    "ljust": "{{ 'x'.ljust(10 ** 9) }}",
    "expandtabs": "{{ ('\t' * 1000).expandtabs(60000) }}",
    "format_width": "{{ '{:>999999999}'.format(1) }}",
    "percent_width": "{{ '%999999999s' % 1 }}",
    "replace_empty": "{{ ('x' * 1000).replace('', 'y' * 1000) }}",
    "replace_filter": "{{ ('x' * 1000) | replace('', 'y' * 1000) }}",
    "join_sep": "{{ range(10000) | join('y' * 10000) }}",
    "indent_filter": "{{ ('\n' * 60000) | indent(60000) }}",
    "wordwrap_filter": "{{ 'x' | wordwrap(10) }}",
    "output_flood": "{% for i in range(10000) %}{{ 'x' * 1000 }}{% endfor %}",
}
BIG_LIST = "(['x' * 60000] * 60000)"
"""60,000 references to one 60,000-character string: small in memory and in length, 3.6 GB written out."""
RESOURCE_BOMBS = {
    # widths and precisions taken from the arguments, not written in the format string
    "percent_star_width": "{{ ('%*s' % (600000000, 'a')) | length }}",
    "percent_star_precision": "{{ '%.*f' % (600000000, 1.5) }}",
    "percent_many_fields": "{{ ('%s' * 30000) % ((('y' * 60000),) * 30000) }}",
    "format_nested_width": "{{ '{:{}}'.format('a', 600000000) }}",
    "format_map_width": "{{ '{a:>999999999}'.format_map({'a': 1}) }}",
    "format_repeated_field": "{{ ('{0}' * 30000).format('y' * 60000) }}",
    # a list repeated, then joined, concatenated or serialised
    "list_join_filter": "{{ " + BIG_LIST + " | join }}",
    "list_join_method": "{{ ''.join(" + BIG_LIST + ") }}",
    "list_tilde": "{{ " + BIG_LIST + " ~ 'a' }}",
    "list_tojson": "{{ " + BIG_LIST + " | tojson }}",
    "list_string": "{{ " + BIG_LIST + " | string | length }}",
    "list_output": "{{ " + BIG_LIST + " }}",
    "list_percent": "{{ '%s' % (" + BIG_LIST + ",) }}",
    "list_format": "{{ '{}'.format(" + BIG_LIST + ") }}",
    "list_upper": "{{ " + BIG_LIST + " | upper }}",
    "list_plus_doubling": (
        "{% set ns = namespace(l=['x' * 60000]) %}{% for i in range(20) %}{% set ns.l = ns.l + ns.l %}"
        "{% endfor %}{{ ns.l | length }}"
    ),
    "list_sum": "{{ ([['x'] * 60000] * 60000) | sum(start=[]) | length }}",
    "namespace_output": "{% set ns = namespace(a='x' * 60000, b='y' * 60000) %}{{ ns }}",
    # integer powers and products in a loop
    "int_square_loop": (
        "{% set ns = namespace(x=7) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}{{ ns.x > 0 }}"
    ),
    "int_pow_loop": (
        "{% set ns = namespace(x=7) %}{% for i in range(40) %}{% set ns.x = ns.x ** 2 %}{% endfor %}{{ ns.x > 0 }}"
    ),
    # output kept in inner buffers, which the output cap of the top level does not see
    "macro_buffer": "{% macro m() %}{% for i in range(10000) %}{{ 'x' * 60000 }}{% endfor %}{% endmacro %}{{ m() | length }}",
    "set_block": "{% set x %}{% for i in range(10000) %}{{ 'x' * 60000 }}{% endfor %}{% endset %}{{ x | length }}",
    "filter_block": "{% filter length %}{% for i in range(10000) %}{{ 'x' * 60000 }}{% endfor %}{% endfilter %}",
    # front matter: a billion laughs in YAML, and values of the wrong type
    "yaml_aliases": "---\na: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']\n"
    + "".join(f"{c}: &{c} [{','.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
    + "---\nx",
    "front_variables_int": "---\nvariables: 5\n---\nx",
    "front_variables_nested": "---\nvariables: [[history]]\n---\nx",
    "front_system_list": "---\nsystem: [a, b]\n---\nx",
    "front_system_mapping": "---\nsystem: {a: 1}\n---\nx",
}
HOSTILE.update(RESOURCE_BOMBS)


def _shared(kind: str = "[]", depth: int = 40) -> str:
    """`a` and `b`: two equal values built alike, each level a list (or tuple) holding the level below twice: 80
    small statements, 2**40 elements reached by a comparison or a hash."""
    wrap = "({0}, {0})" if kind == "()" else "[{0}, {0}]"
    levels = "".join(
        f"{{% set a{k} = {wrap.format(f'a{k - 1}')} %}}{{% set b{k} = {wrap.format(f'b{k - 1}')} %}}"
        for k in range(1, depth + 1)
    )
    first = (
        "{% set a0 = (1,) %}{% set b0 = (1,) %}" if kind == "()" else "{% set a0 = [1] %}{% set b0 = [1] %}"
    )
    return first + levels


def _shared_pair(kind: str = "[]") -> str:
    return _shared(kind) + "{% set a = a40 %}{% set b = b40 %}"


SHARED_REFERENCES = {
    # a comparison or a hash walks every path through shared references, in C, with the GIL held: no clock
    # (trace or ticks) can stop it, so it must be refused before it starts (sandbox.reach)
    "shared_equal": _shared_pair() + "{{ a == b }}",
    "shared_less": _shared_pair() + "{{ a < b }}",
    "shared_in": _shared_pair() + "{{ a in [b] }}",
    "shared_dict_key": _shared_pair("()") + "{{ {a: 1} | length }}",
    "shared_dict_in": _shared_pair("()") + "{{ a in {b: 1} }}",
    "shared_unique": _shared_pair("()") + "{{ [a, b] | unique | list | length }}",
    "shared_sort": _shared_pair() + "{{ [a, b] | sort | length }}",
    "shared_sort_generator": _shared_pair() + "{{ [a, b] | map('list') | sort | length }}",
    "shared_max": _shared_pair() + "{{ [a, b] | max | length }}",
    "shared_select": _shared_pair() + "{{ [a] | select('in', [b]) | list | length }}",
    "shared_test": _shared_pair() + "{{ a is in [b] }}",
    "shared_method": _shared_pair() + "{{ [a].count(b) }}",
    "shared_loop_changed": _shared_pair() + "{% for x in [a, b] %}{{ loop.changed(x) }}{% endfor %}",
    # an index or a name: hashed, and written out (repr) into the error when it is not found
    "shared_index_missing": _shared_pair() + "{{ [][a] }}",
    "shared_index_hashed": _shared_pair("()") + "{{ {}[a] }}",
    "shared_slice": _shared_pair() + "{{ [][a:] }}",
    "shared_filter_name": _shared_pair("()") + "{{ [1] | map(a) | list }}",
    "shared_test_name": _shared_pair("()") + "{{ [1] | select(a) | list }}",
    "shared_attr_name": _shared_pair("()") + "{{ 1 | attr(a) }}",
    "shared_method_missing": _shared_pair() + "{{ [1].index(a) }}",
}
HOSTILE.update(SHARED_REFERENCES)


@pytest.fixture(scope="module")
def ids(small_data):
    return atomic_ids(len(small_data.catalog))


CHECKED = pytest.mark.parametrize("checked", [False, True], ids=["traced", "checked"])
"""Both ways a render is timed: under the line trace, and by ticks alone (a checked template, the hot path): a
template that passed the save check can still meet a user it was not checked on, so every bound must hold there."""


def parse(text: str, *, checked: bool, **kwargs):  # type: ignore[no-untyped-def]
    t = parse_template(text, **kwargs)
    t.checked = checked
    return t


@CHECKED
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_template_is_refused_quickly(small_data, ids, name, checked):
    limits = RenderLimits(max_seconds=0.5, max_chars=65_536)
    start = time.monotonic()
    with pytest.raises(TemplateProblem) as err:
        t = parse(HOSTILE[name], source=f"{name}.jinja", limits=limits, checked=checked)
        PromptBuilder(t, small_data.catalog, ids, max_history=5, title_words=2).messages([0, 1, 2])
    assert time.monotonic() - start < 5.0, f"{name} was not stopped in time"
    assert f"{name}.jinja" in str(err.value)  # names the file


@CHECKED
@pytest.mark.parametrize("name", sorted(RESOURCE_BOMBS))
def test_resource_bombs_are_refused_before_they_allocate(small_data, ids, name, checked):
    """Each family the outside probe found (issue 29) is refused within 1 s having allocated under 64 MiB:
    the checks run before the allocation, not after it."""
    import tracemalloc

    tracemalloc.start()
    try:
        start = time.monotonic()
        with pytest.raises(TemplateProblem) as err:
            t = parse(RESOURCE_BOMBS[name], source=f"{name}.jinja", checked=checked)
            PromptBuilder(t, small_data.catalog, ids, max_history=5, title_words=2).messages([0, 1, 2])
        took = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert took < 1.0, f"{name} took {took:.2f} s"
    assert peak < 64 * 2**20, f"{name} allocated {peak / 2**20:.0f} MiB before it was refused"
    assert err.value.line is not None, str(err.value)  # located in the file


def test_history_is_not_mutated_and_limits_leave_normal_templates_alone(small_data, ids):
    text = (
        "{% set ns = namespace(n=0) %}{% for it in history | recent(2) %}{% set ns.n = ns.n + 1 %}"
        "{{ it | format_item(1) }}{{ '|' ~ loop.index }}\n{% endfor %}{{ ns.n }} {{ '%05d' % 7 }} "
        "{{ '{:>4}'.format(user) }} {{ range(3) | join(',') }} {{ 'ab'.replace('a', 'c') }}"
        "\n{{ history[0] in history }} {{ history | sort(attribute='title') | length }} {{ 2 < 3 <= 3 }} "
        "{{ {(1, 2): 'x'}[(1, 2)] }} {{ history | map(attribute='sid') | unique | list | length }}"
    )
    b = PromptBuilder(parse_template(text), small_data.catalog, ids, max_history=5, title_words=2)
    out = b.messages([0, 1, 2], "u1")[-1]["content"]
    lines = out.splitlines()
    assert lines[0].startswith("<item_1> ") and lines[0].endswith("|1")
    assert lines[1].startswith("<item_2> ")
    assert lines[2] == "2 00007   u1 0,1,2 cb"
    assert lines[3] == "True 3 True x 3"


def test_time_limit_applies_per_render_and_releases_the_trace_hook(small_data, ids):
    import sys

    t = parse_template(HOSTILE["nested_loops"], limits=RenderLimits(max_seconds=0.2))
    b = PromptBuilder(t, small_data.catalog, ids, max_history=5, title_words=2)
    with pytest.raises(TemplateProblem, match=r"longer than 0.2 s"):
        b.messages([0])
    assert sys.gettrace() is None or "genrec" not in repr(sys.gettrace())


def test_runtime_error_names_line_and_column(small_data, ids):
    text = "---\nname: x\n---\nfirst line\n  {{ history[0].nope }}\n"
    b = PromptBuilder(
        parse_template(text, source="x.jinja"), small_data.catalog, ids, max_history=5, title_words=2
    )
    with pytest.raises(TemplateProblem) as err:
        b.messages([0])
    assert err.value.line == 5 and err.value.column == 17
    assert "x.jinja: line 5, column 17" in str(err.value)


def test_yaml_error_in_front_matter_has_a_line():
    with pytest.raises(TemplateProblem) as err:
        parse_template("---\nname: x\ndescription: [unclosed\n---\nbody", source="y.jinja")
    assert err.value.line is not None and err.value.line >= 3


def _sandbox(budget: float, **helpers):
    from genrec.templates.sandbox import BoundedSandbox

    env = BoundedSandbox(RenderLimits(max_seconds=budget))
    env.globals.update(helpers)
    return env


@pytest.mark.parametrize("traced", [True, False])
def test_time_limit_counts_the_renders_cpu_not_waiting(traced):
    """A render that waits (descheduled, GIL held elsewhere: here a sleep in a helper) without spending CPU
    is not cut off; one that spends the CPU still is."""
    env = _sandbox(0.05, nap=lambda: time.sleep(0.3) or "")
    t = env.from_string("{{ nap() }}{% for i in range(300) %}{{ i }}{% endfor %}")
    start = time.monotonic()
    out = env.render_bounded(lambda: t.generate(), traced=traced)
    assert time.monotonic() - start >= 0.3 and out.endswith("299")
    spin = env.from_string("{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}")
    with pytest.raises(Exception, match="longer than 0.05 s of CPU time"):
        env.render_bounded(lambda: spin.generate(), traced=traced)


@pytest.mark.parametrize("traced", [True, False])
def test_time_limit_leaves_out_garbage_collection(traced):
    """A collection of a big heap that happens to run inside a render is not the template's cost."""
    import gc

    heap = [[i] for i in range(1_000_000)]  # tracked containers make a full collection slow
    t0 = time.thread_time()
    gc.collect()
    pause = time.thread_time() - t0
    assert pause > 0.01, "the heap is too small to test with"
    env = _sandbox(pause / 4, collect=lambda: [gc.collect() for _ in range(2)] and "")
    t = env.from_string("{{ collect() }}{% for i in range(300) %}{{ i }}{% endfor %}")
    assert env.render_bounded(lambda: t.generate(), traced=traced).endswith("299")
    del heap


def test_a_checked_template_renders_without_the_line_trace(small_data, ids, monkeypatch):
    """The hot path's cost: a checked template renders with no trace hook installed (a helper called from the
    template sees none) and never enters the trace's context; an unchecked one still does."""
    import sys

    from genrec.templates import sandbox

    env = _sandbox(0.5, probe=lambda: "traced" if sys.gettrace() is not None else "untraced")
    t = env.from_string("{{ probe() }}")
    assert env.render_bounded(lambda: t.generate(), traced=False) == "untraced"
    assert env.render_bounded(lambda: t.generate(), traced=True) == "traced"

    traces = []
    real = sandbox._line_trace
    monkeypatch.setattr(sandbox, "_line_trace", lambda budget: traces.append(budget) or real(budget))
    text = "{% for it in history %}{{ it | format_item(2) }}\n{% endfor %}{{ user }}"
    fast = parse(text, checked=True)
    slow = parse(text, checked=False)
    b_fast, b_slow = (
        PromptBuilder(t, small_data.catalog, ids, max_history=5, title_words=2) for t in (fast, slow)
    )
    assert b_fast.messages([0, 1, 2], "u") == b_slow.messages([0, 1, 2], "u")
    assert len(traces) == 1  # the unchecked template's render only


@CHECKED
def test_a_template_fine_on_short_histories_is_bounded_on_long_ones_and_huge_titles(small_data, ids, checked):
    """What the save check cannot see: the same template, harmless for the sample users' short histories and
    short titles, meets a long history (nested loops over it) or a huge title (its output): still refused,
    quickly, at render time."""
    nested = parse(
        "{% for a in history %}{% for b in history %}{% for c in history %}{% for d in history %}"
        "{% endfor %}{% endfor %}{% endfor %}{% endfor %}{{ history | length }}",
        source="nested.jinja",
        limits=RenderLimits(max_seconds=0.2),
        checked=checked,
    )
    builder = PromptBuilder(nested, small_data.catalog, ids, max_history=500, title_words=2)
    assert builder.messages([0, 1, 2])[-1]["content"] == "3"
    n_items = len(small_data.catalog)
    start = time.monotonic()
    with pytest.raises(TemplateProblem, match=r"nested.jinja: line 1.*longer than 0.2 s"):
        builder.messages([k % n_items for k in range(500)])  # 500**4 iterations
    assert time.monotonic() - start < 2.0

    titles = parse(
        "{% for it in history %}{{ it.title }}\n{% endfor %}", source="titles.jinja", checked=checked
    )
    variables = builder.variables([0, 1])
    assert titles.render(variables)[-1]["content"].count("\n") == 1
    for it in variables["history"]:
        it["title"] = "t" * 40_000  # a catalogue whose titles are larger than the prompt may be
    with pytest.raises(TemplateProblem, match="titles.jinja: output exceeds 65536"):
        titles.render(variables)


# -- the render worker: the backstop for whatever the sandbox's checks miss ------------------------
@pytest.fixture(scope="module")
def worker():
    from genrec.templates.prompt_worker import IsolationLimits, RenderWorker

    w = RenderWorker(IsolationLimits(seconds_per_render=1.0, memory_mb=64))
    yield w
    w.close()


VARS = {"history": [], "user": "u", "max_history": 5, "title_words": 2, "n_history_total": 0}


def test_render_worker_renders_like_the_process_and_names_the_failing_set(worker):
    t = parse_template("---\nsystem: be brief\n---\nhi {{ user }}", source="w.jinja")
    assert worker.render(t, [VARS, {**VARS, "user": "v"}]) == [
        t.render(VARS),
        t.render({**VARS, "user": "v"}),
    ]
    bad = parse_template("{{ history[0].title }}", source="bad.jinja")
    with pytest.raises(TemplateProblem, match="bad.jinja: line 1") as err:
        worker.render(bad, [{**VARS, "history": [{"title": "a"}]}, VARS])
    assert err.value.index == 1


def test_render_worker_stops_a_render_past_its_memory_or_time(worker):
    """With the sandbox's own size and CPU limits switched off, the worker still holds: an allocation past
    its 64 MiB fails there (MemoryError, reported), and a render past its wall-clock limit is killed."""
    import os

    huge = parse_template(
        "{{ ('x' * 10 ** 9) | length }}", source="m.jinja", limits=RenderLimits(max_chars=10**10)
    )
    with pytest.raises(TemplateProblem, match="needs more than 64 MiB"):
        worker.render(huge, [VARS])
    spin = parse_template(
        HOSTILE["nested_loops"], source="t.jinja", limits=RenderLimits(max_seconds=1000, max_range=10**9)
    )
    pid, kills, start = worker._proc.pid, worker.kills, time.monotonic()
    with pytest.raises(TemplateProblem, match="longer than 1 s and was stopped"):
        worker.render(spin, [VARS])
    assert time.monotonic() - start < 3.0 and worker.kills == kills + 1
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone
    start = time.monotonic()  # the spare, started ahead, takes over: no wait for a process to import
    assert worker.render(parse_template("ok"), [VARS]) == [[{"role": "user", "content": "ok"}]]
    assert time.monotonic() - start < 1.0
