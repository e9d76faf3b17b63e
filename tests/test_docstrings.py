"""Every public name of the API reference has a Google-style docstring: a one-line summary; an ``Args:``
section naming every parameter (self / cls / ``*args`` / ``**kwargs`` excepted); a ``Returns:`` (or
``Yields:``) section when it returns something; a ``Raises:`` section when its own body has a ``raise``
statement.

The names are those the API reference renders (tests/test_docs_site.py): each ``:::`` directive of
docs/api/*.md, a module directive standing for its ``__all__``, plus the public methods and properties that a
public class defines itself (except the hooks it implements for a base class from outside medquant, such as
``forward`` and ``extra_repr`` of ``torch.nn.Module``: the base class documents their contract). For a class,
the class docstring (or its ``__init__`` / ``__post_init__``'s) documents the constructor's parameters, under
``Args:`` (or ``Attributes:`` for dataclass fields), and what the constructor raises. Properties need only the
summary.

The rules are deliberately mechanical:

* returns something: the return annotation is present and is not ``None`` (``-> None``, ``-> NoReturn``);
  without an annotation, the body's own ``return`` statements (nested functions excluded) return a value;
* yields: the body's own statements contain ``yield`` (then ``Yields:`` or ``Returns:``);
* raises: the body's own statements contain ``raise X`` (a bare re-raise inside ``except`` does not count).

``UNDOCUMENTED`` lists the names that still lack sections, so that the test passes while that work is under
way; it may only shrink: a listed name that now passes fails the test until it is removed from the list.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
API = REPO / "docs" / "api"
DIRECTIVE = re.compile(r"^::: *([\w.]+)(?P<options>(?:\n[ \t]+.*)*)", re.MULTILINE)
MEMBERS = re.compile(r"members:\s*\[([^\]]*)\]")
SECTION = re.compile(
    r"^(?P<indent>[ \t]*)(?P<name>Args|Arguments|Parameters|Attributes|Returns|Yields|Raises):[ \t]*$")
ENTRY = re.compile(r"^[ \t]*\**(?P<name>\w+)[ \t]*(\([^)]*\))?[ \t]*:")
SKIP_PARAMS = {"self", "cls"}

# public paths (package.name, package.Class.method) that do not pass yet; it only shrinks (module docstring)
UNDOCUMENTED: set[str] = set()


# ----------------------------------------------------------------------------------------------- public names


def _resolve(dotted: str):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def _is_module(obj) -> bool:
    return inspect.ismodule(obj)


def _overrides_foreign(cls, name: str) -> bool:
    """Whether ``cls.name`` implements a hook of a base class from outside medquant (``nn.Module.forward``,
    ``extra_repr``, a transformers quantizer hook...): that base class documents the contract."""
    return any(name in vars(base) for base in cls.__mro__[1:] if not base.__module__.startswith("medquant"))


def documented_objects() -> dict[str, object]:
    """``"package.name" -> object`` for every callable the API reference renders (functions, classes and
    the public methods / properties those classes define themselves, as ``package.Class.method``), keyed by
    the public path the reference shows (stable when the code moves between private modules)."""
    found: dict[str, object] = {}
    seen: set[int] = set()

    def add(key: str, obj) -> None:
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)
                or (callable(obj) and hasattr(obj, "__wrapped__"))):
            return  # constants, type aliases, instances
        obj = inspect.unwrap(obj)
        if not (getattr(obj, "__module__", "") or "").startswith("medquant") or id(obj) in seen:
            return
        seen.add(id(obj))
        found[key] = obj
        if inspect.isclass(obj):
            for name, member in vars(obj).items():
                if name.startswith("_") or _overrides_foreign(obj, name):
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if isinstance(member, property) or inspect.isfunction(member):
                    found[f"{key}.{name}"] = member

    for page in sorted(API.glob("*.md")):
        for match in DIRECTIVE.finditer(page.read_text(encoding="utf-8")):
            target = _resolve(match.group(1))
            members = MEMBERS.search(match.group("options"))
            if "members: false" in match.group("options"):
                continue  # the root page lists names that are documented on their package's page
            if _is_module(target):
                names = ([m.strip().strip("'\"") for m in members.group(1).split(",")] if members
                         else getattr(target, "__all__", []))
                for name in names:
                    add(f"{match.group(1)}.{name}", getattr(target, name))
            else:
                add(match.group(1), target)
    return found


# ----------------------------------------------------------------------------------------------- the rules


def sections(doc: str) -> dict[str, list[str]]:
    """``section name -> entry names`` of a Google-style docstring (``Args`` / ``Arguments`` / ``Parameters``
    are one section, ``Args``; ``Yields`` counts as ``Returns``)."""
    lines = inspect.cleandoc(doc).splitlines()
    out: dict[str, list[str]] = {}
    i = 0
    while i < len(lines):
        m = SECTION.match(lines[i])
        if not m:
            i += 1
            continue
        name = m.group("name")
        name = {"Arguments": "Args", "Parameters": "Args", "Yields": "Returns"}.get(name, name)
        depth = len(m.group("indent"))
        i += 1
        body: list[str] = []
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > depth):
            body.append(lines[i])
            i += 1
        body_text = textwrap.dedent("\n".join(body))
        if body_text.strip():  # an empty section counts as absent
            out.setdefault(name, []).extend(e.group("name") for line in body_text.splitlines()
                                            if line[:1].strip() for e in [ENTRY.match(line)] if e)
    return out


def _own_nodes(func: ast.AST):
    """The statements of ``func``'s body, without descending into nested functions, lambdas or classes."""
    stack = list(ast.iter_child_nodes(func))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))


def _function_node(func) -> ast.AST | None:
    try:
        source = textwrap.dedent(inspect.getsource(func))
    except (OSError, TypeError):
        return None
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return node
    return None


def body_facts(func) -> dict[str, bool]:
    """Whether ``func``'s own body raises, yields, or returns a value (nested functions excluded)."""
    node = _function_node(func)
    if node is None:
        return {"raises": False, "yields": False, "returns": False}
    own = list(_own_nodes(node))
    return {
        "raises": any(isinstance(n, ast.Raise) and n.exc is not None for n in own),
        "yields": any(isinstance(n, (ast.Yield, ast.YieldFrom)) for n in own),
        "returns": any(isinstance(n, ast.Return) and n.value is not None
                       and not (isinstance(n.value, ast.Constant) and n.value.value is None) for n in own),
    }


def _parameters(func) -> list[str]:
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return []
    return [p.name for p in sig.parameters.values()
            if p.name not in SKIP_PARAMS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _returns_value(func) -> bool:
    if not _parameters_ok(func):
        return body_facts(func)["returns"]
    annotation = inspect.signature(func).return_annotation
    if annotation is inspect.Signature.empty:
        return body_facts(func)["returns"]
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", repr(annotation))
    return text not in ("None", "NoReturn", "Never", "NoneType")


def _parameters_ok(func) -> bool:
    try:
        inspect.signature(func)
        return True
    except (TypeError, ValueError):
        return False


def summary_problem(doc: str | None) -> str | None:
    if not doc or not doc.strip():
        return "no docstring"
    lines = inspect.cleandoc(doc).splitlines()
    if len(lines) > 1 and lines[1].strip() and not SECTION.match(lines[1]):
        return "the summary is not one line (line 2 must be blank)"
    return None


def problems_of_function(func, doc: str | None = None, is_init: bool = False) -> list[str]:
    doc = func.__doc__ if doc is None else doc
    problem = summary_problem(doc)
    if problem:
        return [problem]
    found = sections(doc)
    out = []
    params = _parameters(func)
    missing = [p for p in params if p not in found.get("Args", []) + found.get("Attributes", [])]
    if missing:
        out.append(f"Args: does not name {missing}")
    facts = body_facts(func)
    if not is_init and (facts["yields"] or _returns_value(func)) and "Returns" not in found:
        out.append("no Returns: / Yields: section")
    if facts["raises"] and "Raises" not in found:
        out.append("no Raises: section (the body raises)")
    return out


def problems_of_class(cls) -> list[str]:
    problem = summary_problem(cls.__doc__)
    if problem:
        return [problem]
    docs = [cls.__doc__]
    ctors = [vars(cls)[n] for n in ("__init__", "__post_init__") if inspect.isfunction(vars(cls).get(n))]
    docs += [c.__doc__ for c in ctors if c.__doc__]
    merged = "\n\n".join(inspect.cleandoc(d) for d in docs if d)
    found = sections(merged)
    out = []
    init = vars(cls).get("__init__")
    if inspect.isfunction(init) or dataclasses.is_dataclass(cls):
        params = _parameters(cls.__init__) if init is None or inspect.isfunction(init) else []
        if dataclasses.is_dataclass(cls):
            params = [f.name for f in dataclasses.fields(cls) if f.init]
        missing = [p for p in params if p not in found.get("Args", []) + found.get("Attributes", [])]
        if missing:
            out.append(f"Args: / Attributes: does not name the constructor's {missing}")
    if any(body_facts(c)["raises"] for c in ctors) and "Raises" not in found:
        out.append("no Raises: section (the constructor raises)")
    return out


def problems(obj) -> list[str]:
    if isinstance(obj, property):
        return [p for p in [summary_problem(obj.__doc__)] if p]
    if inspect.isclass(obj):
        return problems_of_class(obj)
    return problems_of_function(obj)


# ----------------------------------------------------------------------------------------------- the tests


def test_every_documented_name_has_summary_args_returns_raises():
    objects = documented_objects()
    assert len(objects) > 200, "the walk found too few public names: is the API reference complete?"
    failing = {key: problems(obj) for key, obj in objects.items()}
    failing = {key: p for key, p in failing.items() if p}
    new = {key: p for key, p in failing.items() if key not in UNDOCUMENTED}
    fixed = sorted(UNDOCUMENTED - set(failing))
    lines = [f"  {key}: {'; '.join(p)}" for key, p in sorted(new.items())]
    assert not new, "public names whose docstring lacks sections (Google style):\n" + "\n".join(lines)
    assert not fixed, f"now documented: remove from UNDOCUMENTED in tests/test_docstrings.py: {fixed}"


def test_the_rules_catch_what_is_missing():
    # controls: each rule fails a function that breaks it and passes the same function documented
    def scale(w, bits: int = 4) -> float:
        """Scale of a tensor.

        Args:
            w: the weight.
            bits (int): the bit-width, 2..8.

        Returns:
            The scale max|w| / (2^(bits-1) - 1).

        Raises:
            ValueError: bits outside 2..8.
        """
        if not 2 <= bits <= 8:
            raise ValueError(bits)
        return 1.0

    assert problems(scale) == []
    full = scale.__doc__
    scale.__doc__ = full.replace("            bits (int): the bit-width, 2..8.\n", "")
    assert problems(scale) == ["Args: does not name ['bits']"]
    returns = "        Returns:\n            The scale max|w| / (2^(bits-1) - 1).\n\n"
    assert returns in full
    scale.__doc__ = full.replace(returns, "")
    assert problems(scale) == ["no Returns: / Yields: section"]
    scale.__doc__ = full.split("        Raises:")[0]
    assert problems(scale) == ["no Raises: section (the body raises)"]
    scale.__doc__ = "Scale\nof a tensor.\n\n" + full.split("\n", 1)[1]
    assert problems(scale) == ["the summary is not one line (line 2 must be blank)"]
    scale.__doc__ = None
    assert problems(scale) == ["no docstring"]

    def helper(x) -> None:
        """Do nothing with x; the nested function's raise and return are not this function's.

        Args:
            x: anything.
        """
        def inner():
            if x is None:
                raise RuntimeError
            return 1

        inner()

    assert problems(helper) == []
    assert body_facts(helper) == {"raises": False, "yields": False, "returns": False}


def test_class_rules():
    @dataclasses.dataclass
    class Point:
        """A point.

        Attributes:
            x: abscissa.
        """
        x: float
        y: float = 0.0

        def __post_init__(self):
            if self.x < 0:
                raise ValueError("x < 0")

    assert problems(Point) == ["Args: / Attributes: does not name the constructor's ['y']",
                               "no Raises: section (the constructor raises)"]
