import pytest

from genrec.ids import atomic_ids
from genrec.templates.prompts import (
    PromptBuilder,
    TemplateProblem,
    load_template,
    parse_template,
    template_path,
)


def builder(small_data, text, **kw):
    t = parse_template(text, source="t.jinja")
    return PromptBuilder(
        t,
        small_data.catalog,
        atomic_ids(len(small_data.catalog)),
        max_history=kw.get("max_history", 3),
        title_words=kw.get("title_words", 2),
    )


def test_default_template_renders_history_most_recent_last(small_data):
    t = load_template("default")
    b = PromptBuilder(
        t, small_data.catalog, atomic_ids(len(small_data.catalog)), max_history=3, title_words=2
    )
    seq = small_data.sequences[0]
    msgs = b.messages(seq, "u")
    assert [m["role"] for m in msgs] == ["system", "user"]
    lines = [ln for ln in msgs[1]["content"].splitlines() if ln.startswith("<item_")]
    assert [ln.split()[0] for ln in lines] == [f"<item_{i}>" for i in seq[-3:]]  # truncated, oldest first
    assert all(len(ln.split()) == 3 for ln in lines)  # ID + 2 title words
    assert b.target(seq[-1]) == f"<item_{seq[-1]}>"
    assert len(t.hash) == 16 and t.name == "default"


def test_all_shipped_templates_render(small_data):
    for path in template_path("default").parent.glob("*.jinja"):
        b = builder(small_data, path.read_text())
        assert b.messages(small_data.sequences[1])[-1]["content"]


def test_syntax_error_names_file_and_line():
    with pytest.raises(TemplateProblem, match=r"t.jinja: line 5, column 4: Unexpected end of template"):
        parse_template("---\nname: x\n---\nok\n{% for i in history %}\n", source="t.jinja")


def test_undefined_variable_is_an_error(small_data):
    b = builder(small_data, "{{ nope }}")
    with pytest.raises(TemplateProblem, match="'nope' is undefined"):
        b.messages([0, 1])


def test_front_matter_checks():
    with pytest.raises(TemplateProblem, match="no closing"):
        parse_template("---\nname: x\n", source="t.jinja")
    with pytest.raises(TemplateProblem, match=r"unknown front-matter key\(s\) \['colour'\]"):
        parse_template("---\ncolour: red\n---\nhi", source="t.jinja")
    with pytest.raises(TemplateProblem, match=r"unknown variable\(s\) \['secrets'\]"):
        parse_template("---\nvariables: [secrets]\n---\nhi", source="t.jinja")


@pytest.mark.parametrize(
    "payload",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ history.__class__.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    ],
)
def test_sandbox_refuses_escapes(small_data, payload):
    b = builder(small_data, payload)
    with pytest.raises(TemplateProblem):
        b.messages([0, 1])


def test_template_names_cannot_traverse():
    with pytest.raises(TemplateProblem, match="invalid template name"):
        load_template("../../etc/passwd")
    with pytest.raises(TemplateProblem, match="not found"):
        load_template("missing_template")


def test_a_plain_system_message_is_kept_as_text_and_reads_as_its_render():
    """A system message without Jinja syntax is not rendered per prompt (constant text); what it gives is what the
    render gives, for the shipped templates and for odd whitespace. One with syntax still renders."""
    import json

    from genrec.templates.prompts import PROMPTS_DIR

    systems = [parse_template(f.read_text()).system for f in sorted(PROMPTS_DIR.glob("*.jinja"))]
    odd = ["  a\n\n", "a\tb ", "x\n", "tabs\t\tand  spaces", "unicode — ü"]
    for system in [s for s in systems if s] + odd:
        t = parse_template(f"---\nsystem: {json.dumps(system)}\n---\nbody")  # YAML reads JSON's escapes
        assert (
            t.system == system
            and t._system_text is not None
            and t._system_text == t._render(t._system, {}, True)
        ), system
    t = parse_template("---\nsystem: 'hi {{ user }}'\n---\nbody")
    assert t._system_text is None and t.render({"user": "u"})[0]["content"] == "hi u"
