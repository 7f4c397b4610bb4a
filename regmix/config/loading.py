"""A config from YAML or a dict, with overrides; validation errors as one line naming the field."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import yaml
from pydantic import (
    ValidationError,
)

from regmix.config.schema import RegMixConfig
from regmix.config.sections import PATTERN_WORDS, SHAPE_TAGS
from regmix.errors import ConfigError


def parse_config(data: dict, source: str = "config") -> RegMixConfig:
    try:
        return RegMixConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def apply_overrides(data: dict, overrides: Iterable[str]) -> None:
    """Set `section.key=value` assignments (YAML values) in a config mapping, in place."""
    for assignment in overrides:
        dotted, sep, value = assignment.partition("=")
        if not sep or not dotted:
            raise ConfigError(f"override '{assignment}': write it as section.key=value, "
                              "e.g. regression.target=wikipedia")
        *sections, key = dotted.split(".")
        node = data
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{assignment}': '{section}' is not a config section")
        node[key] = yaml.safe_load(value)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key repeated in one mapping (PyYAML keeps the last one
    silently, so a second `search:` block would replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may repeat its keys
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = (type(key), key) in seen  # 1 and true are different keys
                seen.add((type(key), key))
            except TypeError:  # a list or mapping as a key
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a plain value", key_node.start_mark) from None
            if repeated:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}'; keep one", key_node.start_mark)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path, error: type[Exception]):
    """A YAML file's content, or `error` naming the file, line and problem."""
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise error(f"{path}{where}: not valid YAML: {getattr(e, 'problem', e)}") from None


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> RegMixConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}; pass an existing YAML (see configs/)")
    data = read_yaml(path, ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config sections")
    apply_overrides(data, overrides)
    config = parse_config(data, str(path))
    # Relative paths (corpus spec, inline domains, tokenizer file) are relative to the config
    # file, so a config works from any cwd. (A spec's own paths are relative to the spec.)

    def beside_config(file: str | None) -> str | None:
        if file is None:
            return None
        expanded = Path(file).expanduser()  # `~/corpus.yaml`, as a shell would
        return str(expanded if expanded.is_absolute() else path.parent / file)

    corpus, tokenizer = config.corpus, config.tokenizer
    domains = corpus.domains and [d.model_copy(update={"path": beside_config(d.path)})
                                  for d in corpus.domains]
    return config.model_copy(update={
        "corpus": corpus.model_copy(update={"spec": beside_config(corpus.spec), "domains": domains}),
        "tokenizer": tokenizer.model_copy(update={"path": beside_config(tokenizer.path)}),
    })


def format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"{source}: {error.error_count()} invalid value(s):"]
    for e in error.errors():
        # The tag pydantic puts after `shape` (a shape by name or inline) is no key of the config.
        loc = [p for i, p in enumerate(e["loc"]) if not (i and e["loc"][i - 1] == "shape"
                                                          and p in SHAPE_TAGS)]
        field, problem = ".".join(str(p) for p in loc), _problem(e)
        # A whole-config check has no location of its own, and some messages name their field.
        named = not field or problem.startswith((f"{field}.", f"{field}:"))
        lines.append(f"  {problem}" if named else f"  {field}: {problem}")
    return "\n".join(lines)


def _problem(e: dict) -> str:
    """One validation error in words, with the fix where pydantic's words lack it."""
    kind, value = e["type"], e.get("input")
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        return "unknown key; remove it or fix its spelling"
    if kind == "missing":
        return "required; add it"
    if kind == "string_pattern_mismatch":
        pattern = e["ctx"]["pattern"]
        return f"{value!r}: use {PATTERN_WORDS.get(pattern, f'text matching {pattern}')}"
    # YAML 1.1 traps: yes/no/on/off are booleans, and 2e5 (no dot) is text
    if kind == "string_type" and isinstance(value, bool):
        return f"YAML read this as the boolean {str(value).lower()}; quote it to keep it text"
    if kind == "int_parsing" and isinstance(value, str) and _whole_number(value):
        return f"YAML read {value!r} as text, not a number; write it in digits: {float(value):.0f}"
    return e["msg"].removeprefix("Value error, ")


def _whole_number(text: str) -> bool:
    try:
        return float(text).is_integer()
    except ValueError:
        return False
