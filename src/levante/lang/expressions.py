"""YAQL (``<% %>``) and Jinja (``{{ }}`` / ``{% %}``) expressions, evaluated as Mistral does.

This module owns every expression Levante evaluates: it finds the expressions embedded in
JSON-like data (dict, list, str, int, float, bool, None), checks their syntax, evaluates
them against a data context and names the tasks they read through ``task('x')``.

Rules:

* Pure. No I/O, no clock, no asyncio. What an expression may learn about the world (tasks,
  the execution, its env, workflow variables) comes from the caller through
  :class:`ExpressionHost`. Two documented exceptions, both inherited from Mistral:
  ``uuid()`` returns a random uuid4, and YAQL's standard library keeps ``now()``. (The
  time limit of regular expressions reads the CPU clock; see below.)
* Mistral's behaviour is the reference (openstack/mistral ``mistral/expressions/``):
  which strings are expressions, whole-string expressions give native values while text
  around or between expressions gives string interpolation (``str()`` of each value),
  dict values (never keys) and list items are evaluated recursively, the same YAQL engine
  options and standard library, the same Jinja environment options (StrictUndefined,
  trim_blocks, lstrip_blocks), the same custom functions and the same error wording
  ("Can not evaluate YAQL expression [expression=..., error=...]").
* Results are JSON-like: yaql's frozen dicts, tuples, sets and iterators and Jinja's
  generators come back as plain dicts and lists (datetimes as Mistral stores them).
* Sandboxed and bounded. Expressions only see the JSON-like context and the functions
  below. YAQL cannot touch Python objects (its lexer rejects ``__`` names and only
  registered functions are callable); Jinja runs in a sandbox that refuses internal
  attributes, refuses in-place mutation of the context and of host data, and bounds the
  size of what ``*``, ``**``, ``+``, ``~``, ``%``, ``str.format``, ``range``, the
  amplifying filters and ``str`` methods may build. YAQL runs with ``limitIterators`` /
  ``memoryQuota`` and checked big-number and string functions. Whatever may build far
  more than it is given is checked before it builds (widths, repeated format arguments,
  joins, replacements, dump indentation, ``str()`` of a list sharing a list). Rendered
  text is capped (:data:`MAX_RENDERED_LENGTH`).
  The work of one evaluate() call is metered (:class:`_Meter`, :data:`MAX_WORK_STEPS`):
  calls, loop items and the size of the values handled, counted rather than timed so
  that a replay evaluates the same way. Regular expressions are the one thing timed, as
  backtracking cannot be counted: yaql's regex functions are replaced by
  :mod:`levante.lang.regex_functions`, whose patterns are bounded in size and share
  :data:`REGEX_TIMEOUT_SECONDS` of CPU time per evaluate() call; Jinja has no
  regular-expression filter, and ``urlize`` (whose own regexes are fixed) is metered.
* Fast. The yaql engine and its root context are built once at import; parsed YAQL
  expressions and compiled Jinja templates are cached by source string (bounded LRU).
"""

from __future__ import annotations

import collections.abc  # yaql 3.2 uses collections.abc without importing it: keep this first
import contextvars
import datetime
import decimal
import functools
import inspect
import json
import re
import string
import sys
import types
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, Protocol

import jinja2
import jinja2.compiler
import jinja2.nodes
import jinja2.utils
import yaml
import yaql
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment, modifies_known_mutable
from yaql.language import expressions as yaql_expressions
from yaql.language import factory as yaql_factory
from yaql.language import runner as yaql_runner
from yaql.language import specs as yaql_specs
from yaql.language import utils as yaql_utils
from yaql.language import yaqltypes

from levante.errors import ExpressionError, LevanteError
from levante.lang import regex_functions
from levante.lang.yaql_signatures import declare

__all__ = [
    "HAS_EXPRESSION",
    "MAX_RENDERED_LENGTH",
    "MAX_WORK_STEPS",
    "NULL_HOST",
    "REGEX_TIMEOUT_SECONDS",
    "ExpressionHost",
    "NullHost",
    "check_syntax",
    "evaluate",
    "is_expression",
    "literal",
    "referenced_task_names",
]

# -- limits ------------------------------------------------------------------------------

#: yaql ``limitIterators``: the most elements any collection handled or returned by a YAQL
#: expression may have (Mistral's default is unlimited).
YAQL_LIMIT_ITERATORS: Final = 100_000
#: yaql ``memoryQuota`` in bytes, checked by yaql on every value a function produces
#: (shallow size; strings are counted whole). Mistral's default is unlimited.
YAQL_MEMORY_QUOTA: Final = 16 * 1024 * 1024
#: The longest string a Jinja operator or filter may build.
MAX_STRING_LENGTH: Final = 16 * 1024 * 1024
#: The longest list a Jinja operator or filter may build.
MAX_COLLECTION_LENGTH: Final = YAQL_LIMIT_ITERATORS
#: The longest text an interpolation (text around expressions, Jinja blocks) may produce.
MAX_RENDERED_LENGTH: Final = 1024 * 1024
#: The most values (containers and scalars) and characters one native result may hold.
MAX_RESULT_NODES: Final = 1_000_000
MAX_RESULT_CHARS: Final = 64 * 1024 * 1024
#: The largest integer (in bits) ``*``, ``**`` and bit shifts may build.
MAX_INT_BITS: Final = 65_536
#: Total number of elements all ``range()`` calls of one Jinja evaluation may produce.
JINJA_RANGE_BUDGET: Final = 1_000_000
#: Parsed YAQL expressions and compiled Jinja templates kept, by source string.
CACHE_SIZE: Final = 4096

#: The work one evaluate() call may do, in steps (see :class:`_Meter`). The step costs
#: below make it about two seconds of CPU on a small machine. Read at each evaluation.
MAX_WORK_STEPS = 5_000_000
YAQL_CALL_STEPS: Final = 200  # one yaql function or operator call (tens of microseconds)
JINJA_CALL_STEPS: Final = 16  # one Jinja function, method, macro or filter call
ITEM_STEPS: Final = 1  # one item a Jinja loop or a yaql function goes through one by one
ITEMS_PER_STEP: Final = 4  # a list (dict, set, range) handed over or built, per this many items
CHARS_PER_STEP: Final = 1024  # a string handed over or built, per this many characters
URLIZE_CHAR_STEPS: Final = 3  # the urlize filter, per character of its text (see _check_urlize)
URLIZE_RUN_SQUARES_PER_STEP: Final = 16  # and per this many (run of punctuation length)²
WORDWRAP_CHARS_PER_STEP: Final = 2  # the wordwrap filter, per this many characters
WORDWRAP_COPIED_CHARS_PER_STEP: Final = 16 * 1024  # and per this many copied (see _check_wordwrap)

#: The CPU time all the regular expressions of one evaluate() call may take together
#: (see :mod:`levante.lang.regex_functions`): the one limit that is timed, since
#: backtracking cannot be counted. Read at each evaluation.
REGEX_TIMEOUT_SECONDS = 1.0


# -- the host ----------------------------------------------------------------------------


class ExpressionHost(Protocol):
    """What expressions may ask about the running workflow (Mistral's custom functions)."""

    def task(self, name: str | None) -> Mapping[str, Any] | None:
        """``task(name)``: {id, name, spec, state, state_info, result, published, ...}.

        ``None`` names the current task. ``None`` is returned for an unknown task.
        """
        ...

    def tasks(
        self, execution_id: str | None, recursive: bool, state: str | None, flat: bool
    ) -> Sequence[Mapping[str, Any]]:
        """Mistral's ``tasks()``: the task executions of an execution (None: the current
        one), oldest first, each as ``task(name)`` shows it, with ``type`` (``ACTION`` or
        ``WORKFLOW``); ``recursive`` adds those of its subworkflow executions, ``state``
        keeps those in that state, ``flat`` leaves out a workflow task whose state is
        that of one of its subworkflow executions."""
        ...

    def execution(self) -> Mapping[str, Any]:
        """``execution()``: {id, name, spec, input, params, created_at, ...}."""
        ...

    def env(self) -> Mapping[str, Any]:
        """``env()``: the execution's environment."""
        ...

    def global_var(self, name: str) -> Any:
        """``global(name)``: a workflow variable of the execution (None when unset)."""
        ...


class NullHost:
    """A host for callers without a workflow: no tasks, an empty execution and env."""

    def task(self, name: str | None) -> Mapping[str, Any] | None:
        return None

    def tasks(
        self, execution_id: str | None, recursive: bool, state: str | None, flat: bool
    ) -> Sequence[Mapping[str, Any]]:
        return ()

    def execution(self) -> Mapping[str, Any]:
        return {}

    def env(self) -> Mapping[str, Any]:
        return {}

    def global_var(self, name: str) -> Any:
        return None


NULL_HOST: Final[ExpressionHost] = NullHost()


# -- finding expressions (mistral/expressions/{yaql,jinja}_expression.py) -----------------

# Mistral's patterns, deliberately without re.DOTALL: an expression never spans lines.
_YAQL_PATTERN: Final = re.compile(r"<%.*?%>")
_JINJA_VAR_PATTERN: Final = re.compile(r"{{(.*?)}}")
_JINJA_BLOCK_PATTERN: Final = re.compile(r"{%(.*?)%}")

# Keys Mistral copies from the data context into the evaluation context ($__env, __env).
_MISTRAL_CONTEXT_KEYS: Final = ("__env", "__execution", "__task_execution")


def _has_jinja(s: str) -> bool:
    return bool(_JINJA_VAR_PATTERN.search(s) or _JINJA_BLOCK_PATTERN.search(s))


def _has_yaql(s: str) -> bool:
    return bool(_YAQL_PATTERN.search(s))


def _might_be_expression(s: str) -> bool:
    return "<%" in s or "{{" in s or "{%" in s


def _yaql_inner(match_text: str) -> str:
    """The expression inside ``<% ... %>``, trimmed the way Mistral trims it."""
    return match_text.strip("<%>").strip()


def is_expression(value: Any) -> bool:
    """True for a string holding a YAQL ``<% %>`` or a Jinja ``{{ }}`` / ``{% %}`` part."""
    return (
        isinstance(value, str)
        and _might_be_expression(value)
        and (_has_jinja(value) or _has_yaql(value))
    )


# -- errors ------------------------------------------------------------------------------


class _LimitExceeded(Exception):
    """An expression tried to build something larger than the limits allow."""


# -- the work meter ----------------------------------------------------------------------


def _size_steps(value: Any) -> int:
    """What handing over or building ``value`` costs: copying or scanning it."""
    if isinstance(value, (str, bytes, bytearray)):
        return len(value) // CHARS_PER_STEP
    if isinstance(value, (Mapping, list, tuple, set, frozenset, range)):
        return len(value) // ITEMS_PER_STEP
    return 0


def _items_steps(value: Any) -> int:
    """What a filter or test costs for its input: it may call Python code for each item
    (a sort key, an attribute getter)."""
    if isinstance(value, (Mapping, list, tuple, set, frozenset, range)):
        return len(value) * ITEM_STEPS
    return _size_steps(value)


class _Meter:
    """The work budget of one evaluate() call, counted in steps.

    Time cannot be measured here (the language ring reads no clock, so that replaying an
    execution evaluates the same way), so the work is counted instead: yaql function
    calls, Jinja calls and filters, items that loops and functions go through, and the
    size of the values handed to and built by them. Going over the budget raises; once
    over, every later step raises again, so code that swallows one exception cannot go on.
    """

    __slots__ = ("budget", "left")

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.left = budget

    def take(self, steps: int) -> None:
        self.left -= steps
        if self.left < 0:
            raise _LimitExceeded(
                f"the expression needs more than {self.budget} steps of work, the limit of "
                "one evaluation (loops, function calls and the size of the values they handle)"
            )

    def take_size(self, value: Any) -> None:
        steps = _size_steps(value)
        if steps:
            self.take(steps)

    def items(self, iterable: Iterable[Any]) -> Iterator[Any]:
        for item in iterable:
            self.take(ITEM_STEPS)
            yield item


# The meter of the evaluation running in this thread (or asyncio task), if any.
_METER: Final[contextvars.ContextVar[_Meter | None]] = contextvars.ContextVar(
    "levante_expression_meter", default=None
)


def _install_yaql_meter() -> None:
    """Count yaql's work: every function call and the items its functions iterate.

    yaql has no evaluation hooks, so two of its module functions are wrapped: ``runner.call``
    (which every function and operator call goes through) and ``utils.limit_iterable``
    (which every collection parameter goes through). Outside an evaluation (no meter) the
    wrappers only pass the call on; other users of yaql in the process are unaffected.
    """
    original_call = yaql_runner.call
    original_limit = yaql_utils.limit_iterable
    if getattr(original_call, "levante_metered", False):
        return

    def call(*args: Any, **kwargs: Any) -> Any:
        meter = _METER.get()
        if meter is None:
            return original_call(*args, **kwargs)
        meter.take(YAQL_CALL_STEPS)
        result = original_call(*args, **kwargs)
        meter.take_size(result)
        return result

    def limit_iterable(iterable: Any, limit_or_engine: Any) -> Any:
        limited = original_limit(iterable, limit_or_engine)
        meter = _METER.get()
        if meter is None:
            return limited
        if isinstance(limited, (Mapping, Sequence, collections.abc.Set)):
            meter.take_size(limited)  # a function may scan it in Python: charged up front
            return limited
        return meter.items(limited)

    call.levante_metered = True  # type: ignore[attr-defined]
    yaql_runner.call = call
    yaql_utils.limit_iterable = limit_iterable


_install_yaql_meter()


def _yaql_failure(expression: str, error: BaseException) -> ExpressionError:
    return ExpressionError(
        f"Can not evaluate YAQL expression [expression={expression}, error={error}]"
    )


def _jinja_failure(expression: str, error: BaseException) -> ExpressionError:
    return ExpressionError(
        f"Can not evaluate Jinja expression [expression={expression}, error={error}]"
    )


def _passes_through(error: BaseException) -> bool:
    """Errors of the host (store failures...) reach the caller unwrapped, as in Mistral."""
    return isinstance(error, LevanteError) and not isinstance(error, ExpressionError)


# -- results: back to plain JSON-like data -------------------------------------------------


class _Budget:
    __slots__ = ("chars", "collection_limit", "nodes")

    def __init__(self, collection_limit: int | None) -> None:
        self.nodes = MAX_RESULT_NODES
        self.chars = MAX_RESULT_CHARS
        self.collection_limit = collection_limit

    def take(self, nodes: int = 1, chars: int = 0) -> None:
        self.nodes -= nodes
        self.chars -= chars
        if self.nodes < 0:
            raise _LimitExceeded(f"the result holds more than {MAX_RESULT_NODES} values")
        if self.chars < 0:
            raise _LimitExceeded(f"the result holds more than {MAX_RESULT_CHARS} characters")

    def check_length(self, length: int) -> None:
        if self.collection_limit is not None and length > self.collection_limit:
            raise _LimitExceeded(f"Collection length exceeds {self.collection_limit} elements")


# oslo.serialization's to_primitive formats, which is how Mistral stores these values.
_DATETIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%S.%f"
_DATE_FORMAT: Final = "%Y-%m-%d"


def _to_plain(value: Any, budget: _Budget) -> Any:
    """A fresh JSON-like copy of ``value`` (raises on values that have no JSON form)."""
    if value is None or isinstance(value, (bool, int, float)):
        budget.take()
        return value
    if isinstance(value, str):
        budget.take(chars=len(value))
        return value if type(value) is str else str.__str__(value)
    if isinstance(value, jinja2.Undefined):
        str(value)  # a StrictUndefined raises its UndefinedError (or SecurityError) here
        return None
    if isinstance(value, Mapping):
        budget.check_length(len(value))
        budget.take()
        return {_plain_key(k, budget): _to_plain(v, budget) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        budget.check_length(len(value))
        budget.take()
        return [_to_plain(item, budget) for item in value]
    if isinstance(value, (set, frozenset)):
        budget.check_length(len(value))
        budget.take()
        items = [_to_plain(item, budget) for item in value]
        try:
            return sorted(items)  # a stable order; Python's set order varies between runs
        except TypeError:
            return items
    if isinstance(value, datetime.datetime):
        budget.take()
        return value.strftime(_DATETIME_FORMAT)
    if isinstance(value, datetime.date):
        budget.take()
        return value.strftime(_DATE_FORMAT)
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        budget.take()
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        budget.take(chars=len(value))
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, Iterable) and not isinstance(value, (Mapping, str)):
        budget.take()
        out: list[Any] = []
        limit = budget.collection_limit
        for item in value:
            if limit is not None and len(out) >= limit:
                raise _LimitExceeded(f"Collection length exceeds {limit} elements")
            out.append(_to_plain(item, budget))
        return out
    raise _LimitExceeded(f"a value of type '{type(value).__name__}' has no JSON form")


def _plain_key(key: Any, budget: _Budget) -> Any:
    if key is None or isinstance(key, (str, bool, int, float)):
        return _to_plain(key, budget)
    raise _LimitExceeded(f"a dict key of type '{type(key).__name__}' has no JSON form")


def _to_text(value: Any, budget: _Budget) -> str:
    """How Mistral renders one value inside a string: ``str()`` of the value."""
    if isinstance(value, (datetime.date, str)):
        return str(value)
    return str(_to_plain(value, budget))


def _plain(value: Any) -> Any:
    """A plain copy of a value passed to a function (yaql hands over frozen structures)."""
    return _to_plain(value, _Budget(None))


# -- the functions (mistral/expressions/std_functions.py) ----------------------------------


def _json_dump(data: Any) -> str:
    plain = _plain(data)
    _check_dump_size(plain, 4)
    return json.dumps(plain, indent=4)


def _json_parse(data: Any) -> Any:
    return json.loads(data)


class _YamlDumper(yaml.SafeDumper):
    """Mistral's yaml_dump: safe, block style, never anchors/aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _yaml_dump(data: Any) -> str:
    plain = _plain(data)
    _check_dump_size(plain, 2)
    return yaml.dump(plain, Dumper=_YamlDumper, default_flow_style=False)


class _YamlLoader(yaml.SafeLoader):
    """Mistral's hardened yaml_parse: anchors and aliases are read as plain text (no
    "billion laughs" expansion) and a scalar may start with ``@``."""

    def fetch_anchor(self) -> None:
        self.fetch_plain()

    def fetch_alias(self) -> None:
        self.fetch_plain()

    def check_plain(self) -> bool:
        return self.peek() == "@" or bool(super().check_plain())


def _yaml_parse(data: Any) -> Any:
    return yaml.load(data, Loader=_YamlLoader)


def _uuid() -> str:
    return str(uuid.uuid4())


def _task_name(name: Any) -> str | None:
    return None if name is None else str(name)


def _tasks(
    host: ExpressionHost,
    workflow_execution_id: Any = None,
    recursive: Any = False,
    state: Any = None,
    flat: Any = False,
) -> list[Mapping[str, Any]]:
    """Mistral's ``tasks(workflow_execution_id, recursive, state, flat)``; no id (or an
    empty one) means the current execution."""
    execution_id = str(workflow_execution_id) if workflow_execution_id else None
    return list(host.tasks(execution_id, bool(recursive), state or None, bool(flat)))


# -- YAQL (mistral/expressions/yaql_expression.py) -----------------------------------------

_YAQL_ENGINE_OPTIONS: Final[dict[str, Any]] = {
    "yaql.limitIterators": YAQL_LIMIT_ITERATORS,
    "yaql.memoryQuota": YAQL_MEMORY_QUOTA,
    "yaql.convertTuplesToLists": True,
    "yaql.convertSetsToLists": True,
    "yaql.iterableDicts": False,
    # Output conversion is done here (_to_plain) with a total budget, instead of by yaql.
    "yaql.convertOutputData": False,
}

# A key the YAQL lexer cannot spell, so expressions cannot reach the host object.
_YAQL_HOST_KEY: Final = "levante host"


def _yaql_host(context: Any) -> ExpressionHost:
    host: ExpressionHost = context[_YAQL_HOST_KEY]
    return host


def _yaql_env(context: Any) -> Any:
    return _yaql_host(context).env()


def _yaql_execution(context: Any) -> Any:
    return _yaql_host(context).execution()


def _yaql_global(context: Any, var_name: Any) -> Any:
    return _yaql_host(context).global_var(str(var_name))


def _yaql_task(context: Any, task_name: Any = None) -> Any:
    return _yaql_host(context).task(_task_name(task_name))


def _yaql_tasks(
    context: Any,
    workflow_execution_id: Any = None,
    recursive: Any = False,
    state: Any = None,
    flat: Any = False,
) -> Any:
    return _tasks(_yaql_host(context), workflow_execution_id, recursive, state, flat)


def _yaql_json_dump(context: Any, data: Any) -> str:
    return _json_dump(data)


def _yaql_json_parse(context: Any, data: Any) -> Any:
    return _json_parse(data)


def _yaql_yaml_dump(context: Any, data: Any) -> str:
    return _yaml_dump(data)


def _yaql_yaml_parse(context: Any, data: Any) -> Any:
    return _yaml_parse(data)


def _yaql_uuid(context: Any = None) -> str:
    return _uuid()


def _check_int_bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise _LimitExceeded(f"the number would have more than {MAX_INT_BITS} bits")


def _check_product(left: Any, right: Any) -> None:
    if isinstance(left, int) and isinstance(right, int):
        _check_int_bits(left.bit_length() + right.bit_length())


def _check_power(base: Any, exponent: Any) -> None:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        _check_int_bits(base.bit_length() * exponent)


def _check_string_size(length: int) -> None:
    if length > MAX_STRING_LENGTH:
        raise _LimitExceeded(f"the string would be longer than {MAX_STRING_LENGTH} characters")


def _check_text_length(value: Any) -> None:
    """``str()`` of a container prints a value it holds twice twice: a list built by
    doubling itself 40 times is 40 small lists in memory and 2**40 items in print. Walk
    what ``str()`` would print, bounded, before printing it."""
    if not isinstance(value, (Mapping, list, tuple, set, frozenset)):
        return
    stack: list[Any] = [value]
    nodes = chars = 0
    while stack:
        item = stack.pop()
        nodes += 1
        if isinstance(item, str):
            chars += len(item)
        elif isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        if nodes > MAX_RESULT_NODES:
            raise _LimitExceeded(f"the value would print more than {MAX_RESULT_NODES} values")
        _check_string_size(chars)


def _check_dump_size(value: Any, indent: int) -> None:
    """A JSON or YAML dump indents each value by its depth: a deep value dumps to far
    more text than it holds. Count the indentation and the strings before dumping."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    size = 0
    while stack:
        item, depth = stack.pop()
        size += indent * depth + 8  # its line: indentation, punctuation, a short scalar
        if isinstance(item, str):
            size += len(item)
        elif isinstance(item, Mapping):
            stack.extend((k, depth + 1) for k in item)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        _check_string_size(size)


# Checked versions of the yaql operators whose cost is not bounded by memoryQuota (it is
# checked only after the value exists). Registered above the standard library, they
# shadow its overloads with the same signature and leave the others alone.


def _yaql_multiply(left: Any, right: Any) -> Any:
    _check_product(left, right)
    return left * right


def _yaql_pow(a: Any, b: Any, c: Any = None) -> Any:
    if c is None:
        _check_power(a, b)
        return a**b
    return pow(a, b, c)


def _yaql_shift_bits_left(value: int, bits_number: int) -> int:
    if value:
        _check_int_bits(value.bit_length() + bits_number)
    return value << bits_number


def _yaql_replace(string: str, old: str, new: str, count: int = -1) -> str:
    _check_string_size(_replaced_length(string, old, new, None if count < 0 else count))
    return string.replace(old, new, count)


def _yaql_replace_many(string: str, str_func: Any, replacements: Any, count: int = -1) -> str:
    for key, value in replacements.items():
        old, new = str_func(key), str_func(value)
        _check_string_size(_replaced_length(string, old, new, None if count < 0 else count))
        string = string.replace(old, new, count)
    return string


def _yaql_str(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    _check_text_length(value)
    return str(value)


#: The longest text one strftime directive (``%c``, ``%A``, ``%Z``...) gives.
_STRFTIME_DIRECTIVE_LENGTH: Final = 64


def _yaql_format_datetime(dt: datetime.datetime, format__: str) -> str:
    _check_string_size(len(format__) + format__.count("%") * _STRFTIME_DIRECTIVE_LENGTH)
    return dt.strftime(format__)


def _checked_yaql_operators() -> list[Any]:
    number, nullable_number = yaqltypes.Number(), yaqltypes.Number(nullable=True)
    text = yaqltypes.String()
    return [
        declare(_yaql_multiply, "#operator_*", False, left=number, right=number),
        declare(_yaql_pow, "pow", False, a=number, b=number, c=nullable_number),
        declare(_yaql_shift_bits_left, "shiftBitsLeft", False, value=int, bits_number=int),
        declare(_yaql_replace, "replace", True, string=text, old=text, new=text),
        yaql_specs.inject("str_func", yaqltypes.Delegate("str"))(
            declare(
                _yaql_replace_many,
                "replace",
                True,
                string=text,
                replacements=yaql_utils.MappingType,
                count=int,
            )
        ),
        declare(_yaql_str, "str", False, value=yaqltypes.PythonType(object, nullable=True)),
        declare(_yaql_format_datetime, "format", True, dt=yaqltypes.DateTime(), format__=text),
    ]


def _replaced_length(s: str, old: str, new: str, count: int | None) -> int:
    occurrences = s.count(old) if old else len(s) + 1
    if count is not None:
        occurrences = min(occurrences, count)
    return len(s) + occurrences * (len(new) - len(old))


_YAQL_FUNCTIONS: Final[dict[str, Callable[..., Any]]] = {
    "env": _yaql_env,
    "execution": _yaql_execution,
    "global": _yaql_global,
    "json_dump": _yaql_json_dump,
    "json_parse": _yaql_json_parse,
    "task": _yaql_task,
    "tasks": _yaql_tasks,
    "uuid": _yaql_uuid,
    "yaml_dump": _yaql_yaml_dump,
    "yaml_parse": _yaql_yaml_parse,
}


def _build_yaql() -> tuple[Any, Any]:
    engine = yaql_factory.YaqlFactory(keyword_operator="=>", allow_delegates=False).create(
        options=dict(_YAQL_ENGINE_OPTIONS)
    )
    # yaql's regex functions run re, which cannot be interrupted: Levante's own instead.
    root = yaql.create_context(regex=False).create_child_context()
    regex_functions.register(root)
    for name, function in _YAQL_FUNCTIONS.items():
        root.register_function(function, name=name)
    for checked in _checked_yaql_operators():
        root.register_function(checked)
    return engine, root


_YAQL_ENGINE, _YAQL_ROOT = _build_yaql()


@functools.lru_cache(maxsize=CACHE_SIZE)
def _parse_yaql(source: str) -> Any:
    return _YAQL_ENGINE(source)


# A plain path (``$.a.b``, ``task(x).result``, ``env().foo``) is most of what workflows
# write. It is walked directly on the plain data, skipping yaql's machinery and the
# conversion of the whole context; anything unusual (a missing key, a list on the way, a
# big string) falls back to yaql, so results and errors stay exactly yaql's.
_YaqlPath = tuple[str, str | None, tuple[str, ...]]  # (root function or "$", argument, keys)
_HOST_ROOTS: Final = frozenset({"task", "env", "execution"})


@functools.lru_cache(maxsize=CACHE_SIZE)
def _yaql_path(source: str) -> _YaqlPath | None:
    try:
        node = _parse_yaql(source)
    except Exception:
        return None
    if isinstance(node, yaql_expressions.Statement):
        node = node.expression
    keys: list[str] = []
    while (
        isinstance(node, yaql_expressions.BinaryOperator)
        and node.name == "#operator_."
        and isinstance(node.args[1], yaql_expressions.KeywordConstant)
    ):
        keys.append(node.args[1].value)
        node = node.args[0]
    keys.reverse()
    if isinstance(node, yaql_expressions.GetContextValue):
        path = node.path
        if isinstance(path, yaql_expressions.Constant) and path.value == "$":
            return ("$", None, tuple(keys))
        return None
    if type(node) is not yaql_expressions.Function or node.name not in _HOST_ROOTS:
        return None
    args = node.args
    if not args:
        return (node.name, None, tuple(keys))
    if node.name == "task" and len(args) == 1 and type(args[0]) in _YAQL_LITERALS:
        return ("task", _task_name(args[0].value), tuple(keys))
    return None


_YAQL_LITERALS: Final = (yaql_expressions.Constant, yaql_expressions.KeywordConstant)
_SLOW: Final = object()


def _walk_path(value: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(value, Mapping) or key not in value:
            return _SLOW
        value = value[key]
    if isinstance(value, (str, bytes)) and sys.getsizeof(value, 0) > YAQL_MEMORY_QUOTA:
        return _SLOW
    return value


def _yaql_grammar_error(source: str) -> ExpressionError | None:
    try:
        _parse_yaql(source)
    except Exception as e:
        return ExpressionError(
            f"Invalid grammar of YAQL expression [expression={source}, error={e}]"
        )
    return None


# -- Jinja (mistral/expressions/jinja_expression.py) ---------------------------------------

# A context key templates cannot spell: the per-evaluation state (host functions, budgets).
_JINJA_STATE_KEY: Final = "levante state"

_PRINTF_SPEC: Final = re.compile(r"%(?:\([^)]*\))?[#0 +\-]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[a-zA-Z%]")
_NUMBER: Final = re.compile(r"\d+")


def _int_arguments(args: Any) -> Iterator[int]:
    values: Iterable[Any]
    if isinstance(args, Mapping):
        values = args.values()
    elif isinstance(args, (tuple, list)):
        values = args
    else:
        values = (args,)
    for value in values:
        if isinstance(value, int):
            yield value


def _check_printf(template: Any, args: Any) -> None:
    """``'%9999999d' % x`` would allocate before any check: look at the widths first,
    then at the whole: ``'%s%s%s' % (x, x, x)`` prints ``x`` three times."""
    if not isinstance(template, str):
        return
    matches = list(_PRINTF_SPEC.finditer(template))
    for match in matches:
        for width in match.groups():
            if width == "*":
                if any(abs(v) > MAX_STRING_LENGTH for v in _int_arguments(args)):
                    raise _LimitExceeded("a format width is too large")
            elif width is not None and int(width) > MAX_STRING_LENGTH:
                raise _LimitExceeded("a format width is too large")
    if "%" in template:
        _check_string_size(_printf_size(template, matches, args))


def _printf_size(template: str, matches: list[re.Match[str]], args: Any) -> int:
    """At most how long ``template % args`` is: its text, and for each conversion its
    width, its precision and its printed argument (each argument printed once here, to
    measure it)."""
    if template.count("%") != sum(m.group().count("%") for m in matches):
        if "%(" in template:  # a key with parentheses inside: re-reading it is not worth it
            raise _LimitExceeded("a format key holding parentheses cannot be checked")
        return 0  # not a valid format: Python refuses it before printing anything
    values = list(args) if isinstance(args, tuple) else [args]
    printed: dict[tuple[int, str], int] = {}

    def length(value: Any, conversion: str) -> int:
        if (id(value), conversion) not in printed:
            printed[id(value), conversion] = _printed_length(value, conversion)
        return printed[id(value), conversion]

    size = len(template)
    position = 0
    for match in matches:
        spec = match.group()
        size += max((int(n) for n in _NUMBER.findall(spec[spec.rfind(")") + 1 :])), default=0)
        conversion = spec[-1]
        if conversion == "%":
            continue
        if spec.startswith("%(") and isinstance(args, Mapping):
            key = spec[2 : spec.rfind(")")]
            size += length(args[key], conversion) if key in args else 0
            continue
        position += spec.count("*")
        size += length(values[position], conversion) if position < len(values) else 0
        position += 1
    return size


def _printed_length(value: Any, conversion: str) -> int:
    """At most how long ``%s`` (``%r``, ``%a``, ``%d``...) prints ``value``."""
    if isinstance(value, str):
        # repr() and ascii() escape a character in at most 10 (\U0001f600)
        return len(value) if conversion not in "ra" else 10 * len(value) + 2
    if isinstance(value, float):
        return _FLOAT_TEXT  # %f prints a float whole: 1e308 has 309 digits
    _check_text_length(value)
    return len(ascii(value) if conversion == "a" else repr(value))


#: The longest text ``%f`` gives for a float (1e308 has 309 digits).
_FLOAT_TEXT: Final = 320


def _check_format_string(template: str, args: Any, kwargs: Any) -> None:
    """The same check for ``str.format`` / ``str.format_map``."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:
        return  # str.format reports it
    for _literal, _field, spec, _conversion in parsed:
        if not spec:
            continue
        if "{" in spec:
            ints = [*_int_arguments(args), *_int_arguments(kwargs)]
            for arg in args if isinstance(args, (tuple, list)) else ():
                ints.extend(_int_arguments(arg) if isinstance(arg, Mapping) else ())
            if any(abs(v) > MAX_STRING_LENGTH for v in ints):
                raise _LimitExceeded("a format width is too large")
        elif any(int(n) > MAX_STRING_LENGTH for n in _NUMBER.findall(spec)):
            raise _LimitExceeded("a format width is too large")
    _check_string_size(_format_size(parsed, args, kwargs))


_FIELD_ROOT: Final = re.compile(r"[^.\[]*")


def _format_size(parsed: list[tuple[str, Any, Any, Any]], args: Any, kwargs: Any) -> int:
    """At most how long ``str.format`` prints: its text, and for each field its widths
    and the printed value it names (``{0[key]}``, ``{0.name}``: the whole argument), so
    that ``'{0}{0}{0}'.format(x)`` counts ``x`` three times (and prints it once here)."""
    positional = list(args) if isinstance(args, (tuple, list)) else []
    named = kwargs if isinstance(kwargs, Mapping) else {}
    nested_widths = max((abs(v) for v in (*_int_arguments(args), *_int_arguments(named))),
                        default=0)  # fmt: skip
    printed: dict[tuple[int, str], int] = {}
    size = auto = 0
    for literal, field, spec, conversion in parsed:
        size += len(literal)
        if field is None:
            continue
        root = _FIELD_ROOT.match(field)
        name = root.group() if root else ""
        value: Any = None
        if not name:
            value = positional[auto] if auto < len(positional) else None
            auto += 1
        elif name.isdigit():
            value = positional[int(name)] if int(name) < len(positional) else None
        else:
            value = named.get(name)
        key = (id(value), conversion or "s")
        if key not in printed:
            printed[key] = _printed_length(value, conversion or "s")
        size += printed[key]
        if spec:
            auto += spec.count("{}")
            numbers = [int(n) for n in _NUMBER.findall(spec)]
            size += max(numbers, default=0) + (nested_widths if "{" in spec else 0)
    return size


def _sequence_length(value: Any) -> int | None:
    return len(value) if isinstance(value, (str, list, tuple)) else None


def _check_binop(operator: str, left: Any, right: Any) -> None:
    if operator == "+":
        a, b = _sequence_length(left), _sequence_length(right)
        if a is not None and b is not None:
            _check_built_size(left, a + b)
    elif operator == "*":
        for seq, times in ((left, right), (right, left)):
            n = _sequence_length(seq)
            if n is not None and isinstance(times, int):
                _check_built_size(seq, n * times)
                return
        _check_product(left, right)
    elif operator == "**":
        _check_power(left, right)
    elif operator == "%":
        _check_printf(left, right)


def _check_built_size(sample: Any, size: int) -> None:
    if isinstance(sample, str):
        _check_string_size(size)
    elif size > MAX_COLLECTION_LENGTH:
        raise _LimitExceeded(f"the list would be longer than {MAX_COLLECTION_LENGTH} items")


def _check_width(text: str, width: Any = 0, *rest: Any) -> None:
    if isinstance(width, int):
        _check_string_size(width)


def _check_expandtabs(text: str, tabsize: Any = 8) -> None:
    if isinstance(tabsize, int) and tabsize > 0:
        _check_string_size(len(text) + text.count("\t") * tabsize)


def _check_str_join(text: str, items: Any = ()) -> None:
    items = list(items)  # the caller hands the same list on
    _check_string_size(len(text) * max(len(items) - 1, 0)
                       + sum(len(i) for i in items if isinstance(i, str)))  # fmt: skip


def _check_str_replace(text: str, old: Any = "", new: Any = "", count: Any = -1) -> None:
    if isinstance(old, str) and isinstance(new, str) and isinstance(count, int):
        _check_string_size(_replaced_length(text, old, new, None if count < 0 else count))


def _check_translate(text: str, table: Any = None) -> None:
    if isinstance(table, Mapping):
        longest = max((len(v) for v in table.values() if isinstance(v, str)), default=1)
        if len(text) * longest > MAX_STRING_LENGTH:  # count exactly only when it matters
            counts = collections.Counter(text)
            _check_string_size(sum(
                n * (len(v) if isinstance(v := table.get(ord(c), c), str) else 1)
                for c, n in counts.items()
            ))  # fmt: skip


def _check_case(text: str, *rest: Any) -> None:
    if not text.isascii():  # "ß".upper() is "SS", "ΐ".upper() three characters
        _check_string_size(3 * len(text))


#: Methods of ``str`` whose result may be much longer than the string and arguments they
#: get, checked before they run (``format`` and ``format_map``: see wrap_str_format).
#: The result of any other method is checked after (``upper``, ``encode``... build at
#: most a few times their input).
_STR_METHOD_CHECKS: Final[dict[str, Callable[..., None]]] = {
    "capitalize": _check_case,
    "casefold": _check_case,
    "center": _check_width,
    "expandtabs": _check_expandtabs,
    "join": _check_str_join,
    "ljust": _check_width,
    "lower": _check_case,
    "replace": _check_str_replace,
    "rjust": _check_width,
    "swapcase": _check_case,
    "title": _check_case,
    "translate": _check_translate,
    "upper": _check_case,
    "zfill": _check_width,
}


def _mutation_target(function: Any, args: tuple[Any, ...]) -> tuple[Any, str] | None:
    """The container a call would modify in place (``d.update(...)``, ``dict.update(d)``)."""
    if isinstance(function, types.MethodDescriptorType):
        return (args[0], function.__name__) if args else None
    owner = getattr(function, "__self__", None)
    name = getattr(function, "__name__", None)
    if owner is not None and isinstance(name, str):
        return owner, name
    return None


class _LevanteCodeGenerator(CodeGenerator):
    """Compiles ``a ~ b`` into a size-checked join and has ``{% for %}`` loops meter their
    items (the sandbox intercepts neither)."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Frame) -> None:
        self.write("environment.levante_concat((")
        for argument in node.nodes:
            self.visit(argument, frame)
            self.write(", ")
        self.write("))")

    def visit_Operand(self, node: jinja2.nodes.Operand, frame: Frame) -> None:
        if node.op not in ("in", "notin"):
            super().visit_Operand(node, frame)
            return
        self.write(f" {jinja2.compiler.operators[node.op]} environment.levante_scanned(")
        self.visit(node.expr, frame)
        self.write(")")

    def visit_For(self, node: jinja2.nodes.For, frame: Frame) -> None:
        metered = jinja2.nodes.Call(
            jinja2.nodes.EnvironmentAttribute("levante_items"), [node.iter], [], None, None,
            lineno=node.lineno,
        )  # fmt: skip
        super().visit_For(
            jinja2.nodes.For(node.target, metered, node.body, node.else_, node.test,
                             node.recursive, lineno=node.lineno),
            frame,
        )  # fmt: skip


class _Sandbox(SandboxedEnvironment):
    """Mistral's SandboxedEnvironment, with bounded operators and a guarded context.

    Containers that belong to the data context or came from the host cannot be modified
    in place; containers a template builds itself can (as in Mistral).
    """

    code_generator_class = _LevanteCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        result = self.binop_table[operator](left, right)
        meter = _METER.get()
        if meter is not None:
            meter.take_size(result)
        return result

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        target = _mutation_target(__obj, args)
        if target is not None and modifies_known_mutable(*target):
            state = __context.get(_JINJA_STATE_KEY)
            if not isinstance(state, _JinjaState) or state._protects(target[0]):
                raise SecurityError(f"{target[1]}() would modify data the expression does not own")
        receiver, name = target if target is not None else (None, "")
        string_method = isinstance(receiver, str)
        if string_method and name in _STR_METHOD_CHECKS:
            unbound = isinstance(__obj, types.MethodDescriptorType)  # str.ljust(s, n)
            head, method_args = args[: int(unbound)], args[int(unbound) :]
            if name == "join" and method_args:  # an iterator is read once: hand on a list
                method_args = (list(method_args[0]), *method_args[1:])
                args = (*head, *method_args)
            _STR_METHOD_CHECKS[name](receiver, *method_args, *kwargs.values())
        meter = _METER.get()
        if meter is None:
            result = super().call(__context, __obj, *args, **kwargs)
        else:
            meter.take(JINJA_CALL_STEPS)
            meter.take_size(getattr(__obj, "__self__", None))  # a method scans its object
            for argument in (*args, *kwargs.values()):
                meter.take_size(argument)
            result = super().call(__context, __obj, *args, **kwargs)
            meter.take_size(result)
        if string_method and isinstance(result, (str, bytes)):
            _check_string_size(len(result))
        return result

    def levante_scanned(self, container: Any) -> Any:
        """The right side of ``in``: a list or string is scanned, which is metered."""
        meter = _METER.get()
        if meter is not None and isinstance(container, (str, list, tuple)):
            meter.take_size(container)
        return container

    def levante_items(self, iterable: Any) -> Any:
        """What a ``{% for %}`` loop iterates: the same items, each one metered."""
        meter = _METER.get()
        return iterable if meter is None else meter.items(iterable)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        template = str(value.__self__)
        is_format_map = value.__name__ == "format_map"

        def checked(*args: Any, **kwargs: Any) -> str:
            if is_format_map and len(args) == 1:
                _check_format_string(template, (), args[0])
            else:
                _check_format_string(template, args, kwargs)
            result = wrapped(*args, **kwargs)
            _check_string_size(len(result))  # Markup's format escapes what it prints
            return result

        return checked

    def levante_concat(self, parts: tuple[Any, ...]) -> str:
        for part in parts:
            _check_text_length(part)
        texts = [str(part) for part in parts]
        size = sum(len(t) for t in texts)
        _check_string_size(size)
        meter = _METER.get()
        if meter is not None:
            meter.take(size // CHARS_PER_STEP)
        return "".join(texts)


class _JinjaState:
    """Per-evaluation state, reachable only from Python (its attributes are private)."""

    __slots__ = ("_functions", "_pending", "_protected", "_range_left")

    def __init__(self, context: Any) -> None:
        self._functions: dict[str, Callable[..., Any]] = {}
        self._pending: list[Any] = [context]
        self._protected: set[int] = set()
        self._range_left = JINJA_RANGE_BUDGET

    def _remember(self, value: Any) -> Any:
        self._pending.append(value)
        return value

    def _protects(self, obj: Any) -> bool:
        """Whether ``obj`` is (inside) the data context or a value from the host."""
        while self._pending:
            stack = [self._pending.pop()]
            while stack:
                item = stack.pop()
                if isinstance(item, (str, int, float, bool)) or item is None:
                    continue
                if id(item) in self._protected:
                    continue
                self._protected.add(id(item))
                if isinstance(item, Mapping):
                    stack.extend(item.values())
                elif isinstance(item, (list, tuple, set, frozenset, collections.deque)):
                    stack.extend(item)
        return id(obj) in self._protected

    def _take_range(self, size: int) -> None:
        self._range_left -= size
        if self._range_left < 0:
            raise _LimitExceeded(
                f"range() produced more than {JINJA_RANGE_BUDGET} numbers in one expression"
            )


def _state_of(context: Context) -> _JinjaState:
    state = context.get(_JINJA_STATE_KEY)
    if not isinstance(state, _JinjaState):
        raise SecurityError("expression state is not available")
    return state


@jinja2.pass_context
def _jinja_range(context: Context, *args: int) -> range:
    r = range(*args)
    if len(r) > MAX_COLLECTION_LENGTH:
        raise OverflowError(
            f"Range too big. The sandbox blocks ranges larger than MAX_RANGE "
            f"({MAX_COLLECTION_LENGTH})."
        )
    _state_of(context)._take_range(len(r))
    return r


def _jinja_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    if n > 100 or max > 1000 or min > max:
        raise _LimitExceeded("lipsum() arguments are too large")
    return str(jinja2.utils.generate_lorem_ipsum(n=n, html=html, min=min, max=max))


def _make_function_filter(name: str) -> Callable[..., Any]:
    """Mistral registers each function as a filter too: ``_ | task('x')``. Mistral passes
    the piped value as the function's context; here the host plays that role."""

    @jinja2.pass_context
    def function_filter(context: Context, _value: Any, *args: Any, **kwargs: Any) -> Any:
        return _state_of(context)._functions[name](*args, **kwargs)

    return function_filter


_PASS_PARAMETERS: Final = frozenset({"context", "eval_ctx", "environment"})


def _checked_filter(
    original: Callable[..., Any], check: Callable[[inspect.BoundArguments], None]
) -> Callable[..., Any]:
    """Wrap a built-in filter so that ``check`` sees its arguments by name first."""
    passes_object = getattr(original, "jinja_pass_arg", None) is not None
    parameters = list(inspect.signature(original).parameters.values())
    # Jinja passes the context / eval context / environment first; async variants take
    # one even when the function they wrap (whose signature we see) does not.
    if passes_object and parameters and parameters[0].name in _PASS_PARAMETERS:
        parameters = parameters[1:]
    visible = inspect.Signature(parameters)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        head, rest = (args[:1], args[1:]) if passes_object else ((), args)
        bound = visible.bind(*rest, **kwargs)
        bound.apply_defaults()
        check(bound)
        return original(*head, *bound.args, **bound.kwargs)

    return wrapper


def _check_center(b: inspect.BoundArguments) -> None:
    width = b.arguments.get("width")
    if isinstance(width, int):
        _check_string_size(width)


def _check_indent(b: inspect.BoundArguments) -> None:
    text = str(b.arguments.get("s", ""))
    width = b.arguments.get("width", 4)
    per_line = width if isinstance(width, int) else len(str(width))
    _check_string_size(len(text) + (text.count("\n") + 1) * per_line)


def _check_format_filter(b: inspect.BoundArguments) -> None:
    _check_printf(b.arguments.get("value"), b.arguments.get("kwargs") or b.arguments.get("args"))


def _check_replace(b: inspect.BoundArguments) -> None:
    s, old, new = (str(b.arguments.get(k, "")) for k in ("s", "old", "new"))
    count = b.arguments.get("count")
    _check_string_size(_replaced_length(s, old, new, count if isinstance(count, int) else None))


def _check_wordwrap(b: inspect.BoundArguments) -> None:
    text = str(b.arguments.get("s", ""))
    width = b.arguments.get("width", 79)
    wrap = b.arguments.get("wrapstring") or "\n"
    lines = len(text) // (width if isinstance(width, int) and width > 0 else 1)
    _check_string_size(len(text) + (lines + text.count("\n") + 1) * len(str(wrap)))
    meter = _METER.get()
    if meter is not None and isinstance(width, int) and width > 0:
        # textwrap is a Python loop over the words, and cuts a word longer than a line
        # one line at a time, copying the rest of the word each time: words² / width.
        meter.take(len(text) // WORDWRAP_CHARS_PER_STEP)
        copied = sum(len(w) ** 2 for w in text.split() if len(w) > width) // (2 * width)
        meter.take(copied // WORDWRAP_COPIED_CHARS_PER_STEP)


def _check_count_argument(name: str) -> Callable[[inspect.BoundArguments], None]:
    def check(b: inspect.BoundArguments) -> None:
        n = b.arguments.get(name)
        if isinstance(n, int) and n > MAX_COLLECTION_LENGTH:
            raise _LimitExceeded(f"{name} is larger than {MAX_COLLECTION_LENGTH}")

    return check


def _check_join(b: inspect.BoundArguments) -> None:
    items = list(b.arguments.get("value", ()))
    b.arguments["value"] = items
    separator = b.arguments.get("d", "")
    size = len(str(separator)) * max(len(items) - 1, 0)
    if b.arguments.get("attribute") is None:  # ['x' * 10**6] * 1000: one string, many times
        size += sum(len(i) if isinstance(i, str) else _printed_length(i, "s") for i in items)
    _check_string_size(size)


def _check_sum(b: inspect.BoundArguments) -> None:
    start = b.arguments.get("start")
    if isinstance(start, (list, tuple, str)):
        items = list(b.arguments.get("iterable", ()))
        b.arguments["iterable"] = items
        total = len(start) + sum(len(i) for i in items if isinstance(i, (list, tuple, str)))
        _check_built_size(start, total)


def _check_case_filter(b: inspect.BoundArguments) -> None:
    value = next(iter(b.arguments.values()), "")
    if isinstance(value, str):
        _check_case(value)


# urlize finds links with regular expressions. One of them, re.search(r"([)>.,\n]|&gt;)+$")
# on each word, tries every start in a run of such characters: its time grows with the
# square of the run's length. The rest of urlize is a Python loop over the words.
_URLIZE_TRAILING_RUN: Final = re.compile(r"[)>.,]{2,}")


def _check_urlize(b: inspect.BoundArguments) -> None:
    """Charge urlize's work to the meter before it runs."""
    meter = _METER.get()
    if meter is None:
        return
    text = str(b.arguments.get("value", ""))
    meter.take(len(text) * URLIZE_CHAR_STEPS)  # first: it bounds the scan below
    squares = sum((m.end() - m.start()) ** 2 for m in _URLIZE_TRAILING_RUN.finditer(text))
    meter.take(squares // URLIZE_RUN_SQUARES_PER_STEP)


_FILTER_CHECKS: Final[dict[str, Callable[[inspect.BoundArguments], None]]] = {
    "batch": _check_count_argument("linecount"),
    "capitalize": _check_case_filter,
    "center": _check_center,
    "format": _check_format_filter,
    "indent": _check_indent,
    "join": _check_join,
    "lower": _check_case_filter,
    "replace": _check_replace,
    "slice": _check_count_argument("slices"),
    "sum": _check_sum,
    "title": _check_case_filter,
    "upper": _check_case_filter,
    "urlize": _check_urlize,
    "wordwrap": _check_wordwrap,
}

_FUNCTION_NAMES: Final = tuple(_YAQL_FUNCTIONS)

#: Filters that go through their value one item at a time in Python: a string, one
#: character at a time (so it is metered per character, not per CHARS_PER_STEP).
_ITEM_BY_ITEM_FILTERS: Final = frozenset({
    "batch", "groupby", "join", "map", "max", "min", "reject", "rejectattr", "select",
    "selectattr", "slice", "sort", "sum", "unique",
})  # fmt: skip
#: Filters that print their value (``str()``, JSON, ...): a container is walked first.
_PRINTING_FILTERS: Final = frozenset({
    "capitalize", "center", "e", "escape", "forceescape", "indent", "lower", "pprint",
    "replace", "safe", "string", "striptags", "title", "tojson", "trim", "truncate",
    "upper", "urlencode", "urlize", "wordcount", "wordwrap", "xmlattr",
})  # fmt: skip


def _metered(
    original: Callable[..., Any], built_in: bool = True, name: str = ""
) -> Callable[..., Any]:
    """Wrap a filter or test so that calling it, its arguments and its result are metered.

    A built-in filter may not return a string longer than :data:`MAX_STRING_LENGTH`: those
    not checked beforehand (``escape``, ``tojson``, ``urlencode``, ``upper``...) build at
    most a few times their input, and the check stops them from compounding.
    """
    passes_object = getattr(original, "jinja_pass_arg", None) is not None
    item_by_item, prints = name in _ITEM_BY_ITEM_FILTERS, name in _PRINTING_FILTERS

    @functools.wraps(original)
    def metered(*args: Any, **kwargs: Any) -> Any:
        meter = _METER.get()
        arguments = (*args[1 if passes_object else 0 :], *kwargs.values())
        value = arguments[0] if arguments else None
        if prints:
            _check_text_length(value)
        if meter is None:
            result = original(*args, **kwargs)
        else:
            meter.take(JINJA_CALL_STEPS)
            if item_by_item and isinstance(value, str):
                meter.take(len(value) * ITEM_STEPS)
            for argument in arguments:
                meter.take(_items_steps(argument))
            result = original(*args, **kwargs)
            meter.take_size(result)
        if built_in and isinstance(result, str):
            _check_string_size(len(result))
        return result

    return metered


def _printed(value: Any) -> Any:
    """What a template prints is ``str()`` of it: walked first (see _check_text_length)."""
    _check_text_length(value)
    return value


def _build_jinja() -> _Sandbox:
    env = _Sandbox(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                   finalize=_printed)  # fmt: skip
    env.globals["range"] = _jinja_range
    env.globals["lipsum"] = _jinja_lipsum
    for name, check in _FILTER_CHECKS.items():
        env.filters[name] = _checked_filter(env.filters[name], check)
    for name in _FUNCTION_NAMES:
        env.filters[name] = _make_function_filter(name)
    for name, original in list(env.filters.items()):
        env.filters[name] = _metered(original, name not in _FUNCTION_NAMES, name)
    for name, test in list(env.tests.items()):
        env.tests[name] = _metered(test)  # type: ignore[arg-type]  # typeshed: "function"
    return env


_JINJA_ENV: Final = _build_jinja()


@functools.lru_cache(maxsize=CACHE_SIZE)
def _jinja_template(source: str) -> jinja2.Template:
    return _JINJA_ENV.from_string(source)


@functools.lru_cache(maxsize=CACHE_SIZE)
def _jinja_expression(source: str) -> Callable[..., Any]:
    return _JINJA_ENV.compile_expression(source, undefined_to_none=False)


def _jinja_grammar_error(source: str) -> ExpressionError | None:
    # Parse only, as Mistral does: an unknown filter is an evaluation error, not a syntax
    # error (compiling would reject it).
    try:
        _JINJA_ENV.parse(source)
    except jinja2.TemplateError as e:
        return ExpressionError(
            f"Invalid grammar of Jinja expression [expression={source}, error=Syntax error '{e}'.]"
        )
    except Exception as e:
        return ExpressionError(
            f"Invalid grammar of Jinja expression [expression={source}, error={e}]"
        )
    return None


# -- evaluation --------------------------------------------------------------------------


class _Evaluation:
    """One evaluate() call: the context converted for yaql and the Jinja variables are
    built at most once, and only for the languages actually used."""

    __slots__ = ("_context", "_host", "_jinja_vars", "_yaql_base")

    def __init__(self, context: Any, host: ExpressionHost) -> None:
        self._context = context
        self._host = host
        self._yaql_base: Any = None
        self._jinja_vars: dict[str, Any] | None = None

    def _yaql_fast(self, source: str) -> Any:
        path = _yaql_path(source)
        if path is None:
            return _SLOW
        root, argument, keys = path
        if root == "$":
            return _walk_path(self._context, keys)
        if root == "task":
            return _walk_path(self._host.task(argument), keys)
        if root == "env":
            return _walk_path(self._host.env(), keys)
        return _walk_path(self._host.execution(), keys)

    def yaql_context(self) -> Any:
        if self._yaql_base is None:
            base = _YAQL_ROOT.create_child_context()
            base["$"] = yaql_utils.convert_input_data(self._context)
            base[_YAQL_HOST_KEY] = self._host
            if isinstance(self._context, Mapping):
                for key in _MISTRAL_CONTEXT_KEYS:
                    base[key] = yaql_utils.convert_input_data(self._context.get(key))
            self._yaql_base = base
        # A child per expression: def()/let() in one expression never leak into the next.
        return self._yaql_base.create_child_context()

    def jinja_vars(self) -> dict[str, Any]:
        """The variables of one render; a fresh state (budgets) for each render."""
        if self._jinja_vars is None:
            self._jinja_vars = {"_": self._context}
            if isinstance(self._context, Mapping):
                for key in _MISTRAL_CONTEXT_KEYS:
                    self._jinja_vars[key] = self._context.get(key)
        state = _JinjaState(self._context)
        host = self._host
        remember = state._remember
        functions: dict[str, Callable[..., Any]] = {
            "env": lambda: remember(host.env()),
            "execution": lambda: remember(host.execution()),
            "global": lambda var_name: remember(host.global_var(str(var_name))),
            "json_dump": _json_dump,
            "json_parse": _json_parse,
            "task": lambda task_name=None: remember(host.task(_task_name(task_name))),
            "tasks": lambda *args, **kwargs: remember(_tasks(host, *args, **kwargs)),
            "uuid": _uuid,
            "yaml_dump": _yaml_dump,
            "yaml_parse": _yaml_parse,
        }
        state._functions = functions
        return {**self._jinja_vars, **functions, _JINJA_STATE_KEY: state}

    # -- YAQL

    def _run_yaql(self, source: str, as_text: bool) -> Any:
        try:
            raw = self._yaql_fast(source)
            if raw is _SLOW:
                raw = _parse_yaql(source).evaluate(context=self.yaql_context())
            budget = _Budget(YAQL_LIMIT_ITERATORS)
            return _to_text(raw, budget) if as_text else _to_plain(raw, budget)
        except Exception as e:
            if _passes_through(e):
                raise
            raise _yaql_failure(source, e) from e

    def yaql_string(self, s: str) -> Any:
        first = _YAQL_PATTERN.search(s)
        assert first is not None
        if first.start() == 0 and first.end() == len(s):
            return self._run_yaql(_yaql_inner(s), as_text=False)
        # Each distinct expression is evaluated once and replaces all its occurrences,
        # as Mistral's str.replace loop does ("<% uuid() %> <% uuid() %>" repeats one uuid).
        rendered: dict[str, str] = {}

        def substitute(match: re.Match[str]) -> str:
            text = match.group(0)
            if text not in rendered:
                rendered[text] = self._run_yaql(_yaql_inner(text), as_text=True)
            return rendered[text]

        result = _YAQL_PATTERN.sub(substitute, s)
        if len(result) > MAX_RENDERED_LENGTH:
            raise _yaql_failure(
                s, _LimitExceeded(f"the text is longer than {MAX_RENDERED_LENGTH} characters")
            )
        return result

    # -- Jinja

    def jinja_string(self, s: str) -> Any:
        first = _JINJA_VAR_PATTERN.search(s)
        try:
            if first is not None and first.start() == 0 and first.end() == len(s):
                inner = first.group(1)
                try:
                    raw = _jinja_expression(inner)(**self.jinja_vars())
                    return _to_plain(raw, _Budget(None))
                except MemoryError as e:
                    raise ExpressionError(
                        f"Expression evaluation exceeded the available memory [expression={inner}]"
                    ) from e
            return self._render(_jinja_template(s))
        except ExpressionError:
            raise
        except Exception as e:
            if _passes_through(e):
                raise
            raise _jinja_failure(s, e) from e

    def _render(self, template: jinja2.Template) -> str:
        chunks: list[str] = []
        length = 0
        for chunk in template.generate(**self.jinja_vars()):
            length += len(chunk)
            if length > MAX_RENDERED_LENGTH:
                raise _LimitExceeded(
                    f"the rendered text is longer than {MAX_RENDERED_LENGTH} characters"
                )
            chunks.append(chunk)
        return "".join(chunks)

    # -- data

    def string(self, s: str) -> Any:
        if not _might_be_expression(s):
            return s
        # Mistral tries its evaluators in name order: jinja before yaql. A string with
        # both is Jinja (its <% %> parts stay text); check_syntax rejects such strings.
        if _has_jinja(s):
            return self.jinja_string(s)
        if _has_yaql(s):
            return self.yaql_string(s)
        return s

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.string(value)
        if isinstance(value, Mapping):
            return {k: self.value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.value(v) for v in value]
        return value


_SCALARS: Final = frozenset({type(None), bool, int, float})

#: What :func:`literal` returns for a value that holds an expression.
HAS_EXPRESSION: Final = object()


def literal(value: Any) -> Any:
    """What :func:`evaluate` returns for ``value`` when it holds no expression (a new
    copy: mappings become dicts, tuples lists), without a context; else HAS_EXPRESSION.
    Most values a decision evaluates (action names, inputs, params) hold none."""
    kind = type(value)
    if kind in _SCALARS:  # the common cases first, before any isinstance() of an ABC
        return value
    if kind is str or isinstance(value, str):
        return HAS_EXPRESSION if is_expression(value) else value
    if kind is dict or isinstance(value, Mapping):
        copy: dict[Any, Any] = {}
        for key, item in value.items():
            item = literal(item)
            if item is HAS_EXPRESSION:
                return HAS_EXPRESSION
            copy[key] = item
        return copy
    if isinstance(value, list | tuple):
        items = []
        for item in value:
            item = literal(item)
            if item is HAS_EXPRESSION:
                return HAS_EXPRESSION
            items.append(item)
        return items
    return value


def evaluate(value: Any, context: Any, host: ExpressionHost = NULL_HOST) -> Any:
    """Evaluate every expression in ``value`` against the data ``context``.

    ``value`` is JSON-like data: strings are evaluated, dict values and list items
    recursively (dict keys are never evaluated, as in Mistral), anything else is returned
    as is. New dicts and lists are returned (any Mapping becomes a dict, a tuple a list);
    ``value`` is not modified. ``context`` is what
    ``$`` (YAQL) and ``_`` (Jinja) see: usually a dict, but any JSON value works (Mistral
    evaluates ad-hoc action ``output`` against the action's result).

    Raises ExpressionError naming the failing expression and the reason, e.g.
    ``Can not evaluate YAQL expression [expression=$.x.y, error=...]``. The whole call may
    do at most :data:`MAX_WORK_STEPS` steps of work (see :class:`_Meter`), and its regular
    expressions may take :data:`REGEX_TIMEOUT_SECONDS` of CPU time.
    """
    token = _METER.set(_Meter(MAX_WORK_STEPS))
    try:
        with regex_functions.RegexTimeLimit(REGEX_TIMEOUT_SECONDS):
            return _Evaluation(context, host).value(value)
    finally:
        _METER.reset(token)


# -- syntax ------------------------------------------------------------------------------


def _syntax_error(s: str) -> ExpressionError | None:
    if not _might_be_expression(s):
        return None
    jinja, yaql_found = _has_jinja(s), _has_yaql(s)
    if jinja and yaql_found:
        return ExpressionError(
            "The line already contains an expression of type 'jinja'. Mixing expression "
            f"types in a single line is not allowed. [expression={s}]"
        )
    if jinja:
        return _jinja_grammar_error(s)
    if yaql_found:
        for match in _YAQL_PATTERN.finditer(s):
            error = _yaql_grammar_error(_yaql_inner(match.group(0)))
            if error is not None:
                return error
    return None


def _strings(value: Any) -> Iterator[str]:
    """Every string evaluate() would look at: strings, dict values, list items."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def check_syntax(value: Any) -> None:
    """Parse every expression in ``value`` without evaluating anything.

    Raises ExpressionError for a YAQL or Jinja syntax error, and for a string that mixes
    both languages (Mistral rejects those at definition time).
    """
    for s in _strings(value):
        error = _syntax_error(s)
        if error is not None:
            raise error


# -- task('x') references ----------------------------------------------------------------


class _Dynamic(Exception):
    """A task(...) call whose argument is not a literal."""


def _literal_task_argument(value: Any, names: set[str]) -> None:
    if value is not None:
        names.add(str(value))


def _yaql_task_names(node: Any, names: set[str]) -> None:
    if isinstance(node, yaql_expressions.Function):
        if node.name == "tasks":
            raise _Dynamic  # reads every task
        if node.name == "task":
            _yaql_task_call(node.args, names)
        elif node.name == "call" and not _yaql_names_other_function(node.args):
            raise _Dynamic  # call(task, ...) or call($.name, ...)
        for arg in node.args:
            _yaql_task_names(arg, names)
    elif isinstance(node, yaql_expressions.MappingRuleExpression):
        _yaql_task_names(node.source, names)
        _yaql_task_names(node.destination, names)
    elif isinstance(node, yaql_expressions.Wrap):
        _yaql_task_names(node.expr, names)


def _yaql_names_other_function(args: tuple[Any, ...]) -> bool:
    return (
        bool(args)
        and isinstance(args[0], yaql_expressions.Constant)
        and args[0].value not in ("task", "tasks")
    )


def _yaql_task_call(args: tuple[Any, ...], names: set[str]) -> None:
    if len(args) > 1:
        raise _Dynamic
    for arg in args:
        if isinstance(arg, yaql_expressions.MappingRuleExpression):
            arg = arg.destination
        if not isinstance(arg, yaql_expressions.Constant):
            raise _Dynamic
        _literal_task_argument(arg.value, names)


def _jinja_task_call(args: list[Any], kwargs: list[Any], names: set[str]) -> None:
    values = list(args) + [kw.value for kw in kwargs]
    if len(values) > 1:
        raise _Dynamic
    for arg in values:
        if not isinstance(arg, jinja2.nodes.Const):
            raise _Dynamic
        _literal_task_argument(arg.value, names)


def _jinja_task_names(tree: jinja2.nodes.Node, names: set[str]) -> None:
    if any(n.name == "tasks" for n in tree.find_all(jinja2.nodes.Name)) or any(
        n.name == "tasks" for n in tree.find_all(jinja2.nodes.Filter)
    ):
        raise _Dynamic  # tasks() reads every task
    direct_calls: set[int] = set()
    for call in tree.find_all(jinja2.nodes.Call):
        if isinstance(call.node, jinja2.nodes.Name) and call.node.name == "task":
            if call.dyn_args is not None or call.dyn_kwargs is not None:
                raise _Dynamic
            _jinja_task_call(call.args, call.kwargs, names)
            direct_calls.add(id(call.node))
    for filter_node in tree.find_all(jinja2.nodes.Filter):
        if filter_node.name == "task":
            if filter_node.dyn_args is not None or filter_node.dyn_kwargs is not None:
                raise _Dynamic
            _jinja_task_call(filter_node.args, filter_node.kwargs, names)
    for name in tree.find_all(jinja2.nodes.Name):
        if name.name == "task" and name.ctx == "load" and id(name) not in direct_calls:
            raise _Dynamic  # task used as a value ({% set f = task %}): cannot follow it


def _string_task_names(s: str, names: set[str]) -> None:
    if not _might_be_expression(s):
        return
    if _has_jinja(s):
        _jinja_task_names(_JINJA_ENV.parse(s), names)
    elif _has_yaql(s):
        for match in _YAQL_PATTERN.finditer(s):
            _yaql_task_names(_parse_yaql(_yaql_inner(match.group(0))), names)


def referenced_task_names(value: Any) -> frozenset[str] | None:
    """The task names used as literal arguments of ``task('x')`` in ``value``'s expressions.

    ``task()`` (the current task) adds nothing. ``None`` means some ``task(...)`` call has a
    non-literal argument, ``tasks()`` is used (or an expression does not parse): the caller
    must then assume any task may be read.
    """
    names: set[str] = set()
    try:
        for s in _strings(value):
            _string_task_names(s, names)
    except _Dynamic:
        return None
    except Exception:
        return None  # a syntax error: evaluation will report it
    return frozenset(names)
