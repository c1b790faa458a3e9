"""Reading a YAML file a person wrote (deploy.yaml): UTF-8 text only, and no key given twice
in any mapping (PyYAML keeps the last one silently: `host:` twice would connect elsewhere
than the reader of the file thinks). Every problem is one ConfigError naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import ConfigError

_MERGE = "tag:yaml.org,2002:merge"


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key: str, line: int, first_line: int) -> None:
        super().__init__(f"line {line}: duplicate key {key!r} (first given on line {first_line})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (a merge key `<<` may still
    be overridden: that is what it is for)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _value in node.value:
            if key_node.tag == _MERGE:
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    shown = key_node.value if isinstance(key_node, yaml.ScalarNode) else key
                    raise DuplicateKey(str(shown), line, seen[key])
                seen[key] = line
            except TypeError:  # an unhashable key: the base class reports it
                continue
        return super().construct_mapping(node, deep=deep)


MAX_BYTES = 1 << 20  # a configuration file is a few KB


def read_yaml(path: Path) -> Any:
    """The parsed document of ``path`` (None when empty)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_BYTES + 1)
        if len(data) > MAX_BYTES:
            raise ConfigError(f"{path}: more than {MAX_BYTES >> 20} MB, too big for a configuration file; is it "
                              "the right file?")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        if b"\0" in data:
            raise UnicodeError("a NUL byte")
        text = data.decode("utf-8-sig")
    except UnicodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (binary, or another encoding); "
                          "save it as UTF-8 text") from exc
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: builds plain data only
    except DuplicateKey as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', exc)})") from exc
