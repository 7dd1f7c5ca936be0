"""Griffe extension for the API reference (mkdocs.yml loads it with mkdocstrings' python handler).

medfast's docstrings are numpy style with Sphinx cross-reference roles (:func:`warp`, :class:`~medfast.data.
NiftiDataset`, ...) and Sphinx ``#:`` comments that document module constants. mkdocstrings renders neither:
the roles came out as literal ":func:" text and the constants as undocumented (hidden) attributes. This
extension, run once the package is loaded:

- turns each role into an optional autorefs link to the object it names, resolved as Sphinx does: against the
  object's class, module and parent packages, then ``medfast``'s public names. An optional link to an object
  no page renders (a private helper, ``ValueError``) stays plain code text: no broken link, no strict warning.
- gives an attribute without a docstring the text of the ``#:`` comment lines right above it.
"""

from __future__ import annotations

import html
import re
from typing import Any

from griffe import Alias, AliasResolutionError, Docstring, Extension, Module, Object

_ROLE = re.compile(r":(?:py:)?(?P<role>func|meth|class|mod|attr|data|exc|obj|const):`(?P<target>[^`]+)`")
_CALLABLE_ROLES = {"func", "meth", "class", "exc", "attr", "data", "obj", "const"}


def _lookup(collection: Any, path: str) -> Object | Alias | None:
    try:
        return collection[path]
    except (KeyError, ValueError, AliasResolutionError):
        return None


def _resolve(obj: Object | Alias, role: str, name: str) -> str | None:
    """The canonical path of the object ``name`` refers to from ``obj``'s docstring, or None."""
    collection = obj.modules_collection
    scopes: list[str] = []
    scope: Object | Alias | None = obj
    while scope is not None:
        scopes.append(scope.path)
        scope = scope.parent
    candidates = [name] if name.startswith("medfast.") else [f"{s}.{name}" for s in scopes] + [f"medfast.{name}"]
    for path in candidates:
        found = _lookup(collection, path)
        if found is None:
            continue
        try:
            # a function named as its module (medfast.ultrasound.simulate.simulate): griffe finds the submodule
            if role in _CALLABLE_ROLES and found.is_module and name.split(".")[-1] in found.members:
                found = found.members[name.split(".")[-1]]
            return found.canonical_path
        except AliasResolutionError:
            return None
    return None


def _replace_roles(obj: Object | Alias, text: str) -> str:
    def link(match: re.Match) -> str:
        target = match["target"].strip()
        short = target.startswith("~")
        name = target.lstrip("~!.").removesuffix("()")
        title = name.rsplit(".", 1)[-1] if short else name
        path = _resolve(obj, match["role"], name)
        code = f"<code>{html.escape(title)}</code>"
        if path is None:
            return code
        # optional: autorefs renders plain code text (no warning under --strict) when no page renders `path`
        return f'<autoref identifier="{html.escape(path)}" optional>{code}</autoref>'

    return _ROLE.sub(link, text)


def _comment_doc(obj: Object) -> str | None:
    """The ``#:`` comment lines right above an attribute's assignment, as its docstring text."""
    if obj.lineno is None or obj.filepath is None or isinstance(obj.filepath, list):
        return None
    try:
        lines = obj.lines_collection[obj.filepath]
    except KeyError:
        return None
    doc: list[str] = []
    index = obj.lineno - 2
    while index >= 0 and lines[index].strip().startswith("#:"):
        doc.insert(0, lines[index].strip()[2:].strip())
        index -= 1
    return " ".join(doc) or None


class SphinxCrossrefs(Extension):
    """Links Sphinx roles and reads ``#:`` attribute comments (see the module docstring)."""

    def on_package(self, *, pkg: Module, **kwargs: Any) -> None:
        seen: set[int] = set()
        stack: list[Object] = [pkg]
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.is_attribute and obj.docstring is None:
                text = _comment_doc(obj)
                if text:
                    obj.docstring = Docstring(text, lineno=obj.lineno, parent=obj)
            if obj.docstring is not None and _ROLE.search(obj.docstring.value):
                obj.docstring.value = _replace_roles(obj, obj.docstring.value)
            stack.extend(member for member in obj.members.values() if not member.is_alias)
