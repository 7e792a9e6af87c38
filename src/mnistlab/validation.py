"""Strict validation of plain values (TOML, JSON, metadata) with one-line errors.

Every value is checked on the way in by pydantic, from type annotations: an integer is no bool or
float, a float is finite where it must be, `"false"` is no bool. The last string in a field's
annotation is its rule; a mistake is one ConfigError line naming the file, the place and the
rule, e.g. `study.toml: runs[1].layernorm must be true or false, got 'false'`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from types import UnionType
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin, get_type_hints

from annotated_types import Ge, Lt
from pydantic import (
    AfterValidator,
    AllowInfNan,
    ConfigDict,
    InstanceOf,
    Strict,
    TypeAdapter,
    ValidationError,
    with_config,
)
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict, dataclass_transform, is_typeddict

from mnistlab.errors import ConfigError

FORBID_EXTRA = ConfigDict(extra="forbid")
T = TypeVar("T")


def _path_safe(name: str) -> str:
    """A name that is one plain path component: it names the run directory and model files."""
    size = len(name.encode("utf-8"))
    unsafe = any(c.isspace() or c in "/\\,:" or not c.isprintable() for c in name)
    if not 0 < size <= 100 or unsafe or name[0] in ".-=+@":
        raise PydanticCustomError("name", "not a plain file name")
    return name


# Value kinds, all strict. A field's rule (the string in its annotation) says what it accepts.
Int = Annotated[int, Strict()]
NonNegative = Annotated[int, Strict(), Ge(0)]
Count = Annotated[int, Strict(), Ge(1)]
Number = Annotated[float, Strict()]  # NaN allowed: a diverged model's metrics
Real = Annotated[float, Strict(), AllowInfNan(False)]
Text = Annotated[str, Strict()]
Flag = Annotated[bool, Strict()]
Name = Annotated[
    Text, AfterValidator(_path_safe),
    "must be 1-100 bytes without spaces, commas, colons or slashes, not starting with . - = + @",
]
Unit = Annotated[Real, Ge(0), Lt(1)]  # [0, 1)
Switch = Annotated[Flag, "must be true or false"]
SEED_LIMIT = 1 << 63  # seeds are 64-bit signed integers to torch and NumPy


def _seed_range(value: int) -> int:
    if value >= SEED_LIMIT:
        raise ValueError(f"must be below 2^63 (seeds are 64-bit integers), got {value}")
    return value


SeedValue = Annotated[NonNegative, AfterValidator(_seed_range)]  # a seed, without a rule of its own
Seed = Annotated[SeedValue, "must be an integer >= 0"]


def plain_numbers(value: Any) -> Any:
    """`value` with NumPy's scalars and arrays as Python's numbers and lists, inside lists,
    tuples and dicts too: what a notebook holds (`np.arange(3)`, `np.int64(2)`) where a number
    or a list of them is meant. Anything else is returned as it is. NumPy is recognised by its
    module, so this costs no NumPy import."""
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    if type(value) in (list, tuple):
        return type(value)(plain_numbers(v) for v in value)
    if type(value) is dict:
        return {k: plain_numbers(v) for k, v in value.items()}
    return value


def _plain_retry(check: Callable[[Any], Any], value: Any) -> Any:
    """`check(value)`; where strict validation refuses it, `check(plain_numbers(value))`: NumPy
    numbers and arrays are accepted wherever Python's are, converted here at the boundary (a
    value refused both ways is reported as converted: `got 0.5`, not `got np.float64(0.5)`)."""
    try:
        return check(value)
    except ValidationError:
        return check(plain_numbers(value))


@dataclass_transform(frozen_default=True)
def validated(cls: type[T]) -> type[T]:
    """`cls` as a frozen, hashable dataclass whose fields pydantic checks (unknown fields too);
    constructing one with a bad value raises a one-line ConfigError naming the class. NumPy
    numbers and arrays are taken as Python's (plain_numbers)."""
    cls = pydantic_dataclass(frozen=True, config=FORBID_EXTRA)(cls)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            _plain_retry(lambda given: init(self, *given[0], **given[1]), (args, kwargs))
        except ValidationError as exc:
            raise ConfigError(one_line(exc, cls.__name__, cls)) from None

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


@functools.cache
def _adapter(kind: Any) -> TypeAdapter:
    return TypeAdapter(kind)


def validate(kind: Any, values: Any, where: str) -> Any:
    """`values` (TOML/JSON data, or a caller's, where NumPy numbers and arrays stand for Python's)
    as a `kind` (a validated dataclass, a TypedDict, a type), or a one-line ConfigError:
    `<file>: <key> <rule>, got <value>`."""
    try:
        return _plain_retry(_adapter(kind).validate_python, values)
    except ValidationError as exc:
        raise ConfigError(one_line(exc, where, kind)) from None


_UNKNOWN = ("unexpected_keyword_argument", "extra_forbidden")


def one_line(exc: ValidationError, where: str, root: Any) -> str:
    """The first problem of `exc`, raised while validating a `root`, as one line."""
    errors = exc.errors(include_url=False)
    error, loc = errors[0], tuple(errors[0]["loc"])
    if error["type"] in _UNKNOWN:
        parent = loc[:-1]
        names = [str(e["loc"][-1]) for e in errors
                 if e["type"] in _UNKNOWN and tuple(e["loc"][:-1]) == parent]
        known = _field_names(_kind_at(root, parent))
        return (f"{where}: {_place(parent)}unknown field(s) {', '.join(names)}; "
                f"known: {', '.join(known)}")
    if error["type"] == "value_error":
        return f"{where}: {_place(loc)}{error['ctx']['error']}".replace("\n", " ")
    kinds = [root] + [kind for _, kind in _levels(root, loc)]  # kinds[i]: the type at loc[:i]
    ruled = [i for i, kind in enumerate(kinds) if _rule(kind)]
    if not ruled:
        return f"{where}: {_place(loc)}{error['msg'][:1].lower()}{error['msg'][1:]}"
    i = ruled[-1]
    key = f"{_dotted(loc[:i])} " if i else ""
    return f"{where}: {key}{_rule(kinds[i])}, got {_shown(error['input'])}"


def _rule(kind: Any) -> str | None:
    """A field's rule: the last string in its annotation."""
    rules = [m for m in _metadata(kind) if isinstance(m, str)]
    return rules[-1] if rules else None


def _dotted(loc: tuple) -> str:
    """A place in the file in TOML's dotted words: `runs[1].lr`, `schedule.epochs`."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _place(loc: tuple) -> str:
    """`runs[1]: `, `schedule: ` or nothing at the top of the file."""
    return f"{_dotted(loc)}: " if loc else ""


def _shown(value: Any) -> str:
    """A value as the file wrote it (true, not True), cut short."""
    text = str(value).lower() if isinstance(value, bool) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _metadata(kind: Any) -> tuple:
    return get_args(kind)[1:] if get_origin(kind) is Annotated else ()


def _bare(kind: Any) -> Any:
    return get_args(kind)[0] if get_origin(kind) is Annotated else kind


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    """A dataclass's or TypedDict's field annotations, rules and constraints included."""
    return get_type_hints(cls, include_extras=True)


def _field_names(kind: Any) -> list[str]:
    kind = _bare(kind)
    return list(hints(kind)) if dataclasses.is_dataclass(kind) or is_typeddict(kind) else []


def _kind_at(root: Any, loc: tuple) -> Any:
    """The annotation that `loc` leads to from the type `root`, or None where it is unknown."""
    levels = _levels(root, loc)
    if len(levels) < len(loc):
        return None
    return levels[-1][1] if levels else root


def _levels(root: Any, loc: tuple) -> list[tuple[Any, Any]]:
    """(part, annotation) for each part of `loc` that the type `root` describes."""
    levels, kind = [], root
    for part in loc:
        bare = _bare(kind)
        if isinstance(part, str) and part in _field_names(bare):
            kind = hints(bare)[part]
        elif isinstance(part, int) and get_origin(bare) is tuple:
            args = get_args(bare)
            kind = args[0] if args[-1] is Ellipsis else args[min(part, len(args) - 1)]
        else:
            break
        levels.append((part, kind))
    return levels


def arguments(func: Callable[..., T]) -> Callable[..., T]:
    """`func` checking its arguments against its annotations before it runs, strictly, as a
    file's values are checked: a public function of the Python API then refuses a wrong
    argument in the one line the command line would print, `<function>: <argument> <rule>,
    got <value>` (the rule: the last string of the annotation, else the kinds it allows),
    instead of failing later inside with a message that does not name it.

    NumPy scalars and arrays are accepted wherever Python numbers and lists are, and converted
    here, at the boundary (plain_numbers): `seeds=np.arange(3)` is `seeds=[0, 1, 2]`. An
    argument whose annotation takes arrays (in-memory data) keeps them; `**options` (RunConfig
    and Schedule fields) are converted."""
    signature = inspect.signature(func)

    @functools.wraps(func)
    def checked(*args: Any, **kwargs: Any) -> T:
        bound = signature.bind(*args, **kwargs)  # a wrong call is Python's own TypeError
        kinds = _argument_kinds(func)
        for name, value in bound.arguments.items():
            if name in kinds:
                bound.arguments[name] = _check_argument(func.__name__, name, kinds[name], value)
            elif signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                bound.arguments[name] = plain_numbers(value)
        return func(*bound.args, **bound.kwargs)

    return checked


@functools.cache
def _argument_kinds(func: Callable[..., Any]) -> dict[str, Any]:
    """The annotations of `func`'s named parameters (not *args, **kwargs or the return)."""
    named = [p.name for p in inspect.signature(func).parameters.values()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    found = get_type_hints(func, include_extras=True)
    return {name: found[name] for name in named if name in found and found[name] is not Any}


@functools.cache
def _argument_adapter(kind: Any) -> TypeAdapter:
    return TypeAdapter(_instances(kind),
                       config=ConfigDict(strict=True, arbitrary_types_allowed=True))


def _instances(kind: Any) -> Any:
    """`kind` with each dataclass in it (a RunConfig, a StudyConfig) wanting an instance: an
    argument is an object, where a file's table would be built into one from its values."""
    bare = _bare(kind)
    if get_origin(bare) in (Union, UnionType):
        return Union[tuple(_instances(a) for a in get_args(bare))]  # noqa: UP007
    if isinstance(bare, type) and dataclasses.is_dataclass(bare):
        return InstanceOf[bare]
    return kind


def _check_argument(where: str, name: str, kind: Any, value: Any) -> Any:
    """The argument to pass on: `value`, or its plain_numbers form where only that is valid."""
    def check(given: Any) -> Any:
        _argument_adapter(kind).validate_python(given)
        return given

    try:
        return _plain_retry(check, value)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        if error["type"] == "value_error":
            raise ConfigError(f"{where}: {name}: {error['ctx']['error']}") from None
        shown = _shown(plain_numbers(value))
        raise ConfigError(f"{where}: {name} {_argument_rule(kind)}, got {shown}") from None


def _argument_rule(kind: Any) -> str:
    """What an argument of `kind` must be: its rule, else its kinds in words."""
    options = get_args(_bare(kind)) if get_origin(_bare(kind)) in (Union, UnionType) else ()
    rules = [r for r in (_rule(kind), *map(_rule, options)) if r]
    if rules:
        return rules[0]
    names = [_kind_name(k) for k in (options or (kind,))]
    return "must be " + (", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1
                         else names[0])


def _kind_name(kind: Any) -> str:
    kind = _bare(kind)
    if kind is type(None):
        return "None"
    if get_origin(kind) is not None:
        return str(kind).replace("typing.", "").replace("collections.abc.", "").replace(
            "numpy.ndarray", "ndarray")
    return getattr(kind, "__name__", str(kind))


def typed_table(name: str, fields: Mapping[str, Any]) -> Any:
    """A TypedDict of optional `fields` that refuses any other key: the shape of a TOML table."""
    return with_config(FORBID_EXTRA)(TypedDict(name, dict(fields), total=False))  # type: ignore[operator]


