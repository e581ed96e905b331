"""Bulk ingestion of product catalogs into the ranker (`ctl ingest`): no torch unless `--embedded`."""
