"""``Record``: immutable typed records that cost nothing to define.

A client command must start in a few tens of milliseconds, and ``@dataclass`` costs half a millisecond per class
(plus a dozen to import ``dataclasses``), ``typing.NamedTuple`` a third (and ``typing`` itself two). A ``Record``
subclass declares its fields as class annotations, with defaults as class attributes; ``dataclass_transform``
(PEP 681) tells mypy to check its constructor as a frozen dataclass's, and ``__init_subclass__`` reads the field
names once. Records compare equal field by field, print as ``Name(field=value, ...)``, refuse assignment, and give
``as_dict()``.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: importing typing costs every client command 2 ms
if TYPE_CHECKING:
    from typing import Any, ClassVar, dataclass_transform
else:

    def dataclass_transform(**_: object) -> object:  # at run time, typing's is a no-op too
        return lambda cls: cls


@dataclass_transform(frozen_default=True)
class Record:
    _fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        names: list[str] = []
        for klass in reversed(cls.__mro__):
            for name, annotation in vars(klass).get("__annotations__", {}).items():
                if not name.startswith("_") and "ClassVar" not in str(annotation) and name not in names:
                    names.append(name)
        cls._fields = tuple(names)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        cls = type(self)
        if len(args) > len(cls._fields):
            raise TypeError(f"{cls.__name__}() takes {len(cls._fields)} fields, got {len(args)} positional arguments")
        values = dict(zip(cls._fields, args, strict=False))
        for name, value in kwargs.items():
            if name not in cls._fields or name in values:
                raise TypeError(f"{cls.__name__}() got an unexpected or repeated argument {name!r}")
            values[name] = value
        for name in cls._fields:
            if name in values:
                object.__setattr__(self, name, values[name])
            elif not hasattr(cls, name):
                raise TypeError(f"{cls.__name__}() missing the argument {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self) or not isinstance(other, Record):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((type(self), self._values()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in self._fields)})"

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._fields}
