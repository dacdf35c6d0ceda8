"""What a structure file's pickle would call, decided before anything of it runs.

The trust gate (:mod:`experiment_io.run.trust`) decides which *names* a structure file
may refer to. Referring to a class is not calling it: pickle rebuilds an object from
its class's ``__new__`` and its state, and never needs the class's constructor. A file
can still ask for calls (the ``REDUCE`` opcode calls any callable on the stack with
arguments from the file), and an admitted class's ``__init__`` can do anything (read a
path, allocate gigabytes); an admitted function (``operator.add``) can be called
over and over on a memoised value until the load runs out of memory.

:func:`check_calls` reads the pickle's opcodes without running them (a symbolic
stack, with ``pickletools``) and refuses, with the gate's error, a file that

* calls a class or function other than torch's own rebuilders (what
  ``torch.load(weights_only=True)`` admits by itself, which rebuild tensors, sizes,
  devices and plain containers), the constructors of plain containers, which only
  store their arguments (:data:`STORE_ONLY`), an enum's value lookup, and what the
  user named in ``allow`` (by object, by exact name or by package: code the user
  trusts);
* makes an object whose class has a ``__new__`` of its own, or sets the state of one
  whose class has a ``__setstate__`` of its own, outside torch, experiment_io and what
  the user allowed (pickle runs both);
* makes torch's ``bytearray`` rebuilder allocate from a number instead of copying bytes;
* makes its calls do more work than its own size explains: the sizes of all the
  arguments of all its calls together (a string's length, a container's items) are at
  most :data:`WORK_PER_BYTE` times the pickle's size plus :data:`WORK_ALLOWANCE`.

A file ``torch.save`` wrote from real objects passes: it calls only torch's rebuilders
and the container constructors, each on values it holds once.
"""
from __future__ import annotations

import _compat_pickle
import collections
import enum
import pickletools
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

__all__ = ["CallRefused", "check_calls", "STORE_ONLY", "WORK_PER_BYTE", "WORK_ALLOWANCE"]

#: Constructors that only store their arguments (what a file may call besides torch's rebuilders).
STORE_ONLY = (set, frozenset, tuple, list, dict, complex, collections.OrderedDict, collections.Counter,
              collections.defaultdict, collections.deque)
#: The work a file's calls may do per byte of its pickle (see the module's description).
WORK_PER_BYTE = 4
#: The work a file's calls may do whatever its size.
WORK_ALLOWANCE = 1 << 20

_TRUSTED_CODE = ("torch", "experiment_io", "builtins", "collections", "enum")
_PLAIN_NEW = {object.__new__, tuple.__new__, dict.__new__, list.__new__, set.__new__, frozenset.__new__}


class CallRefused(Exception):
    """A structure file asks for what :func:`check_calls` refuses; ``name`` is the global concerned (or ``None``)."""

    def __init__(self, message: str, name: Optional[str] = None):
        super().__init__(message)
        self.name = name


@dataclass
class _Global:
    name: str


@dataclass
class _Made:
    name: str


@dataclass
class _Str:
    length: int
    value: Optional[str] = None


@dataclass
class _Seq:
    items: list = field(default_factory=list)


def _size(value):
    if isinstance(value, _Str):
        return value.length
    if isinstance(value, _Seq):
        return len(value.items)
    return 1


def _defining_module(cls, attribute):
    for klass in getattr(cls, "__mro__", ()):
        if attribute in vars(klass):
            return getattr(klass, "__module__", "") or ""
    return None


def _trusted_module(module, trusted_packages):
    roots = _TRUSTED_CODE + tuple(trusted_packages)
    return any(module == r or module.startswith(r + ".") for r in roots)


class _Rules:
    def __init__(self, objects, torch_rebuilders, trusted, trusted_packages, refused):
        self.objects, self.torch_rebuilders = objects, torch_rebuilders
        self.trusted, self.trusted_packages, self.refused = trusted, trusted_packages, refused

    def user_trusts(self, name):
        return name in self.trusted or any(name.startswith(p + ".") for p in self.trusted_packages)

    def call(self, func, args):
        if not isinstance(func, _Global):
            raise CallRefused("the file calls an object it built itself (pickle REDUCE on a non-global)")
        name = func.name
        if name in self.refused:
            raise CallRefused(f"the file calls {name}", name)
        obj = self.objects.get(name)
        if obj is bytearray and not all(isinstance(a, _Str) for a in _items(args)):
            raise CallRefused(f"the file calls {name} with a number: it would allocate that many bytes", name)
        if any(obj is c for c in self.torch_rebuilders) or any(obj is c for c in STORE_ONLY):
            return
        if isinstance(obj, type) and issubclass(obj, enum.Enum):
            return  # a member looked up by its value
        if self.user_trusts(name):
            return
        kind = "class" if isinstance(obj, type) else "function"
        raise CallRefused(
            f"the file calls the {kind} {name} (pickle REDUCE): a stored object is rebuilt from its state, never by "
            f"running its class's constructor, and a stored function is kept, never called. If you trust this "
            f"code, name it in allow=[{name!r}]", name)

    def new(self, cls):
        if not isinstance(cls, _Global):
            raise CallRefused("the file makes an object of a class it built itself (pickle NEWOBJ on a non-global)")
        obj = self.objects.get(cls.name)
        if obj is None or cls.name in self.refused:
            return  # an inert stand-in of a refused name, or one torch refuses itself
        new = getattr(obj, "__new__", None)
        if new in _PLAIN_NEW or any(obj is c for c in self.torch_rebuilders) or self.user_trusts(cls.name):
            return
        module = _defining_module(obj, "__new__") or ""
        if _trusted_module(module, self.trusted_packages):
            return
        raise CallRefused(f"{cls.name} has a __new__ of its own (defined in {module}), which making it would run; "
                          f"if you trust this code, name it in allow=[{cls.name!r}]", cls.name)

    def build(self, made):
        if not isinstance(made, _Made):
            return  # torch's unpickler builds only admitted classes, tensors and parameters
        obj = self.objects.get(made.name)
        if obj is None or made.name in self.refused or self.user_trusts(made.name):
            return
        module = _defining_module(obj, "__setstate__")
        if module is None or _trusted_module(module, self.trusted_packages):
            return
        raise CallRefused(f"{made.name} has a __setstate__ of its own (defined in {module}), which restoring it "
                          f"would run; if you trust this code, name it in allow=[{made.name!r}]", made.name)


def _python3_name(module, name):
    """The name a global of a protocol 2 pickle has in Python 3 (``__builtin__.set`` is ``builtins.set``), as
    pickle and torch's unpickler resolve it."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _items(value):
    return value.items if isinstance(value, _Seq) else [value]


_STRINGS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
            "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"}
_EMPTY = {"EMPTY_LIST", "EMPTY_TUPLE", "EMPTY_DICT", "EMPTY_SET"}
_REFUSED_OPCODES = {"INST", "OBJ", "EXT1", "EXT2", "EXT4", "PERSID", "NEXT_BUFFER", "READONLY_BUFFER"}


def check_calls(data: bytes, objects: Mapping[str, Any], *, trusted: frozenset = frozenset(),
                trusted_packages: tuple = (), refused: frozenset = frozenset(),
                torch_rebuilders: Mapping[str, Any] = {}) -> None:
    """Refuse (raise :class:`CallRefused`) a pickle that asks for a call, an object or work the module's rules
    refuse.

    :param data: the pickle (a structure file's ``data.pkl``).
    :param objects: ``{stored name: object}`` of the globals the gate admitted.
    :param trusted: names the user named exactly in ``allow``.
    :param trusted_packages: modules and packages the user named in ``allow``.
    :param refused: names the gate refused (unpickled as inert stand-ins, never called).
    :param torch_rebuilders: ``{name: callable}`` of what ``torch.load(weights_only=True)`` calls by itself.
    """
    rules = _Rules({**torch_rebuilders, **objects}, tuple(torch_rebuilders.values()), trusted, trusted_packages,
                   refused)
    budget = WORK_PER_BYTE * len(data) + WORK_ALLOWANCE
    stack: list = []
    marks: list = []
    memo: dict = {}
    work = 0

    def pop_mark():
        nonlocal stack
        items, stack = stack, marks.pop()
        return items

    try:
        for opcode, arg, _ in pickletools.genops(data):
            name = opcode.name
            if name in _REFUSED_OPCODES:
                raise CallRefused(f"the file uses the pickle opcode {name}, which experiment_io never writes")
            if name == "MARK":
                marks.append(stack)
                stack = []
            elif name == "GLOBAL":
                stack.append(_Global(_python3_name(*str(arg).split(" ", 1))))
            elif name == "STACK_GLOBAL":
                qualname, module = stack.pop(), stack.pop()
                if not (isinstance(module, _Str) and isinstance(qualname, _Str)) or None in (module.value,
                                                                                             qualname.value):
                    raise CallRefused("the file names a global through values it computed (pickle STACK_GLOBAL)")
                stack.append(_Global(_python3_name(module.value, qualname.value)))
            elif name in _STRINGS:
                length = len(arg)  # type: ignore[arg-type]
                stack.append(_Str(length, arg if isinstance(arg, str) and length <= 4096 else None))
            elif name in ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"):
                stack.append(arg)
            elif name in _EMPTY:
                stack.append(_Seq())
            elif name in ("MEMOIZE",):
                memo[len(memo)] = stack[-1]
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
            elif name in ("TUPLE", "LIST", "DICT", "FROZENSET"):
                items = pop_mark()  # (before naming the stack: popping the mark replaces it)
                stack.append(_Seq(items))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                items, stack[-n:] = stack[-n:], []
                stack.append(_Seq(items))
            elif name in ("APPENDS", "SETITEMS", "ADDITEMS"):
                items = pop_mark()
                target = stack[-1]
                if isinstance(target, _Seq):
                    target.items.extend(items)
            elif name in ("APPEND", "SETITEM"):
                items = [stack.pop() for _ in range(1 if name == "APPEND" else 2)]
                if isinstance(stack[-1], _Seq):
                    stack[-1].items.extend(items)
            elif name == "REDUCE":
                args, func = stack.pop(), stack.pop()
                rules.call(func, args)
                work += 1 + sum(_size(a) for a in _items(args))
                if work > budget:
                    raise CallRefused(f"the file's calls do more work than its size explains (over {budget} "
                                      "argument items and bytes): a structure file holds each value once")
                stack.append(_Made(func.name) if isinstance(func, _Global) else None)
            elif name in ("NEWOBJ", "NEWOBJ_EX"):
                if name == "NEWOBJ_EX":
                    stack.pop()
                stack.pop()
                cls = stack.pop()
                rules.new(cls)
                stack.append(_Made(cls.name) if isinstance(cls, _Global) else None)
            elif name == "BUILD":
                stack.pop()
                rules.build(stack[-1])
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                stack.append(stack[-1])
            elif name == "STOP":
                break
            else:
                before = opcode.stack_before
                if pickletools.markobject in before:
                    pop_mark()
                    before = before[:before.index(pickletools.markobject)]
                for _ in before:
                    stack.pop()
                stack.extend(None for _ in opcode.stack_after)
    except CallRefused:
        raise
    except (ValueError, IndexError, KeyError, TypeError) as e:  # not a well-formed pickle
        raise CallRefused(f"the file's pickle is malformed ({e!r})") from e
