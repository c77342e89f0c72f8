"""docs/configuration.md, generated from the config dataclasses: every key, its type, its default
and what it does (the field's comment in ``metakd_ray/config.py``).

    .venv/bin/python -m metakd_ray.config_reference        # rewrite docs/configuration.md

``tests/test_inputs.py`` fails when the committed file differs from what this prints.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path

from metakd_ray import config
from metakd_ray.io import atomic_write_text

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def field_comments(cls) -> dict[str, str]:
    """{field: its comment}: the comment on the field's line, after the comment lines above it."""
    comments, above = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        found = re.match(r"(\w+): [^=]+=[^#]*(?:#\s*(.*))?$", stripped)
        if found:
            comments[found.group(1)] = " ".join(above + ([found.group(2)] if found.group(2) else [])).strip()
        above = []
    return comments


def _type(tp) -> str:
    if typing.get_origin(tp) is list:
        return f"list of {_type(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is typing.Union:
        return " or ".join(_type(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _default(field) -> str:
    value = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    return f"`{value!r}`" if not isinstance(value, str) else (f"`{value}`" if value else '`""`')


def reference() -> str:
    lines = ["# Configuration", "",
             "Every key of a metakd-ray config, generated from `metakd_ray/config.py` by "
             "`python -m metakd_ray.config_reference`. A config is a preset (`metakd-ray presets`) or a YAML "
             "file; `key=value` overrides on the command line use the dotted names below, e.g. "
             "`distill.temperature=2`. `metakd-ray validate CONFIG` prints the resolved config.", ""]
    hints = typing.get_type_hints(config.Config)
    top = [f for f in dataclasses.fields(config.Config) if not dataclasses.is_dataclass(hints[f.name])]
    sections = [f for f in dataclasses.fields(config.Config) if dataclasses.is_dataclass(hints[f.name])]
    for title, cls, fields, prefix in [("Top level", config.Config, top, "")] + [
            (f"`{f.name}`", hints[f.name], dataclasses.fields(hints[f.name]), f"{f.name}.") for f in sections]:
        comments = field_comments(cls)
        types = typing.get_type_hints(cls)
        lines += [f"## {title}", ""]
        if cls is not config.Config and not cls.__doc__.startswith(cls.__name__ + "("):  # not the generated one
            lines += [" ".join(inspect.getdoc(cls).split()), ""]
        lines += ["| key | type | default | what it does |", "|---|---|---|---|"]
        for f in fields:
            what = comments.get(f.name, "").replace("|", "\\|")
            lines.append(f"| `{prefix}{f.name}` | {_type(types[f.name])} | {_default(f)} | {what} |")
        lines.append("")
    return "\n".join(lines)


def undocumented() -> list[str]:
    """Keys whose field has no comment."""
    hints = typing.get_type_hints(config.Config)
    missing = [f.name for f in dataclasses.fields(config.Config)
               if not dataclasses.is_dataclass(hints[f.name]) and not field_comments(config.Config).get(f.name)]
    for f in dataclasses.fields(config.Config):
        if dataclasses.is_dataclass(hints[f.name]):
            comments = field_comments(hints[f.name])
            missing += [f"{f.name}.{g.name}" for g in dataclasses.fields(hints[f.name]) if not comments.get(g.name)]
    return missing


if __name__ == "__main__":
    DOC.parent.mkdir(exist_ok=True)
    atomic_write_text(DOC, reference())
    print(f"wrote {DOC}")
