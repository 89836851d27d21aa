"""Weight-space unlearning methods: one file each, holding its loss, its defaults and its `Method` record
(methods/contract.py). `unlearnkit.unlearn` runs them through the shared training loop.

Adding a method: write methods/<name>.py ending in `METHOD = Method(...)` and add it to the tuple below
(docs/methods.md, "Add a method in one file"); code outside the package can call `register` instead.
"""
from __future__ import annotations

from ..errors import UserError
from . import ga, graddiff, npo, rmu, simnpo
from .contract import Method

METHODS: dict[str, Method] = {}


def register(method: Method, replace: bool = False) -> Method:
    """Make a method available to `unlearn(..., method=name)` and `unlearnkit unlearn --method name`."""
    if not isinstance(method, Method):
        raise TypeError(f"register: expected a Method record, got {type(method).__name__}")
    if method.name in METHODS and not replace:
        raise ValueError(f"register: a method named {method.name!r} exists (pass replace=True to override it)")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    METHODS.pop(name, None)


def get(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"--method: unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


for _m in (ga.METHOD, graddiff.METHOD, npo.METHOD, simnpo.METHOD, rmu.METHOD, rmu.ADAPTIVE):
    register(_m)
