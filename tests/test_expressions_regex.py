"""Regular expressions in expressions (lang/regex_functions.py): yaql's regex functions
give the results they gave under Python's ``re``, and no pattern can hold the engine.

The reference is yaql's own standard library, evaluated here on the side: each case must
give the same value, or fail with the same message.
"""

from __future__ import annotations

import collections.abc  # noqa: F401  # yaql 3.2 needs it imported: keep this first
import re
import time
import warnings
from typing import Any

import pytest
import yaql
from hypothesis import given, settings
from hypothesis import strategies as st

from levante.client import Client
from levante.errors import ExpressionError
from levante.lang import expressions as expr_module
from levante.lang import regex_functions
from levante.lang.expressions import evaluate

# -- the same results as yaql's own functions ---------------------------------------------

SAME_AS_YAQL = [
    # operators, with a pattern string or a compiled pattern
    r"'abc' =~ 'a.c'",
    r"'abc' =~ 'A.C'",
    r"'abc' !~ 'a.c'",
    r"'acb' !~ regex('a.c')",
    r"'abc' =~ regex('a.c')",
    r"'abc' =~ regex('A.C', ignoreCase => true)",
    r"'a12' =~ '\d+$'",
    # matches, both ways round, and the flags
    r"regex('a.c').matches('abc')",
    r"regex('A.c').matches('abc')",
    r"'abc'.matches('a.c')",
    r"'abc'.matches('^b')",
    r"regex('^b', multiLine => true).matches('a\nb')",
    r"regex('^b').matches('a\nb')",
    r"regex('a.b', dotAll => true).matches('a\nb')",
    r"regex('a.b').matches('a\nb')",
    # search and searchAll, with and without a selector
    r"regex('a.c').search('cabc')",
    r"regex('a.c').search('cabc', $)",
    r"regex('a.c').search('cabc', $.start)",
    r"regex('x').search('abc')",
    r"regex('(a)(b)?').search('ac', [$1, $2, $3])",
    r"regex('a.c').searchAll('abcadc')",
    r"regex('a.c').searchAll('abcadc', $)",
    r"regex('a(.)c').searchAll('abcadc', $2.value)",
    r"regex('x*').searchAll('axbc', [$.start, $.end])",
    r"regex('a.c').searchAll('xyz')",
    # split
    r"regex('a.').split('abcadc')",
    r"regex('a.').split('abcadc', maxSplit => 1)",
    r"'abcadc'.split(regex('a.'))",
    r"'abcadc'.split(regex('a.'), maxSplit => 1)",
    r"regex('(\d+)').split('a1b22c')",
    r"regex('x*').split('axbc')",
    r"regex('a').split('bab', -1)",
    # replace (a template) and replaceBy (a lambda)
    r"regex('a.').replace('abcadc', 'xx')",
    r"regex('a.').replace('abcadc', 'xx', count => 1)",
    r"'abcadc'.replace(regex('a.'), 'xx')",
    r"regex('(a)(.)').replace('abcadc', '\\2\\1')",
    r"regex('(?P<x>a)').replace('abc', '[\\g<x>]')",
    r"regex('x*').replace('abc', '-')",
    r"regex('a.c').replaceBy('abcadc', switch($.value = 'abc' => xx, $.value = 'adc' => yy))",
    r"'abcadc'.replaceBy(regex('a(.)'), $2.value + '!')",
    r"'abcadc'.replaceBy(regex('a(.)'), $2.value + '!', count => 1)",
    r"'abc'.replace('b', 'x')",  # the string replace is still there
    r"'a,b'.split(',')",  # and the string split
    # escapeRegex and isRegex
    r"escapeRegex('a.b c{1}[x]')",
    r"isRegex(regex('a.c'))",
    r"isRegex('a.c')",
    r"isRegex(regex('a.c').matches('abc'))",
    # what re takes as plain characters, which regex would read otherwise
    r"'${env}' =~ '\${env}'",
    r"'/users/{id}' =~ '^/users/{id}$'",
    r"'/users/7' =~ '^/users/{id}$'",
    r"'a{e<=1}' =~ 'a{e<=1}'",
    r"'ab' =~ 'a{e<=1}'",
    r"'x{i}' =~ '^x{i}$'",
    r"'x{}' =~ '^x{}$'",
    r"'x{1' =~ '^x{1$'",
    r"'a{1,2,3}' =~ '^a{1,2,3}$'",
    r"'{' =~ '^{'",
    r"'aaa' =~ '^a{,2}$'",
    r"'aa' =~ '^a{,2}$'",
    r"'x' =~ '[[:alpha:]]'",
    r"'a]' =~ '[[:alpha:]]'",
    r"'[' =~ '^[][]$'",
    r"'x' =~ '[^[:digit:]]'",
    r"'a{e}' =~ '(?#[)a{e}'",
    r"'ab' =~ '(?x) a  # a comment: [x{e}\n b'",
    r"'a{e}' =~ '(?x) a { e }'",
    r"'1' =~ `^\N{DIGIT ONE}{2}`",
    r"'11' =~ `^\N{DIGIT ONE}{2}$`",
    r"'{1' =~ `^[{\N{DIGIT ONE}]+$`",
    # what re refuses is refused with re's message
    r"regex('(')",
    r"'a' =~ '['",
    r"'a' =~ '\p{L}'",
    r"'a' =~ '(?L)a'",
    r"'a' =~ '(?V1)a'",
    r"'a' =~ 'a{2}{3}'",
    r"regex('a').replace('a', '\\x41')",
    r"regex('a').replace('a', '\\g<2>')",
    r"regex('a').replace('a', '\\q')",
    r"'a' =~ '(?<n>a)'",
    r"'ab' =~ '(?<=a+)b'",
]


def yaql_reference(source: str) -> Any:
    """What yaql's own regex functions (Python's re) give for ``source``."""
    raw = expr_module._YAQL_ENGINE(source).evaluate(context=yaql.create_context())
    return expr_module._plain(raw)


@pytest.mark.filterwarnings("ignore:Possible nested set:FutureWarning")  # re's, as in Mistral
@pytest.mark.parametrize("source", SAME_AS_YAQL)
def test_same_results_as_yaql(source: str) -> None:
    try:
        expected = yaql_reference(source)
    except Exception as e:
        with pytest.raises(ExpressionError) as info:
            evaluate(f"<% {source} %>", {})
        assert str(info.value) == (
            f"Can not evaluate YAQL expression [expression={source}, error={e}]"
        )
    else:
        assert evaluate(f"<% {source} %>", {}) == expected


# Pieces of patterns, many of them read differently by re and by the regex package.
PATTERN_PIECES = [
    "a", "b", "ab", ".", r"\d", r"\w", r"\s", r"\b", "^", "$", r"\A", r"\Z", "*", "+",
    "?", "*?", "+?", "*+", "{2}", "{1,3}", "{,2}", "{2,}", "{e}", "{id}", "{e<=1}", "{",
    "}", "(", ")", "(?:", "(?P<g>", "(?P=g)", "(?=", "(?!", "(?<=a)", "(?<!b)", "(?<=a+)", "(?>",
    "|", "[", "]", "[^", "-", "[:alpha:]", r"\1", r"\10", "0", "1", "(?i)", "(?i:",
    "(?-i:", "(?x)", "(?x:", " ", "#", "\n", "(?#c[{e})", "(?(1)", "é", r"\N{DIGIT ONE}",
    r"\x41", r"\[", r"\{", "\\\\", "&&", "--", "(?s)", "(?m)", "(?a)",
]  # fmt: skip
TEXTS = ["", "a", "ab", "aab", "ba", "a\nb", "abab", "a{e}", "{id}", "{e<=1}", "1", "10",
         "A", "[:", "a b", "-", "aa1", "#", "é", "[:alpha:]"]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PATTERN_PIECES), min_size=1, max_size=7).map("".join))
def test_patterns_mean_what_they_mean_to_re(pattern: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # re's "Possible nested set"
        try:
            expected = re.compile(pattern)
        except re.error as e:
            with regex_functions.RegexTimeLimit(1.0), pytest.raises(re.error) as info:
                regex_functions._compile(pattern)
            assert str(info.value) == str(e)
            return
        with regex_functions.RegexTimeLimit(1.0):
            compiled = regex_functions._compile(pattern)
    for text in TEXTS:
        assert [(m.span(), m.groups()) for m in compiled.finditer(text)] == [
            (m.span(), m.groups()) for m in expected.finditer(text)
        ], (pattern, text)


def test_named_groups_are_published() -> None:
    # yaql's own loop over named groups always fails; here $name is the group.
    assert evaluate("<% regex('(?P<x>b)').search('abc', $x) %>", {}) == {
        "value": "b", "start": 1, "end": 2,
    }  # fmt: skip
    assert evaluate("<% regex('(?P<d>\\d)').replaceBy('a1b2', '<' + $d.value + '>') %>", {}) == (
        "a<1>b<2>"
    )


def test_regex_returns_a_compiled_pattern() -> None:
    assert evaluate("<% isRegex(regex($.p)) and not isRegex($.p) %>", {"p": "a+"}) is True
    with pytest.raises(ExpressionError, match="has no JSON form"):
        evaluate("<% regex('a') %>", {})


def test_unicode_classes_follow_the_unicode_standard() -> None:
    """Where regex and re differ, as documented: \\w, \\b and \\s outside ASCII."""
    assert yaql_reference(r"'²' =~ '^\w$'") is True
    assert evaluate(r"<% '²' =~ '^\w$' %>", {}) is False
    assert evaluate(r"<% 'été_1' =~ '^\w+$' %>", {}) is True


def test_patterns_from_the_context() -> None:
    context = {"names": ["web-1", "db-2", "web-3"], "pattern": "^web-(\\d+)$"}
    where = "<% let(p => $.pattern) -> $.names.where($ =~ $p) %>"
    assert evaluate(where, context) == ["web-1", "web-3"]
    select = "<% let(p => regex($.pattern)) -> $.names.select($p.search($, $2.value)) %>"
    assert evaluate(select, context) == ["1", None, "3"]


# -- bounded in time ------------------------------------------------------------------------

SLOW_TEXT = "'" + "a" * 40 + "!'"
CATASTROPHIC = "'(a|aa)+$'"  # exponential backtracking, in re and in regex alike

HANGING = [
    f"{SLOW_TEXT} =~ {CATASTROPHIC}",
    f"{SLOW_TEXT} !~ {CATASTROPHIC}",
    f"{SLOW_TEXT} =~ regex({CATASTROPHIC})",
    f"{SLOW_TEXT}.matches({CATASTROPHIC})",
    f"regex({CATASTROPHIC}).matches({SLOW_TEXT})",
    f"regex({CATASTROPHIC}).search({SLOW_TEXT})",
    f"regex({CATASTROPHIC}).searchAll({SLOW_TEXT})",
    f"regex({CATASTROPHIC}).searchAll({SLOW_TEXT}, $.start)",
    f"regex({CATASTROPHIC}).replace({SLOW_TEXT}, 'x')",
    f"{SLOW_TEXT}.replace(regex({CATASTROPHIC}), 'x')",
    f"regex({CATASTROPHIC}).replaceBy({SLOW_TEXT}, 'x')",
    f"{SLOW_TEXT}.replaceBy(regex({CATASTROPHIC}), $.value)",
    f"regex({CATASTROPHIC}).split({SLOW_TEXT})",
    f"{SLOW_TEXT}.split(regex({CATASTROPHIC}))",
]
OUT_OF_TIME = "regular expressions ran for more than"


def fails_quickly(expression: Any, context: Any = None, match: str = OUT_OF_TIME,
                  within: float = 5.0) -> ExpressionError:  # fmt: skip
    started = time.monotonic()
    with pytest.raises(ExpressionError, match=match) as info:
        evaluate(expression, {} if context is None else context)
    assert time.monotonic() - started < within
    return info.value


@pytest.mark.parametrize("source", HANGING)
def test_catastrophic_backtracking_fails_the_evaluation(
    source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(expr_module, "REGEX_TIMEOUT_SECONDS", 0.2)
    error = fails_quickly(f"<% {source} %>")
    assert str(error).startswith(f"Can not evaluate YAQL expression [expression={source}, ")
    assert "0.2 s of CPU time, the limit of one evaluation" in str(error)
    assert regex_functions._TIME_LIMIT.get() is None  # the limit belongs to the evaluation


def test_the_example_at_the_default_limit() -> None:
    assert expr_module.REGEX_TIMEOUT_SECONDS == 1.0
    error = fails_quickly("<% 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!' =~ '(a|aa)+$' %>")
    assert "more than 1 s of CPU time" in str(error)
    # regex's guards see through this one, which under re ran for hours
    assert evaluate("<% 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!' =~ '(a+)+$' %>", {}) is False
    # a new evaluation has a new allowance
    assert evaluate("<% 'abc' =~ 'a.c' %>", {}) is True


def test_one_evaluation_shares_one_allowance(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each search takes some 20 ms, well within the limit; a thousand of them would
    # take 20 s. Together they run out of the evaluation's 0.2 s.
    monkeypatch.setattr(expr_module, "REGEX_TIMEOUT_SECONDS", 0.2)
    text = {"text": "a" * 22 + "!"}
    slow = "regex('(a|aa)+$').matches($t)"
    assert evaluate(f"<% let(t => $.text) -> {slow} %>", text) is False
    fails_quickly(f"<% let(t => $.text) -> range(0, 1000).select({slow}) %>", text)
    # one evaluate() call: a task's whole publish, say
    fails_quickly([f"<% let(t => $.text) -> {slow} %>"] * 1000, text)


# -- bounded in size --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        # regex would unroll these (re does not): the first two into gigabytes
        ("(?:x{1000}){1000}", "would compile to more than 10000 parts"),
        ("a{4294967294}", "would compile to more than 10000 parts"),
        ("((a{10}b){10}c){1000}", "would compile to more than 10000 parts"),
        ("x" * 10_001, "has 10001 characters, more than the limit of 10000"),
    ],
)
def test_patterns_are_bounded_in_size(pattern: str, message: str) -> None:
    for expression in ("<% regex($.p) %>", "<% 'x' =~ $.p %>", "<% 'x'.matches($.p) %>"):
        fails_quickly(expression, {"p": pattern}, match=message, within=2.0)


def test_sizes_a_workflow_uses_are_fine() -> None:
    patterns = {
        "hash": "^[0-9a-f]{64}$",
        "ip": r"^(?:\d{1,3}\.){3}\d{1,3}$",
        "long": "^.{1,4096}$",
        "names": "|".join(f"host-{i}\\.example\\.com" for i in range(300)),
    }
    for name, pattern in patterns.items():
        assert evaluate("<% isRegex(regex($.p)) %>", {"p": pattern}) is True, name


# -- Jinja ------------------------------------------------------------------------------------


def test_urlize_is_charged_for_its_regular_expressions() -> None:
    assert '<a href="https://www.example.com"' in evaluate(
        "{{ 'see www.example.com.' | urlize }}", {}
    )
    # Jinja's urlize strips trailing punctuation with a search that is quadratic in the
    # length of the run: this text would take some fifteen minutes...
    fails_quickly("{{ (')' * 200000 ~ 'x)') | urlize }}", match="steps of work")
    # ... and its loop over three million words some eight seconds.
    fails_quickly("{{ ('a ' * 3000000) | urlize }}", match="steps of work")


def test_jinja_has_no_regular_expression_filter() -> None:
    env = expr_module._JINJA_ENV
    names = {*env.filters, *env.tests, *env.globals}
    assert not {n for n in names if "regex" in n or n.startswith("re_") or "match" in n}


# -- through the service ----------------------------------------------------------------------

BACKTRACKING = """
version: '2.0'
backtracking:
  tasks:
    echo:
      action: std.echo output="aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!"
      publish:
        matched: <% task().result =~ '(a|aa)+$' %>
"""

HELLO = """
version: '2.0'
hello:
  tasks:
    greet:
      action: std.echo output="hello"
      publish:
        greeting: <% regex('h(.)llo').search(task().result, $2.value) %>
"""


@pytest.mark.usefixtures("workers")
async def test_a_catastrophic_regex_in_a_publish_fails_its_task(client: Client) -> None:
    started = time.monotonic()
    execution_id = await client.run("backtracking", definition=BACKTRACKING)
    info = await client.wait(execution_id)
    assert info.state == "ERROR"
    [task] = info.tasks
    assert task.state == "ERROR"
    assert "[expression=task().result =~ '(a|aa)+$', error=regular expressions ran" in (
        task.state_info
    )
    # the engine is still there, and still matches regular expressions
    execution_id = await client.run("hello", definition=HELLO)
    info = await client.wait(execution_id)
    assert info.state == "SUCCESS", info.state_info
    assert info.tasks[0].published == {"greeting": "e"}
    assert time.monotonic() - started < 30
