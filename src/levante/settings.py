"""Settings of a command from flags, environment variables and a TOML file, in that order.

``layer(parser)`` takes an argparse (sub)parser whose options are all declared, and
makes each long option a layered setting: a flag given on the command line wins, then
the environment variable ``LEVANTE_<OPTION>`` (``--lease-seconds``:
``LEVANTE_LEASE_SECONDS``), then the key of the same name in the file named by
``--config`` (``lease-seconds = 30``; ``lease_seconds`` is accepted too), then the
option's default. Each option's help gains its variable and default, so ``--help`` is
the reference. ``resolve(args)`` fills the parsed namespace in.

Values from the environment and the file go through the option's own ``type`` and
``choices``, so ``--lease-seconds abc``, ``LEVANTE_LEASE_SECONDS=abc`` and
``lease-seconds = "abc"`` fail alike. A key the command does not know is an error: a
misspelt setting is never silently ignored.
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Layers", "SettingsError", "layer", "resolve"]

CONFIG_ENV = "LEVANTE_CONFIG"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class SettingsError(ValueError):
    """A setting from the environment or the file is not valid."""


@dataclass(frozen=True)
class _Setting:
    dest: str
    name: str  # the long option without dashes: also the file's key
    env: str
    default: Any
    action: argparse.Action


@dataclass
class Layers:
    """The layered settings of one parser (kept in its namespace as ``_layers``)."""

    settings: list[_Setting] = field(default_factory=list)

    def resolve(
        self, args: argparse.Namespace, environ: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """Fill ``args`` in; returns where each value came from (flag, env, file, default)."""
        environ = os.environ if environ is None else environ
        config = getattr(args, "config", None) or environ.get(CONFIG_ENV) or None
        from_file = _read_file(config, self) if config else {}
        sources: dict[str, str] = {}
        for s in self.settings:
            if getattr(args, s.dest, None) is not None:
                sources[s.name] = "flag"
                continue
            if s.env in environ:
                value = _convert(s, environ[s.env], f"${s.env}")
                sources[s.name] = "env"
            elif s.name in from_file:
                value = _convert(s, from_file[s.name], f"{config}: {s.name}")
                sources[s.name] = "file"
            else:
                value = s.default
                sources[s.name] = "default"
            setattr(args, s.dest, value)
        args.config = config
        return sources


def env_name(option: str) -> str:
    return "LEVANTE_" + option.upper().replace("-", "_")


def layer(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> Layers:
    """Make every long option of ``parser`` (but --help and --config) a layered setting.

    ``env`` names the variable of an option whose variable is not ``LEVANTE_<OPTION>``
    (by its dest). Call it after the last ``add_argument``.
    """
    env = env or {}
    layers = Layers()
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or action.dest in ("help", "config"):
            continue
        name = longs[0][2:]
        variable = env.get(action.dest, env_name(name))
        layers.settings.append(_Setting(action.dest, name, variable, action.default, action))
        shown = "off" if action.default in (None, "") else action.default
        # The default is shown once, in the suffix below.
        text = re.sub(r"\s*\(default %\(default\)s\)", "", action.help or "")
        text = text.replace("%(default)s", str(shown))
        if not re.search(rf"\b{re.escape(variable)}\b", text):
            text = f"{text} [env {variable}; default {shown}]".strip()
        action.help = text.replace("%", "%%")
        action.default = argparse.SUPPRESS  # absent from the namespace unless given
    parser.add_argument(
        "--config", metavar="FILE", default=None,
        help=f"a TOML file of these settings, keyed by option name (lease-seconds = 30); "
        f"flags and environment variables win over it [env {CONFIG_ENV}]",
    )  # fmt: skip
    parser.set_defaults(_layers=layers)
    return layers


def resolve(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Fill in the settings of the command ``args`` was parsed for (see ``layer``)."""
    layers: Layers | None = getattr(args, "_layers", None)
    if layers is None:
        return {}
    return layers.resolve(args, environ)


def _read_file(path: str, layers: Layers) -> dict[str, Any]:
    try:
        with Path(path).open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise SettingsError(f"cannot read the config file {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"{path} is not valid TOML: {e}") from None
    known = {s.name for s in layers.settings}
    found: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("_", "-")
        if name not in known:
            raise SettingsError(
                f"{path}: unknown setting {key!r} (known: {', '.join(sorted(known))})"
            )
        found[name] = value
    return found


def _convert(s: _Setting, value: Any, where: str) -> Any:
    """A value from the environment (a string) or the file (TOML-typed), made like a flag's."""
    action = s.action
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        return _boolean(value, where)
    if action.nargs in ("*", "+") or isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [v for v in str(value).split(",") if v]
        return [_scalar(action, item, where) for item in items]
    if isinstance(value, list | dict):
        raise SettingsError(f"{where}: expected one value, not {type(value).__name__}")
    return _scalar(action, value, where)


def _scalar(action: argparse.Action, value: Any, where: str) -> Any:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    try:
        converted = action.type(text) if callable(action.type) else text
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise SettingsError(f"{where}: invalid value {value!r} ({e})") from None
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise SettingsError(f"{where}: {value!r} is not one of {choices}")
    return converted


def _boolean(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise SettingsError(f"{where}: expected true or false, not {value!r}")
