"""Memory quantities as Kubernetes writes them (``512Mi``, ``2Gi``, ``1G``)."""

from __future__ import annotations

import re

from jobrunner.errors import InvalidInput

__all__ = ["memory_bytes"]

_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_UNITS |= {"k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "": 1}
_QUANTITY = re.compile(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|K|M|G|T)?")


def memory_bytes(quantity: str) -> int:
    """Return the bytes of a memory quantity.

    Raises:
        InvalidInput: The quantity is not a number with an optional unit.
    """
    match = _QUANTITY.fullmatch(quantity.strip())
    if not match:
        raise InvalidInput(
            f"invalid memory quantity {quantity!r}: use e.g. 512Mi or 2Gi"
        )
    return int(float(match[1]) * _UNITS[match[2] or ""])
