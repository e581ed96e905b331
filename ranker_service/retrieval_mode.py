"""The ways Recommend finds candidates before the exact rerank, named once (DESIGN.md §2).

A module of its own, with nothing to import, so that `ctl`'s parser can offer the choices without loading
the ranking code (numpy, the store).
"""

from __future__ import annotations

from enum import Enum


class RetrievalMode(Enum):
    """How candidates are found before the exact rerank; the values are the names callers use (`ctl
    recommend --mode`). The one list of modes: the API's enum is mapped to it by name (service.py)."""

    POOLED = "pooled"
    EXHAUSTIVE = "exhaustive"
    CERTIFY = "certify"
