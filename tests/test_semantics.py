"""REPL semantics across steps: every step below runs in its own process."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import pytest
from steps import run_all

from jobrunner import Session


@pytest.fixture
def session(new_session: Callable[..., Session]) -> Session:
    return new_session("repl")


def test_functions_see_current_globals(session: Session) -> None:
    value = run_all(
        session,
        "import math; r = 2",
        "def area(): return math.pi * r ** 2",
        "r = 3; area()",
    )
    assert value == "28.274333882308138"


def test_lambdas_closures_and_decorators(session: Session) -> None:
    value = run_all(
        session,
        "double = lambda x: x * 2",
        "def counter():\n    n = 0\n    def bump():\n        nonlocal n\n"
        "        n += 1\n        return n\n    return bump\nbump = counter()",
        "bump(); bump()",
        "import functools\ndef logged(f):\n    @functools.wraps(f)\n"
        "    def wrapper(*a):\n        return ('logged', f(*a))\n    return wrapper\n"
        "@logged\ndef square(x): return x * x",
        "bump(), double(21), square(4), square.__name__",
    )
    assert value == "(3, 42, ('logged', 16), 'square')"


def test_classes_and_instances_keep_identity(session: Session) -> None:
    value = run_all(
        session,
        "class Point:\n    def __init__(self, x): self.x = x\n"
        "    def moved(self): return Point(self.x + 1)",
        "p = Point(1)",
        "q = p.moved()",
        "isinstance(p, Point), isinstance(q, Point), type(p) is Point, q.x",
    )
    assert value == "(True, True, True, 2)"


def test_dataclasses_and_enums(session: Session) -> None:
    value = run_all(
        session,
        "from dataclasses import dataclass\nimport enum\n"
        "class Color(enum.Enum):\n    RED = 1\n    BLUE = 2\n"
        "@dataclass\nclass Paint:\n    color: Color\n    litres: float",
        "can = Paint(Color.RED, 2.5)",
        "can.color is Color.RED, isinstance(can, Paint), can",
    )
    assert value == "(True, True, Paint(color=<Color.RED: 1>, litres=2.5))"


def test_aliasing_is_kept(session: Session) -> None:
    value = run_all(
        session,
        "a = []\nb = a\nnested = [a, {'inner': a}]",
        "b.append(1)",
        "nested[1]['inner'].append(2)",
        "a, a is b, nested[0] is a",
    )
    assert value == "([1, 2], True, True)"


def test_instances_shared_between_containers(session: Session) -> None:
    value = run_all(
        session,
        "class Box:\n    def __init__(self): self.items = []",
        "box = Box()\nby_name = {'box': box}\nall_boxes = [box]",
        "all_boxes[0].items.append('x')",
        "box.items, by_name['box'] is box",
    )
    assert value == "(['x'], True)"


def test_global_statement_and_mutation_through_function(session: Session) -> None:
    value = run_all(
        session,
        "total = 0\nseen = []\ndef add(n):\n    global total\n    total += n\n"
        "    seen.append(n)",
        "add(5)",
        "add(7)",
        "total, seen",
    )
    assert value == "(12, [5, 7])"


def test_del_removes_a_name(session: Session) -> None:
    run_all(session, "x = 1\ny = 2", "del x")
    result = session.run("x")
    assert result.status == "error"
    assert result.error is not None and result.error.type == "NameError"
    assert run_all(session, "y") == "2"


def test_modules_come_back(session: Session) -> None:
    value = run_all(
        session,
        "import os.path\nimport collections as col\nfrom json import *",
        "col.Counter('aab')['a'], os.path.join('a', 'b'), dumps([1])",
    )
    assert value == "(2, 'a/b', '[1]')"


@pytest.mark.skipif(
    importlib.util.find_spec("numpy") is None, reason="numpy is not installed"
)
def test_numpy_arrays_and_modules(session: Session) -> None:
    value = run_all(
        session,
        "import numpy as np\narr = np.arange(6).reshape(2, 3)\nview = {'a': arr}",
        "arr[0, 0] = 100",
        "int(np.sum(arr)), view['a'] is arr",
    )
    assert value == "(115, True)"


def test_from_import_star_names_come_back(session: Session) -> None:
    assert run_all(session, "from math import *", "floor(pi), sqrt(16)") == "(3, 4.0)"


def test_a_class_and_a_registry_referring_to_each_other(session: Session) -> None:
    value = run_all(
        session,
        "class Node:\n    registry = []\n"
        "    def __init__(self):\n        Node.registry.append(self)",
        "first = Node()",
        "second = Node()",
        "Node.registry[0] is first, len(Node.registry), type(second) is Node",
    )
    assert value == "(True, 2, True)"


def test_instances_keep_their_class_when_its_name_goes(session: Session) -> None:
    value = run_all(
        session,
        "class Thing:\n    kind = 'old'",
        "thing = Thing()",
        "untouched = 1",
        "del Thing",
        "class Thing:\n    kind = 'new'",
        "thing.kind, Thing.kind, isinstance(thing, Thing)",
    )
    assert value == "('old', 'new', False)"


def test_dynamic_namespace_access_sees_every_name(session: Session) -> None:
    value = run_all(
        session,
        "alpha = 1\nbeta = 2",
        "sorted(k for k in globals() if not k.startswith('__'))",
    )
    assert value == "['alpha', 'beta']"
    assert run_all(session, "eval('alpha + beta')") == "3"


def test_unchanged_variables_are_not_loaded(session: Session) -> None:
    run_all(
        session,
        "class Heavy:\n    def __setstate__(self, state): 1/0",
        "h = Heavy()\nh.data = 1",
    )
    # Loading h would fail; a step that does not name it never loads it.
    assert run_all(session, "z = 3", "z + 1") == "4"
    result = session.run("h")
    assert result.status == "error"
    assert result.error is not None and "ZeroDivisionError" in result.error.message
