"""MkDocs hook: the spec reference page, generated from the pydantic models at build time.

Every field of `emsweep.spec.SweepSpec` and the models under it: its type, its default, and the
comment written above it in `src/emsweep/spec.py`. The page is built from the code that
validates specs, so it cannot drift from it.
"""

from __future__ import annotations

import inspect
import re
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

PLACEHOLDER = "<!-- spec-reference -->"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if PLACEHOLDER in markdown:
        from emsweep.spec import SweepSpec

        markdown = markdown.replace(PLACEHOLDER, reference(SweepSpec))
    return markdown


def reference(root: type[BaseModel]) -> str:
    """One section per model class, reachable from `root`, in the order a spec reads."""
    sections, seen, queue = [], set(), [root]
    while queue:
        model = queue.pop(0)
        if model in seen:
            continue
        seen.add(model)
        comments = field_comments(model)
        rows = []
        for name, field in model.model_fields.items():
            queue.extend(nested_models(field.annotation))
            text = comments.get(name) or (field.description or "")
            rows.append(f"| `{name}` | {_cell(type_name(field.annotation))} | {_cell(default(field))} | {_cell(text)} |")
        doc = inspect.cleandoc(model.__doc__ or "") if model.__doc__ != BaseModel.__doc__ else ""
        sections.append("\n".join([f"## `{model.__name__}`", "", doc, "",
                                   "| field | type | default | what it is |", "| --- | --- | --- | --- |", *rows]))
    return "\n\n".join(sections) + "\n"


def field_comments(model: type[BaseModel]) -> dict[str, str]:
    """The `#` comment lines right above each field in the class body."""
    comments, pending = {}, []
    for line in inspect.getsource(model).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"(\w+)\s*:[^#]*(?:#\s*(.*))?$", stripped)
        if match and match.group(1) in model.model_fields and (pending or match.group(2)):
            comments[match.group(1)] = " ".join([*pending, *([match.group(2)] if match.group(2) else [])])
        pending = []
    return comments


def nested_models(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in nested_models(arg)]


def type_name(annotation) -> str:
    if typing.get_origin(annotation) is typing.Annotated:  # constraints and discriminators live in the validators
        return type_name(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType")):
        return " | ".join(type_name(arg) for arg in typing.get_args(annotation))
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        return f"tuple[{type_name(args[0])}, ...]" if len(args) == 2 and args[1] is Ellipsis else str(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(repr(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    return annotation.__name__ if isinstance(annotation, type) else re.sub(r"typing\.", "", str(annotation))


def default(field) -> str:
    if field.default_factory is not None:
        return "(see its section)"
    if field.default is PydanticUndefined:
        return "required"
    if isinstance(field.default, BaseModel):
        return "(see its section)"
    return f"`{field.default!r}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
