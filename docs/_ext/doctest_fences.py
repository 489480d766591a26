"""A griffe extension for the API reference: growops' docstrings in Markdown as mkdocstrings renders them.

The docstrings are written for `help()` and the source: doctest examples (``>>> depth_map(3, 8)``) at the start of
a line, reStructuredText's ``::`` before an indented literal block, and arguments or fields described one per line
(``stages: unique blocks per stage, ...``). Markdown reads the first as nested block quotes, prints the second as is
and runs the third into one paragraph. This extension fences each run of doctest lines as a ``pycon`` code block,
turns a paragraph's closing ``::`` into ``:`` (the indented block after it is a code block in Markdown too), and
makes a line that starts with one of the object's parameter or member names a list item. It changes only what the
site shows; the docstrings stay as they are.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ITEM = re.compile(r"^(\w+): \S")


def to_markdown(text: str, names: frozenset[str] = frozenset()) -> str:
    """`text` with every unindented run of ``>>>`` lines (and the output lines after them, up to a blank line)
    fenced as ``pycon``, a line's trailing ``::`` made ``:``, and each unindented ``name: ...`` line with a name in
    `names` made a list item (its indented continuation lines stay in the item)."""
    out, in_doctest, in_list = [], False, False
    for line in text.splitlines():
        if not in_doctest and line.startswith(">>>"):
            out.append("```pycon")
            in_doctest = True
        elif in_doctest and not line.strip():
            out.append("```")
            in_doctest = False
        if in_doctest:
            out.append(line)
            continue
        if line.endswith("::") and not line.endswith(":::"):
            line = line[:-1]
        item = ITEM.match(line)
        if item and item.group(1) in names:
            if not in_list and out and out[-1].strip():
                out.append("")  # a list needs a blank line after a paragraph
            line, in_list = f"- `{item.group(1)}`:{line[len(item.group(1)) + 1:]}", True
        elif in_list and line.strip() and not line.startswith(" "):
            out.append("")  # the list ended
            in_list = False
        elif not line.strip():
            in_list = False
        out.append(line)
    if in_doctest:
        out.append("```")
    return "\n".join(out)


def _names(obj: griffe.Object) -> frozenset[str]:
    """The names an argument list in `obj`'s docstring may describe: a function's parameters, a class's members and
    its constructor's parameters."""
    if obj.is_function:
        return frozenset(p.name for p in obj.parameters)
    if obj.is_class:
        init = obj.members.get("__init__")
        params = {p.name for p in init.parameters} if init is not None and init.is_function else set()
        return frozenset(params | set(obj.members))
    return frozenset()


class DoctestFences(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and not obj.is_alias:
            obj.docstring.value = to_markdown(obj.docstring.value, _names(obj))
