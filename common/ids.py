"""Item ids become file names and object keys, so only a safe alphabet is accepted."""

from __future__ import annotations

import re

from .errors import InvalidItemId

ITEM_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def check_item_id(item_id: object) -> str:
    """Return ``item_id`` if it is safe to use as a file name / object key, else raise `InvalidItemId`.

    Allowed: letters, digits, ``.``, ``_``, ``-``; 1–128 characters; not ``.`` or ``..``.
    """
    if not isinstance(item_id, str) or not ITEM_ID_PATTERN.fullmatch(item_id) or set(item_id) == {"."}:
        raise InvalidItemId(
            f"item_id {item_id!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-' (no path separators)"
        )
    return item_id
