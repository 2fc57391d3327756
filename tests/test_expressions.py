"""lang/expressions.py: YAQL and Jinja evaluated the way Mistral evaluates them.

Expected values come from Mistral's own tests (mistral/tests/unit/test_expressions.py,
mistral/tests/unit/expressions/test_{yaql,jinja}_expression.py) and from the conformance
corpus (/work/shared/conformance/mistral); the sandbox and limit cases are Levante's.
"""

from __future__ import annotations

import json
import re
import time
import tracemalloc
import uuid
from collections.abc import Mapping
from typing import Any

import pytest

from levante.errors import ExpressionError, NotFoundError, StoreError
from levante.lang import expressions as expr_module
from levante.lang import regex_functions
from levante.lang.expressions import (
    HAS_EXPRESSION,
    MAX_RENDERED_LENGTH,
    NULL_HOST,
    NullHost,
    check_syntax,
    evaluate,
    is_expression,
    literal,
    referenced_task_names,
)

SECRET = "s3cr3t-t0ken"


class FakeHost:
    """Records what expressions asked for."""

    def __init__(self, fail_with: BaseException | None = None) -> None:
        self.by_name: dict[str | None, dict[str, Any]] = {
            None: {"id": "t-cur", "name": "current", "result": 100, "published": {}},
            "task1": {
                "id": "t-1",
                "name": "task1",
                "state": "SUCCESS",
                "state_info": None,
                "result": {"sub_wf_out": "out", "list": [1, 2, 3]},
                "published": {"p": 1},
                "spec": {"description": "first", "tags": ["a", "b"]},
            },
        }
        self.asked: list[str | None] = []
        self.tasks_calls: list[tuple[str | None, bool, str | None, bool]] = []
        self.fail_with = fail_with
        self.executions: list[dict[str, Any]] = [
            {"id": "t-1", "name": "task1", "state": "SUCCESS", "type": "ACTION"},
            {"id": "t-2", "name": "sub", "state": "ERROR", "type": "WORKFLOW"},
            {"id": "t-3", "name": "task3", "state": "ERROR", "type": "ACTION"},
        ]

    def tasks(
        self, execution_id: str | None, recursive: bool, state: str | None, flat: bool
    ) -> list[dict[str, Any]]:
        self.tasks_calls.append((execution_id, recursive, state, flat))
        return [
            t for t in self.executions
            if (state is None or t["state"] == state) and not (flat and t["type"] == "WORKFLOW")
        ]  # fmt: skip

    def task(self, name: str | None) -> Mapping[str, Any] | None:
        if self.fail_with is not None:
            raise self.fail_with
        self.asked.append(name)
        return self.by_name.get(name)

    def execution(self) -> Mapping[str, Any]:
        return {"id": "ex-1", "name": "wf", "input": {"a": 1}, "params": {}}

    def env(self) -> Mapping[str, Any]:
        return {"foo": "bar", "from": "me", "list": [1, 2]}

    def global_var(self, name: str) -> Any:
        return {"my_var": 42}.get(name)


CTX: dict[str, Any] = {
    "a": 1,
    "b": 2,
    "c": 3,
    "d": True,
    "e": False,
    "f": 10.1,
    "g": 10,
    "h": [1, 2, 3, 4, 5],
    "i": "We are OpenStack!",
    "j": "World",
    "k": "Mistral",
    "l": "awesome",
    "m": "the way we roll",
    "n": None,
    "obj": {"x": {"y": "deep"}, "list": [{"id": 1, "value": 11}, {"id": 2, "value": 13}]},
    "auth_token": SECRET,
}


def ev(value: Any, context: Any = None, host: Any = None) -> Any:
    return evaluate(value, CTX if context is None else context, host or FakeHost())


def fails(value: Any, context: Any = None, match: str | None = None) -> ExpressionError:
    with pytest.raises(ExpressionError, match=match) as info:
        ev(value, context)
    return info.value


# -- recognising expressions ------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<% $.a %>", True),
        ("text <% $.a %> text", True),
        ("{{ _.a }}", True),
        ("{% if _.a %}x{% endif %}", True),
        ("{{}}", True),
        ("plain", False),
        ("<% not closed", False),
        ("<%\n$.a\n%>", False),  # Mistral's patterns never span lines
        ("{{ _.a\n}}", False),
        (1, False),
        (None, False),
        (["<% $.a %>"], False),
    ],
)
def test_is_expression(value: Any, expected: bool) -> None:
    assert is_expression(value) is expected


# -- YAQL --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "expected"),
    [  # mistral/tests/unit/test_expressions.py::test_evaluate_complex_expressions
        ("<% $.a + $.b * $.c %>", 7),
        ("<%($.a + $.b) * $.c %>", 9),
        ("<% $.d and $.e %>", False),
        ("<% $.f > $.g %>", True),
        ("<% $.h.len() >= 5 %>", True),
        ("<% $.h.len() >= $.b + $.c %>", True),
        ("<% 100 in $.h %>", False),
        ("<% $.a in $.h%>", True),
        ("<% 'OpenStack' in $.i %>", True),
        ("Hello, <% $.j %>!", "Hello, World!"),
        ("<% $.k %> is <% $.l %>!", "Mistral is awesome!"),
        ("This is <% $.m %>.", "This is the way we roll."),
        ("<% 1 + 1 = 3 %>", False),
    ],
)
def test_yaql_mistral_cases(expression: str, expected: Any) -> None:
    assert ev(expression) == expected


def test_yaql_whole_string_gives_native_values() -> None:
    assert ev("<% $.h %>") == [1, 2, 3, 4, 5]
    assert ev("<% $.obj.x %>") == {"y": "deep"}
    assert ev("<% $.n %>") is None
    assert ev("<% $.f %>") == 10.1
    assert ev("<% {key1 => foo, key2 => bar} %>") == {"key1": "foo", "key2": "bar"}
    assert ev("<% $.obj.list.where($.value = 13).id.first() %>") == 2
    assert ev("<% $.h.select($ * 2) %>") == [2, 4, 6, 8, 10]
    assert ev("<% $.get(continue_flag) = null %>") is True
    assert ev("<% a in $.keys() %>") is True
    assert ev("<% list() %>") == []


def test_yaql_results_are_plain_json_like() -> None:
    result = ev("<% dict(a => [1, 2], b => {c => [3]}) %>")
    assert result == {"a": [1, 2], "b": {"c": [3]}}
    assert type(result) is dict and type(result["a"]) is list and type(result["b"]) is dict
    assert ev("<% $.h.toSet() %>") == [1, 2, 3, 4, 5]  # sets become (sorted) lists
    assert ev("<% range(3) %>") == [0, 1, 2]  # iterators are materialised
    assert ev("<% $.obj.x.items() %>") == [["y", "deep"]]
    assert json.loads(json.dumps(ev("<% $ %>"))) == CTX


def test_yaql_single_value_casting() -> None:
    # mistral InlineYAQLEvaluatorTest.test_single_value_casting / test_function_string
    assert ev("<% $ %>", 3) == 3
    assert ev("<% $ %><% $ %>", 3) == "33"
    assert ev("<% str($) %>", 3) == "3"
    assert ev("<% $ %> and <% $ %>", "a+b") == "a+b and a+b"  # ad-hoc action output


def test_yaql_interpolation_renders_str_of_values() -> None:
    assert ev("x=<% $.obj.x %>") == "x={'y': 'deep'}"
    assert ev("n=<% $.n %>, d=<% $.d %>, h=<% $.h %>") == "n=None, d=True, h=[1, 2, 3, 4, 5]"


def test_yaql_text_around_a_single_expression_is_interpolation() -> None:
    # Mistral compares the whole string with the expression: no whitespace is trimmed.
    assert ev(" <% $.a %>") == " 1"
    assert ev("<% $.a %>\n") == "1\n"


def test_yaql_same_expression_twice_is_evaluated_once() -> None:
    # Mistral's str.replace loop replaces every occurrence with the first value.
    first, second = ev("<% uuid() %> <% uuid() %>").split(" ")
    assert first == second


def test_yaql_multi_line_text_is_not_an_expression() -> None:
    assert ev("<% $.a\n %>") == "<% $.a\n %>"


def test_yaql_missing_key_fails_like_mistral() -> None:
    # mistral YaqlEvaluatorTest.test_wrong_expression: $.wrong_key raises
    error = fails("<% $.missing %>")
    assert str(error) == "Can not evaluate YAQL expression [expression=$.missing, error='missing']"
    fails("<% $.n.x %>", match=re.escape("[expression=$.n.x, error="))
    fails("<% wrong(yaql) %>", match=re.escape("[expression=wrong(yaql)"))
    fails("<% $.t1.get($foobar) %>", match="Can not evaluate YAQL expression")


def test_yaql_bare_identifier_is_a_string() -> None:
    assert ev("<% invalid_expression_string %>") == "invalid_expression_string"


def test_yaql_error_does_not_leak_the_context() -> None:
    error = fails("<% 1 / 0 %>")
    assert SECRET not in str(error)
    assert "1 / 0" in str(error)


def test_yaql_now_is_stored_as_mistral_stores_datetimes() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}", ev("<% now() %>"))
    assert ev("<% now().year > 2000 %>") is True


def test_yaql_fast_path_matches_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    cases = [
        "<% $ %>",
        "<% $.obj %>",
        "<% $.obj.x.y %>",
        "<% $.n %>",
        "<% $.obj.list %>",
        "<% task(task1).result.list %>",
        "<% task().result %>",
        "<% task(nope) %>",
        "<% env().foo %>",
        "<% execution().input %>",
    ]
    fast = [ev(case) for case in cases]
    failing = ["<% $.missing %>", "<% $.n.y %>", "<% task(nope).result %>", "<% $.h.x %>"]
    fast_errors = [str(fails(case)) for case in failing]
    monkeypatch.setattr(expr_module, "_yaql_path", lambda source: None)
    assert [ev(case) for case in cases] == fast
    assert [str(fails(case)) for case in failing] == fast_errors


# -- Jinja -------------------------------------------------------------------------------


def test_jinja_whole_string_gives_native_values() -> None:
    assert ev("{{ _.h }}") == [1, 2, 3, 4, 5]
    assert ev("{{ _.obj.x }}") == {"y": "deep"}
    assert ev("{{ _.n }}") is None
    assert ev("{{ 1 + 1 }}") == 2
    assert ev("{{ _.obj.x.y == 'deep' }}") is True
    assert ev("{{ _ }}", 3) == 3
    assert ev("{{ _|string }}", 3) == "3"
    assert ev("{{ _|length }}", "hey") == 3


def test_jinja_generators_become_lists() -> None:
    servers = {"servers": [{"name": "centos"}, {"name": "ubuntu"}]}
    assert ev('{{ _.servers|selectattr("name", "equalto", "ubuntu") }}', servers) == [
        {"name": "ubuntu"}
    ]
    assert ev("{{ _.h|select('odd') }}") == [1, 3, 5]


def test_jinja_interpolation() -> None:
    assert ev("{{ _ }}{{ _ }}", 3) == "33"
    assert ev("{{ _.j }}/{{ _.k }}") == "World/Mistral"
    assert ev("x={{ _.obj.x }}, n={{ _.n }}") == "x={'y': 'deep'}, n=None"
    assert ev("{{ _.a }}\n") == "1"  # Jinja drops one trailing newline (Mistral too)


def test_jinja_blocks_render_with_mistral_options() -> None:
    # mistral InlineJinjaEvaluatorTest.test_block_placeholders (trim_blocks, lstrip_blocks)
    template = (
        "Number of virtual machines: {{ _.vm_count }}\n"
        "    {% if _.active_vm_count %}\n"
        "Active: {{ _.active_vm_count }}\n"
        "    {% endif %}\n"
        "Number of networks: {{ _.net_count }}\n"
    )
    context = {"vm_count": 28, "active_vm_count": 0, "net_count": 1}
    assert ev(template, context) == "Number of virtual machines: 28\nNumber of networks: 1"


def test_jinja_block_only_string_renders() -> None:
    # Mistral fails here with "list index out of range" (no {{ }} found); Levante renders.
    assert ev("{% if _.a %}yes{% else %}no{% endif %}") == "yes"


def test_jinja_undefined_is_an_error() -> None:
    # StrictUndefined, as in mistral InlineJinjaEvaluatorTest.test_wrong_expression
    error = fails("{{ _.wrong_key }}")
    assert str(error) == (
        "Can not evaluate Jinja expression [expression={{ _.wrong_key }}, "
        "error='dict object' has no attribute 'wrong_key']"
    )
    fails("{{ invalid_expression_string }}", match="is undefined")
    fails("!! {{ _.nonexistent_variable }} !!\n", match=re.escape("expression=!! {{"))
    fails("{{ [_.missing] }}", match="has no attribute 'missing'")
    fails("{{ (_.obj|some_invalid_filter).id }}", match="some_invalid_filter")
    assert ev("{{ _.missing | default('dflt') }}") == "dflt"
    assert ev("{{ _.missing is defined }}") is False


def test_jinja_error_does_not_leak_the_context() -> None:
    error = fails("{{ 1 / 0 }}")
    assert SECRET not in str(error)
    assert "1 / 0" in str(error)


def test_mixing_languages_evaluates_jinja_only() -> None:
    # mistral test_expressions.py::test_evaluate_mixing_jinja_and_yaql
    assert ev("<% $.a %>{{ _.a }}", {"a": "b"}) == "<% $.a %>b"
    assert ev("{{ _.a }}<% $.a %>", {"a": "b"}) == "b<% $.a %>"


# -- data --------------------------------------------------------------------------------


def test_nested_data_evaluates_values_not_keys() -> None:
    data = {
        "parameters": {
            "p1": "My string",
            "p2": "<% $.j %>",
            "p3": "",
            "list": ["var1", "/servers/<% $.k %>/bla", 7, None, {"t": "{{ _.a }}"}],
        },
        "<% $.a %>": "key stays",
        "num": 1.5,
    }
    original = json.loads(json.dumps(data))
    result = ev(data)
    assert result == {
        "parameters": {
            "p1": "My string",
            "p2": "World",
            "p3": "",
            "list": ["var1", "/servers/Mistral/bla", 7, None, {"t": 1}],
        },
        "<% $.a %>": "key stays",
        "num": 1.5,
    }
    assert data == original  # the input is not modified
    assert result["parameters"] is not data["parameters"]


def test_non_strings_pass_through() -> None:
    for value in (1, 2.5, True, None):
        assert ev(value) == value
    assert ev((1, "<% $.a %>")) == [1, 1]


def test_the_context_is_never_modified() -> None:
    context = {"l": [1], "d": {"a": 1}}
    ev(["<% $.l.append(2) %>", "<% $.d.set(b => 2) %>"], context)
    assert context == {"l": [1], "d": {"a": 1}}


# -- functions ---------------------------------------------------------------------------


def test_task_function_in_both_languages() -> None:
    host = FakeHost()
    assert ev("<% task(task1).result.sub_wf_out %>", host=host) == "out"
    assert ev("<% task('task1').state %>", host=host) == "SUCCESS"
    assert ev("<% task(task1).spec.tags %>", host=host) == ["a", "b"]
    assert ev("<% task().result %>", host=host) == 100
    assert ev("<% task().result = 100 %>", host=host) is True
    assert ev("<% task(non_existing_task) %>", host=host) is None
    assert ev("<% task(task1).result.list.len() %>", host=host) == 3  # slow path
    assert ev('{{ task("task1").result.sub_wf_out }}', host=host) == "out"
    assert ev("{{ task().result }}", host=host) == 100
    assert ev("{{ task(task_name='task1').published }}", host=host) == {"p": 1}
    assert ev("{{ _|task('task1') }}", host=host)["id"] == "t-1"  # Mistral's filter form
    assert host.asked.count(None) == 3 and "non_existing_task" in host.asked


def test_env_execution_global_functions() -> None:
    assert ev("<% env().foo %>") == "bar"
    assert ev("<% env().list %>") == [1, 2]
    assert ev("{{ env().foo }}") == "bar"
    assert ev("{{ _|env }}")["from"] == "me"
    assert ev("<% execution().id %>") == "ex-1"
    assert ev("{{ execution().input.a }}") == 1
    assert ev("<% global(my_var) %>") == 42
    assert ev("{{ global('my_var') }}") == 42
    assert ev("<% global(unset) %>") is None


def _names(value: Any) -> list[str]:
    return [t["name"] for t in value]


def test_tasks_function_in_both_languages() -> None:
    # the forms of Mistral's documentation (wf_lang_v2.rst, "Tasks function")
    every = ["task1", "sub", "task3"]
    assert _names(ev("<% tasks() %>")) == every
    assert _names(ev("{{ tasks() }}")) == every
    assert _names(ev("<% tasks(execution().id) %>")) == every
    assert _names(ev("{{ tasks(execution().id) }}")) == every
    assert _names(ev("<% tasks(null, false, null, false) %>")) == every
    assert _names(ev("<% tasks(null, false, false, false) %>")) == every  # falsy state: all
    assert _names(ev("{{ tasks(None, false, None, false) }}")) == every
    assert _names(ev("<% tasks(null, false, ERROR) %>")) == ["sub", "task3"]
    assert _names(ev("<% tasks(state => ERROR) %>")) == ["sub", "task3"]
    assert _names(ev("{{ tasks(None, false, 'ERROR') }}")) == ["sub", "task3"]
    assert _names(ev("{{ tasks(state='ERROR') }}")) == ["sub", "task3"]
    assert _names(ev("{{ _ | tasks(state='SUCCESS') }}")) == ["task1"]  # the filter form
    assert ev("<% tasks(state => ERROR).where($.type = ACTION).select($.id) %>") == ["t-3"]


def test_tasks_arguments_reach_the_host() -> None:
    # Filtering is the host's (the engine's core; see test_runner's tasks() tests): here,
    # that each form hands it the same four arguments.
    forms = {
        "<% tasks(flat => true) %>": (None, False, None, True),
        "{{ tasks(state='ERROR', flat=true) }}": (None, False, "ERROR", True),
        "<% tasks(execution().id, true) %>": ("ex-1", True, None, False),
        "{{ tasks(execution().id, true) }}": ("ex-1", True, None, False),
        "<% tasks(recursive => true) %>": (None, True, None, False),
        "<% tasks('ex-2') %>": ("ex-2", False, None, False),
        "{{ tasks('ex-2', false, 'SUCCESS') }}": ("ex-2", False, "SUCCESS", False),
        "<% tasks('', false, '') %>": (None, False, None, False),
    }
    for source, expected in forms.items():
        host = FakeHost()
        ev(source, host=host)
        assert host.tasks_calls == [expected], source


def test_null_host() -> None:
    assert evaluate("<% task(x) %>", {}, NULL_HOST) is None
    assert evaluate("<% tasks() %>", {}, NULL_HOST) == []
    assert evaluate("<% env() %>", {}) == {}
    assert evaluate("{{ execution() }}", {}) == {}
    assert evaluate("<% global(x) %>", {}) is None
    assert isinstance(NULL_HOST, NullHost)


def test_json_and_yaml_functions() -> None:
    # conformance test_yaql_functions__test_yaml_dump_function
    data = {"data": {"key1": "foo", "key2": "bar"}}
    assert ev("<% json_dump($.data) %>", data) == '{\n    "key1": "foo",\n    "key2": "bar"\n}'
    assert ev("<% yaml_dump($.data) %>", data) == "key1: foo\nkey2: bar\n"
    assert ev("{{ json_dump(_.data) }}", data) == ev("<% json_dump($.data) %>", data)
    assert ev("{{ yaml_dump(_.data) }}", data) == "key1: foo\nkey2: bar\n"
    assert ev("<% json_parse($.s) %>", {"s": '{"a": [1, null]}'}) == {"a": [1, None]}
    assert ev("{{ json_parse(_.s).a }}", {"s": '{"a": [1, null]}'}) == [1, None]
    assert ev("<% yaml_parse($.s) %>", {"s": "a: [1, 2]\nb: x"}) == {"a": [1, 2], "b": "x"}
    fails("<% json_parse($.s) %>", {"s": "{"}, match=re.escape("[expression=json_parse($.s)"))


def test_yaml_parse_is_hardened() -> None:
    # mistral/utils/safe_yaml.py: anchors and aliases are plain text, '@' may start a scalar
    doc = "a: &x [1, 2]\nb: *x\nc: @home\nd: 2020-01-02"
    expected = {"a": "&x [1, 2]", "b": "*x", "c": "@home", "d": "2020-01-02"}
    assert ev("<% yaml_parse($.doc) %>", {"doc": doc}) == expected
    assert ev("{{ yaml_parse(_.doc) }}", {"doc": doc}) == expected


def test_uuid_function() -> None:
    for value in (ev("<% uuid() %>"), ev("{{ uuid() }}"), ev("{{ _|uuid }}")):
        assert str(uuid.UUID(value)) == value


def test_mistral_context_keys_are_exposed() -> None:
    context = {"__env": {"e": 1}, "__execution": {"id": "x"}, "v": 2}
    assert ev("<% $__env.e %>", context) == 1
    assert ev("{{ __execution.id }}", context) == "x"
    assert ev("<% $__task_execution %>", context) is None


def test_host_failures_pass_through_unwrapped() -> None:
    for error in (StoreError("db down"), NotFoundError("gone")):
        for expression in ("<% task(x) %>", "<% task(x).result.len() %>", "{{ task('x') }}"):
            with pytest.raises(type(error)):
                evaluate(expression, CTX, FakeHost(fail_with=error))
    with pytest.raises(ExpressionError, match="Can not evaluate YAQL expression"):
        evaluate("<% task(x) %>", CTX, FakeHost(fail_with=KeyError("boom")))


# -- syntax ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "There is no expression.",
        "<% abc %>",
        "<% 1 + 2 %>",
        "<% $.a1 * $.a2 %>",
        "<% $.a1 %> is <% $.a2 %>",
        "{{ abc }}",
        "{{ _.a1 * _.a2 }}",
        "The value is {{ _.a1 }}.",
        "{% for x in _.l %}{{ x }}{% endfor %}",
        "<% global(my_var) %>",
        "{{ (_.my_dict|some_invalid_filter).id }}",  # unknown filters fail when evaluated
        {"<% * %>": "keys are not expressions"},
        [1, None, {"a": ["<% $.ok %>"]}],
        42,
    ],
)
def test_check_syntax_accepts(value: Any) -> None:
    check_syntax(value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("<% * %>", r"Invalid grammar of YAQL expression \[expression=\*, error="),
        ("The value is <% * %>.", "Invalid grammar of YAQL expression"),
        ("<%%>", "Invalid grammar of YAQL expression"),
        ("{{ * }}", "Invalid grammar of Jinja expression"),
        ("The value is {{ * }}.", "Invalid grammar of Jinja expression"),
        ("{{ $ }}", "Invalid grammar of Jinja expression"),
        ("{% if _.a %}no end", "Invalid grammar of Jinja expression"),
        ("<% $.a %>{{ _.a }}", "Mixing expression types in a single line is not allowed"),
        ("{{ _.a }}<% $.a %>", "Mixing expression types"),
        ({"deep": [{"x": "<% ) %>"}]}, "Invalid grammar of YAQL expression"),
    ],
)
def test_check_syntax_rejects(value: Any, message: str) -> None:
    with pytest.raises(ExpressionError, match=message):
        check_syntax(value)


# -- task('x') references ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<% task(task1).result %>", {"task1"}),
        ("<% task('a') %> and <% task(\"b\").state %>", {"a", "b"}),
        ("<% task() %>", set()),
        ("<% task(null) %>", set()),
        ("<% task(taskName => zz) %>", {"zz"}),
        ("<% not task(task1).result.contains(4) %>", {"task1"}),
        ("{{ task('j').result }}", {"j"}),
        ('{{ task("k") }}', {"k"}),
        ("{{ task() }}", set()),
        ("{{ task(task_name='kw') }}", {"kw"}),
        ("{{ _|task('f') }}", {"f"}),
        ("{{ _|task }}", set()),
        ("{% for t in ['x'] %}{{ task('in_loop') }}{% endfor %}", {"in_loop"}),
        ("plain text", set()),
        (["<% task(a) %>", {"k": "{{ task('b') }}", "n": 3}], {"a", "b"}),
        ({"<% task(key) %>": "value"}, set()),  # keys are never evaluated
        ("<% $.x %>{{ task('j') }}", {"j"}),  # such a string is Jinja
        ("<% call(len, [[1]], {}) %>", set()),
    ],
)
def test_referenced_task_names(value: Any, expected: set[str]) -> None:
    assert referenced_task_names(value) == frozenset(expected)


@pytest.mark.parametrize(
    "value",
    [
        "<% task($.name) %>",
        "<% $.names.select(task($).result) %>",
        "<% call(task, [x], {}) %>",
        "{{ task(_.name) }}",
        "{{ task('a' ~ 'b') }}",
        "{{ task(*_.args) }}",
        "{% set f = task %}{{ f('y') }}",
        "{{ _|task(_.name) }}",
        ["<% task(ok) %>", "{{ task(_.x) }}"],
        # tasks() reads every task
        "<% tasks() %>",
        "<% tasks(state => ERROR).len() %>",
        "<% call(tasks, [], {}) %>",
        "{{ tasks() }}",
        "{{ _ | tasks }}",
        "{% set f = tasks %}{{ f() }}",
        "<% * %>",  # does not parse: evaluation will report it
    ],
)
def test_referenced_task_names_dynamic(value: Any) -> None:
    assert referenced_task_names(value) is None


# -- sandbox -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expression",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ joiner.__init__.__globals__.os }}",
        "{{ lipsum.__globals__ }}",
        "{{ range.__globals__ }}",
        "{{ task.__globals__ }}",
        "{{ json_dump.__code__ }}",
        "{{ self.__init__ }}",
        "{{ _.__class__ }}",
        "{{ _|attr('__class__') }}",
        "{{ '{0.__class__}'.format(1) }}",
        "{{ _.obj.get.__self__ }}",
        "{% include '/etc/passwd' %}",
        "{% import 'os' as os %}{{ os.system('id') }}",
        "{% from 'os' import popen %}",
        "{{ open('/etc/passwd') }}",
        "{{ __import__('os') }}",
        "<% $.__class__ %>",
        "<% ''.__class__ %>",
        "<% call('__import__', ['os'], {}) %>",
        "<% call('#get_context_data', ['levante host'], {}) %>",
        "<% open('/etc/passwd') %>",
        "<% $.obj.__dict__ %>",
    ],
)
def test_sandbox_escapes_fail(expression: str) -> None:
    fails(expression, match="Can not evaluate")


def test_jinja_cannot_modify_the_context_or_host_data() -> None:
    context = {"l": [1], "d": {"a": 1}, "nested": {"x": [{"y": {}}]}}
    host = FakeHost()
    for expression in (
        "{{ _.l.append(2) }}",
        "{{ _.d.update({'b': 2}) }}",
        "{{ _.d.pop('a') }}",
        "{{ dict.update(_.d, {'b': 2}) }}",
        "{% set x = _.nested.x[0].y %}{{ x.update({'z': 1}) }}",
        "{{ _.l.sort() }}",
        "{{ task('task1').result.list.append(4) }}",
        "{{ env().list.clear() }}",
    ):
        with pytest.raises(ExpressionError, match="would modify data"):
            evaluate(expression, context, host)
    assert context == {"l": [1], "d": {"a": 1}, "nested": {"x": [{"y": {}}]}}
    assert host.by_name["task1"]["result"]["list"] == [1, 2, 3]


def test_jinja_may_modify_what_it_builds() -> None:
    template = "{% set d = {} %}{% set _x = d.update({'a': _.a}) %}{{ d }}"
    assert ev(template) == "{'a': 1}"
    assert ev("{% set l = _.h|list %}{% set _x = l.append(6) %}{{ l|length }}") == "6"
    assert ev("{% set ns = namespace(n=0) %}{% for i in _.h %}{% set ns.n = ns.n + i %}"
              "{% endfor %}{{ ns.n }}") == "15"  # fmt: skip


def test_values_without_json_form_are_refused() -> None:
    fails("{{ cycler }}", match="has no JSON form")
    fails("<% now() - now() %>", match="has no JSON form")


# -- limits ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("{{ 'a' * 100000000 }}", "string would be longer"),
        ("{{ [0] * 2000000000 }}", "list would be longer"),
        ("{{ 10 ** 100000 }}", "more than 65536 bits"),
        ("{{ (2 ** 40000) * (2 ** 40000) }}", "more than 65536 bits"),
        ("{{ '%0999999999d' % 1 }}", "format width is too large"),
        ("{{ '%*d' % (999999999, 1) }}", "format width is too large"),
        ("{{ '{:999999999}'.format(1) }}", "format width is too large"),
        ("{{ 'a' | center(999999999) }}", "string would be longer"),
        ("{{ 'a' | indent(999999999) }}", "string would be longer"),
        ("{{ '%999999999s' | format('a') }}", "format width is too large"),
        ("{{ ('a' * 1000000) | replace('a', 'b' * 100) }}", "string would be longer"),
        ("{{ range(100000) | join('x' * 1000) }}", "string would be longer"),
        ("{{ range(10) | batch(999999999, 'x') | list }}", "linecount is larger"),
        ("{{ range(10) | slice(999999999) | list }}", "slices is larger"),
        ("{{ range(1000000000) }}", "Range too big"),
        ("{{ lipsum(100000) }}", "lipsum"),
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "range\\(\\) produced more than",
        ),
        (
            "{% set ns = namespace(s='ab') %}{% for i in range(40) %}"
            "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
            "string would be longer",
        ),
        (
            "{% set ns = namespace(s='ab') %}{% for i in range(40) %}"
            "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s | length }}",
            "string would be longer",
        ),
        ("<% range(1000000000) %>", "Collection length exceeds 100000 elements"),
        ("<% len(range(200000).toList()) %>", "Collection length exceeds"),
        ("<% 'a' * 100000000 %>", "Expression consumed too much memory"),
        ("<% pow(10, 1000000) %>", "more than 65536 bits"),
        ("<% shiftBitsLeft(1, 1000000) %>", "more than 65536 bits"),
        ("<% ('a' * 1000000).replace(a, concat('b' * 40, 'b' * 40)) %>", "string would be longer"),
    ],
)
def test_limits(expression: str, message: str) -> None:
    fails(expression, match=message)


def test_rendered_output_is_capped() -> None:
    half = MAX_RENDERED_LENGTH // 2 + 1
    fails(f"{{{{ 'x' * {half} }}}}{{{{ 'y' * {half} }}}}", match="rendered text is longer")
    fails(f"<% 'x' * {half} %> <% 'y' * {half} %>", match="text is longer")
    # a whole-string expression is a value, not rendered text: only the value limits apply
    assert len(ev(f"{{{{ 'x' * {MAX_RENDERED_LENGTH * 2} }}}}")) == MAX_RENDERED_LENGTH * 2
    assert len(ev(f"a{{{{ 'x' * {MAX_RENDERED_LENGTH - 1} }}}}")) == MAX_RENDERED_LENGTH


def test_reasonable_values_stay_allowed() -> None:
    assert ev("{{ 'ab' * 3 }}") == "ababab"
    assert ev("{{ [0] * 3 }}") == [0, 0, 0]
    assert ev("{{ 2 ** 10 }}") == 1024
    assert ev("{{ '%5s|%-3d' % ('a', 7) }}") == "    a|7  "
    assert ev("{{ '{:>4}'.format('a') }}") == "   a"
    assert ev("{{ 'a\\nb' | indent(2) }}") == "a\n  b"
    assert ev("{{ 'aaa' | replace('a', 'bb') }}") == "bbbbbb"
    assert ev("{{ range(3) | join(', ') }}") == "0, 1, 2"
    assert ev("{{ [[1], [2]] | sum(start=[]) }}") == [1, 2]
    assert ev("{{ _.h | batch(2) | list }}") == [[1, 2], [3, 4], [5]]
    assert ev("{{ range(5) | list }}") == [0, 1, 2, 3, 4]
    assert ev("{{ _.j ~ '-' ~ _.a }}") == "World-1"
    assert ev("<% 'ab' * 3 %>") == "ababab"
    assert ev("<% pow(2, 10) %>") == 1024
    assert ev("<% 'aaa'.replace(a, b) %>") == "bbb"
    assert ev("<% [1, 2, 3].replace(0, 9) %>") == [9, 2, 3]  # the list overload still works


# Operations that build far more than they are given: each must be refused before it
# builds, fast and in little memory. (Before these checks, each took from a second and a
# gigabyte to hanging the engine for hours.)
AMPLIFIERS = [
    # str methods reachable from Jinja
    ("{{ 'a'.ljust(10**9) }}", "string would be longer"),
    ("{{ 'a'.rjust(10**9, 'x') }}", "string would be longer"),
    ("{{ 'a'.center(10**9) }}", "string would be longer"),
    ("{{ 'a'.zfill(10**9) }}", "string would be longer"),
    ("{{ '\t'.expandtabs(10**9) }}", "string would be longer"),
    ("{{ ('\t' * 1000).expandtabs(1000000) }}", "string would be longer"),
    ("{{ ('x' * 1000000).join(['a'] * 300) }}", "string would be longer"),
    ("{{ ''.join(['x' * 1000000] * 300) }}", "string would be longer"),
    ("{{ ('a' * 1000000).replace('a', 'b' * 100) }}", "string would be longer"),
    ("{{ ('a' * 100000).replace('', 'b' * 1000) }}", "string would be longer"),
    ("{{ ('a' * 1000).translate({97: 'x' * 1000000}) }}", "string would be longer"),
    ("{{ ('\u00df' * 9000000).upper() }}", "string would be longer"),
    # a format that prints one argument many times, or many widths
    ("{{ ('%s' * 1000) % (('x' * 1000000,) * 1000) }}", "string would be longer"),
    ("{{ ('%(a)s' * 1000) % {'a': 'x' * 1000000} }}", "string would be longer"),
    ("{{ ('%.10000000f' * 100) % ((1.0,) * 100) }}", "string would be longer"),
    ("{{ ('%(a)s' * 1000) | format(a='x' * 1000000) }}", "string would be longer"),
    ("{{ '%(a(b))999999999s' % {'a(b)': 1} }}", "format key holding parentheses"),
    ("{{ ('{0}' * 1000).format('x' * 1000000) }}", "string would be longer"),
    ("{{ ('{a}' * 1000).format_map({'a': 'x' * 1000000}) }}", "string would be longer"),
    ("{{ ('{0[a]}' * 1000).format({'a': 'x' * 1000000}) }}", "string would be longer"),
    # filters
    ("{{ (['x' * 1000000] * 1000) | join }}", "string would be longer"),
    ("{{ ('\x00' * 6000000) | urlencode }}", "string would be longer"),
    ("{{ ('<' * 3000000) | tojson }}", "string would be longer"),
    ("{{ ('a' * 1000000) | wordwrap(1) }}", "steps of work"),
    ("{{ ('a' * 10000000) | sort | length }}", "steps of work"),
    ("{{ ('a' * 10000000) | max }}", "steps of work"),
    # str() of a list that holds itself, or one list twice, 40 times over (2**40 items)
    ("{% set l = [] %}{% set _ = l.append(l) %}{{ l ~ '' }}", "would print more than"),
    *(
        (
            "{% set ns = namespace(x=[1]) %}{% for i in range(40) %}"
            "{% set ns.x = [ns.x, ns.x] %}{% endfor %}" + tail,
            "would print more than",
        )
        for tail in (
            "{{ ns.x | string }}",
            "{{ ns.x ~ '' }}",
            "{{ ns.x | upper }}",
            "{{ ns.x }} text",
            "{{ ns.x | tojson }}",
            "{{ '%s' % [ns.x] }}",
            "{{ '{}'.format(ns.x) }}",
            "{{ [ns.x] | join }}",
        )
    ),
    # YAQL
    ("<% ('a' * 100000).replace({a => 'b' * 100000}) %>", "string would be longer"),
    ("<% ('a' * 1000000).replace(regex(''), 'x' * 1000) %>", "replaced string would be longer"),
    ("<% regex('').replace('a' * 1000000, 'x' * 1000) %>", "replaced string would be longer"),
    ("<% ('a' * 100000).replace(regex('(a)'), '\\\\1' * 1000) %>", "replaced string would"),
    (
        "<% let(b => 'x' * 1000000) -> ('a' * 1000).replaceBy(regex(''), $b) %>",
        "replaced string would be longer",
    ),
    ("<% now().format('%c' * 1000000) %>", "string would be longer"),
    ("<% str(range(40).aggregate([$1, $1], [1])) %>", "would print more than"),
    ("<% [range(40).aggregate([$1, $1], [1])].join(',') %>", "would print more than"),
    (
        "<% json_dump(range(400).aggregate([$1], range(50000).toList())) %>",
        "string would be longer",
    ),
    (
        "<% yaml_dump(range(300).aggregate([$1], range(50000).toList())) %>",
        "string would be longer",
    ),
]


@pytest.mark.parametrize(("expression", "message"), AMPLIFIERS)
def test_amplifiers_are_refused_before_they_build(expression: str, message: str) -> None:
    tracemalloc.start()
    started = time.monotonic()
    try:
        fails(expression, match=message)
        elapsed = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Some inputs above take 20 MiB; upper, urlencode and tojson are checked after they
    # build (at most a few times their input), on inputs chosen to stay under the limit.
    assert peak < 128 * 1024 * 1024, f"{peak / 1024 / 1024:.0f} MiB"
    assert elapsed < 10, f"{elapsed:.1f}s"  # generous: tracing and a loaded machine


def test_amplifiers_keep_their_ordinary_results() -> None:
    assert ev("{{ 'ab'.ljust(5) }}|") == "ab   |"
    assert ev("{{ 'ab'.rjust(4, '.') ~ 'a'.center(5, '*') }}") == "..ab**a**"
    assert ev("{{ '7'.zfill(3) }}") == "007"
    assert ev("{{ 'a\tb'.expandtabs(4) }}") == "a   b"
    assert ev("{{ '-'.join(['a', 'b']) ~ ','.join(range(3) | map('string')) }}") == "a-b0,1,2"
    assert ev("{{ 'aaa'.replace('a', 'bb', 2) }}") == "bbbba"
    assert ev("{{ 'abc'.translate({97: 'xy', 98: None}) }}") == "xyc"
    assert ev("{{ 'a'.ljust(100000) | length }}") == 100_000
    assert ev("{{ '%s-%5d|%(x)s' % {'x': 1} if false else '%s-%5d' % ('a', 7) }}") == "a-    7"
    assert ev("{{ '%(a)s %(b)r' % {'a': 1, 'b': 'x'} }}") == "1 'x'"
    assert ev("{{ '%.2f|%s' % (3.14159, [1, 2]) }}") == "3.14|[1, 2]"
    assert ev("{{ '{0[a]}-{1}-{x:>3}'.format({'a': 5}, 2, x=3) }}") == "5-2-  3"
    assert ev("{{ '{:{}}|{}'.format('a', 3, 'z') }}") == "a  |z"
    assert ev("{{ ['a', 'b'] | join('-') }}") == "a-b"
    assert ev("{{ 'Hello World' | wordwrap(5) }}") == "Hello\nWorld"
    assert ev("{{ [[1], [1]] | string }} {{ [2, 1] | max }}") == "[[1], [1]] 2"
    assert ev("<% '7'.replace({'7' => '007'}) %>") == "007"
    assert ev("<% 'abc ab abc'.replace({ab => yy, abc => xx}, 1) %>") == "yyc ab xx"
    # yaql's lists are tuples
    assert ev("<% str([1, 'a']) + str(null) + str(true) %>") == "(1, 'a')nulltrue"
    assert ev("<% 'ac'.replace(regex('a(b)?'), '<\\\\1>') %>") == "<>c"
    assert ev("<% 'abc'.replaceBy(regex('b'), $1.value + '!') %>") == "ab!c"
    assert ev("<% ('a' * 1000).replace(regex('(a)'), '\\\\1\\\\1').len() %>") == 2000
    assert ev("<% len(now().format('%Y-%m-%d')) %>") == 10
    assert ev("<% json_dump([[1]]) %>") == "[\n    [\n        1\n    ]\n]"
    assert ev("<% yaml_dump({a => [1]}) %>") == "a:\n- 1\n"


def test_regex_substitutions_share_the_string_limit() -> None:
    assert regex_functions.MAX_RESULT_LENGTH == expr_module.MAX_STRING_LENGTH


# -- the work limit ----------------------------------------------------------------------

SMALL_BUDGET = 20_000
BIG: dict[str, Any] = {"big": list(range(5000)), "text": "x" * 100_000}

# Each would run for minutes, hours or for ever without the work limit.
HOSTILE = [
    "<% range(0, 1000000000).sum() %>",
    "<% range(0, 100000).select(range(0, 100000).sum()).sum() %>",
    "<% range(0, 100000).reduce($1 + str($2), '') %>",
    "<% let(x => $.big) -> range(0, 100000).select(-1 in $x).len() %>",
    "<% let(x => $.text) -> range(0, 100000).select($x.indexOf(y)).len() %>",
    "{% for a in _.big %}{% for b in _.big %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "{% set ns = namespace(s='') %}{% for i in range(100000) %}"
    "{% set ns.s = ns.s ~ 'x' * 100 %}{% endfor %}",
    "{% for i in range(100000) %}{{ _.big | sort | first }}{% endfor %}",
    "{% for i in range(100000) %}{% if -1 in _.big %}x{% endif %}{% endfor %}",
    "{% for i in range(100000) %}{% if -1 is in _.big %}x{% endif %}{% endfor %}",
    "{% for i in range(100000) %}{{ _.text.count('y') }}{% endfor %}",
    "{{ range(100000) | map('string') | join(',') * 10 }}",
]


@pytest.mark.parametrize("expression", HOSTILE)
def test_work_limit_stops_hostile_expressions(
    expression: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(expr_module, "MAX_WORK_STEPS", SMALL_BUDGET)
    error = fails(expression, BIG, match=f"needs more than {SMALL_BUDGET} steps of work")
    # the message names the expression (YAQL: its inside; Jinja: the whole template)
    assert f"[expression={expression.strip('<%> ')}, error=" in str(error)
    assert expr_module._METER.get() is None  # the meter belongs to the evaluation only


def test_work_limit_at_its_default_value() -> None:
    # The example of a workflow that must not hang the engine, at the real limit: it
    # fails within a few seconds instead of summing for minutes.
    fails(
        "<% range(0, 1000000000).sum() %>",
        match=f"needs more than {expr_module.MAX_WORK_STEPS} steps of work",
    )
    fails("{% for i in range(10**9) %}x{% endfor %}", match="Range too big")
    # Ordinary work stays well within it.
    assert ev("<% range(0, 2000).select($ * 2).sum() %>") == 3_998_000
    assert ev("<% $.big.where($ mod 7 = 0).len() %>", BIG) == 715
    assert ev("{{ _.big | map('string') | join(',') | length }}", BIG) == 23_889
    loop = "{% for i in _.big %}{% if i is divisibleby 1000 %}{{ i }},{% endif %}{% endfor %}"
    assert ev(loop, BIG) == "0,1000,2000,3000,4000,"


def test_work_limit_counts_one_evaluate_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(expr_module, "MAX_WORK_STEPS", SMALL_BUDGET)
    costly = "<% range(0, 80).sum() %>"  # some 60 % of the small budget
    assert ev(costly) == 3160
    assert ev(costly) == 3160  # a new evaluation has a new budget
    # one evaluate() call (a task's whole publish, say) shares one budget
    fails({"a": costly, "b": costly}, match="steps of work")


# -- caching -----------------------------------------------------------------------------


def test_parsed_expressions_are_cached() -> None:
    expression = "<% $.a + 41 %>"
    ev(expression)
    hits = expr_module._parse_yaql.cache_info().hits
    assert ev(expression) == 42
    assert expr_module._parse_yaql.cache_info().hits > hits
    template = "a {{ _.a }} b"
    ev(template)
    hits = expr_module._jinja_template.cache_info().hits
    assert ev(template) == "a 1 b"
    assert expr_module._jinja_template.cache_info().hits > hits


def test_literal_is_what_evaluate_gives_a_value_without_expressions() -> None:
    for value in ["std.noop", {"a": [1, (2, "x")], "b": None}, [], {}, 3, None, "50%"]:
        assert literal(value) == evaluate(value, {"unused": True})
    nested = {"k": ["plain", "<% $.x %>"]}
    assert literal(nested) is HAS_EXPRESSION and literal("{{ 1 }}") is HAS_EXPRESSION
    source = {"a": {"b": 1}}
    copy = literal(source)
    assert copy == source and copy is not source and copy["a"] is not source["a"]
