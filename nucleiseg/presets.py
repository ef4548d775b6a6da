"""Settings files that overlay ``params.yaml``: the presets under ``presets/`` and tuning's best settings.

A settings file is YAML with one ``params`` mapping of dotted settings to scalar values::

    params:
      data.dir: data
      train.beta: 0.0

:func:`apply_settings` copies them into a params file, editing only those lines, so that the file stays
the single, commented source of settings that DVC tracks; the result is validated before it replaces
the file. ``nucleiseg preset NAME`` and ``nucleiseg tune --apply`` use it.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from nucleiseg.io import atomic_path
from nucleiseg.params import ParamsError, load_params

PRESETS_DIR = Path("presets")  # beside params.yaml, in the project's root


def resolve_preset(name_or_path: str | os.PathLike[str]) -> Path:
    """A preset's file: a path as given when it exists, else ``presets/<name>.yaml``; the error lists them."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = PRESETS_DIR / f"{path.name}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")) if PRESETS_DIR.is_dir() else []
    raise ParamsError(f"{name_or_path}: no such preset (known: {', '.join(known) or f'none in {PRESETS_DIR}/'})")


def read_settings(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``params`` mapping of a settings file (dotted setting -> scalar value), checked."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: settings file not found")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({exc})") from exc
    values = doc.get("params") if isinstance(doc, dict) else None
    if not isinstance(values, dict) or not values:
        raise ParamsError(f"{path}: expected a `params` mapping of settings (section.key: value)")
    for key, value in values.items():
        if not isinstance(key, str) or "." not in key or isinstance(value, dict | list):
            raise ParamsError(f"{path}: `params.{key}` is not a `section.key: scalar` setting")
    return values


def apply_settings(
    settings_path: str | os.PathLike[str], params_path: str | os.PathLike[str]
) -> dict[str, tuple[Any, Any]]:
    """Copy the settings of ``settings_path`` into ``params_path``; returns ``{key: (old, new)}``.

    Only the lines of those settings change (comments, order and layout are kept); a setting missing from
    the file is added to its section. The result is validated before it replaces the file, atomically: an
    invalid result leaves the file as it was.
    """
    values = read_settings(settings_path)
    params_path = Path(params_path)
    if not params_path.is_file():
        raise ParamsError(f"{params_path}: params file not found")
    text = params_path.read_text()
    before = yaml.safe_load(text) or {}
    new_text = set_yaml_values(text, values)
    with atomic_path(params_path) as tmp:
        tmp.write_text(new_text)
        try:
            load_params(tmp)
        except ParamsError as exc:
            raise ParamsError(str(exc).replace(str(tmp), str(params_path))) from None
    return {key: (_lookup(before, key), value) for key, value in values.items()}


def _lookup(tree: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _yaml_scalar(value: Any) -> str:
    """A scalar as YAML writes it (floats keep a dot or exponent form that YAML 1.1 reads back as float)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).splitlines()[0]


def _round_trip_yaml() -> Any:
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 1 << 16
    rt.indent(mapping=2, sequence=4, offset=2)
    rt.representer.add_representer(type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    return rt


def set_yaml_values(text: str, values: Mapping[str, Any]) -> str:
    """Set dotted keys in a YAML document's text, editing only their lines where the keys exist.

    Existing scalar values are replaced in place (the comment after a value keeps its column where it
    fits); missing keys are inserted with a round-trip YAML dump, which keeps comments.
    """
    rt = _round_trip_yaml()
    tree = rt.load(text) or {}
    missing = {k: v for k, v in values.items() if not _has_key(tree, k)}
    if missing:
        for dotted, value in missing.items():
            node = tree
            *sections, key = dotted.split(".")
            for section in sections:
                if section not in node or node[section] is None:
                    node[section] = {}
                node = node[section]
            node[key] = value
        buffer = io.StringIO()
        rt.dump(tree, buffer)
        text = buffer.getvalue()
    for dotted, value in values.items():
        if dotted not in missing:
            text = _replace_scalar(text, rt, dotted, value)
    return text


def _has_key(tree: Any, dotted: str) -> bool:
    *sections, key = dotted.split(".")
    for section in sections:
        if not isinstance(tree, dict) or section not in tree:
            return False
        tree = tree[section]
    return isinstance(tree, dict) and key in tree


def _replace_scalar(text: str, rt: Any, dotted: str, value: Any) -> str:
    tree = rt.load(text)
    *sections, key = dotted.split(".")
    node = tree
    for section in sections:
        node = node[section]
    if isinstance(node[key], dict | list):
        raise ParamsError(f"{dotted}: is a section or a list in the params file, not a single value")
    line_no, col = node.lc.value(key)
    lines = text.splitlines(keepends=True)
    line = lines[line_no]
    ending = line[len(line.rstrip("\r\n")) :]
    body = line[: len(line) - len(ending)]
    match = re.compile(r"(\"(?:[^\"\\]|\\.)*\"|'(?:[^']|'')*'|[^\s#](?:[^#]*?))(\s+#.*|\s*)$").match(body, col)
    if match is None:  # e.g. an empty value ("key:") followed by a comment
        old, rest = "", body[col:]
    else:
        old, rest = match.group(1), match.group(2)
    new = _yaml_scalar(value)
    if rest.lstrip().startswith("#"):
        pad = max(1, len(rest) - len(rest.lstrip()) + len(old) - len(new))
        rest = " " * pad + rest.lstrip()
    lines[line_no] = body[:col] + new + rest + ending
    return "".join(lines)
