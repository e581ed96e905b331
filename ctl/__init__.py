"""ctl: Complete The Look, scene-based complementary product recommendation.

This package is the foundation every other part builds on (docs/ARCHITECTURE.md): the generated API
(`ctl.v1`), the wire form of embeddings (`ctl.tensors`), the serving parts both services share
(`ctl.serving`, `ctl.security`, `ctl.settings`) and small helpers. It imports nothing of the model package,
the services or the application (`ctl_app`); a linter contract in pyproject.toml keeps it so.
"""
