"""Parse Mistral Workflow Language v2 YAML into the frozen model of lang/spec.py.

This module owns everything between the YAML text a user registers and the
``Document`` the rest of Levante reads:

* reading YAML safely, the way Mistral's own loader does (``&``, ``*`` and a leading
  ``@`` are plain text, so aliases and alias bombs cannot exist), with line numbers,
  duplicate-key detection and a cap on the number of nodes;
* the structure rules of Mistral v2 (openstack/mistral ``mistral/lang/v2``): which keys
  a workbook, workflow, task, task-defaults block, on-* clause, retry policy and ad-hoc
  action may hold, and which values they take;
* Mistral's one-line syntaxes: ``action: std.echo output="Hi" count=3``,
  ``retry: count=3 delay=1``, ``with-items: x in <% $.xs %>`` and engine commands such as
  ``fail(msg="...")``;
* applying task-defaults to every task the way Mistral's engine does, and the graph
  checks (transition targets, start tasks, join counts, reverse ``requires`` and cycles).

Every problem raises ``DefinitionError(message, line)`` with a 1-based YAML line.
Expressions (``<% %>`` and ``{{ }}``) are recognised by their delimiters only and kept
as raw strings; lang/expressions.py evaluates (and may further validate) them.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn, TypeAlias

import yaml
from yaml.reader import ReaderError

from levante.errors import DefinitionError, ExpressionError
from levante.lang import expressions
from levante.lang.spec import (
    ENGINE_COMMANDS,
    ActionSpec,
    Document,
    InputParam,
    Join,
    PoliciesSpec,
    RetrySpec,
    TaskSpec,
    Transition,
    TransitionClause,
    WithItems,
    WorkflowSpec,
    WorkflowType,
)

MAX_NODES: Final = 100_000
"""A document may hold at most this many YAML nodes (scalars, lists and mappings)."""

MAX_DEPTH: Final = 64
"""Lists and mappings may nest at most this deep."""

MAX_TASK_NAME: Final = 255
MAX_JOIN_TASK_NAME: Final = 208  # Mistral: 255 minus what it adds to name a join lock

CLAUSE_KEYS: Final = ("on-success", "on-error", "on-complete", "on-skip")
POLICY_KEYS: Final = (
    "retry",
    "wait-before",
    "wait-after",
    "timeout",
    "pause-before",
    "concurrency",
    "fail-on",
)

_WORKBOOK_KEYS: Final = frozenset(
    {"version", "name", "description", "tags", "workflows", "actions"}
)
_WORKFLOW_KEYS: Final = frozenset(
    {
        "version",
        "type",
        "description",
        "tags",
        "input",
        "output",
        "output-on-error",
        "vars",
        "task-defaults",
        "tasks",
    }
)
_TASK_KEYS: Final = frozenset(
    {
        "version",
        "type",
        "description",
        "tags",
        "action",
        "workflow",
        "input",
        "with-items",
        "publish",
        "publish-on-error",
        "target",
        "keep-result",
        "safe-rerun",
        *POLICY_KEYS,
    }
)
_DIRECT_TASK_KEYS: Final = _TASK_KEYS | {"join", *CLAUSE_KEYS}
_REVERSE_TASK_KEYS: Final = _TASK_KEYS | {"requires"}
_TASK_DEFAULTS_KEYS: Final = frozenset({*POLICY_KEYS, *CLAUSE_KEYS, "safe-rerun", "requires"})
_ACTION_KEYS: Final = frozenset(
    {"version", "description", "tags", "base", "base-input", "input", "output"}
)
_RETRY_KEYS: Final = frozenset({"count", "delay", "break-on", "continue-on"})
_ADVANCED_CLAUSE_KEYS: Final = frozenset({"publish", "next"})
_PUBLISH_SCOPES: Final = frozenset({"branch", "global", "atomic"})

_UNSUPPORTED: Final = {
    "publish-on-skip": "'publish-on-skip' is not supported by Levante",
}

_EXPRESSION = re.compile(r"(<%.*%>|\{\{.*\}\})\s*", re.DOTALL)
_PARAM_KEY = re.compile(r"([-\w]+)\s*=\s*")  # Mistral: key=value; blanks around '=' tolerated
_BARE_VALUE = re.compile(r"[^\s,]+")
_BARE_WORD = re.compile(r"[A-Za-z_][\w.\-/:@]*")
_COMMAND_NAME = re.compile(r"<%.*?%>|\{\{.*?\}\}|[\w.]+[^=(\s\"]*", re.DOTALL)
_COMMAND_CALL = re.compile(r"(\w+)\s*\((.*)\)", re.DOTALL)
_WITH_ITEMS = re.compile(r"\s*([\w-]+)\s+in\b\s*(.*?)\s*", re.DOTALL)
_WORKBOOK_ITEM_NAME = re.compile(r"[\w-]+")

_YAML_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS: Final = frozenset(
    _YAML_TAG + name for name in ("str", "int", "float", "bool", "null")
)
_TIMESTAMP_TAG: Final = _YAML_TAG + "timestamp"
_MERGE_TAG: Final = _YAML_TAG + "merge"


# --------------------------------------------------------------------------- YAML


class _MistralLoader(yaml.SafeLoader):
    """The safe loader, reading ``&``, ``*`` and a leading ``@`` as plain text.

    This is what Mistral's own loader (mistral/utils/safe_yaml.py) does: Mistral
    workflows never use anchors, and without them no alias bomb can be written.
    """

    def fetch_alias(self) -> None:
        self.fetch_plain()

    def fetch_anchor(self) -> None:
        self.fetch_plain()

    def check_plain(self) -> bool:
        return bool(self.peek() == "@" or super().check_plain())

    # Bounds enforced while PyYAML reads, not after: it looks ahead across every open '['
    # and '{' (quadratic in their nesting) and builds every node before _Reader sees one,
    # so a hostile document would cost seconds and megabytes before being refused.

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        if self.flow_level >= MAX_DEPTH:
            raise DefinitionError(f"document nests deeper than {MAX_DEPTH} levels", self.line + 1)
        super().fetch_flow_collection_start(TokenClass)

    def add_indent(self, column: int) -> bool:
        if self.indent < column and len(self.indents) >= MAX_DEPTH:
            raise DefinitionError(f"document nests deeper than {MAX_DEPTH} levels", self.line + 1)
        return bool(super().add_indent(column))

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.composed = getattr(self, "composed", 0) + 1
        if self.composed > MAX_NODES:
            raise DefinitionError(
                f"document is too large: more than {MAX_NODES} YAML nodes", self.line + 1
            )
        return super().compose_node(parent, index)


@dataclass(frozen=True)
class _Scalar:
    value: Any
    line: int


@dataclass(frozen=True)
class _Seq:
    items: tuple[_Node, ...]
    line: int


@dataclass(frozen=True)
class _Entry:
    key_line: int
    value: _Node


@dataclass(frozen=True)
class _Map:
    entries: Mapping[Any, _Entry]
    line: int

    def get(self, key: str) -> _Entry | None:
        return self.entries.get(key)

    def items(self) -> Iterator[tuple[Any, _Entry]]:
        return iter(self.entries.items())


_Node: TypeAlias = _Scalar | _Seq | _Map


class _Reader:
    """Turns PyYAML's node graph into ``_Node`` trees, counting every node it visits."""

    def __init__(self, loader: _MistralLoader) -> None:
        self._loader = loader
        self._count = 0

    def read(self, node: yaml.Node, depth: int = 0) -> _Node:
        line = node.start_mark.line + 1
        self._count += 1
        if self._count > MAX_NODES:
            raise DefinitionError(f"document is too large: more than {MAX_NODES} YAML nodes", line)
        if depth > MAX_DEPTH:
            raise DefinitionError(f"document nests deeper than {MAX_DEPTH} levels", line)
        if isinstance(node, yaml.ScalarNode):
            return _Scalar(self._scalar(node), line)
        if isinstance(node, yaml.SequenceNode):
            self._check_tag(node, _YAML_TAG + "seq")
            return _Seq(tuple(self.read(item, depth + 1) for item in node.value), line)
        if isinstance(node, yaml.MappingNode):
            self._check_tag(node, _YAML_TAG + "map")
            return self._mapping(node, depth, line)
        raise DefinitionError(f"unsupported YAML node {type(node).__name__}", line)

    def _mapping(self, node: yaml.MappingNode, depth: int, line: int) -> _Map:
        entries: dict[Any, _Entry] = {}
        merged: list[_Map] = []
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE_TAG:
                merged.extend(self._merge_sources(value_node, depth))
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise DefinitionError(
                    "mapping keys must be plain values, not lists or mappings", key_line
                )
            key = self._scalar(key_node)
            if key in entries:
                first = entries[key].key_line
                raise DefinitionError(
                    f"duplicate key '{key}' (first given at line {first})", key_line
                )
            entries[key] = _Entry(key_line, self.read(value_node, depth + 1))
        for source in merged:  # YAML merge keys: explicit keys win, then earlier sources
            for key, entry in source.items():
                entries.setdefault(key, entry)
        return _Map(entries, line)

    def _merge_sources(self, node: yaml.Node, depth: int) -> list[_Map]:
        sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
        maps: list[_Map] = []
        for source in sources:
            read = self.read(source, depth + 1)
            if not isinstance(read, _Map):
                raise DefinitionError("'<<' merges only mappings", read.line)
            maps.append(read)
        return maps

    def _scalar(self, node: yaml.ScalarNode) -> Any:
        if node.tag == _TIMESTAMP_TAG:
            return node.value  # dates stay text: values are JSON-like
        if node.tag not in _SCALAR_TAGS:
            raise DefinitionError(f"unsupported YAML tag '{node.tag}'", node.start_mark.line + 1)
        return self._loader.construct_object(node)

    @staticmethod
    def _check_tag(node: yaml.Node, expected: str) -> None:
        if node.tag != expected:
            raise DefinitionError(f"unsupported YAML tag '{node.tag}'", node.start_mark.line + 1)


def _load(text: str | bytes) -> _Node:
    if isinstance(text, bytes):
        raw = text
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad_line = raw.count(b"\n", 0, e.start) + 1
            raise DefinitionError(f"document is not valid UTF-8: {e.reason}", bad_line) from None
    if not isinstance(text, str):
        raise DefinitionError(f"document must be text, not {type(text).__name__}")
    loader: _MistralLoader | None = None
    try:
        loader = _MistralLoader(text)
        root = loader.get_single_node()
        if root is None:
            raise DefinitionError("document is empty", 1)
        return _Reader(loader).read(root)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "invalid YAML"
        if e.problem and e.context and e.context_mark is not None:
            # e.g. "expected ',' or ']' ... (while parsing a flow sequence started at line 4)"
            problem = f"{problem} ({e.context} started at line {e.context_mark.line + 1})"
        raise DefinitionError(
            f"invalid YAML: {problem}", None if mark is None else mark.line + 1
        ) from None
    except ReaderError as e:
        raise DefinitionError(
            f"invalid YAML: character {e.character!r} is not allowed",
            text.count("\n", 0, e.position) + 1,
        ) from None
    except yaml.YAMLError as e:
        raise DefinitionError(f"invalid YAML: {e}") from None
    except RecursionError:
        raise DefinitionError(f"document nests deeper than {MAX_DEPTH} levels") from None
    finally:
        if loader is not None:
            loader.dispose()


def _data(node: _Node) -> Any:
    """The plain JSON-like value of a node (expressions stay raw strings)."""
    if isinstance(node, _Scalar):
        return node.value
    if isinstance(node, _Seq):
        return [_data(item) for item in node.items]
    return {key: _data(entry.value) for key, entry in node.items()}


# ------------------------------------------------------------------ value readers


def _fail(where: str, message: str, line: int | None) -> NoReturn:
    raise DefinitionError(f"{where}: {message}" if where else message, line)


def _kind(node: _Node) -> str:
    if isinstance(node, _Map):
        return "a mapping"
    if isinstance(node, _Seq):
        return "a list"
    value = node.value
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value}"
    return f"the text {value!r}"


def _is_expression(value: Any) -> bool:
    return isinstance(value, str) and _EXPRESSION.fullmatch(value) is not None


def _check_keys(node: _Map, allowed: frozenset[str], where: str, hints: Mapping[str, str]) -> None:
    for key, entry in node.items():
        if key in allowed:
            continue
        if key in hints:
            _fail(where, hints[key], entry.key_line)
        close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
        suggestion = f" (did you mean '{close[0]}'?)" if close else ""
        _fail(where, f"unknown key '{key}'{suggestion}", entry.key_line)


def _mapping(node: _Node, where: str, what: str) -> _Map:
    if not isinstance(node, _Map):
        _fail(where, f"'{what}' must be a mapping, not {_kind(node)}", node.line)
    if not node.entries:
        _fail(where, f"'{what}' must not be empty", node.line)
    return node


def _text(node: _Node, where: str, what: str) -> str:
    if not isinstance(node, _Scalar) or not isinstance(node.value, str) or not node.value.strip():
        _fail(where, f"'{what}' must be non-empty text, not {_kind(node)}", node.line)
    return node.value


def _description(node: _Node, where: str) -> str:
    if isinstance(node, _Scalar) and node.value is None:
        return ""
    if not isinstance(node, _Scalar) or not isinstance(node.value, str):
        _fail(where, f"'description' must be text, not {_kind(node)}", node.line)
    return node.value


def _expression(node: _Node, where: str, what: str) -> str:
    if not isinstance(node, _Scalar) or not _is_expression(node.value):
        _fail(
            where,
            f"'{what}' must be an expression (<% ... %> or {{{{ ... }}}}), not {_kind(node)}",
            node.line,
        )
    return str(node.value)


def _count_or_expression(node: _Node, where: str, what: str) -> int | str:
    """Mistral's EXPRESSION_OR_POSITIVE_INTEGER: an integer >= 0 or an expression."""
    value = node.value if isinstance(node, _Scalar) else None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if _is_expression(value):
        return str(value)
    _fail(where, f"'{what}' must be an integer >= 0 or an expression, not {_kind(node)}", node.line)


def _seconds_or_expression(node: _Node, where: str, what: str) -> int | float | str:
    """A duration: a number of seconds >= 0 or an expression.

    Mistral takes whole seconds only; Levante also takes fractions (documented).
    """
    value = node.value if isinstance(node, _Scalar) else None
    if isinstance(value, float) and value >= 0 and value != float("inf"):
        return int(value) if value.is_integer() else value
    return _count_or_expression(node, where, what)


def _bool_or_expression(node: _Node, where: str, what: str) -> bool | str:
    value = node.value if isinstance(node, _Scalar) else None
    if isinstance(value, bool):
        return value
    if _is_expression(value):
        return str(value)
    _fail(where, f"'{what}' must be true, false or an expression, not {_kind(node)}", node.line)


def _variables(node: _Node, where: str, what: str) -> dict[str, Any]:
    """A non-empty mapping of names to values (publish, vars, input, output, ...)."""
    mapping = _mapping(node, where, what)
    for key, entry in mapping.items():
        if not isinstance(key, str) or not key:
            _fail(where, f"'{what}': names must be non-empty text, not {key!r}", entry.key_line)
    return {key: _data(entry.value) for key, entry in mapping.items()}


def _names(node: _Node, where: str, what: str, *, single_allowed: bool) -> tuple[str, ...]:
    """A non-empty list of distinct non-empty names (or one name, where Mistral allows it)."""
    if single_allowed and isinstance(node, _Scalar):
        return (_text(node, where, what),)
    if not isinstance(node, _Seq) or not node.items:
        wanted = "a name or a non-empty list of names" if single_allowed else "a non-empty list"
        _fail(where, f"'{what}' must be {wanted}, not {_kind(node)}", node.line)
    names: list[str] = []
    for item in node.items:
        name = _text(item, where, what)
        if name in names:
            _fail(where, f"'{what}' lists '{name}' twice", item.line)
        names.append(name)
    return tuple(names)


def _input_params(node: _Node, where: str) -> tuple[InputParam, ...]:
    """Workflow and ad-hoc action ``input``: names, or one-key mappings ``name: default``."""
    if not isinstance(node, _Seq) or not node.items:
        _fail(where, f"'input' must be a non-empty list, not {_kind(node)}", node.line)
    params: list[InputParam] = []
    for item in node.items:
        if isinstance(item, _Map):
            if len(item.entries) != 1:
                _fail(where, "an 'input' entry with a default must have exactly one key", item.line)
            ((name, entry),) = item.items()
            if not isinstance(name, str) or not name:
                _fail(where, f"input names must be non-empty text, not {name!r}", entry.key_line)
            param = InputParam(name, has_default=True, default=_data(entry.value))
        else:
            param = InputParam(_text(item, where, "input"))
        if any(p.name == param.name for p in params):
            _fail(where, f"input '{param.name}' is declared twice", item.line)
        params.append(param)
    return tuple(params)


def _version(node: _Map, where: str, line: int, *, required: bool) -> None:
    entry = node.get("version")
    if entry is None:
        if required:
            _fail(where, "'version' is required (version: '2.0')", line)
        return
    value = entry.value.value if isinstance(entry.value, _Scalar) else None
    try:
        ok = not isinstance(value, bool) and value is not None and float(value) == 2.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        _fail(
            where,
            f"unsupported version: {_kind(entry.value)}; only '2.0' is supported",
            entry.value.line,
        )


def _merged(left: Mapping[str, Any], right: Mapping[str, Any]) -> dict[str, Any]:
    """Mistral's merge_dicts: right wins, nested mappings merge key by key."""
    result = dict(left)
    for key, value in right.items():
        old = result.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            result[key] = _merged(old, value)
        else:
            result[key] = value
    return result


# ------------------------------------------------------------ one-line syntaxes


def _split_command(text: str, line: int, where: str, what: str) -> tuple[str, dict[str, Any]]:
    """``std.echo output="Hi" n=3`` -> ("std.echo", {"output": "Hi", "n": 3})."""
    stripped = text.strip()
    if not any(ch.isspace() for ch in stripped):
        return stripped, {}
    match = _COMMAND_NAME.match(stripped)
    if match is None:
        _fail(where, f"'{what}' must start with a name or an expression: {text!r}", line)
    rest = stripped[match.end() :]
    if rest and not rest[0].isspace():
        _fail(where, f"'{what}': unexpected {rest!r} after '{match.group()}'", line)
    return match.group(), _parameters(rest, line, where, what)


def _parameters(text: str, line: int, where: str, what: str) -> dict[str, Any]:
    """Inline ``key=value`` pairs, separated by blanks (or commas).

    Values follow Mistral: "double" or 'single' quoted text (quotes removed, nothing
    unescaped), an expression kept raw, a [list] read as JSON (kept as text if it is
    not JSON, as Mistral does), or a bare JSON literal: a number, true, false, null.
    """
    params: dict[str, Any] = {}
    pos = 0
    while True:
        while pos < len(text) and (text[pos].isspace() or text[pos] == ","):
            pos += 1
        if pos >= len(text):
            return params
        key = _PARAM_KEY.match(text, pos)
        if key is None:
            _fail(where, f"'{what}': expected key=value at {text[pos:]!r}", line)
        name = key.group(1)
        value, pos = _parameter_value(text, key.end(), line, where, f"{what}: parameter '{name}'")
        if pos < len(text) and not (text[pos].isspace() or text[pos] == ","):
            _fail(
                where,
                f"'{what}': parameter '{name}': unexpected {text[pos:]!r} after its value",
                line,
            )
        if name in params:
            _fail(where, f"'{what}': parameter '{name}' is given twice", line)
        params[name] = value


def _parameter_value(text: str, pos: int, line: int, where: str, what: str) -> tuple[Any, int]:
    if pos >= len(text) or text[pos].isspace() or text[pos] == ",":
        _fail(where, f"'{what}' has no value", line)
    first = text[pos]
    if first in "\"'":
        end = text.find(first, pos + 1)
        if end < 0:
            _fail(where, f"'{what}': unterminated quote", line)
        return text[pos + 1 : end], end + 1
    for opener, closer in (("<%", "%>"), ("{{", "}}")):
        if text.startswith(opener, pos):
            end = text.find(closer, pos + 2)
            if end < 0:
                _fail(where, f"'{what}': expression without closing '{closer}'", line)
            return text[pos : end + 2], end + 2
    if first == "[":
        end = _closing_bracket(text, pos, line, where, what)
        raw = text[pos:end]
        try:
            return json.loads(raw), end
        except ValueError:
            return raw, end
    token = _BARE_VALUE.match(text, pos)
    assert token is not None  # text[pos] is neither blank nor a comma
    try:
        return json.loads(token.group()), token.end()
    except ValueError:
        # Mistral silently drops a bare word such as output=hello; Levante takes it as
        # the text it plainly is (docs/semantics.md). Anything odder must be quoted.
        if _BARE_WORD.fullmatch(token.group()):
            return token.group(), token.end()
        _fail(
            where,
            f"'{what}': {token.group()!r} is not a number, true, false, null, [list], "
            "expression, word or quoted text (quote text values)",
            line,
        )


def _closing_bracket(text: str, pos: int, line: int, where: str, what: str) -> int:
    """The index just past the ``]`` that closes the ``[`` at ``pos``."""
    depth = 0
    i = pos
    while i < len(text):
        ch = text[i]
        if ch in "\"'":
            end = text.find(ch, i + 1)
            i = len(text) if end < 0 else end + 1
            continue
        if text.startswith("<%", i) or text.startswith("{{", i):
            end = text.find("%>" if ch == "<" else "}}", i + 2)
            i = len(text) if end < 0 else end + 2
            continue
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    _fail(where, f"'{what}': '[' is never closed", line)


def _retry(node: _Node, where: str) -> RetrySpec:
    """``retry:`` as a mapping or as Mistral's one-line ``count=3 delay=1 break-on=<% ... %>``."""
    values: dict[str, _Node]
    if isinstance(node, _Scalar) and isinstance(node.value, str) and node.value.strip():
        params = _parameters(node.value, node.line, where, "retry")
        for key in params:
            if key not in _RETRY_KEYS:
                _fail(where, f"'retry': unknown parameter '{key}'", node.line)
        values = {key: _Scalar(value, node.line) for key, value in params.items()}
        line = node.line
    else:
        mapping = _mapping(node, where, "retry")
        _check_keys(mapping, _RETRY_KEYS, f"{where}: retry" if where else "retry", {})
        values = {key: entry.value for key, entry in mapping.items()}
        line = mapping.line
    for required in ("count", "delay"):
        if required not in values:
            _fail(
                where, f"'retry' needs '{required}' (Mistral requires both count and delay)", line
            )
    return RetrySpec(
        count=_count_or_expression(values["count"], where, "retry: count"),
        delay=_seconds_or_expression(values["delay"], where, "retry: delay"),
        break_on=_optional(values, "break-on", lambda n: _expression(n, where, "retry: break-on")),
        continue_on=_optional(
            values, "continue-on", lambda n: _expression(n, where, "retry: continue-on")
        ),
    )


def _optional(values: Mapping[str, _Node], key: str, read: Callable[[_Node], Any]) -> Any:
    node = values.get(key)
    return None if node is None else read(node)


def _with_items(node: _Node, where: str) -> WithItems:
    items = node.items if isinstance(node, _Seq) else (node,)
    if not items:
        _fail(where, "'with-items' must not be empty", node.line)
    variables: list[tuple[str, Any]] = []
    for item in items:
        text = _text(item, where, "with-items")
        match = _WITH_ITEMS.fullmatch(text)
        if match is None:
            _fail(
                where,
                f"wrong format of 'with-items' {text!r}: use 'x in [1, 2]' or 'x in <% $.xs %>'",
                item.line,
            )
        name, source = match.group(1), match.group(2)
        values: Any
        if source.startswith("["):
            try:
                values = json.loads(source)
            except ValueError as e:
                _fail(where, f"Invalid array in 'with-items' clause: {source} ({e})", item.line)
        elif _is_expression(source):
            values = source
        else:
            _fail(
                where,
                f"'with-items' {text!r}: after 'in' comes a [JSON list] or an expression",
                item.line,
            )
        if any(existing == name for existing, _ in variables):
            _fail(where, f"'with-items' declares '{name}' twice", item.line)
        variables.append((name, values))
    return WithItems(tuple(variables))


# ------------------------------------------------------------------- transitions


def _clause(node: _Node, where: str, kind: str, task_names: frozenset[str]) -> TransitionClause:
    """One on-* clause: a target, a list of targets, or ``{publish: ..., next: ...}``."""
    if not isinstance(node, _Map):
        return TransitionClause(_transitions(node, where, kind, task_names), line=node.line)
    if not set(node.entries) & _ADVANCED_CLAUSE_KEYS:
        _fail(
            where,
            f"'{kind}' as a mapping takes 'publish' and 'next'; write a conditional "
            "transition as a list item: '- task: <% condition %>'",
            node.line,
        )
    _check_keys(node, _ADVANCED_CLAUSE_KEYS, f"{where}: {kind}", {})
    branch: dict[str, Any] = {}
    global_: dict[str, Any] = {}
    publish = node.get("publish")
    if publish is not None:
        branch, global_ = _advanced_publish(publish.value, where, kind)
    following = node.get("next")
    transitions = (
        () if following is None else _transitions(following.value, where, kind, task_names)
    )
    return TransitionClause(transitions, publish=branch, publish_global=global_, line=node.line)


def _advanced_publish(node: _Node, where: str, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    what = f"{kind}: publish"
    scopes = _mapping(node, where, what)
    for key, entry in scopes.items():
        if key not in _PUBLISH_SCOPES:
            _fail(
                where,
                f"'{what}' takes the scopes 'branch', 'global' (and 'atomic'), not '{key}'",
                entry.key_line,
            )
    found = {key: _variables(entry.value, where, f"{what}: {key}") for key, entry in scopes.items()}
    # 'atomic' is accepted as Mistral does, and, as in Mistral, publishes nothing.
    return found.get("branch", {}), found.get("global", {})


def _transitions(
    node: _Node, where: str, kind: str, task_names: frozenset[str]
) -> tuple[Transition, ...]:
    items = node.items if isinstance(node, _Seq) else (node,)
    if not items:
        _fail(where, f"'{kind}' must not be an empty list", node.line)
    transitions: list[Transition] = []
    seen: list[Any] = []
    for item in items:
        raw = _data(item)
        if raw in seen:
            _fail(where, f"'{kind}' lists the same transition twice", item.line)
        seen.append(raw)
        transitions.append(_transition(item, where, kind, task_names))
    return tuple(transitions)


def _transition(node: _Node, where: str, kind: str, task_names: frozenset[str]) -> Transition:
    condition: str | None = None
    if isinstance(node, _Map):
        if len(node.entries) != 1:
            _fail(
                where,
                f"a conditional '{kind}' entry must have exactly one key (task: condition)",
                node.line,
            )
        ((key, entry),) = node.items()
        if not isinstance(key, str):
            _fail(where, f"'{kind}': {key!r} is not a task name", entry.key_line)
        text, line = key, entry.key_line
        condition = _expression(entry.value, where, f"{kind}: {key}")
    elif isinstance(node, _Scalar) and isinstance(node.value, str):
        text, line = node.value, node.line
    else:
        _fail(where, f"'{kind}' entries must be task names, not {_kind(node)}", node.line)
    target, params = _transition_target(text, line, where, kind, task_names)
    if target not in task_names and target not in ENGINE_COMMANDS:
        _fail(where, f"{kind} refers to task '{target}' which does not exist", line)
    return Transition(target, condition=condition, params=params, line=line)


def _transition_target(
    text: str, line: int, where: str, kind: str, task_names: frozenset[str]
) -> tuple[str, dict[str, Any]]:
    """``task``, ``fail``, ``fail msg="x"`` or ``fail(msg=<% $.x %>)``."""
    stripped = text.strip()
    if not stripped:
        _fail(where, f"'{kind}' has an empty task name", line)
    if stripped in task_names:
        return stripped, {}
    call = _COMMAND_CALL.fullmatch(stripped)
    if call is not None:
        return call.group(1), _parameters(call.group(2), line, where, kind)
    return _split_command(stripped, line, where, kind)


# ------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class _Defaults:
    """A workflow's task-defaults, parsed."""

    policies: PoliciesSpec = field(default_factory=PoliciesSpec)
    clauses: Mapping[str, TransitionClause] = field(default_factory=dict)
    safe_rerun: Any = None
    requires: tuple[str, ...] = ()
    requires_line: int | None = None


@dataclass(frozen=True)
class _Draft:
    """A task as written, before task-defaults are applied."""

    spec: TaskSpec
    safe_rerun: Any  # None when the task does not set it
    join_line: int | None
    requires_line: int | None


def _policies(node: _Map, where: str) -> PoliciesSpec:
    def read(key: str, reader: Callable[[_Node, str, str], Any]) -> Any:
        entry = node.get(key)
        return None if entry is None else reader(entry.value, where, key)

    retry = node.get("retry")
    return PoliciesSpec(
        retry=None if retry is None else _retry(retry.value, where),
        timeout=read("timeout", _seconds_or_expression),
        wait_before=read("wait-before", _seconds_or_expression),
        wait_after=read("wait-after", _seconds_or_expression),
        pause_before=read("pause-before", _bool_or_expression),
        fail_on=read("fail-on", _bool_or_expression),
        concurrency=read("concurrency", _count_or_expression),
    )


def _task_defaults(entry: _Entry, wf_type: WorkflowType, task_names: frozenset[str]) -> _Defaults:
    where = "task-defaults"
    node = _mapping(entry.value, "", where)
    _check_keys(node, _TASK_DEFAULTS_KEYS, where, _UNSUPPORTED)
    clauses = {
        kind: _clause(clause.value, where, kind, task_names)
        for kind in CLAUSE_KEYS
        if (clause := node.get(kind)) is not None
    }
    safe_rerun = node.get("safe-rerun")
    requires = node.get("requires")
    required = (
        () if requires is None else _names(requires.value, where, "requires", single_allowed=True)
    )
    if wf_type == "reverse":
        for name in required:
            if name not in task_names:
                _fail(
                    where,
                    f"requires task '{name}' which does not exist",
                    requires.value.line if requires else None,
                )
    return _Defaults(
        policies=_policies(node, where),
        clauses=clauses,
        safe_rerun=None
        if safe_rerun is None
        else _bool_or_expression(safe_rerun.value, where, "safe-rerun"),
        requires=required,
        requires_line=None if requires is None else requires.value.line,
    )


def _task(name: str, entry: _Entry, wf_type: WorkflowType, task_names: frozenset[str]) -> _Draft:
    where = f"task '{name}'"
    node = entry.value
    if not isinstance(node, _Map) or not node.entries:
        _fail(where, f"a task must be a non-empty mapping, not {_kind(node)}", entry.key_line)
    if wf_type == "direct":
        hints = dict(_UNSUPPORTED, requires="'requires' is only for tasks of reverse workflows")
        _check_keys(node, _DIRECT_TASK_KEYS, where, hints)
    else:
        hints = dict(_UNSUPPORTED)
        hints.update(
            {k: f"'{k}' is only for tasks of direct workflows" for k in ("join", *CLAUSE_KEYS)}
        )
        _check_keys(node, _REVERSE_TASK_KEYS, where, hints)
    _version(node, where, entry.key_line, required=False)
    task_type = node.get("type")
    if task_type is not None and _data(task_type.value) not in ("direct", "reverse"):
        _fail(where, "'type' must be 'direct' or 'reverse'", task_type.value.line)

    action, workflow, inline, inline_line = _runs(node, where)
    task_input: dict[str, Any] = {}
    input_expression: str | None = None
    given_input = node.get("input")
    if given_input is not None:
        if isinstance(given_input.value, _Scalar):
            input_expression = _expression(given_input.value, where, "input")
            if inline:
                _fail(
                    where,
                    "'input' is an expression, so inline parameters cannot be merged into it",
                    inline_line,
                )
        else:
            task_input = _variables(given_input.value, where, "input")
    # Mistral (tasks.py) merges the inline parameters over 'input': inline ones win.
    task_input = _merged(task_input, inline)

    clauses = {
        kind: _clause(clause.value, where, kind, task_names)
        for kind in CLAUSE_KEYS
        if (clause := node.get(kind)) is not None
    }
    join, join_line = _join(node, where)
    requires = node.get("requires")
    with_items = node.get("with-items")
    publish = node.get("publish")
    publish_on_error = node.get("publish-on-error")
    keep_result = node.get("keep-result")
    safe_rerun = node.get("safe-rerun")
    target = node.get("target")
    description = node.get("description")
    tags = node.get("tags")
    spec = TaskSpec(
        name=name,
        action=action,
        workflow=workflow,
        input=task_input,
        input_expression=input_expression,
        publish={} if publish is None else _variables(publish.value, where, "publish"),
        publish_on_error={}
        if publish_on_error is None
        else _variables(publish_on_error.value, where, "publish-on-error"),
        on_success=clauses.get("on-success"),
        on_error=clauses.get("on-error"),
        on_complete=clauses.get("on-complete"),
        on_skip=clauses.get("on-skip"),
        join=join,
        requires=()
        if requires is None
        else tuple(
            r for r in _names(requires.value, where, "requires", single_allowed=True) if r != name
        ),
        with_items=None if with_items is None else _with_items(with_items.value, where),
        policies=_policies(node, where),
        keep_result=True
        if keep_result is None
        else _bool_or_expression(keep_result.value, where, "keep-result"),
        target=None if target is None else _text(target.value, where, "target"),
        description="" if description is None else _description(description.value, where),
        tags=() if tags is None else _names(tags.value, where, "tags", single_allowed=False),
        line=entry.key_line,
    )
    return _Draft(
        spec=spec,
        safe_rerun=None
        if safe_rerun is None
        else _bool_or_expression(safe_rerun.value, where, "safe-rerun"),
        join_line=join_line,
        requires_line=None if requires is None else requires.value.line,
    )


def _runs(node: _Map, where: str) -> tuple[str | None, str | None, dict[str, Any], int | None]:
    """The task's action or workflow name and its inline parameters."""
    action = node.get("action")
    workflow = node.get("workflow")
    if action is not None and workflow is not None:
        later = max(action.key_line, workflow.key_line)
        _fail(where, "a task has either 'action' or 'workflow', not both", later)
    chosen = action or workflow
    if chosen is None:
        return None, None, {}, None  # runs std.noop
    what = "action" if action is not None else "workflow"
    text = _text(chosen.value, where, what)
    name, params = _split_command(text, chosen.value.line, where, what)
    if action is not None:
        return name, None, params, chosen.value.line
    return None, name, params, chosen.value.line


def _join(node: _Map, where: str) -> tuple[Join, int | None]:
    entry = node.get("join")
    if entry is None:
        return None, None
    value = entry.value.value if isinstance(entry.value, _Scalar) else None
    if value in ("all", "one"):
        return value, entry.value.line
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value, entry.value.line
    _fail(
        where,
        f"'join' must be 'all', 'one' or an integer >= 0, not {_kind(entry.value)}",
        entry.value.line,
    )


def _truthy_policy(value: Any) -> bool:
    """Whether Mistral's engine builds a policy from a value (policies.py: str or > 0 or true)."""
    return isinstance(value, str) or bool(value)


def _with_defaults(draft: _Draft, defaults: _Defaults, wf_type: WorkflowType) -> TaskSpec:
    """Apply task-defaults the way Mistral's engine reads them.

    * policies, one by one: the task's value when Mistral would build a policy from it
      (set and not 0/false), else the default (engine/policies.py);
    * safe-rerun: the task's when set, else the default, else false (engine/tasks.py);
    * on-* (direct): the task's transitions when it has some, else the default clause's
      without the task itself (DirectWorkflowSpec.get_on_*_clause); the task's own
      clause publishing is kept, the default clause's publishing is never used;
    * requires (reverse): the task's and the default ones, without the task itself.
    """
    spec = draft.spec
    own, default = spec.policies, defaults.policies
    policies = PoliciesSpec(
        **{
            f.name: getattr(own, f.name)
            if _truthy_policy(getattr(own, f.name)) or getattr(default, f.name) is None
            else getattr(default, f.name)
            for f in dataclasses.fields(PoliciesSpec)
        }
    )
    safe_rerun = draft.safe_rerun
    if safe_rerun is None:
        safe_rerun = defaults.safe_rerun if defaults.safe_rerun is not None else False
    changes: dict[str, Any] = {"policies": policies, "safe_rerun": safe_rerun}
    if wf_type == "direct":
        for kind in CLAUSE_KEYS:
            attr = kind.replace("-", "_")
            changes[attr] = _clause_with_default(
                getattr(spec, attr), defaults.clauses.get(kind), spec.name
            )
    else:
        extra = tuple(r for r in defaults.requires if r != spec.name and r not in spec.requires)
        changes["requires"] = spec.requires + extra
    return dataclasses.replace(spec, **changes)


def _clause_with_default(
    own: TransitionClause | None, default: TransitionClause | None, task_name: str
) -> TransitionClause | None:
    if default is None or (own is not None and own.transitions):
        return own
    inherited = tuple(t for t in default.transitions if t.target != task_name)
    if own is None:
        return TransitionClause(inherited, line=default.line) if inherited else None
    return dataclasses.replace(own, transitions=inherited)


# --------------------------------------------------------------------- workflows


def _workflow(full_name: str, entry: _Entry) -> WorkflowSpec:
    where = f"workflow '{full_name}'"
    if not isinstance(entry.value, _Map):
        _fail(
            where,
            f"a workflow must be a mapping with 'tasks', not {_kind(entry.value)}",
            entry.key_line,
        )
    node = entry.value
    _check_keys(node, _WORKFLOW_KEYS, where, {})
    _version(node, where, entry.key_line, required=False)
    _check_not_uuid(full_name.rsplit(".", 1)[-1], where, entry.key_line)

    wf_type: WorkflowType = "direct"
    type_entry = node.get("type")
    if type_entry is not None:
        value = _data(type_entry.value)
        if value not in ("direct", "reverse"):
            _fail(
                where,
                f"'type' must be 'direct' or 'reverse', not {_kind(type_entry.value)}",
                type_entry.value.line,
            )
        wf_type = value

    tasks_entry = node.get("tasks")
    if tasks_entry is None:
        _fail(where, "'tasks' is required", entry.key_line)
    tasks_node = _mapping(tasks_entry.value, where, "tasks")
    task_names = _task_names(tasks_node)

    defaults_entry = node.get("task-defaults")
    defaults = (
        _Defaults()
        if defaults_entry is None
        else _task_defaults(defaults_entry, wf_type, task_names)
    )
    drafts = [_task(name, task, wf_type, task_names) for name, task in tasks_node.items()]
    tasks = {d.spec.name: _with_defaults(d, defaults, wf_type) for d in drafts}

    if wf_type == "direct":
        _check_direct(tasks, drafts, where, tasks_entry.key_line)
    else:
        _check_reverse(tasks, drafts, defaults)

    description = node.get("description")
    tags = node.get("tags")
    given_input = node.get("input")
    output = node.get("output")
    output_on_error = node.get("output-on-error")
    variables = node.get("vars")
    return WorkflowSpec(
        name=full_name,
        type=wf_type,
        input=() if given_input is None else _input_params(given_input.value, where),
        output=None if output is None else _variables(output.value, where, "output"),
        output_on_error=None
        if output_on_error is None
        else _variables(output_on_error.value, where, "output-on-error"),
        vars={} if variables is None else _variables(variables.value, where, "vars"),
        tasks=tasks,
        description="" if description is None else _description(description.value, where),
        tags=() if tags is None else _names(tags.value, where, "tags", single_allowed=False),
        line=entry.key_line,
    )


def _task_names(tasks: _Map) -> frozenset[str]:
    for name, entry in tasks.items():
        where = f"task '{name}'"
        if not isinstance(name, str) or not name.strip():
            _fail("", f"task names must be non-empty text, not {name!r}", entry.key_line)
        if name in ENGINE_COMMANDS:
            _fail(where, f"'{name}' is an engine command and cannot name a task", entry.key_line)
        if len(name) > MAX_TASK_NAME:
            _fail(where, f"a task name must not exceed {MAX_TASK_NAME} characters", entry.key_line)
    return frozenset(tasks.entries)


def _check_not_uuid(name: str, where: str, line: int) -> None:
    try:
        uuid.UUID(name)
    except ValueError:
        return
    _fail(where, "a workflow name cannot look like a UUID", line)


def _check_direct(
    tasks: Mapping[str, TaskSpec], drafts: Iterable[_Draft], where: str, tasks_line: int
) -> None:
    inbound: dict[str, int] = {name: 0 for name in tasks}
    for task in tasks.values():
        for target in task.next_task_names():
            inbound[target] += 1
    if all(count > 0 for count in inbound.values()):
        _fail(
            where,
            "no start task: every task is the target of a transition, so none can run first",
            tasks_line,
        )
    for draft in drafts:
        name, join = draft.spec.name, draft.spec.join
        if join is None:
            continue
        task_where = f"task '{name}'"
        if len(name) > MAX_JOIN_TASK_NAME:
            _fail(
                task_where,
                f"a join task name must not exceed {MAX_JOIN_TASK_NAME} characters",
                draft.spec.line,
            )
        needed = 1 if join in ("all", "one") else int(join)
        if inbound[name] < needed:
            _fail(
                task_where,
                f"'join: {join}' needs at least {needed} inbound task(s), "
                f"but {inbound[name]} task(s) transition to it",
                draft.join_line,
            )


def _check_reverse(
    tasks: Mapping[str, TaskSpec], drafts: Iterable[_Draft], defaults: _Defaults
) -> None:
    lines: dict[str, int | None] = {}
    for draft in drafts:
        name = draft.spec.name
        lines[name] = draft.requires_line or defaults.requires_line or draft.spec.line
        for required in draft.spec.requires:
            if required not in tasks:
                _fail(
                    f"task '{name}'",
                    f"requires task '{required}' which does not exist",
                    draft.requires_line,
                )
    cycle = _find_cycle({name: task.requires for name, task in tasks.items()})
    if cycle:
        path = " -> ".join(f"'{n}'" for n in cycle)
        _fail(f"task '{cycle[0]}'", f"'requires' forms a cycle: {path}", lines[cycle[0]])


def _find_cycle(graph: Mapping[str, tuple[str, ...]]) -> list[str] | None:
    """A dependency cycle as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in graph:
        if state.get(start):
            continue
        path: list[str] = [start]
        stack: list[Iterator[str]] = [iter(graph[start])]
        state[start] = 1
        while stack:
            following = next(stack[-1], None)
            if following is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(following) == 1:
                return [*path[path.index(following) :], following]
            elif not state.get(following):
                state[following] = 1
                path.append(following)
                stack.append(iter(graph[following]))
    return None


# ----------------------------------------------------------------------- actions


def _action(full_name: str, entry: _Entry) -> ActionSpec:
    where = f"action '{full_name}'"
    if not isinstance(entry.value, _Map):
        _fail(
            where,
            f"an ad-hoc action must be a mapping with 'base', not {_kind(entry.value)}",
            entry.key_line,
        )
    node = entry.value
    _check_keys(node, _ACTION_KEYS, where, {})
    _version(node, where, entry.key_line, required=False)
    base_entry = node.get("base")
    if base_entry is None:
        _fail(where, "'base' is required", entry.key_line)
    base, inline = _split_command(
        _text(base_entry.value, where, "base"), base_entry.value.line, where, "base"
    )
    base_input = node.get("base-input")
    given = {} if base_input is None else _variables(base_input.value, where, "base-input")
    given_input = node.get("input")
    output = node.get("output")
    description = node.get("description")
    tags = node.get("tags")
    if tags is not None:
        _names(tags.value, where, "tags", single_allowed=False)
    return ActionSpec(
        name=full_name,
        base=base,
        base_input=_merged(given, inline),  # Mistral: inline base parameters win
        input=() if given_input is None else _input_params(given_input.value, where),
        output=None if output is None else _data(output.value),
        description="" if description is None else _description(description.value, where),
        line=entry.key_line,
    )


# --------------------------------------------------------------------- documents


@functools.lru_cache(maxsize=128)
def parse_document_cached(text: str) -> Document:
    """``parse_document``, remembering the last documents parsed in this process.

    Documents are immutable, so one parse serves every engine in the process that
    registers or loads the same text (a script calling ``run_workflow`` in a loop, an
    engine loading a definition its replica registered). Errors are not cached.
    """
    return parse_document(text)


def parse_document(text: str | bytes) -> Document:
    """Parse one Mistral v2 document: a workflows document or a workbook.

    A workbook has a top-level ``name`` (and ``workflows:`` / ``actions:``); its
    workflows and actions are named ``"<workbook>.<name>"``. Anything else is a
    workflows document, whose top-level keys other than ``version`` are workflows.
    Raises DefinitionError with the 1-based line of the first problem found.
    """
    root = _load(text)
    if not isinstance(root, _Map):
        _fail(
            "", f"the document must be a mapping with 'version: 2.0', not {_kind(root)}", root.line
        )
    for key, entry in root.items():
        if not isinstance(key, str) or not key.strip():
            _fail("", f"top-level keys must be non-empty text, not {key!r}", entry.key_line)
    name = root.get("name")
    if name is not None and not isinstance(name.value, _Map):
        return _checked_expressions(_workbook(root))
    for key in ("workflows", "actions"):
        section = root.get(key)
        if section is None or not isinstance(section.value, _Map):
            continue
        if "tasks" not in section.value.entries:  # not a workflow that happens to be so named
            _fail(
                "",
                f"'{key}:' belongs to a workbook, which needs a 'name'; "
                "a workflows document holds 'version' and workflows only",
                section.key_line,
            )
    return _checked_expressions(_workflows_document(root))


def _checked_expressions(document: Document) -> Document:
    """Refuse expressions that do not parse, naming the task (and line) that holds them.

    Returns the document with each workflow knowing its workbook and ad-hoc actions.
    """
    document = dataclasses.replace(
        document,
        workflows={
            name: dataclasses.replace(wf, workbook=document.workbook, actions=document.actions)
            for name, wf in document.workflows.items()
        },
    )
    for workflow in document.workflows.values():
        where = f"workflow '{workflow.name}'"
        for what, value in (("output", workflow.output), ("output-on-error",
                            workflow.output_on_error), ("vars", dict(workflow.vars))):  # fmt: skip
            _check_expression(value, f"{where}: {what}", workflow.line)
        for task in workflow.tasks.values():
            at = f"{where}: task '{task.name}'"
            for what, value in (
                ("action", task.action), ("workflow", task.workflow),
                ("input", dict(task.input)), ("input", task.input_expression),
                ("publish", dict(task.publish)), ("publish-on-error", dict(task.publish_on_error)),
                ("with-items", task.with_items.variables if task.with_items else None),
                ("policies", task.policies), ("keep-result", task.keep_result),
                ("target", task.target),
            ):  # fmt: skip
                _check_expression(value, f"{at}: {what}", task.line)
            for clause in task.clauses():
                _check_expression(dict(clause.publish), f"{at}: publish", clause.line)
                _check_expression(dict(clause.publish_global), f"{at}: publish", clause.line)
                for t in clause.transitions:
                    line = t.line or clause.line or task.line
                    _check_expression(t.condition, f"{at}: transition to '{t.target}'", line)
                    _check_expression(dict(t.params), f"{at}: '{t.target}' parameters", line)
    for action in document.actions.values():
        at = f"action '{action.name}'"
        _check_expression(dict(action.base_input), f"{at}: base-input", action.line)
        _check_expression(action.output, f"{at}: output", action.line)
    return document


def _check_expression(value: Any, where: str, line: int | None) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    try:
        expressions.check_syntax(value)
    except ExpressionError as e:
        raise DefinitionError(f"{where}: {e}", line) from None


def _workflows_document(root: _Map) -> Document:
    _version(root, "", root.line, required=True)
    workflows: dict[str, WorkflowSpec] = {}
    for name, entry in root.items():
        if name == "version":
            continue
        if name in ("description", "tags") and not isinstance(entry.value, _Map):
            _fail(
                "",
                f"top-level '{name}' belongs to workbooks; a workflows document holds "
                "'version' and workflows only",
                entry.key_line,
            )
        workflows[name] = _workflow(name, entry)
    if not workflows:
        _fail("", "the document defines no workflow", root.line)
    return Document(workflows=workflows)


def _workbook(root: _Map) -> Document:
    _check_keys(root, _WORKBOOK_KEYS, "workbook", {})
    _version(root, "workbook", root.line, required=True)
    name_entry = root.get("name")
    assert name_entry is not None
    name = _text(name_entry.value, "workbook", "name")
    where = f"workbook '{name}'"
    description = root.get("description")
    if description is not None:
        _description(description.value, where)
    tags = root.get("tags")
    if tags is not None:
        _names(tags.value, where, "tags", single_allowed=False)
    workflows = {
        full: _workflow(full, entry) for full, entry in _workbook_section(root, "workflows", name)
    }
    actions = {
        full: _action(full, entry) for full, entry in _workbook_section(root, "actions", name)
    }
    return Document(workflows=workflows, actions=actions, workbook=name)


def _workbook_section(root: _Map, key: str, workbook: str) -> Iterator[tuple[str, _Entry]]:
    entry = root.get(key)
    if entry is None:
        return
    where = f"workbook '{workbook}'"
    section = _mapping(entry.value, where, key)
    _version(section, f"{where}: {key}", entry.key_line, required=False)
    for name, item in section.items():
        if name == "version":
            continue
        if not isinstance(name, str) or not _WORKBOOK_ITEM_NAME.fullmatch(name):
            _fail(
                where,
                f"'{key}': name {name!r} may hold only letters, digits, '_' and '-'",
                item.key_line,
            )
        yield f"{workbook}.{name}", item
