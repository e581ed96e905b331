"""The encoder and the ranker run inside this process, on loopback: `ctl ingest --embedded` and `ctl demo`.

The same servers as `ctl serve-encoder` / `ctl serve-ranker` (in-process TorchScript, embedded Qdrant),
started on the running event loop without their signal handling (`ctl.lifecycle.Service.start`/`stop`), so
that the caller owns their life.
Needs the `model` extra (torch), which the ranker alone never does.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
STORE_WAIT_S = 1.0  # a store held by another process: say so after a second (a command, not a service)


@dataclass(frozen=True)
class LocalServices:
    encoder_address: str
    ranker_address: str
    store_path: str


@contextlib.asynccontextmanager
async def local_services(
    model_repo: Path,
    store_path: str,
    *,
    host: str = "127.0.0.1",
    encoder_port: int = 0,
    ranker_port: int = 0,
    grace_s: float = 5.0,
) -> AsyncIterator[LocalServices]:
    """Encoder (TorchScript from `model_repo`) and ranker (embedded store at `store_path`, where
    `{model_version}` is replaced), both SERVING when this yields; drained and closed on exit."""
    from encoder_service.config import EncoderConfig
    from encoder_service.server import Encoder
    from ranker_service.config import RankerConfig
    from ranker_service.server import Ranker

    encoder = Encoder(
        EncoderConfig(model_repo=Path(model_repo), host=host, port=encoder_port, metrics_port=-1)
    )
    await encoder.start()  # stops itself if it cannot come up
    ranker = None
    try:
        encoder_address = f"{host}:{encoder.port}"
        config = RankerConfig(
            host=host,
            port=ranker_port,
            metrics_port=-1,
            encoder=encoder_address,
            store_path=store_path,
            startup_timeout_s=STORE_WAIT_S,
        )
        starting = Ranker(config)
        await starting.start()  # stops itself if it cannot come up
        ranker = starting
        assert ranker.store is not None
        location = ranker.store.description
        log.info("local encoder on %s, ranker on %s:%d (%s)", encoder_address, host, ranker.port, location)
        yield LocalServices(encoder_address, f"{host}:{ranker.port}", location)
    finally:
        if ranker is not None:
            await ranker.stop(grace=grace_s)
        await encoder.stop(grace=grace_s)
