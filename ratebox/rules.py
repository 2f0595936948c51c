"""The rules engine: rule data (field, check, params, code, template) compiled into checks; pure."""

from __future__ import annotations

import hashlib
import re
import string
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

import orjson
import re2

from ratebox.errors import ConfigError
from ratebox.mask import mask_email, mask_value

#: Rule codes belong to 1..899; 900 and above are the pipeline's (ratebox.message).
MIN_CODE, MAX_CODE = 1, 899
#: Longest {value} shown in a message; longer values keep their end (already masked).
_MAX_SHOWN = 64


@dataclass(frozen=True)
class RuleSpec:
    """One rule as data; ``message`` is a str.format template."""

    field: str
    check: str
    params: Mapping[str, Any]
    code: int
    message: str

    def __post_init__(self) -> None:
        # A read-only copy: the defaults are shared by every caller and must not drift.
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    def __hash__(self) -> int:
        return hash((self.field, self.check, _canonical(self.params), self.code, self.message))


@dataclass(frozen=True)
class Failure:
    """One failed rule (or pipeline error) of one item."""

    code: int
    field: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape stored in raw_items.errors."""
        return {"code": self.code, "field": self.field, "message": self.message}


DEFAULT_RULES: tuple[RuleSpec, ...] = (
    RuleSpec("phone", "required", {}, 100, "Missing phone number"),
    RuleSpec(
        "phone",
        "min_length",
        {"min": 10},
        101,
        "Phone number too short: {length} chars, minimum {min}",
    ),
    RuleSpec("bank_account", "required", {}, 200, "Missing bank account"),
    RuleSpec(
        "bank_account",
        "min_length",
        {"min": 8},
        201,
        "Bank account too short: {length} chars, minimum {min}",
    ),
    RuleSpec("email", "email", {}, 300, "Invalid email format: {value}"),
    RuleSpec(
        "name", "min_length", {"min": 2}, 400, "Name too short: {length} chars, minimum {min}"
    ),
)

# A dot-atom local part (RFC 5322 atext), then labels of letters, digits and inner hyphens,
# ending in a TLD of 2+ letters. ASCII only: that is what the CMS and the mailers accept.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_EMAIL_RE = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@(?:{_LABEL}\.)+[A-Za-z]{{2,63}}")


def _is_email(value: str) -> bool:
    local, _, _ = value.partition("@")
    return len(value) <= 254 and len(local) <= 64 and _EMAIL_RE.fullmatch(value) is not None


def _non_negative_int(value: Any, path: str) -> None:
    if type(value) is not int or value < 0:
        raise ConfigError(f"{path}: must be a non-negative integer, got {_show(value)}")


# A rule's pattern runs on every item a producer sends: it is compiled by RE2, whose matching
# time is linear in the input, so no pattern can hang a worker (Python's re backtracks:
# `^(a+)+$` on 41 characters takes minutes). RE2 has no backreferences or lookaround; such a
# pattern is refused at load time. \d, \w and \s are ASCII in RE2, as a rule means them.
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # its errors are raised, not also printed to stderr
_RE2_OPTIONS.max_mem = 8 << 20  # a pattern's compiled program stays small


def _re2(pattern: str) -> Any:
    return re2.compile(pattern, _RE2_OPTIONS)


def _regex(value: Any, path: str) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"{path}: must be a string, got {_show(value)}")
    try:
        _re2(value)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args else "invalid"
        if isinstance(reason, str) and len(reason) > 120:
            reason = reason[:120] + "…"
        raise ConfigError(
            f"{path}: not a pattern the linear-time engine (RE2) accepts: {reason}"
        ) from None


def _string_list(value: Any, path: str) -> None:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{path}: must be a non-empty list of strings, got {_show(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigError(f"{path}[{i}]: must be a string, got {_show(item)}")


_Test = Callable[[str], bool]


def _max_length(params: Mapping[str, Any]) -> _Test:
    most = params["max"]
    return lambda value: len(value) <= most


def _pattern(params: Mapping[str, Any]) -> _Test:
    fullmatch = _re2(params["regex"]).fullmatch
    return lambda value: fullmatch(value) is not None


def _email(params: Mapping[str, Any]) -> _Test:
    return _is_email


def _digits(params: Mapping[str, Any]) -> _Test:
    return lambda value: value.isascii() and value.isdigit()


def _one_of(params: Mapping[str, Any]) -> _Test:
    allowed = frozenset(_normalise_text(v) for v in params["values"])
    return lambda value: value in allowed


@dataclass(frozen=True)
class _Check:
    build: Callable[[Mapping[str, Any]], _Test] | None  # None: checked inline by Engine.check
    params: Mapping[str, Callable[[Any, str], None]]  # name -> validator raising ConfigError


#: The built-in checks, with their parameters and how each is validated.
CHECKS: Mapping[str, _Check] = MappingProxyType(
    {
        "required": _Check(None, {}),
        "min_length": _Check(None, {"min": _non_negative_int}),
        "max_length": _Check(_max_length, {"max": _non_negative_int}),
        "pattern": _Check(_pattern, {"regex": _regex}),
        "email": _Check(_email, {}),
        "digits": _Check(_digits, {}),
        "one_of": _Check(_one_of, {"values": _string_list}),
    }
)
#: What each parameter is called in a template.
_PLACEHOLDER_OF = {"min": "min", "max": "max", "regex": "pattern", "values": "values"}
_KEYS = ("field", "check", "params", "code", "message", "enabled")
_HUGE_WIDTH = re.compile(r"\d{4}")


@dataclass(frozen=True, slots=True)
class _Rule:
    test: _Test | None  # None: a length check, done inline with `least`
    least: int  # min_length's minimum; 0 for required (any present value passes)
    code: int
    field: str
    template: str
    context: Mapping[str, Any]  # the placeholders known before an item is seen
    required: bool
    mask: Callable[[str], str]


class _Field(NamedTuple):
    """One field's rules: the first (for values that are not text), the first required one
    (for a missing value), and those that test a present value, in order."""

    name: str
    first: _Rule
    required: _Rule | None
    tests: tuple[_Rule, ...]


class Engine:
    """Compiled rules: ``check(item)`` returns the item's failures, at most one per field."""

    def __init__(self, specs: Sequence[RuleSpec], plan: Sequence[tuple[str, tuple[_Rule, ...]]]):
        self.specs = tuple(specs)
        self.fingerprint = fingerprint(self.specs)
        self._fields = tuple(
            _Field(
                field,
                rules[0],
                next((r for r in rules if r.required), None),
                tuple(r for r in rules if not r.required),
            )
            for field, rules in plan
        )

    def check(self, item: Mapping[str, Any]) -> list[Failure]:
        """Every failure of the item, in rule order; never raises for JSON values."""
        failures: list[Failure] = []
        get = item.get
        # Runs for every message: length checks inline, no call per passing rule.
        for field in self._fields:
            raw = get(field.name)
            if type(raw) is str:  # the common case first, without a function call
                value = raw.strip()
                if value and not value.isascii():
                    value = unicodedata.normalize("NFC", value)
            elif raw is None:
                value = ""
            else:
                value, label = _normalise_other(raw)
                if label is not None:
                    failures.append(_failure(field.first, 0, label))
                    continue
            if not value:
                if field.required is not None:
                    failures.append(_failure(field.required, 0, ""))
                continue
            for rule in field.tests:
                test = rule.test
                if len(value) >= rule.least if test is None else test(value):
                    continue
                failures.append(_failure(rule, len(value), rule.mask(value)))
                break
        return failures

    def __repr__(self) -> str:
        return f"<Engine {len(self.specs)} rules {self.fingerprint[:12]}>"


def compile_rules(specs: Sequence[RuleSpec]) -> Engine:
    """Validate the specs and group them by field, in the order fields first appear."""
    plan: dict[str, list[_Rule]] = {}
    seen: dict[int, int] = {}
    for i, spec in enumerate(specs):
        path = f"rules[{i}]"
        _validate_spec(spec, path)
        if spec.code in seen:
            raise ConfigError(
                f"{path}.code: duplicate code {spec.code} (also rules[{seen[spec.code]}])"
            )
        seen[spec.code] = i
        plan.setdefault(spec.field, []).append(_compile(spec))
    return Engine(specs, [(field, tuple(rules)) for field, rules in plan.items()])


def parse_rules(raw: Any, path: str = "rules") -> tuple[RuleSpec, ...]:
    """The YAML ``rules:`` value merged with DEFAULT_RULES; any problem is a ConfigError."""
    if raw is None:
        return DEFAULT_RULES
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: must be a list of rules, got {_show(raw)}")
    merged: list[RuleSpec | None] = list(DEFAULT_RULES)
    at = {spec.code: i for i, spec in enumerate(DEFAULT_RULES)}
    seen: dict[int, int] = {}
    for i, entry in enumerate(raw):
        where = f"{path}[{i}]"
        spec, enabled = _parse_entry(entry, where)
        if spec.code in seen:
            raise ConfigError(
                f"{where}.code: duplicate code {spec.code} (also {path}[{seen[spec.code]}])"
            )
        seen[spec.code] = i
        if not enabled:
            if spec.code not in at:
                raise ConfigError(f"{where}.code: no default rule with code {spec.code} to disable")
            merged[at[spec.code]] = None
        elif spec.code in at:
            merged[at[spec.code]] = spec
        else:
            merged.append(spec)
    return tuple(spec for spec in merged if spec is not None)


def fingerprint(specs: Sequence[RuleSpec]) -> str:
    """A stable sha256 of the specs, so a supervisor can tell whether the rules changed."""
    rows = [[s.field, s.check, dict(s.params), s.code, s.message] for s in specs]
    return hashlib.sha256(orjson.dumps(rows, option=orjson.OPT_SORT_KEYS, default=repr)).hexdigest()


def _parse_entry(entry: Any, where: str) -> tuple[RuleSpec, bool]:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: must be a mapping with keys field, check, code, message")
    for key in entry:
        if key not in _KEYS:
            raise ConfigError(f"{where}.{key}: unknown key (one of: {', '.join(sorted(_KEYS))})")
    enabled = entry.get("enabled", True)
    if type(enabled) is not bool:
        raise ConfigError(f"{where}.enabled: must be true or false, got {_show(enabled)}")
    code = _get(entry, "code", where)
    if type(code) is not int or not MIN_CODE <= code <= MAX_CODE:
        raise ConfigError(
            f"{where}.code: must be an integer from {MIN_CODE} to {MAX_CODE}, got {_show(code)}"
        )
    if not enabled:  # disabling needs the code only
        return RuleSpec("", "", {}, code, ""), False
    params = entry.get("params")
    if params is None:
        params = {}
    elif not isinstance(params, Mapping):
        raise ConfigError(f"{where}.params: must be a mapping, got {_show(params)}")
    spec = RuleSpec(
        _get(entry, "field", where),
        _get(entry, "check", where),
        params,
        code,
        _get(entry, "message", where),
    )
    _validate_spec(spec, where)
    return spec, True


def _get(entry: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in entry:
        raise ConfigError(f"{where}.{key}: missing (a rule needs field, check, code, message)")
    return entry[key]


def _validate_spec(spec: RuleSpec, where: str) -> None:
    for key in ("field", "check", "message"):
        value = getattr(spec, key)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{where}.{key}: must be a non-empty string, got {_show(value)}")
    if type(spec.code) is not int or not MIN_CODE <= spec.code <= MAX_CODE:
        raise ConfigError(
            f"{where}.code: must be an integer from {MIN_CODE} to {MAX_CODE}, got {_show(spec.code)}"
        )
    check = CHECKS.get(spec.check)
    if check is None:
        raise ConfigError(
            f"{where}.check: unknown check {spec.check!r} (one of: {', '.join(sorted(CHECKS))})"
        )
    for name in spec.params:
        if name not in check.params:
            expected = ", ".join(check.params) or "none"
            raise ConfigError(
                f"{where}.params.{name}: unknown parameter of check {spec.check!r} (expected: {expected})"
            )
    for name, validate in check.params.items():
        if name not in spec.params:
            raise ConfigError(f"{where}.params.{name}: missing (check {spec.check!r} needs it)")
        validate(spec.params[name], f"{where}.params.{name}")
    _validate_template(spec, where)


def _validate_template(spec: RuleSpec, where: str) -> None:
    # Templates are checked by formatting them with dummy values now, so a typo is a config
    # error at load time, not a crash on the first failing item.
    dummy = {**_static_context(spec), "length": 0, "value": "***"}
    try:
        for _, name, spec_text, _ in string.Formatter().parse(spec.message):
            # Only plain names: attribute and index access ({value.__class__}) would let a
            # template reach into objects.
            if name is not None and name not in dummy:
                shown = "{}" if name == "" else f"{{{name}}}"
                raise ConfigError(
                    f"{where}.message: unknown placeholder {shown} (available: {', '.join(dummy)})"
                )
            # A width like {value:>999999999} would allocate a gigabyte on every failure, and
            # a nested {x} in a format spec escapes the check above.
            if spec_text and ("{" in spec_text or _HUGE_WIDTH.search(spec_text)):
                raise ConfigError(f"{where}.message: format spec too complex: {spec_text!r}")
        spec.message.format_map(dummy)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise ConfigError(f"{where}.message: invalid template: {exc!s}") from None


def _static_context(spec: RuleSpec) -> dict[str, Any]:
    context: dict[str, Any] = {"field": spec.field}
    for name, value in spec.params.items():
        shown = ", ".join(value) if name == "values" else value
        context[_PLACEHOLDER_OF[name]] = shown
    return context


def _compile(spec: RuleSpec) -> _Rule:
    build = CHECKS[spec.check].build
    return _Rule(
        test=None if build is None else build(spec.params),
        least=spec.params["min"] if spec.check == "min_length" else 0,
        code=spec.code,
        field=spec.field,
        template=spec.message,
        context=_static_context(spec),
        required=spec.check == "required",
        mask=mask_email if spec.check == "email" else mask_value,
    )


def _failure(rule: _Rule, length: int, shown: str) -> Failure:
    if len(shown) > _MAX_SHOWN:
        shown = "…" + shown[1 - _MAX_SHOWN :]
    message = rule.template.format_map({**rule.context, "length": length, "value": shown})
    return Failure(rule.code, rule.field, message)


def _normalise_text(value: str) -> str:
    value = value.strip()
    return value if value.isascii() else unicodedata.normalize("NFC", value)


def _normalise_other(raw: Any) -> tuple[str, str | None]:
    """(text, None) for a number or str subclass, ('', label) for a value that is not text."""
    if isinstance(raw, bool):
        return "", "(boolean)"
    if isinstance(raw, (int, float)):
        try:
            return str(raw), None
        except ValueError:  # an int beyond sys.get_int_max_str_digits: no phone is that long
            return "", "(number)"
    if isinstance(raw, str):
        return _normalise_text(raw), None
    if isinstance(raw, (list, tuple)):
        return "", "(array)"
    return "", "(object)"


def _canonical(params: Mapping[str, Any]) -> bytes:
    return orjson.dumps(dict(params), option=orjson.OPT_SORT_KEYS, default=repr)


def _show(value: Any) -> str:
    try:
        text = orjson.dumps(value, default=repr).decode()
    except (TypeError, orjson.JSONEncodeError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
