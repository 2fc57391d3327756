"""YAQL's regular-expression functions, with every pattern bounded in size and in time.

yaql's own functions (``yaql/standard_library/regex.py``: ``regex``, ``matches``, ``=~``,
``!~``, ``search``, ``searchAll``, ``split``, ``replace``, ``replaceBy``, ``escapeRegex``,
``isRegex``) run Python's ``re``, whose backtracking cannot be interrupted:
``<% 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!' =~ '(a|aa)+$' %>`` would hold the engine
for hours. This module has the same functions, with the same names, signatures and
results, run by the ``regex`` package, which takes a ``timeout``. ``register`` puts them
in a yaql context that has none of yaql's own.

Rules:

* Time. All the regular expressions of one evaluation share one allowance of CPU time
  (:class:`RegexTimeLimit`, which ``expressions.evaluate`` enters). A match, search,
  split or substitution may use what is left and stops with :class:`RegexLimitError`
  when it runs out; so does every later one of that evaluation. Backtracking cannot be
  counted the way the work meter counts everything else, so this is the one limit that
  is timed, and reading the CPU clock is this module's exception to the language ring's
  purity: only an evaluation that comes close to the limit may go differently when an
  execution is replayed. The allowance also pays for compiling patterns and for the
  lambda ``replaceBy`` runs for each match; regex's own clock for a ``searchAll`` runs
  from its start, through whatever uses its results.
* Size. ``regex`` compiles ``x{1000}`` into a thousand copies of ``x`` (``re`` does not),
  so a short pattern could take gigabytes: a pattern may have at most
  :data:`REGEX_MAX_SIZE` characters, and may compile to at most as many parts, each
  repeated part counted as many times as its minimum repeat count. A substitution may
  build at most :data:`MAX_RESULT_LENGTH` characters: an empty pattern matches between
  every two characters and ``\\1`` repeats a group, so what it builds is counted as it
  goes when it could pass that.
* ``re``'s meaning. ``regex`` reads some patterns differently (``{id}`` is an error to
  it, ``a{e<=1}`` fuzzy matching, ``[[:alpha:]]`` a POSIX class; all plain characters to
  ``re``). So a pattern is parsed by ``re`` (what ``re`` refuses is refused with
  ``re``'s message, as in Mistral), and ``regex`` gets ``re``'s parse written back out
  with every character that could mean something escaped (:class:`_Writer`; ``re``
  must parse that back to the same tree). A replacement template is checked by
  ``re``'s rules too. What still differs: ``\\w``, ``\\b`` and ``\\s`` follow the
  Unicode standard rather than Python's ``str`` methods (the same for ASCII text; ``²``
  is a word character to ``re`` only), the text of a few error messages, and ``str()``
  of a compiled pattern.
* ``regex()`` returns a ``regex.Pattern``; ``isRegex`` and the functions that take a
  compiled pattern recognise that type.
"""

from __future__ import annotations

import collections.abc  # noqa: F401  # yaql 3.2 needs it imported: keep this first
import contextvars
import functools
import re
import time
from collections.abc import Callable, Iterator, Mapping
from re import _parser as re_parser  # type: ignore[attr-defined]  # re's own parser
from typing import Any, Final, NamedTuple, TypeVar

import regex
from yaql.language import yaqltypes

from levante.lang.yaql_signatures import declare

__all__ = [
    "MAX_RESULT_LENGTH",
    "PATTERN_TYPE",
    "REGEX_MAX_SIZE",
    "RegexLimitError",
    "RegexTimeLimit",
    "register",
]

#: The most characters a pattern may have, and the most parts it may compile to.
REGEX_MAX_SIZE: Final = 10_000
#: The longest string a substitution (``replace``, ``replaceBy``) may build: the
#: expressions' ``MAX_STRING_LENGTH``.
MAX_RESULT_LENGTH: Final = 16 * 1024 * 1024
#: Patterns at most this size stay compiled (an LRU cache of this many entries).
CACHED_PATTERN_SIZE: Final = 1_000
CACHED_PATTERNS: Final = 256

#: What ``regex()`` returns.
PATTERN_TYPE: Final = regex.Pattern

T = TypeVar("T")


class RegexLimitError(Exception):
    """A regular expression is too large, or ran out of the evaluation's time."""


# -- time ----------------------------------------------------------------------------------


class RegexTimeLimit:
    """The CPU time the regular expressions of one evaluation may take, all together.

    Used as a context manager around the evaluation: ``with RegexTimeLimit(1.0): ...``.
    """

    __slots__ = ("_token", "left", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.left = seconds
        self._token: contextvars.Token[RegexTimeLimit | None] | None = None

    def __enter__(self) -> RegexTimeLimit:
        self._token = _TIME_LIMIT.set(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _TIME_LIMIT.reset(self._token)

    def run(self, operation: Callable[[float], T]) -> T:
        """Run ``operation(timeout)`` with what is left and take the CPU time it used."""
        left = self.left
        if left <= 0:
            raise self._exceeded()
        started = time.process_time()
        try:
            return operation(left)
        except TimeoutError as e:  # how regex reports its timeout
            self.left = 0.0
            raise self._exceeded() from e
        finally:
            # A nested run (a regex inside replaceBy's lambda) has already taken its own
            # time: take the whole elapsed time once, not twice.
            self.left = min(self.left, left - (time.process_time() - started))

    def _exceeded(self) -> RegexLimitError:
        return RegexLimitError(
            f"regular expressions ran for more than {self.seconds:g} s of CPU time, the "
            "limit of one evaluation (a pattern that backtracks too much for its text?)"
        )


# The time limit of the evaluation running in this thread (or asyncio task), if any.
_TIME_LIMIT: Final[contextvars.ContextVar[RegexTimeLimit | None]] = contextvars.ContextVar(
    "levante_regex_time_limit", default=None
)


def _timed(operation: Callable[[float], T]) -> T:
    limit = _TIME_LIMIT.get()
    if limit is None:
        raise RegexLimitError("regular expressions run only inside an evaluation")
    return limit.run(operation)


# -- compiling: re's meaning, bounded size ------------------------------------------------

_REPEATS: Final = frozenset(
    {re_parser.MAX_REPEAT, re_parser.MIN_REPEAT, re_parser.POSSESSIVE_REPEAT}
)


def _compiled_size(items: Any, limit: int) -> int:
    """How many parts regex compiles ``re``'s parse of a pattern to (stops past ``limit``)."""
    size = 0
    for op, av in items:
        if op in _REPEATS:
            low, _high, body = av
            size += max(low, 1) * _compiled_size(body, limit)
        elif op is re_parser.SUBPATTERN:
            size += _compiled_size(av[3], limit)
        elif op is re_parser.BRANCH:
            size += sum(_compiled_size(branch, limit) for branch in av[1])
        elif op is re_parser.ATOMIC_GROUP:
            size += _compiled_size(av, limit)
        elif op in (re_parser.ASSERT, re_parser.ASSERT_NOT):
            size += _compiled_size(av[1], limit)
        elif op is re_parser.GROUPREF_EXISTS:
            size += sum(_compiled_size(branch, limit) for branch in av[1:] if branch)
        else:
            size += 1
        if size > limit:
            break
    return size


# Inline flag letters, by re's flag value (re adds "u" to every str pattern without "a").
_FLAG_LETTERS: Final = ((re.IGNORECASE, "i"), (re.MULTILINE, "m"), (re.DOTALL, "s"),
                        (re.VERBOSE, "x"), (re.ASCII, "a"), (re.UNICODE, "u"))  # fmt: skip
_POSITIONS: Final = {
    re_parser.AT_BEGINNING: "^",
    re_parser.AT_BEGINNING_STRING: "\\A",
    re_parser.AT_END: "$",
    re_parser.AT_END_STRING: "\\Z",
    re_parser.AT_BOUNDARY: "\\b",
    re_parser.AT_NON_BOUNDARY: "\\B",
}
_CATEGORIES: Final = {
    re_parser.CATEGORY_DIGIT: "\\d",
    re_parser.CATEGORY_NOT_DIGIT: "\\D",
    re_parser.CATEGORY_SPACE: "\\s",
    re_parser.CATEGORY_NOT_SPACE: "\\S",
    re_parser.CATEGORY_WORD: "\\w",
    re_parser.CATEGORY_NOT_WORD: "\\W",
}
_ASSERTIONS: Final = {
    (re_parser.ASSERT, 1): "(?=",
    (re_parser.ASSERT, -1): "(?<=",
    (re_parser.ASSERT_NOT, 1): "(?!",
    (re_parser.ASSERT_NOT, -1): "(?<!",
}


def _flag_letters(flags: int) -> str:
    return "".join(letter for flag, letter in _FLAG_LETTERS if flags & flag)


def _character(code: int) -> str:
    """One character, escaped if it could mean anything else (to re or regex, in or out
    of a set, verbose or not): ASCII other than letters, digits and ``_``."""
    char = chr(code)
    return "\\" + char if char.isascii() and not (char.isalnum() or char == "_") else char


def _set_item(op: Any, av: Any) -> str:
    if op is re_parser.NEGATE:
        return "^"
    if op is re_parser.RANGE:
        return f"{_character(av[0])}-{_character(av[1])}"
    if op is re_parser.CATEGORY:
        return _CATEGORIES[av]
    return _character(av)  # LITERAL


class _Writer:
    """Writes ``re``'s parse of a pattern back as a pattern in which nothing is left to
    interpretation, so that ``regex`` reads what ``re`` read. Each construct is written
    so that ``re`` parses it back to the same tree (which is checked)."""

    def __init__(self, group_names: Mapping[str, int]) -> None:
        self.names = {index: name for name, index in group_names.items()}

    def items(self, items: Any) -> str:
        out: list[str] = []
        previous = None
        for op, av in items:
            if op is re_parser.BRANCH:
                # Always last: re moved the alternatives' common first items before it.
                prefix = "".join(out)
                return "|".join(prefix + self.items(branch) for branch in av[1])
            if previous is re_parser.GROUPREF and op is re_parser.LITERAL and 48 <= av <= 57:
                out.append(f"\\x{av:02x}")  # \1 then 0 is not \10
            else:
                out.append(self.item(op, av))
            previous = op
        return "".join(out)

    def item(self, op: Any, av: Any) -> str:
        if op is re_parser.LITERAL:
            return _character(av)
        if op is re_parser.NOT_LITERAL:
            return f"[^{_character(av)}]"
        if op is re_parser.ANY:
            return "."
        if op is re_parser.IN:
            return "[" + "".join(_set_item(o, a) for o, a in av) + "]"
        if op is re_parser.CATEGORY:
            return _CATEGORIES[av]
        if op is re_parser.AT:
            return _POSITIONS[av]
        if op in _REPEATS:
            low, high, body = av
            count = f"{{{low},}}" if high is re_parser.MAXREPEAT else f"{{{low},{high}}}"
            mode = {re_parser.MIN_REPEAT: "?", re_parser.POSSESSIVE_REPEAT: "+"}.get(op, "")
            return f"(?:{self.items(body)}){count}{mode}"
        if op is re_parser.SUBPATTERN:
            group, add_flags, del_flags, body = av
            if group is not None:
                name = self.names.get(group)
                opening = "(" if name is None else f"(?P<{name}>"
            else:
                removed = _flag_letters(del_flags)
                opening = f"(?{_flag_letters(add_flags)}{'-' + removed if removed else ''}:"
            return opening + self.items(body) + ")"
        if op is re_parser.ATOMIC_GROUP:
            return f"(?>{self.items(av)})"
        if op in (re_parser.ASSERT, re_parser.ASSERT_NOT):
            direction, body = av
            return _ASSERTIONS[op, direction] + self.items(body) + ")"
        if op is re_parser.GROUPREF:
            return f"\\{av}"
        if op is re_parser.GROUPREF_EXISTS:
            group, yes, no = av
            return f"(?({group}){self.items(yes)}{'' if no is None else '|' + self.items(no)})"
        raise RegexLimitError(f"the regular expression uses {op}, which Levante cannot run")


def _regex_syntax(parsed: Any) -> str:
    """A pattern ``regex`` reads as ``re`` read ``parsed`` (its global flags inline)."""
    flags = _flag_letters(parsed.state.flags)
    body = _Writer(parsed.state.groupdict).items(parsed.data)
    return f"(?{flags}){body}" if flags else body


@functools.lru_cache(maxsize=CACHED_PATTERNS)
def _regex_source(pattern: str, flags: int) -> tuple[str, int]:
    """The pattern as ``regex`` must read it, and the size it compiles to.

    ``flags`` are ``re``'s. Raises ``re.error`` (with ``re``'s message) for what ``re``
    refuses.
    """
    if len(pattern) > REGEX_MAX_SIZE:
        raise RegexLimitError(
            f"the regular expression has {len(pattern)} characters, more than the "
            f"limit of {REGEX_MAX_SIZE}"
        )
    re.compile(pattern, flags)  # re's compiler refuses more (a look-behind's width)
    parsed = re_parser.parse(pattern, flags)
    size = _compiled_size(parsed.data, REGEX_MAX_SIZE)
    if size > REGEX_MAX_SIZE:
        raise RegexLimitError(
            f"the regular expression would compile to more than {REGEX_MAX_SIZE} parts "
            "(a repeated part counts as many times as its minimum repeat count)"
        )
    source = _regex_syntax(parsed)
    again = re_parser.parse(source)
    if repr(again.data) != repr(parsed.data) or again.state.flags != parsed.state.flags:
        raise RegexLimitError(
            "Levante could not write this regular expression for its regular expression "
            "engine; please report it"
        )
    return source, size


def _regex_compile(source: str) -> regex.Pattern[str]:
    return regex.compile(source, regex.VERSION0, cache_pattern=False)


_cached_regex_compile: Final = functools.lru_cache(maxsize=CACHED_PATTERNS)(_regex_compile)


def _compile(pattern: str, flags: int = 0) -> regex.Pattern[str]:
    """``re.compile(pattern, flags)``, by regex."""

    def compile_now(_timeout: float) -> regex.Pattern[str]:
        source, size = _regex_source(pattern, flags)
        if size <= CACHED_PATTERN_SIZE:
            return _cached_regex_compile(source)
        return _regex_compile(source)

    return _timed(compile_now)


class _Groups(NamedTuple):
    """What re's template parser reads of a pattern."""

    groups: int
    groupindex: Mapping[str, int]


@functools.lru_cache(maxsize=CACHED_PATTERNS)
def _checked_template(template: str, groups: int, names: tuple[tuple[str, int], ...]) -> None:
    re_parser.parse_template(template, _Groups(groups, dict(names)))


def _check_template(template: str, pattern: regex.Pattern[str]) -> None:
    """Refuse what ``re`` refuses in a replacement template (``regex`` takes more, such
    as ``\\x41``), with ``re``'s message."""
    _checked_template(template, pattern.groups, tuple(pattern.groupindex.items()))


# -- the functions (same names, parameters and results as yaql's) --------------------------


def _regex(
    pattern: str, ignore_case: Any = False, multi_line: Any = False, dot_all: Any = False
) -> regex.Pattern[str]:
    flags = re.UNICODE
    if ignore_case:
        flags |= re.IGNORECASE
    if multi_line:
        flags |= re.MULTILINE
    if dot_all:
        flags |= re.DOTALL
    return _compile(pattern, flags)


def _search(regexp: regex.Pattern[str], string: str) -> regex.Match[str] | None:
    return _timed(lambda timeout: regexp.search(string, timeout=timeout))


def _matches(regexp: regex.Pattern[str], string: str) -> bool:
    return _search(regexp, string) is not None


def _matches_string(string: str, regexp: str) -> bool:
    return _search(_compile(regexp), string) is not None


def _matches_operator_regex(string: str, regexp: regex.Pattern[str]) -> bool:
    return _search(regexp, string) is not None


def _matches_operator_string(string: str, pattern: str) -> bool:
    return _search(_compile(pattern), string) is not None


def _not_matches_operator_regex(string: str, regexp: regex.Pattern[str]) -> bool:
    return _search(regexp, string) is None


def _not_matches_operator_string(string: str, pattern: str) -> bool:
    return _search(_compile(pattern), string) is None


def _group_record(match: regex.Match[str], group: int | str) -> dict[str, Any]:
    return {"value": match.group(group), "start": match.start(group), "end": match.end(group)}


def _publish_match(context: Any, match: regex.Match[str]) -> None:
    """What a selector or replacement lambda sees: ``$`` (``$1``) the whole match,
    ``$2``... the groups, ``$name`` a named group. (yaql publishes named groups with a
    loop that always fails; this one publishes them.)"""
    context["$1"] = _group_record(match, 0)
    for index in range(1, len(match.groups()) + 1):
        context[f"${index + 1}"] = _group_record(match, index)
    for name in match.groupdict():
        context[f"${name}"] = _group_record(match, name)


def _search_method(
    context: Any, regexp: regex.Pattern[str], string: str, selector: Any = None
) -> Any:
    found = _search(regexp, string)
    if found is None:
        return None
    if selector is None:
        return found.group()
    child = context.create_child_context()
    _publish_match(child, found)
    return selector(child)


def _all_matches(regexp: regex.Pattern[str], string: str) -> Iterator[regex.Match[str]]:
    """``finditer``, with the time of each step taken from the allowance (the steps are
    taken lazily, between the work of whoever consumes the results)."""
    matches = _timed(lambda timeout: regexp.finditer(string, timeout=timeout))
    while True:
        found = _timed(lambda _timeout: next(matches, None))
        if found is None:
            return
        yield found


def _search_all(
    context: Any, regexp: regex.Pattern[str], string: str, selector: Any = None
) -> Iterator[Any]:
    for found in _all_matches(regexp, string):
        if selector is None:
            yield found.group()
        else:
            child = context.create_child_context()
            _publish_match(child, found)
            yield selector(child)


def _split(regexp: regex.Pattern[str], string: str, max_split: int = 0) -> list[Any]:
    return _timed(lambda timeout: regexp.split(string, max_split, timeout=timeout))


def _split_string(string: str, regexp: regex.Pattern[str], max_split: int = 0) -> list[Any]:
    return _split(regexp, string, max_split)


class _Replaced:
    """Counts what a substitution builds, as it goes: an empty pattern matches between
    every two characters, and ``\\1\\1\\1`` prints a group three times, so the result
    may be far longer than the string and the replacement together."""

    __slots__ = ("left",)

    def __init__(self, string: str) -> None:
        self.left = MAX_RESULT_LENGTH - len(string)  # the text between matches

    def add(self, piece: Any) -> Any:
        if isinstance(piece, str):
            self.left -= len(piece)
            if self.left < 0:
                raise RegexLimitError(
                    f"the replaced string would be longer than {MAX_RESULT_LENGTH} characters"
                )
        return piece


def _replace(regexp: regex.Pattern[str], string: str, repl: str, count: int = 0) -> str:
    _check_template(repl, regexp)
    # Each match prints at most the template and, per reference, a group of the string.
    per_match = len(repl) + repl.count("\\") * len(string)
    if len(string) + (len(string) + 1) * per_match <= MAX_RESULT_LENGTH:
        return _timed(lambda timeout: regexp.sub(repl, string, count, timeout=timeout))
    replaced = _Replaced(string)

    def replacement(found: regex.Match[str]) -> Any:
        return replaced.add(found.expand(repl))

    return _timed(lambda timeout: regexp.sub(replacement, string, count, timeout=timeout))


def _replace_string(string: str, regexp: regex.Pattern[str], repl: str, count: int = 0) -> str:
    return _replace(regexp, string, repl, count)


def _replace_by(
    context: Any, regexp: regex.Pattern[str], string: str, repl: Any, count: int = 0
) -> str:
    replaced = _Replaced(string)

    def replacement(found: regex.Match[str]) -> Any:
        child = context.create_child_context()
        _publish_match(child, found)
        return replaced.add(repl(child))

    return _timed(lambda timeout: regexp.sub(replacement, string, count, timeout=timeout))


def _replace_by_string(
    context: Any, string: str, regexp: regex.Pattern[str], repl: Any, count: int = 0
) -> str:
    return _replace_by(context, regexp, string, repl, count)


def _escape_regex(string: str) -> str:
    return re.escape(string)  # what yaql returns (regex.escape differs); runs no pattern


def _is_regex(value: Any) -> bool:
    return isinstance(value, PATTERN_TYPE)


# -- registration --------------------------------------------------------------------------


@functools.cache  # yaql's declarations stay on the functions: declare them once
def _functions() -> tuple[Any, ...]:
    text, pattern = yaqltypes.String(), PATTERN_TYPE
    selector = yaqltypes.Lambda(with_context=True)
    return (
        declare(_regex, "regex", pattern=text),
        declare(_matches, "matches", True, regexp=pattern, string=text),
        declare(_matches_string, "matches", True, string=text, regexp=text),
        declare(_matches_operator_string, "#operator_=~", string=text, pattern=text),
        declare(_matches_operator_regex, "#operator_=~", string=text, regexp=pattern),
        declare(_not_matches_operator_string, "#operator_!~", string=text, pattern=text),
        declare(_not_matches_operator_regex, "#operator_!~", string=text, regexp=pattern),
        declare(
            _search_method, "search", True, regexp=pattern, string=text, selector=selector
        ),
        declare(
            _search_all, "searchAll", True, regexp=pattern, string=text, selector=selector
        ),
        declare(_split, "split", True, regexp=pattern, string=text, max_split=int),
        declare(_split_string, "split", True, regexp=pattern, string=text, max_split=int),
        declare(
            _replace, "replace", True, regexp=pattern, string=text, repl=text, count=int
        ),
        declare(
            _replace_by, "replaceBy", True, regexp=pattern, string=text, repl=selector, count=int
        ),
        declare(
            _replace_string, "replace", True, regexp=pattern, string=text, repl=text, count=int
        ),
        declare(
            _replace_by_string,
            "replaceBy",
            True,
            regexp=pattern,
            string=text,
            repl=selector,
            count=int,
        ),
        declare(_escape_regex, "escapeRegex", string=text),
        declare(_is_regex, "isRegex"),
    )


def register(context: Any) -> None:
    """Register the functions in a yaql context (one built with ``regex=False``)."""
    for function in _functions():
        context.register_function(function)
