"""The errors of the Triton CPU tool: each message says what failed and what to do."""

from __future__ import annotations


class TritonCpuError(RuntimeError):
    """Something this tool needs failed; the message says what and what to do."""


class NotSetUpError(TritonCpuError):
    """The home is not (or no longer) set up, and setup was told not to install."""
