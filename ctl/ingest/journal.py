"""The ingestion journal: which records already landed (or failed for good), so a killed job resumes.

A JSON-lines file next to the catalog. The first line names the target (ranker or store) and the model
version; then one line per record outcome, written only after the ranker acknowledged the stream that
carried it, flushed and fsynced per stream. A record is keyed by product id and a digest of its content
(id, category, metadata, image bytes): the same content is not sent twice, a changed one is sent again.
Each outcome also names the product's category, so that the job can compare what the journal says landed
with what the store holds (`ingested_by_category`): the journal describes the store as it was, and a
store wiped or cut down since is not the one it describes. A torn last line (the process killed while
writing) is ignored on reading.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT = 1


@dataclass(frozen=True)
class Outcome:
    """How one record ended: ingested, or failed with a gRPC status name and a reason."""

    digest: str
    ok: bool
    line: int = 0
    code: str = ""
    reason: str = ""
    category: str = ""  # "" in journals written before categories were recorded


class Journal:
    """Outcomes by product id, loaded from and appended to one file."""

    def __init__(self, path: Path, target: str, model_version: str, *, fresh: bool = False):
        self.path = Path(path)
        self.header = {"journal": FORMAT, "target": target, "model_version": model_version}
        self.outcomes: dict[str, Outcome] = {}
        if not fresh and self.path.exists():
            self._load()
        else:
            self._start()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open; close())

    def _start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.header) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)

    def _load(self) -> None:
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        try:
            header = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            header = {}
        if header != self.header:
            log.warning(
                "journal %s was written for %s; this job writes to %s: starting a new journal",
                self.path,
                {k: header.get(k) for k in ("target", "model_version")},
                {k: self.header[k] for k in ("target", "model_version")},
            )
            self._start()
            return
        for number, line in enumerate(lines[1:], 2):
            try:
                entry = json.loads(line)
                self.outcomes[entry["id"]] = Outcome(
                    entry["digest"],
                    entry["ok"],
                    entry.get("line", 0),
                    entry.get("code", ""),
                    entry.get("reason", ""),
                    entry.get("category", ""),
                )
            except (json.JSONDecodeError, KeyError, TypeError):
                if number != len(lines):
                    log.warning("journal %s line %d unreadable: ignored", self.path, number)

    def get(self, product_id: str) -> Outcome | None:
        return self.outcomes.get(product_id)

    def ingested_by_category(self, catalog: Mapping[str, str]) -> dict[str, int]:
        """How many of `catalog`'s products (id -> category) the journal says landed, per category.
        Products no longer in the catalog do not count, nor one journaled under another category."""
        counts: dict[str, int] = {}
        for product_id, category in catalog.items():
            done = self.outcomes.get(product_id)
            if done is not None and done.ok and done.category in ("", category):
                counts[category] = counts.get(category, 0) + 1
        return counts

    def record(self, entries: list[tuple[str, Outcome]]) -> None:
        """Appends outcomes durably (one write, flush, fsync)."""
        if not entries:
            return
        text = "".join(
            json.dumps({"id": pid, **{k: v for k, v in vars(o).items() if v not in ("", 0) or k == "ok"}})
            + "\n"
            for pid, o in entries
        )
        self._file.write(text)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.outcomes.update(entries)

    def close(self) -> None:
        self._file.close()
