"""The field statuses, named once. A leaf module: the classifier, store, loop, CLI and web all import it.

`Status` is a `StrEnum`, so a member compares equal to its string, is stored in SQLite and written to JSON as
that string, and the store's CHECK constraint and the page's JavaScript keep using "ok"/"retake"/"refer".
"""
from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    OK = "ok"  # classified: a label, or an ALL alert
    RETAKE = "retake"  # image quality: never classified, the reason says what to fix
    REFER = "refer"  # classified but not trusted (out of distribution, or no confident label)


STATUSES: tuple[str, ...] = tuple(s.value for s in Status)
