"""Reading YAML that users and earlier runs wrote: bounded, and refused in one line naming file and line where
it cannot be a recipe (invalid, not UTF-8, aliases that expand without end, duplicate keys)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


# A YAML alias repeats the node it names without copying it, so nested aliases ("billion laughs") let a few
# hundred bytes stand for billions of values, which building the recipe would then walk. Every real recipe is a
# few dozen values; this bound is far above any of them.
MAX_YAML_VALUES = 100_000


def expanded_size(root: yaml.Node, where: str) -> int:
    """How many values the document stands for once every alias is expanded, counted over the node graph (each
    node once), stopping past MAX_YAML_VALUES; an alias inside the node it names, and a mapping's duplicate keys,
    are refused."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # iterative: a deeply nested document must not exhaust Python's stack here
        node, finished = stack.pop()
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        if finished:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_YAML_VALUES:
                return sizes[id(node)]
            continue
        if id(node) in sizes:
            continue
        if id(node) in open_nodes:
            raise ConfigError(f"{where}:{node.start_mark.line + 1}: invalid YAML: an alias refers to the node that "
                              "holds it")
        open_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            refuse_duplicate_keys(node, where)
        stack.append((node, True))
        stack += [(c, False) for c in children if id(c) not in sizes]
    return sizes[id(root)]


def refuse_duplicate_keys(node: yaml.MappingNode, where: str) -> None:
    """PyYAML keeps the last of two equal keys and drops the first silently (a whole section, or a value)."""
    seen: dict[tuple[str, str], int] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":  # `<<:` merges, repeatable
            continue
        if (key.tag, key.value) in seen:
            raise ConfigError(f"{where}:{key.start_mark.line + 1}: duplicate key {key.value!r} (first at line "
                              f"{seen[key.tag, key.value]})")
        seen[key.tag, key.value] = key.start_mark.line + 1


def load_yaml(text: str, where: str) -> Any:
    """yaml.safe_load, refusing documents whose aliases expand past MAX_YAML_VALUES, and duplicate keys, before
    building them."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if expanded_size(node, where) > MAX_YAML_VALUES:
            raise ConfigError(f"{where}: refused: its YAML aliases expand to more than {MAX_YAML_VALUES:,} values "
                              "(a recipe has a few dozen)")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: Path) -> dict[str, Any]:
    """A recipe file's mapping (empty: {}), each way it can fail named in one line with its file and line."""
    try:
        if not path.is_file():
            raise ConfigError(f"{path}: recipe file not found")
        text = path.read_text(encoding="utf-8")
    except OSError as e:  # a name too long, a folder we may not enter
        raise ConfigError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        data = load_yaml(text, str(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{line}: invalid YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    except ValueError as e:  # a value YAML parses but Python cannot hold, e.g. an integer of thousands of digits
        raise ConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0][:120]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections (model:, train:, ...)")
    return data
