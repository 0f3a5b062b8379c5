"""YAML loading that remembers where each value came from, and resolves secrets.

``load`` returns plain Python data plus a map from key path to line number, so that every
configuration error can name its file, key path and line. Duplicate keys (which PyYAML silently
accepts, keeping the last) are errors. A mapping of exactly one key ``env`` or ``file`` with a
string value is a secret reference and is replaced by the secret's text:
``{env: NAME}`` reads an environment variable, ``{file: PATH}`` a file (relative to the
configuration file's folder; one trailing newline is removed), ``{credential: NAME}`` a
systemd credential (``$CREDENTIALS_DIRECTORY/NAME``, from ``LoadCredential=``).

With ``secrets=False`` no secret is read: each reference is replaced by ``UNRESOLVED`` and its
key path listed in ``Source.unresolved``. The operator commands load the configuration that way:
they need the journal and the routes, not the keys, and run as users who may not have them.
``secrets`` may instead name top-level sections whose secrets alone are read
(``webhook-router metriport`` needs ``metriport.api_key``, not the webhook keys).
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from router.errors import ConfigProblem

KeyPath = tuple[str | int, ...]
#: What stands for a secret that was not read (``load(..., secrets=False)``).
UNRESOLVED = "(secret not loaded)"


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_.*?-]+$")  # a name or a type glob: no quotes needed


def dotted(path: KeyPath) -> str:
    """``sinks.archive.path``, ``routes[0].to``; a key such as a plugin file's path is quoted:
    ``plugins[0]["./audit.py"].tenant``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _PLAIN_KEY.match(part):
            out += f"[{json.dumps(part)}]"
        else:
            out += f".{part}" if out else part
    return out


@dataclass
class Source:
    """A loaded YAML document: its data, the line of every key path, and problems found."""

    file: str
    data: Any = None
    lines: dict[KeyPath, int] = field(default_factory=dict)
    problems: list[ConfigProblem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: Key paths of the secret references left unread (``secrets=False``).
    unresolved: list[KeyPath] = field(default_factory=list)

    def line_of(self, path: KeyPath) -> int | None:
        """The line of the longest prefix of ``path`` that exists in the document."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return None

    def problem(self, path: KeyPath, message: str) -> None:
        self.problems.append(ConfigProblem(self.file, self.line_of(path), dotted(path), message))

    def warning(self, path: KeyPath, message: str) -> None:
        """A warning worded like a problem (file:line: key: text): the file stays valid."""
        problem = ConfigProblem(self.file, self.line_of(path), dotted(path), message)
        self.warnings.append(str(problem))


def load(
    path: Path, environ: Mapping[str, str] | None = None, *, secrets: bool | Collection[str] = True
) -> Source:
    source = Source(str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        source.problems.append(ConfigProblem(str(path), None, "", f"cannot read: {e.strerror}"))
        return source
    except UnicodeDecodeError:
        source.problems.append(ConfigProblem(str(path), None, "", "not UTF-8 text"))
        return source
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        reason = ": ".join(str(x) for x in (e.context, e.problem) if x)
        source.problems.append(ConfigProblem(str(path), line, "", f"invalid YAML: {reason}"))
        return source
    except yaml.YAMLError as e:
        source.problems.append(ConfigProblem(str(path), None, "", f"invalid YAML: {e}"))
        return source
    if node is None:
        source.data = {}
        return source
    builder = _Builder(source, path.parent, os.environ if environ is None else environ, secrets)
    source.data = builder.build(node, ())
    return source


class _Builder:
    def __init__(
        self,
        source: Source,
        base_dir: Path,
        environ: Mapping[str, str],
        secrets: bool | Collection[str],
    ) -> None:
        self.source = source
        self.secrets = secrets
        self.base_dir = base_dir
        self.environ = environ
        self.constructor = yaml.SafeLoader("")

    def build(self, node: yaml.Node, path: KeyPath) -> Any:
        self.source.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as e:
            self.source.problem(path, f"invalid value: {e}")
            return None

    def _mapping(self, node: yaml.MappingNode, path: KeyPath) -> Any:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                self.source.problem(path, "keys must be plain strings (no merge or complex keys)")
                continue
            key = str(key_node.value)
            key_path = (*path, key)
            if key in out:
                self.source.lines[key_path] = key_node.start_mark.line + 1
                self.source.problem(key_path, "duplicate key")
                continue
            self.source.lines[key_path] = key_node.start_mark.line + 1
            out[key] = self.build(value_node, key_path)
        if len(out) == 1 and next(iter(out)) in ("env", "file", "credential"):
            return self._secret(out, path)
        return out

    def _secret(self, ref: dict[str, Any], path: KeyPath) -> str | None:
        ((kind, name),) = ref.items()
        if not isinstance(name, str) or not name:
            self.source.problem((*path, kind), f"{{{kind}: ...}} needs a non-empty string")
            return None
        if isinstance(self.secrets, bool):
            wanted = self.secrets
        else:
            wanted = bool(path) and path[0] in self.secrets
        if not wanted:
            self.source.unresolved.append(path)
            return UNRESOLVED
        if kind == "env":
            value = self.environ.get(name)
            if value is None:
                self.source.problem(path, f"environment variable {name} is not set")
                return None
            if not value:
                self.source.problem(path, f"environment variable {name} is empty")
                return None
            return value
        if kind == "credential":
            # systemd's LoadCredential=: files in $CREDENTIALS_DIRECTORY, readable by us alone.
            directory = self.environ.get("CREDENTIALS_DIRECTORY")
            if not directory:
                self.source.problem(
                    path, f"{{credential: {name}}} needs $CREDENTIALS_DIRECTORY (LoadCredential=)"
                )
                return None
            file = Path(directory) / name
        else:
            file = self.base_dir / name
        try:
            mode = file.stat().st_mode
            value = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            self.source.problem(path, f"cannot read secret file {file}: {reason}")
            return None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            self.source.warnings.append(
                f"{self.source.file}: secret file {file} is readable by group or others:"
                f" chmod 600 {file}"
            )
        value = value.removesuffix("\n").removesuffix("\r")
        if not value:
            self.source.problem(path, f"secret file {file} is empty")
            return None
        return value
