"""Declaring yaql functions without yaql's decorators."""

from __future__ import annotations

import collections.abc  # noqa: F401  # yaql 3.2 needs it imported: keep this first
from collections.abc import Callable
from typing import Any

from yaql.language import specs as yaql_specs

__all__ = ["declare"]


def declare(function: Callable[..., Any], name: str, method: bool = False, **types: Any) -> Any:
    """``function`` with a yaql signature: its ``name``, called as a method or not, and
    the yaql type of each named parameter (what yaql's decorators attach)."""
    declared: Any = function
    for parameter, value_type in types.items():
        declared = yaql_specs.parameter(parameter, value_type)(declared)
    if method:
        declared = yaql_specs.method(declared)
    return yaql_specs.name(name)(declared)
