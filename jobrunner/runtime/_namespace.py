"""Turning a session's namespace into blobs, and blobs back into a namespace.

Three rules keep a namespace whole across processes:

- Variables that share objects are pickled together, in one blob, so that aliasing
  survives (``b = a``, or one list inside two others).
- A reference from one variable to another top-level object (a class, a function,
  an instance, the namespace itself as a function's globals) is written as a
  reference by name and resolved against the namespace being rebuilt, so that
  ``isinstance`` still holds and functions see the current globals.
- The standard library's C pickler does what it can; dill, whose pickler is pure
  Python and many times slower, is imported only for what the C pickler cannot do
  (functions, classes and lambdas defined in the session).

Loading is lazy: a step loads the variables its code names, plus what those
variables refer to or read, and all of them when the code reaches the namespace
dynamically (``globals()``, ``eval``...). A variable that is not loaded cannot be
changed, so the commit carries its entry over without pickling or hashing it.
"""

from __future__ import annotations

import abc
import enum
import gc
import importlib
import io
import itertools
import pickle
import sys
import types
import warnings
from collections.abc import Callable, Iterable
from types import CodeType, FunctionType, ModuleType
from typing import Any

from jobrunner.store import BlobParts, blob_digest, split_blob

__all__ = ["Loader", "Saved", "code_names", "save_namespace"]

PROTOCOL = 5
# Buffers at least this large (numpy arrays, bytearrays...) are written out of
# band: after the pickle stream, straight from the object's memory.
OUT_OF_BAND = 64 * 1024
# Names the runtime puts in every namespace; they are never saved.
RESERVED = frozenset(
    {"__builtins__", "__name__", "__doc__", "__spec__", "__loader__", "__package__"}
)
# Names through which code can reach every global without naming it.
DYNAMIC = frozenset(
    {"globals", "locals", "vars", "dir", "eval", "exec", "compile", "__import__"}
    | {"__dict__", "f_globals", "modules", "__main__"}
)
# Values of these types are copied, never shared or referred to by name.
_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), tuple, frozenset)
# Untracked values whose sharing cannot matter: immutable. (The collector
# untracks a tuple only when nothing in it can hold a reference, so a tuple
# here holds atoms, or a bytearray at worst.)
_UNSHAREABLE = frozenset(
    {int, float, complex, str, bytes, bool, type(None), tuple, frozenset}
)
# Walking stops at these: they are pickled by reference, never by content.
_OPAQUE = (type, FunctionType, ModuleType)


def _lookup(name: str) -> Any:
    """Stands in a pickle for a reference by name; the loader replaces it."""
    raise RuntimeError(f"{name!r} can only be resolved by jobrunner's loader")


def code_names(code: CodeType) -> set[str]:
    """Return every global name a code object and the code inside it can touch."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, CodeType):
            names |= code_names(constant)
    return names


def _refused_types() -> tuple[type, ...]:
    # dill can pickle these, but what comes back is wrong: a file opened for
    # writing is reopened and truncated, a lock or a socket is a new, unrelated
    # one. They are left out of the checkpoint instead.
    import _thread
    import socket
    import types

    return (
        io.IOBase,
        socket.socket,
        _thread.LockType,
        type(_thread.RLock()),
        types.GeneratorType,
        types.CoroutineType,
        types.AsyncGeneratorType,
        types.FrameType,
        types.TracebackType,
    )


class _Pickling:
    """What one blob's pickling needs and learns."""

    def __init__(
        self, namespace: dict[str, Any], by_name: dict[int, str], group: set[str]
    ) -> None:
        self.namespace = namespace
        self.by_name = by_name
        self.group = group
        self.refs: set[str] = set()
        self.reads: set[str] = set()

    def reference(self, obj: Any) -> str | None:
        name = self.by_name.get(id(obj))
        if name is None or name in self.group:
            return None
        self.refs.add(name)
        return name


class _FastPickler(pickle.Pickler):
    """The C pickler; writes top-level objects and modules by name."""

    def __init__(
        self, file: io.BytesIO, pickling: _Pickling, buffers: _Buffers
    ) -> None:
        super().__init__(file, protocol=PROTOCOL, buffer_callback=buffers.take)
        self.pickling = pickling

    def reducer_override(self, obj: Any) -> Any:
        name = self.pickling.reference(obj)
        if name is not None:
            return _lookup, (name,)
        if isinstance(obj, ModuleType):
            return importlib.import_module, (obj.__name__,)
        if isinstance(obj, FunctionType) and obj.__globals__ is self.pickling.namespace:
            # A function of the session that no name holds: only dill can.
            raise pickle.PicklingError("a function defined in the session")
        return NotImplemented


class _Buffers:
    """Collects the large buffers a pickler hands over, to write them out of band."""

    def __init__(self) -> None:
        self.views: list[memoryview] = []

    def take(self, buffer: pickle.PickleBuffer) -> bool:
        """Keep a large contiguous buffer out of band; say True to keep it inline."""
        try:
            view = buffer.raw()
        except BufferError:  # not contiguous: pickled in the stream instead
            return True
        if view.nbytes < OUT_OF_BAND:
            return True
        self.views.append(view)
        return False


def _dill_pickler(file: io.BytesIO, pickling: _Pickling, buffers: _Buffers) -> Any:
    import dill

    refused = _refused_types()
    namespace = pickling.namespace
    module = sys.modules["__main__"]

    class SessionPickler(dill.Pickler):  # type: ignore[misc]
        def persistent_id(self, obj: Any) -> Any:
            if obj is namespace:
                return ("namespace",)
            if obj is module:
                return ("module",)
            name = pickling.reference(obj)
            if name is not None:
                return ("name", name)
            if isinstance(obj, refused):
                raise pickle.PicklingError(f"{type(obj).__name__} objects are not kept")
            if isinstance(obj, FunctionType) and obj.__globals__ is namespace:
                pickling.reads |= code_names(obj.__code__)
            return None

        def reducer_override(self, obj: Any) -> Any:
            if not isinstance(obj, type) or obj.__module__ != module.__name__:
                return NotImplemented
            if isinstance(obj, enum.EnumMeta):
                return _reduce_enum(obj)
            return _reduce_class(obj)

    return SessionPickler(
        file,
        protocol=PROTOCOL,
        byref=False,
        recurse=False,
        buffer_callback=buffers.take,
    )


# What an enum class's dict holds that its metaclass rebuilds from the members.
_ENUM_MACHINERY = frozenset(
    {"_member_names_", "_member_map_", "_member_type_", "_value2member_map_"}
    | {"_unhashable_values_", "_new_member_", "_use_args_", "_value_repr_"}
    | {"_singles_mask_", "_boundary_", "_flag_mask_", "_all_bits_", "_inverted_"}
    | {"__new__", "__dict__", "__weakref__", "__module__", "__qualname__"}
)


# What a class's dict holds that ``type`` makes itself when the class is made.
_CLASS_MACHINERY = frozenset(
    {"__dict__", "__weakref__", "__module__", "__qualname__", "_abc_impl"}
)


def _reduce_class(cls: type) -> tuple[Any, ...]:
    # The class is made empty first and its body set afterwards, as state:
    # pickle memoizes the class in between, so a body that refers back to the
    # class (an instance of it held in a class attribute) finds it.
    declared = vars(cls).get("__slots__", ())
    slots = (declared,) if isinstance(declared, str) else tuple(declared)
    made: dict[str, Any] = {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
    }
    if "__slots__" in vars(cls):
        made["__slots__"] = slots
    body = {
        key: value
        for key, value in vars(cls).items()
        if key not in _CLASS_MACHINERY and key not in slots and key != "__slots__"
    }
    arguments = (type(cls), cls.__name__, cls.__bases__, made)
    return _make_class, arguments, body, None, None, _set_class_body


def _make_class(
    metaclass: type, name: str, bases: tuple[type, ...], made: dict[str, Any]
) -> type:
    return types.new_class(
        name, bases, {"metaclass": metaclass}, lambda ns: ns.update(made)
    )


def _set_class_body(cls: type, body: dict[str, Any]) -> type:
    for key, value in body.items():
        setattr(cls, key, value)
    if isinstance(cls, abc.ABCMeta):
        abc.update_abstractmethods(cls)  # type: ignore[arg-type]
    return cls


def _reduce_enum(cls: enum.EnumMeta) -> tuple[Any, tuple[Any, ...]]:
    # dill cannot pickle an enum class by value (its members refer back to the
    # class), so the class is rebuilt through its metaclass from its members
    # and the rest of its body, as the class statement built it.
    by_name: dict[str, Any] = dict(cls.__members__)
    members = [(name, member._value_) for name, member in by_name.items()]
    body = {
        key: value
        for key, value in vars(cls).items()
        if key not in _ENUM_MACHINERY and key not in cls.__members__
    }
    names = (cls.__name__, cls.__qualname__, cls.__module__)
    return _rebuild_enum, (type(cls), names, cls.__bases__, members, body)


def _rebuild_enum(
    metaclass: type,
    names: tuple[str, str, str],
    bases: tuple[type, ...],
    members: list[tuple[str, Any]],
    body: dict[str, Any],
) -> Any:
    name, qualname, module = names
    namespace = metaclass.__prepare__(name, bases)
    for key, value in members:
        namespace[key] = value
    for key, value in body.items():
        if key != "_generate_next_value_":
            namespace[key] = value
    namespace["__qualname__"] = qualname
    namespace["__module__"] = module
    return metaclass(name, bases, namespace)


def _needs_dill(value: Any, namespace: dict[str, Any]) -> bool:
    if isinstance(value, FunctionType):
        return value.__globals__ is namespace
    return isinstance(value, type) and value.__module__ == namespace["__name__"]


def _pickle(values: dict[str, Any], pickling: _Pickling, use_dill: bool) -> BlobParts:
    file = io.BytesIO()
    buffers = _Buffers()
    if use_dill:
        pickler = _dill_pickler(file, pickling, buffers)
    else:
        pickler = _FastPickler(file, pickling, buffers)
    with warnings.catch_warnings():
        # dill warns when it falls back to a reference; what it cannot do is
        # reported as a dropped name, and its warnings would only reach the
        # user's stderr.
        warnings.simplefilter("ignore")
        pickler.dump(values)
    # getbuffer() shares the stream's memory instead of copying it out.
    return BlobParts(file.getbuffer(), buffers.views)


class _Blob:
    """One pickled group of variables: its parts, written without joining them."""

    def __init__(
        self, names: set[str], data: BlobParts, pickler: str, pickling: _Pickling
    ):
        self.names = names
        self.data = data
        self.pickler = pickler
        self.digest = blob_digest(data)
        self.refs = pickling.refs
        self.needs = pickling.refs | pickling.reads


def _pickle_group(
    names: set[str], namespace: dict[str, Any], by_name: dict[int, str]
) -> _Blob:
    values = {name: namespace[name] for name in sorted(names)}
    if not any(_needs_dill(value, namespace) for value in values.values()):
        pickling = _Pickling(namespace, by_name, names)
        try:
            return _Blob(names, _pickle(values, pickling, False), "pickle", pickling)
        except Exception:  # noqa: BLE001 - whatever the C pickler refuses, dill tries
            pass
    pickling = _Pickling(namespace, by_name, names)
    return _Blob(names, _pickle(values, pickling, True), "dill", pickling)


def _reachable(root: Any, stop: set[int]) -> set[int]:
    """Return the ids of the objects reachable from ``root`` that may be shared.

    Most of a large container is atomic values, which are skipped in C: the
    garbage collector does not track them. It does not track a dict that holds
    only atomic values either, nor a bytearray, which may be shared all the
    same: those are picked out when a level has any, with one more pass in C
    over its referents.
    """
    seen = {id(root)}
    frontier = [root]
    while frontier:
        referents = gc.get_referents(*frontier)
        found = list(filter(gc.is_tracked, referents))
        untracked = set(map(type, itertools.filterfalse(gc.is_tracked, referents)))
        shareable = untracked - _UNSHAREABLE
        if shareable:
            kinds = map(shareable.__contains__, map(type, referents))
            found += itertools.compress(referents, kinds)
        frontier = []
        for obj in found:
            key = id(obj)
            if key in seen or key in stop or isinstance(obj, _OPAQUE):
                continue
            seen.add(key)
            frontier.append(obj)
    return seen


def _groups(
    values: dict[str, Any], by_name: dict[int, str], stop: set[int]
) -> list[set[str]]:
    """Partition variables so that variables sharing an object share a group."""
    parent = {name: name for name in values}

    def find(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    owner: dict[int, str] = {}
    for name, value in values.items():
        if isinstance(value, _OPAQUE):
            continue
        own_stop = stop - {id(value)}
        for key in _reachable(value, own_stop):
            other = owner.setdefault(key, name)
            if other != name:
                parent[find(name)] = find(other)
    groups: dict[str, set[str]] = {}
    for name in values:
        groups.setdefault(find(name), set()).add(name)
    return list(groups.values())


def _cycles(blobs: list[_Blob]) -> list[set[str]]:
    """Return groups of blobs whose references by name form a cycle.

    Such blobs cannot be loaded one after the other, so they are merged.
    """
    by_variable = {
        name: index for index, blob in enumerate(blobs) for name in blob.names
    }
    edges = [
        {by_variable[ref] for ref in blob.refs if ref in by_variable} for blob in blobs
    ]
    index_of: dict[int, int] = {}
    low: dict[int, int] = {}
    stack: list[int] = []
    merged: list[set[str]] = []

    def visit(node: int) -> None:
        index_of[node] = low[node] = len(index_of)
        stack.append(node)
        for other in edges[node]:
            if other not in index_of:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index_of[other])
        if low[node] == index_of[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                merged.append(set().union(*(blobs[i].names for i in component)))

    for node in range(len(blobs)):
        if node not in index_of:
            visit(node)
    return merged


class Saved:
    """The outcome of pickling a namespace: blobs, manifest entries, drops."""

    def __init__(self) -> None:
        self.blobs: list[_Blob] = []
        self.dropped: dict[str, str] = {}
        self.modules: dict[str, str] = {}

    def entries(self, namespace: dict[str, Any]) -> dict[str, dict[str, Any]]:
        entries = {}
        for blob in self.blobs:
            for name in blob.names:
                entries[name] = {
                    "blob": blob.digest,
                    "type": _type_name(namespace[name]),
                    "size": len(blob.data),
                    "needs": sorted(blob.needs - {name}),
                    "refs": sorted(blob.refs - {name}),
                }
        return entries


def _type_name(value: Any) -> str:
    kind = type(value)
    if kind.__module__ in ("builtins", "__main__"):
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def _pickle_or_drop(
    names: set[str], namespace: dict[str, Any], by_name: dict[int, str], saved: Saved
) -> None:
    try:
        saved.blobs.append(_pickle_group(names, namespace, by_name))
        return
    except Exception as error:  # noqa: BLE001 - any failure drops the name, reported
        if len(names) == 1:
            (name,) = names
            saved.dropped[name] = _reason(namespace[name], error)
            return
    # Find the members that cannot be kept; keep the others together.
    keep = set()
    for name in sorted(names):
        try:
            _pickle_group({name}, namespace, by_name)
            keep.add(name)
        except Exception as error:  # noqa: BLE001 - reported as a dropped name
            saved.dropped[name] = _reason(namespace[name], error)
    if keep:
        _pickle_or_drop(keep, namespace, by_name, saved)


def _reason(value: Any, error: Exception) -> str:
    detail = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"a {_type_name(value)} cannot be saved ({detail})"


def save_namespace(namespace: dict[str, Any], names: Iterable[str]) -> Saved:
    """Pickle the given variables of a namespace into blobs.

    Args:
        namespace: The session's globals.
        names: The variables to save; the others are carried over unchanged.
    """
    saved = Saved()
    values: dict[str, Any] = {}
    for name in names:
        value = namespace[name]
        if isinstance(value, ModuleType) and value.__name__ in sys.modules:
            saved.modules[name] = value.__name__
        else:
            values[name] = value
    by_name = {
        id(value): name
        for name, value in namespace.items()
        if name not in RESERVED and not isinstance(value, _IMMUTABLE)
    }
    stop = {
        key for key, name in by_name.items() if isinstance(namespace[name], _OPAQUE)
    }
    stop.add(id(namespace))
    for group in _groups(values, by_name, stop):
        _pickle_or_drop(group, namespace, by_name, saved)
    for cycle in _cycles(saved.blobs):
        saved.blobs = [blob for blob in saved.blobs if not blob.names <= cycle]
        _pickle_or_drop(cycle, namespace, by_name, saved)
    return saved


class _SessionUnpickler(pickle.Unpickler):
    def __init__(
        self, stream: memoryview, buffers: list[memoryview], loader: Loader
    ) -> None:
        super().__init__(io.BytesIO(stream), buffers=buffers)
        self.loader = loader

    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name == "_lookup":
            return self.loader.resolve
        if module == self.loader.namespace["__name__"]:
            return self.loader.resolve(name)
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        kind = pid[0]
        if kind == "namespace":
            return self.loader.namespace
        if kind == "module":
            return sys.modules["__main__"]
        if kind == "name":
            return self.loader.resolve(pid[1])
        raise pickle.UnpicklingError(f"unknown reference {pid!r} in a checkpoint")


class LoadFailed(Exception):
    """A variable could not be rebuilt from its blob."""


class Loader:
    """Rebuilds the variables of a manifest into a namespace, on demand.

    Args:
        namespace: The namespace to fill.
        variables: The manifest's variable entries.
        modules: The manifest's module entries.
        read_blob: Returns a blob's verified bytes given its digest and a name.
        blobs: The manifest's blob entries, with the Python and dill versions
            that wrote each blob.
        writer: The versions to assume for a blob that does not say.
    """

    def __init__(
        self,
        namespace: dict[str, Any],
        variables: dict[str, dict[str, Any]],
        modules: dict[str, str],
        read_blob: Callable[[str, str], bytes | bytearray | memoryview],
        blobs: dict[str, dict[str, Any]] | None = None,
        writer: dict[str, str | None] | None = None,
    ) -> None:
        self.namespace = namespace
        self.variables = variables
        self.modules = modules
        self.read_blob = read_blob
        self.blobs = blobs or {}
        self.writer = writer or {}
        self.loaded: set[str] = set()
        self.warnings: list[str] = []
        self._loading: set[str] = set()

    def closure(self, names: Iterable[str]) -> set[str]:
        """Return the saved names that code naming ``names`` may touch.

        That is the named variables, what they need to be rebuilt or read when
        called, and the variables that refer to any of those by name: the
        code may rebind or delete a name, and a variable that refers to it
        must then be saved again, holding the old object itself.
        """
        referrers: dict[str, list[str]] = {}
        for name, entry in self.variables.items():
            for ref in entry.get("refs", entry["needs"]):
                referrers.setdefault(ref, []).append(name)
        wanted: set[str] = set()
        pending = [name for name in names if self._saved(name)]
        while pending:
            name = pending.pop()
            if name in wanted:
                continue
            wanted.add(name)
            found = self.variables.get(name)
            needs = found["needs"] if found else []
            pending += [need for need in needs if self._saved(need)]
            pending += referrers.get(name, [])
        return wanted

    def _saved(self, name: str) -> bool:
        return name in self.variables or name in self.modules

    def dynamic(self, names: Iterable[str]) -> bool:
        """Return True if code naming ``names`` may reach any global by name."""
        names = set(names)
        for name in self.closure(names):
            entry = self.variables.get(name)
            if entry:
                names |= set(entry["needs"])
        return not DYNAMIC.isdisjoint(names)

    def load(self, names: Iterable[str]) -> None:
        """Load the given saved names (and nothing else) into the namespace."""
        for name in sorted(names):
            self.resolve(name)

    def everything(self) -> set[str]:
        return set(self.variables) | set(self.modules)

    def resolve(self, name: str) -> Any:
        """Return the value of a saved name, loading its blob if needed."""
        if name in self.namespace:
            return self.namespace[name]
        if name in self.modules:
            return self._import(name)
        entry = self.variables.get(name)
        if entry is None:
            raise LoadFailed(
                f"the checkpoint refers to {name!r}, which it does not hold"
            )
        digest = entry["blob"]
        if digest in self._loading:
            raise LoadFailed(f"the checkpoint of {name!r} refers to itself by name")
        members = [n for n, e in self.variables.items() if e["blob"] == digest]
        self.loaded.update(members)
        self._warn_of_versions(digest)
        data = self.read_blob(digest, name)
        self._loading.add(digest)
        try:
            # The buffers are views of the blob's private, writable memory:
            # arrays rebuilt on them are neither copied nor read-only.
            stream, buffers = split_blob(data)
            values = _SessionUnpickler(stream, buffers, self).load()
        except LoadFailed:
            raise
        except Exception as error:
            raise LoadFailed(
                f"could not rebuild {name!r} from its checkpoint, written by"
                f" {self._writer(digest)}: {type(error).__name__}: {error}"
            ) from error
        finally:
            self._loading.discard(digest)
        self.namespace.update(values)
        return self.namespace[name]

    def _versions(self, digest: str) -> tuple[str, str | None]:
        info = self.blobs.get(digest, {})
        python = info.get("python") or self.writer.get("python") or "unknown"
        dill = info.get("dill") or self.writer.get("dill")
        return python, dill if info.get("pickler") == "dill" else None

    def _writer(self, digest: str) -> str:
        python, dill = self._versions(digest)
        return f"Python {python} and dill {dill}" if dill else f"Python {python}"

    def _warn_of_versions(self, digest: str) -> None:
        # A pickle from another Python minor version or another dill often
        # loads, and sometimes loads wrong: say so, once per writer.
        python, dill = self._versions(digest)
        here = ".".join(map(str, sys.version_info[:2]))
        skewed = python != "unknown" and ".".join(python.split(".")[:2]) != here
        if dill:
            import dill as installed  # a dill blob needs it to load anyway

            skewed = skewed or dill != installed.__version__
        warning = (
            f"jobrunner: loading a checkpoint written by {self._writer(digest)};"
            f" this step runs Python {sys.version.split()[0]}"
        )
        if skewed and warning not in self.warnings:
            self.warnings.append(warning)

    def _import(self, name: str) -> Any:
        self.loaded.add(name)
        try:
            module = importlib.import_module(self.modules[name])
        except Exception as error:  # noqa: BLE001 - any import failure is reported
            # The name stays unbound (a NameError if the code uses it) and the
            # step goes on: a module missing here may not be needed by this step.
            self.warnings.append(
                f"jobrunner: could not re-import module {self.modules[name]!r} as"
                f" {name!r}: {type(error).__name__}: {error}"
            )
            return None
        self.namespace[name] = module
        return module
