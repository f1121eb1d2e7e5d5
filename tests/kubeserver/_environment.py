"""What a container's process gets: its command line and its environment."""

from __future__ import annotations

import base64
import math
import os
import re
import sys
from typing import Any

from ._store import Object, Store
from ._validation import parse_quantity

_REFERENCE = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")
_PYTHON = re.compile(r"^python(3(\.\d+)?)?$")


class ConfigError(Exception):
    """The container cannot be configured (a missing Secret or key)."""


def expand(text: str, variables: dict[str, str]) -> str:
    """Expand ``$(VAR)`` references as the kubelet does; ``$$`` escapes."""

    def replace(found: re.Match[str]) -> str:
        name = found.group(1)
        if name is None:
            return "$"
        return variables.get(name, found.group(0))

    return _REFERENCE.sub(replace, text)


def _secret_data(store: Store, namespace: str, name: str) -> dict[str, str] | None:
    secret = store.find("secrets", namespace, name)
    if secret is None:
        return None
    data = secret.get("data") or {}
    return {k: base64.b64decode(v).decode("utf-8", "replace") for k, v in data.items()}


def _from_secret(store: Store, namespace: str, ref: dict[str, Any]) -> str | None:
    data = _secret_data(store, namespace, ref.get("name", ""))
    if data is None or ref.get("key") not in data:
        if ref.get("optional"):
            return None
        if data is None:
            raise ConfigError(f'secret "{ref.get("name")}" not found')
        raise ConfigError(
            f"couldn't find key {ref.get('key')} in Secret "
            f"{namespace}/{ref.get('name')}"
        )
    return data[ref["key"]]


def _from_field(pod: Object, path: str) -> str:
    labeled = re.match(r"^metadata\.(labels|annotations)\['(.+)'\]$", path)
    if labeled:
        return str(
            (pod["metadata"].get(labeled.group(1)) or {}).get(labeled.group(2), "")
        )
    value: Any = pod
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)


def _from_resource(container: dict[str, Any], ref: dict[str, Any]) -> str:
    section, _, name = str(ref.get("resource", "")).partition(".")
    value = (container.get("resources") or {}).get(section, {}).get(name)
    amount = parse_quantity(value) if value is not None else None
    divisor = parse_quantity(ref.get("divisor", "1")) or 1.0
    # TODO: report the node's allocatable when no limit is set (there is no node).
    return str(math.ceil((amount or 0) / divisor))


def _value(
    store: Store, pod: Object, container: dict[str, Any], variable: dict[str, Any]
) -> str | None:
    source = variable.get("valueFrom") or {}
    namespace = pod["metadata"]["namespace"]
    if "secretKeyRef" in source:
        return _from_secret(store, namespace, source["secretKeyRef"])
    if "configMapKeyRef" in source:
        ref = source["configMapKeyRef"]
        if ref.get("optional"):
            return None
        raise ConfigError(f'configmap "{ref.get("name")}" not found')
    if "fieldRef" in source:
        return _from_field(pod, source["fieldRef"].get("fieldPath", ""))
    if "resourceFieldRef" in source:
        return _from_resource(container, source["resourceFieldRef"])
    return None


def _env_from(
    store: Store, namespace: str, sources: list[dict[str, Any]]
) -> dict[str, str]:
    found: dict[str, str] = {}
    for source in sources:
        prefix = source.get("prefix", "")
        ref = source.get("secretRef") or source.get("configMapRef") or {}
        data = _secret_data(store, namespace, ref.get("name", ""))
        if "configMapRef" in source:
            data = None
        if data is None and not ref.get("optional"):
            kind = "secret" if "secretRef" in source else "configmap"
            raise ConfigError(f'{kind} "{ref.get("name")}" not found')
        found.update({prefix + k: v for k, v in (data or {}).items()})
    return found


def container_env(
    store: Store, pod: Object, container: dict[str, Any]
) -> dict[str, str]:
    """Return the variables the container itself defines, resolved.

    Raises:
        ConfigError: when a referenced Secret or key is missing and not optional.
    """
    namespace = pod["metadata"]["namespace"]
    variables = _env_from(store, namespace, container.get("envFrom") or [])
    for variable in container.get("env") or []:
        if "valueFrom" in variable:
            value = _value(store, pod, container, variable)
            if value is not None:
                variables[variable["name"]] = value
        else:
            variables[variable["name"]] = expand(variable.get("value", ""), variables)
    return variables


def command_line(
    container: dict[str, Any],
    variables: dict[str, str],
    entrypoints: dict[str, list[str]],
) -> list[str]:
    """Return the argv to run: command (or the image's entrypoint) plus args.

    ``python``, ``python3`` and ``python3.X`` (with any folder, such as
    ``/usr/local/bin/python``) run as this interpreter, so that a pod sees the
    packages of the test's environment.
    """
    command = container.get("command") or entrypoints.get(container["image"], [])
    argv = [expand(part, variables) for part in command + (container.get("args") or [])]
    if argv and _PYTHON.match(os.path.basename(argv[0])):
        argv[0] = sys.executable
    return argv


def inherited_pythonpath() -> str:
    """Return PYTHONPATH so that a pod imports what this process imports.

    The folders on ``sys.path`` outside the interpreter's own installation
    (the project checkout, for one) come first, then any PYTHONPATH already set.
    """
    installed = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)}
    folders = [
        os.path.abspath(entry or os.curdir)
        for entry in sys.path
        if os.path.isdir(entry or os.curdir)
        and not any(
            os.path.realpath(entry or os.curdir).startswith(p) for p in installed
        )
    ]
    inherited = os.environ.get("PYTHONPATH")
    return os.pathsep.join(dict.fromkeys(folders + ([inherited] if inherited else [])))


def process_env(
    variables: dict[str, str], extra: dict[str, str], pod_name: str
) -> dict[str, str]:
    """Return the process environment: ours, the server's extras, the pod's own."""
    base = {**os.environ, "PYTHONPATH": inherited_pythonpath()}
    return {**base, **extra, "HOSTNAME": pod_name, **variables}
