"""Pydantic's validation errors as configuration problems: each names the key path (and so,
through ``router.yamlsource``, the file and line) in words an operator reads, not pydantic's."""

from __future__ import annotations

import re
from collections.abc import Mapping

from pydantic import BaseModel, ValidationError

from router import yamlsource

_MESSAGES = {
    "missing": "required key is missing",
    "string_type": "expected a string",
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "too_short": "must not be empty",
    "string_too_short": "must not be empty",
}
_UNION_TAG = re.compile(r"^(str|int|float|bool|[a-z]+\[.*\]|function-.*)$")


def report(
    src: yamlsource.Source,
    prefix: yamlsource.KeyPath,
    error: ValidationError,
    models: Mapping[yamlsource.KeyPath, type[BaseModel]],
    extra_allowed: frozenset[str] = frozenset(),
) -> None:
    """Turn pydantic's errors into problems naming key path and line; a union's alternatives
    at one path are merged into one problem."""
    found: dict[yamlsource.KeyPath, list[str]] = {}
    reported = {p.path for p in src.problems}
    for item in error.errors(include_url=False):
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p)))
        if item.get("input") is None and yamlsource.dotted((*prefix, *loc)) in reported:
            continue  # a value dropped while loading (e.g. a missing secret): reported already
        if item["type"] == "extra_forbidden":
            parent = tuple(0 if isinstance(p, int) else p for p in loc[:-1])
            model = models.get(parent)
            names = sorted(extra_allowed | set(model.model_fields)) if model else []
            text = f"unknown key (allowed: {', '.join(names)})" if names else "unknown key"
        else:
            text = _MESSAGES.get(item["type"], item["msg"].removeprefix("Value error, "))
        texts = found.setdefault((*prefix, *loc), [])
        if text not in texts:
            texts.append(text)
    for path, texts in found.items():
        src.problem(path, " or ".join(texts).replace(" or expected ", " or "))
