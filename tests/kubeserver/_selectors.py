"""Label and field selectors, parsed the way the API server parses them."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._errors import bad_request
from ._validation import label_key_problem, label_value_problem

_SET_TERM = re.compile(r"^\s*(!?)\s*([^\s!=()]+)\s*(?:(in|notin)\s*\((.*)\)\s*)?$")
_EQUALITY_TERM = re.compile(r"^\s*([^\s!=()]+)\s*(==|=|!=)\s*([^\s]*)\s*$")

# Which fields each resource can be selected by, as the real server allows.
_COMMON_FIELDS = {"metadata.name", "metadata.namespace"}
_FIELDS: dict[str, set[str]] = {
    "pods": {
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "status.phase",
        "status.podIP",
        "status.nominatedNodeName",
    },
    "jobs": {"status.successful"},
    "events": {
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    },
    "secrets": {"type"},
    "cronjobs": set(),
}

Matcher = Callable[[dict[str, Any]], bool]


@dataclass(frozen=True)
class _Requirement:
    key: str
    operator: str
    values: tuple[str, ...]

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.operator == "exists":
            return present
        if self.operator == "!":
            return not present
        if self.operator in ("=", "==", "in"):
            return present and value in self.values
        return not present or value not in self.values


def _split_terms(selector: str) -> list[str]:
    terms: list[str] = []
    current: list[str] = []
    depth = 0
    for char in selector:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append("".join(current))
            current = []
        else:
            current.append(char)
    terms.append("".join(current))
    return [term for term in terms if term.strip()]


def _check_requirement(term: str, key: str, values: tuple[str, ...]) -> None:
    problems = [label_key_problem(key)] + [label_value_problem(v) for v in values]
    problem = next((p for p in problems if p), None)
    if problem:
        raise bad_request(f"unable to parse requirement: {term!r}: {problem}")


def _parse_term(term: str) -> _Requirement:
    equality = _EQUALITY_TERM.match(term)
    if equality:
        key, operator, value = equality.groups()
        _check_requirement(term, key, (value,))
        return _Requirement(key, operator, (value,))
    found = _SET_TERM.match(term)
    if not found or (found.group(1) and found.group(3)):
        raise bad_request(f"unable to parse requirement: found {term!r}")
    negated, key, operator, raw_values = found.groups()
    if not operator:
        _check_requirement(term, key, ())
        return _Requirement(key, "!" if negated else "exists", ())
    values = tuple(v.strip() for v in raw_values.split(",") if v.strip())
    if not values:
        raise bad_request(f"unable to parse requirement: {term!r}: no values")
    _check_requirement(term, key, values)
    return _Requirement(key, operator, values)


def label_matcher(selector: str | None) -> Matcher:
    """Return a predicate on objects for a ``labelSelector`` query value.

    Raises:
        ApiError: 400 when the selector does not parse.
    """
    requirements = [_parse_term(term) for term in _split_terms(selector or "")]

    def matches(obj: dict[str, Any]) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        return all(requirement.matches(labels) for requirement in requirements)

    return matches


def _field_value(obj: dict[str, Any], field: str) -> str:
    if field == "status.successful":
        field = "status.succeeded"
    value: Any = obj
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if field == "source" and isinstance(value, dict):
        value = value.get("component")
    return "" if value is None else str(value)


def field_matcher(plural: str, selector: str | None) -> Matcher:
    """Return a predicate on objects for a ``fieldSelector`` query value.

    Raises:
        ApiError: 400 for a malformed term or a field the resource cannot be
            selected by.
    """
    allowed = _COMMON_FIELDS | _FIELDS.get(plural, set())
    terms = []
    for term in _split_terms(selector or ""):
        found = _EQUALITY_TERM.match(term)
        if not found:
            raise bad_request(
                f"invalid selector: '{selector}'; can't understand '{term}'"
            )
        field, operator, value = found.groups()
        if field not in allowed:
            raise bad_request(f"field label not supported: {field}")
        terms.append((field, operator != "!=", value))

    def matches(obj: dict[str, Any]) -> bool:
        return all(
            (_field_value(obj, field) == value) == equal
            for field, equal, value in terms
        )

    return matches
