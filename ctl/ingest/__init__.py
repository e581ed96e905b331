"""Bulk ingestion of product catalogs into the ranker (`ctl ingest`): no torch unless `--embedded`."""

from ctl.ingest.catalog import CatalogError, CatalogRecord, read_catalog
from ctl.ingest.job import Failure, IngestConfig, Summary, format_summary, ingest

__all__ = [
    "CatalogError",
    "CatalogRecord",
    "Failure",
    "IngestConfig",
    "Summary",
    "format_summary",
    "ingest",
    "read_catalog",
]
