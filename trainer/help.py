"""`python launch/train.py --help [SECTION]`: every key of the config schema (trainer/config.py) with its type, default
and the comment written beside it there, so the schema's comments are the one place a key is documented."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import re
import typing
from enum import StrEnum

from trainer.config import Config, ConfigError, list_recipes


def _comments(cls) -> dict[str, str]:
    """{field or member name: the comment written beside it (and on the comment lines right below)}."""
    out, last = {}, None
    for line in inspect.getsource(cls).splitlines()[1:]:
        m = re.match(r"^    (\w+)\s*(?::[^=#]*)?=[^#]*?(?:#\s?(.*))?$", line)
        if m and not line.lstrip().startswith("#"):
            last = m.group(1)
            out[last] = (m.group(2) or "").strip()
        elif last and re.match(r"^\s*#\s{2,}", line):  # a continuation, indented under the comment above
            out[last] = (out[last] + " " + line.strip().lstrip("#").strip()).strip()
        else:
            last = None
    return out


def help_text(section: str | None = None) -> str:
    """Every key of the schema (or of one section) with its type, default and comment."""
    top = {f.name: f for f in dataclasses.fields(Config)}
    nested = [n for n, f in top.items() if f.default_factory is not dataclasses.MISSING]
    if section is not None and section not in top:
        close = difflib.get_close_matches(section, list(top), n=1)
        raise ConfigError(
            f"--help {section}: no such section{f'; did you mean {close[0]}?' if close else ''} "
            f"Sections: {', '.join(nested)}"
        )
    lines: list[str] = []

    def walk(cls, prefix: str, default_obj) -> None:
        hints = typing.get_type_hints(cls)
        comments = _comments(cls)
        for f in dataclasses.fields(cls):
            value = getattr(default_obj, f.name)
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.", value)
                continue
            choices = []
            if isinstance(tp, type) and issubclass(tp, StrEnum):
                member_notes = _comments(tp)
                choices = [f"      {m.value:<10} {member_notes.get(m.name, '')}".rstrip() for m in tp]
                type_name = " | ".join(m.value for m in tp)
            else:
                type_name = str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")
            shown = json.dumps(value.value if isinstance(value, StrEnum) else value)
            lines.append(f"  {prefix}{f.name}  ({type_name}, default {shown})")
            if comments.get(f.name):
                lines.append(f"      {comments[f.name]}")
            lines.extend(choices)

    default = Config()
    for name in [section] if section else list(top):
        if name in nested:
            lines.append(f"{name}:")
            walk(typing.get_type_hints(Config)[name], f"{name}.", getattr(default, name))
        else:
            tp = typing.get_type_hints(Config)[name]
            lines.append(f"  {name}  ({getattr(tp, '__name__', tp)}, default {json.dumps(getattr(default, name))})")
            if _comments(Config).get(name):
                lines.append(f"      {_comments(Config)[name]}")
    head = [usage(), "", "Keys (set any with key=value; `--help SECTION` shows one section):", ""]
    return "\n".join((head if section is None else []) + lines)


def usage() -> str:
    return (
        f"usage: python launch/train.py recipe=NAME [key=value ...]     (or under torchrun)\n"
        f"       python launch/train.py --help [SECTION]\n"
        f"recipes: {', '.join(list_recipes())}\n"
        f"example: python launch/train.py recipe=llama_debug training.steps=50 optim.lr=1e-3"
    )
