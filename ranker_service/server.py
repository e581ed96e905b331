"""Builds and runs the ranker: waits for the encoder, opens the store for its model, serves, drains.

Health is NOT_SERVING until the encoder has given its model info and the store is open, and goes back
to NOT_SERVING while the encoder's own health check fails (probed every `probe_interval_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from ctl.security import (
    READ,
    WRITE,
    TokenAuth,
    channel_credentials,
    parse_token,
    parse_tokens,
    server_credentials,
)
from ctl.serving import Metrics, Server, build_server, serve_forever
from ctl.v1 import ranker_pb2_grpc
from ranker_service.config import RankerConfig
from ranker_service.encoder_client import EncoderClient, ModelInfo
from ranker_service.errors import EncoderUnavailable
from ranker_service.service import SERVICE_NAME, RankerApp, RankerServicer
from ranker_service.store import ProductStore, open_client_store, open_edge_store

log = logging.getLogger(__name__)

# The scope each RankerService method needs when tokens are configured.
METHOD_SCOPES = {"Recommend": READ, "GetCatalogStats": READ, "UpsertProducts": WRITE, "DeleteProducts": WRITE}


async def open_store(config: RankerConfig, info: ModelInfo) -> ProductStore:
    """The embedded store (default) or a Qdrant server's collection, for the encoder's model version."""
    location = config.store_location(info.model_version)
    if config.qdrant_url:
        return await open_client_store(
            config.qdrant_url,
            info.model_version,
            info.dim,
            collection=location,
            api_key=config.qdrant_api_key or None,
            timeout=config.qdrant_timeout_s,
            shards=config.qdrant_shards or None,
            replication_factor=config.qdrant_replication_factor or None,
        )
    return await open_edge_store(location, info.model_version, info.dim)


class Ranker:
    """A built ranker server and what it owns; `start()` brings it to SERVING, `stop()` drains it."""

    def __init__(self, config: RankerConfig):
        self.config = config
        self.metrics = Metrics(SERVICE_NAME)
        self.encoder = EncoderClient(
            config.encoder,
            config.encoder_timeout_s,
            config.max_message_bytes,
            products_timeout=config.encoder_products_timeout_s,
            credentials=channel_credentials(
                config.encoder_tls_ca, config.encoder_tls_cert, config.encoder_tls_key
            ),
            token=parse_token(config.encoder_token, "encoder_token"),
        )
        self.app = RankerApp(config, self.encoder, self.metrics)
        auth = TokenAuth(
            {
                READ: parse_tokens(config.read_tokens, "read_tokens"),
                WRITE: parse_tokens(config.write_tokens, "write_tokens"),
            },
            METHOD_SCOPES,
            protect_open=config.protect_health,
        )
        self.server: Server = build_server(
            service_names=(SERVICE_NAME,),
            add_servicers=lambda s: ranker_pb2_grpc.add_RankerServiceServicer_to_server(
                RankerServicer(self.app), s
            ),
            address=f"{config.host}:{config.port}",
            metrics=self.metrics,
            max_message_bytes=config.max_message_bytes,
            max_concurrent_calls=config.max_concurrent_calls,
            auth=auth if auth.enabled else None,
            credentials=server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca),
            health_address=f"{config.host}:{config.health_port}" if config.health_port >= 0 else None,
        )
        self.store: ProductStore | None = None
        self._probe: asyncio.Task | None = None

    @property
    def port(self) -> int:
        return self.server.port

    async def _model_info(self) -> ModelInfo:
        """Asks the encoder until it answers (it may start after us), up to startup_timeout_s."""
        deadline = time.monotonic() + self.config.startup_timeout_s if self.config.startup_timeout_s else None
        delay = 0.2
        while True:
            try:
                return await self.encoder.model_info()
            except EncoderUnavailable as exc:
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise EncoderUnavailable(
                        f"gave up after {self.config.startup_timeout_s:.0f} s: {exc}"
                    ) from exc
                log.warning("waiting for the encoder: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def start(self) -> None:
        """Starts serving (for tests and embedding; `run` is the command's lifecycle)."""
        await self.server.begin()
        await self.server.start()
        await self.bring_up()

    async def bring_up(self) -> None:
        """Encoder answered, store opened: SERVING, and the encoder probe starts."""
        info = await self._model_info()
        self.store = await open_store(self.config, info)
        self.app.attach(info, self.store)
        log.info(
            "model %s (%d regions, %d-d) from the encoder at %s; store: %s",
            info.model_version,
            info.regions,
            info.dim,
            self.config.encoder,
            self.store.description,
        )
        await self.server.set_serving(True)
        self._probe = asyncio.create_task(self._probe_encoder())

    async def _probe_encoder(self) -> None:
        serving = True
        while True:
            await asyncio.sleep(self.config.probe_interval_s)
            ok = await self.encoder.serving(timeout=min(2.0, self.config.probe_interval_s))
            if ok != serving:
                log.warning("encoder at %s is %s", self.config.encoder, "back" if ok else "not serving")
                await self.server.set_serving(ok)
                serving = ok

    async def close(self) -> None:
        """Releases what `start` opened (after the gRPC server stopped)."""
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        if self.store is not None:
            await self.store.close()
        await self.encoder.close()

    async def stop(self, grace: float | None = None) -> None:
        await self.server.set_serving(False)
        await self.server.health.enter_graceful_shutdown()
        await self.server.stop(self.config.grace_s if grace is None else grace)
        await self.close()


async def run(config: RankerConfig, stop: asyncio.Event | None = None) -> None:
    """`ctl serve-ranker`: serve until SIGTERM/SIGINT (or `stop`), then drain and close."""
    ranker = Ranker(config)
    if config.metrics_port >= 0:
        port = ranker.metrics.serve_http(config.host.strip("[]"), config.metrics_port)
        log.info("metrics on http://%s:%d/metrics", config.host, port)
    try:
        await serve_forever(
            ranker.server, grace=config.grace_s, on_start=ranker.bring_up, on_stop=ranker.close, stop=stop
        )
    finally:
        await asyncio.to_thread(ranker.metrics.stop_http)
