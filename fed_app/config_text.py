"""Run-config text in and out: kebab <-> snake names, TOML values, the coercion of a parsed value to its key's
type, and the sentences for an unknown key or a pair that cannot be read (fed_app/config.py has the keys)."""

from __future__ import annotations

import difflib
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import Field
from typing import Any

from fed_app.errors import UserError


class ConfigError(UserError, ValueError):
    """A run-config key or value that cannot be used; the message says which and how to fix it."""


def to_snake(key: str) -> str:
    return key.replace("-", "_")


def to_kebab(name: str) -> str:
    return name.replace("_", "-")


def toml_text(value: Any) -> str:
    """A value as TOML writes it in a key=value pair (true, 0.01, 'text')."""
    return str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, str) else str(value)


def article(noun: str) -> str:
    """'an int', 'a float'."""
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


def coerce(key: str, value: Any, type_name: Any) -> Any:
    """A parsed value as its key's type (an int given for a float becomes one); any other mismatch is a sentence."""
    type_name = type_name if isinstance(type_name, str) else type_name.__name__
    if type_name == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = {"str": str, "int": int, "float": float, "bool": bool}[type_name]
    if type(value) is not expected:
        example = {"str": "'text'", "int": "10", "float": "0.01", "bool": "true"}[type_name]
        raise ConfigError(
            f"run-config {key}={value!r} has type {type(value).__name__}; it must be {article(type_name)} "
            f"(e.g. {key}={example})."
        )
    return value


def unknown_key_message(key: str, known: list[str]) -> str:
    close = nearest_keys(key, known)
    hint = f" (did you mean {' or '.join(repr(k) for k in close)}?)" if close else ""
    return (f"unknown run-config key '{key}'{hint}; every key, with its default, is in [tool.flwr.app.config] of "
            f"pyproject.toml.")


def nearest_keys(key: str, known: list[str]) -> list[str]:
    """The known keys a mistyped `key` most likely meant: close spellings, and a key spelling the initials of
    its words (learning-rate -> lr) or sharing its last word (rounds -> num-rounds); at most three."""
    words = key.replace("_", "-").split("-")
    initials = "".join(w[:1] for w in words)
    found = [k for k in known if k == initials]
    found += sorted((k for k in known if len(words) == 1 and k.split("-")[-1] == words[0]), key=len)
    found += difflib.get_close_matches(key, known, n=3, cutoff=0.7)
    return list(dict.fromkeys(found))[:3]


def bad_pair_message(text: str, parse: Callable[[list[str]], Any], fields: Mapping[str, Field]) -> str:
    """The first key=value pair of `text` that `parse` (Flower's parser) cannot read, and how to write it; `fields`:
    RunConfig's, by snake-case name."""
    for pair in shlex.split(text, posix=False) or [text]:
        key, sep, value = pair.partition("=")
        try:
            parse([pair])
            continue
        except Exception:
            pass
        if not sep or not key:
            return (f"run-config {pair!r} is not a key=value pair; write space-separated pairs, e.g. "
                    f"lr=0.01 partition='iid'.")
        field = fields.get(to_snake(key))
        kind = (field.type if isinstance(field.type, str) else field.type.__name__) if field else None
        if kind == "str" or (kind is None and not re.fullmatch(r"[-+.\d]", value[:1] or "x")):
            bare = value.strip("'\"")
            return (f"run-config {pair} is not valid: text goes in quotes, so write {key}='{bare}' "
                    f"(numbers and true/false go without).")
        example = toml_text(field.default) if field else "0.01"
        takes = "true or false" if kind == "bool" else article(kind or "number")
        return f"run-config {pair} is not valid: {key} takes {takes}, e.g. {key}={example}."
    return f"run-config {text!r} is not valid; write space-separated key=value pairs, e.g. lr=0.01 partition='iid'."
