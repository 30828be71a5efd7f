"""Config and search-space files: found on disk or among the files shipped inside the package,
and a config may build on another with ``base:``.

A name such as ``demo``, ``coco_resdcn18``, ``tune/demo`` or ``tune/search_space`` (also written
``demo.yaml``, ``configs/demo.yaml``) means the file shipped in ``centernet_ray/configs/``, so the
same commands work from a wheel install as from a checkout. A path that exists is read as it is.

``base: NAME_OR_PATH`` at the top of a config loads that config first and lays this one over it,
section by section, key by key (lists and values are replaced, not merged). A relative base path
means the including file's folder first.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import yaml

from centernet_ray.errors import UserInputError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

PACKAGED = "configs"  # folder inside the package
LEGACY_FOLDERS = ("configs/", "centernet_ray/configs/")  # how the names were written before they shipped
MAX_BASE_DEPTH = 8


def packaged_root() -> Traversable:
    return resources.files("centernet_ray") / PACKAGED


def packaged_names() -> list[str]:
    """Every shipped file's name: ``demo``, ``coco_resdcn18``, ..., ``tune/demo``, ``tune/search_space``."""
    names = []
    for entry in packaged_root().iterdir():
        if entry.is_dir():
            names += [f"{entry.name}/{f.name[:-5]}" for f in entry.iterdir() if f.name.endswith(".yaml")]
        elif entry.name.endswith(".yaml"):
            names.append(entry.name[:-5])
    return sorted(names)


class StoredFile:
    """A config named by a URI (``s3://...``, ``gs://...``, ``file://...``), as a sweep on a bucket
    writes its ``best_config.yaml`` beside its runs; read through pyarrow's filesystems."""

    def __init__(self, uri: str) -> None:
        self.uri = self.name = uri

    def read_text(self, encoding: str = "utf-8") -> str:
        from centernet_ray import storage

        try:
            return storage.read_bytes(self.uri).decode(encoding)
        except OSError as exc:
            raise UserInputError(f"cannot read {self.uri}: {exc}") from exc


def find(name_or_path: str | Path, what: str = "config file") -> Path | Traversable | StoredFile:
    """The file ``name_or_path`` names: a URI, an existing path, else a shipped file (see module
    docstring)."""
    if "://" in str(name_or_path):
        return StoredFile(str(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = str(PurePosixPath(str(name_or_path)))
    for folder in LEGACY_FOLDERS:
        name = name.removeprefix(folder)
    name = name.removesuffix(".yaml")
    if name and ".." not in name:
        shipped = packaged_root().joinpath(*f"{name}.yaml".split("/"))
        if shipped.is_file():
            return shipped
    raise UserInputError(f"{what} not found: {name_or_path} is neither a file nor a shipped name "
                         f"({', '.join(packaged_names())})")


def read_yaml(name_or_path: str | Path, what: str = "config file") -> Any:
    """The parsed content of a YAML file or shipped name; missing or malformed is a :class:`UserInputError`."""
    return read_yaml_text(name_or_path, what)[1]


def read_yaml_text(name_or_path: str | Path, what: str = "config file") -> tuple[str, Any]:
    """(the text, its parsed content) of a YAML file or shipped name, read once; missing, not UTF-8
    or malformed (a key given twice included) is a :class:`UserInputError`."""
    try:
        text = find(name_or_path, what).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserInputError(f"{name_or_path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at position "
                             f"{exc.start}): save it as UTF-8") from None
    try:
        return text, yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise UserInputError(f"{name_or_path} is not valid YAML{yaml_error_in_words(exc)}") from None


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, refusing a key given twice in one mapping: the later one would
    win silently (a second ``loss:`` section dropping the first's settings). A key written out may
    replace one a merge (``<<: *anchor``) brings in."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # resolved by the base loader, after this check
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # a list or mapping as a key: refused by the base loader
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice (first on line {seen[key].start_mark.line + 1})",
                    key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def yaml_error_in_words(exc: yaml.YAMLError) -> str:
    """``exc`` in one line: where in the file, and what (PyYAML's own message spans several lines
    and names "<unicode string>")."""
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return f": {exc}"
    mark = exc.problem_mark
    what = "; ".join(part for part in (exc.context, exc.problem) if part)
    return f" at line {mark.line + 1}, column {mark.column + 1}: {what}"


def read_config(name_or_path: str | Path, _depth: int = 0) -> dict[str, Any]:
    """A config file's sections with its ``base:`` chain resolved (the file's own values win)."""
    if _depth > MAX_BASE_DEPTH:
        raise UserInputError(f"{name_or_path}: base: chain deeper than {MAX_BASE_DEPTH} (a cycle?)")
    data = read_yaml(name_or_path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserInputError(f"{name_or_path} must hold a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise UserInputError(f"{name_or_path}: base: must name a config (a shipped name or a path); got {base!r}")
    beside = Path(name_or_path).expanduser().parent / base
    return merge(read_config(beside if beside.is_file() else base, _depth + 1), data)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid over ``base``: sections merged key by key, everything else replaced."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged
