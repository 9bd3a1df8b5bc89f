"""Static scans of the dashboard's source (``ast``) for tests/app/test_dashboard_paths.py: the free-text fields of
every page, and every ``app.api`` call of the pages and their helpers with the arguments it passes."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

APP = Path(__file__).resolve().parents[1] / "app"
PAGES = sorted((APP / "views").glob("*.py"))
MODULES = PAGES + [APP / "state.py", APP / "sae_state.py", APP / "dashboard.py"]  # all code the pages run
FREE_TEXT = {"text_input", "text_area", "chat_input", "file_uploader", "data_editor"}
OPTION_WIDGETS = {"selectbox", "multiselect"}  # free text only with accept_new_options=True


@dataclass(frozen=True)
class Field:
    page: str
    label: str
    key: str | None


@dataclass(frozen=True)
class ApiCall:
    """One use of ``api.NAME``: called directly, or passed to a runner (``run_with_st_progress(label, api.f,
    *args)``); ``args`` / ``keywords`` are the arguments ``api.NAME`` receives; ``scope`` the enclosing function."""

    where: str
    name: str
    args: tuple[ast.expr, ...]
    keywords: dict[str, ast.expr]
    scope: ast.AST


def _text(node: ast.expr | None) -> str | None:
    if node is None:
        return None
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else ast.unparse(node)


def fields() -> Iterator[Field]:
    """Every widget of every page whose value is text the user types."""
    for path in PAGES:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            kw = {k.arg: k.value for k in node.keywords}
            widget = node.func.attr
            accepts_new = isinstance(kw.get("accept_new_options"), ast.Constant) and kw["accept_new_options"].value
            if widget in FREE_TEXT or (widget in OPTION_WIDGETS and accepts_new):
                label = node.args[0] if node.args else kw.get("label")
                yield Field(path.stem, _text(label) or "", _text(kw.get("key")))


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}


def _scope(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> ast.AST:
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return node
    return node


def api_uses() -> Iterator[ApiCall | tuple[str, str]]:
    """Every ``api.NAME`` reference: an ``ApiCall``, or (where, name) when it is used in a way the scan cannot
    follow (stored in a variable, passed by keyword, ...)."""
    for path in MODULES:
        tree = ast.parse(path.read_text())
        parents = _parents(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "api"):
                continue
            where = f"{path.name}:{node.lineno}"
            call = parents.get(node)
            kw = {k.arg: k.value for k in call.keywords} if isinstance(call, ast.Call) else {}
            if isinstance(call, ast.Call) and call.func is node:
                yield ApiCall(where, node.attr, tuple(call.args), kw, _scope(call, parents))
            elif isinstance(call, ast.Call) and node in call.args:
                rest = tuple(call.args[call.args.index(node) + 1:])
                yield ApiCall(where, node.attr, rest, kw, _scope(call, parents))
            else:
                yield where, node.attr


def _call_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Call):
        f = node.func
        return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
    return None


def assigned_values(scope: ast.AST, name: str) -> list[ast.AST | None]:
    """Everything ``name`` is bound to directly in ``scope`` (None for a binding the scan cannot read: a
    parameter, a loop target, tuple unpacking, ``with ... as``, an augmented assignment)."""
    out: list[ast.AST | None] = []
    if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        a = scope.args
        if name in [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs] + \
                [p.arg for p in (a.vararg, a.kwarg) if p is not None]:
            out.append(None)
    body = scope.body if isinstance(scope.body, list) else [scope.body]
    stack = list(body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue  # another scope
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name) and t.id == name:
                    out.append(node.value)
                elif any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(t)):
                    out.append(None)
        elif isinstance(node, (ast.AnnAssign, ast.NamedExpr)) and isinstance(node.target, ast.Name) \
                and node.target.id == name:
            out.append(node.value)
        elif isinstance(node, (ast.AugAssign, ast.For, ast.comprehension, ast.withitem)):
            target = node.optional_vars if isinstance(node, ast.withitem) else node.target
            if target is not None and any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(target)):
                out.append(None)
        stack.extend(ast.iter_child_nodes(node))
    return out


def checked(arg: ast.expr, scope: ast.AST, checks: set[str]) -> bool:
    """Whether ``arg`` is the value of an allow-list check: ``check_x(...)`` itself, or a name that every
    binding in its scope sets from such a call."""
    if _call_name(arg) in checks:
        return True
    if isinstance(arg, ast.Name):
        values = assigned_values(scope, arg.id)
        return bool(values) and all(v is not None and _call_name(v) in checks for v in values)
    return False


def references(names: set[str]) -> Iterator[tuple[str, str]]:
    """(where, name) of every use of one of ``names`` (as a name or an attribute) in the dashboard's modules."""
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else \
                node.name.rpartition(".")[2] if isinstance(node, ast.alias) else None
            if name in names:
                yield f"{path.name}:{getattr(node, 'lineno', '?')}", name
