"""The ingestion journal: which records already landed (or failed for good), so a killed job resumes.

A JSON-lines file next to the catalog. The first line names the target (ranker or store) and the model
version; then one line per record outcome, written only after the ranker acknowledged the stream that
carried it, flushed and fsynced per stream. A record is keyed by product id and a digest of its content
(id, category, metadata, image bytes): the same content is not sent twice, a changed one is sent again.
An ingested record also keeps the digest of its listing (id, category, metadata: what the store returns
for it, GetProducts), so that the job can check that the store still holds each product as it landed
(`ingested`): the journal describes the store as it was, and a store wiped, restored from an older copy or
cut down since is not the one it describes. A torn last line (the process killed while writing) is
ignored on reading.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
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
    listing: str = ""  # of an ingested record: digest of its id, category and metadata ("" in older journals)


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
        except (ValueError, RecursionError):  # JSONDecodeError, a 5,000-digit number, deep nesting
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
                    entry.get("listing", ""),
                )
            except (ValueError, RecursionError, KeyError, TypeError):
                if number != len(lines):
                    log.warning("journal %s line %d unreadable: ignored", self.path, number)

    def get(self, product_id: str) -> Outcome | None:
        return self.outcomes.get(product_id)

    def ingested(self, product_ids: Iterable[str]) -> dict[str, str]:
        """Those of `product_ids` the journal says landed, in that order, with their listing digests ("" where
        an older journal did not record it)."""
        outcomes = self.outcomes
        return {
            pid: done.listing for pid in product_ids if (done := outcomes.get(pid)) is not None and done.ok
        }

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
