"""Builds and runs the ranker: waits for the encoder, opens the store for its model, serves, drains.

Health is NOT_SERVING until the encoder has given its model info and the store is open (both waited for,
up to `startup_timeout_s`: a store still held by the ranker being replaced is opened once it is let go),
and goes back to NOT_SERVING while the encoder's health check or the store's check fails (probed every
`probe_interval_s`), or while either serves another model than the one the catalog was opened for: the
encoder's model info is read again on every probe (an encoder restarted with a new model), and the store's
check reads the collection behind its name (an alias moved to another model's collection). Calls are
refused meanwhile (FAILED_PRECONDITION) by the per-call version checks; the ranker never adopts another
model while it runs: restart it to serve the new one, with its catalog.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlsplit

from ctl.encoding import ModelInfo
from ctl.lifecycle import Service, build_service_server
from ctl.retry import backoff
from ctl.security import (
    READ,
    WRITE,
    SecurityConfigError,
    Tokens,
    channel_credentials,
    is_loopback,
    parse_token,
)
from ctl.serving import Metrics
from ctl.settings import named
from ctl.v1 import ranker_pb2_grpc
from ranker_service.app import RankerApp
from ranker_service.config import ENV_PREFIX, RankerConfig
from ranker_service.encoder_client import EncoderClient
from ranker_service.errors import EncoderUnavailable, RankerError, StoreError, VersionMismatch
from ranker_service.service import SERVICE_NAME, RankerServicer
from ranker_service.store.base import ProductStore
from ranker_service.store.client import open_client_store
from ranker_service.store.edge import open_edge_store

log = logging.getLogger(__name__)
T = TypeVar("T")
STARTUP_BACKOFF_S, STARTUP_BACKOFF_CAP_S = 0.2, 5.0  # the pauses while waiting for a dependency at start-up
PROBE_ERROR_REPEAT_S = 60.0  # a probe that keeps failing (a bug) is logged again at most this often

# The scope each RankerService method needs when tokens are configured.
METHOD_SCOPES = {
    "Recommend": READ,
    "GetCatalogStats": READ,
    "GetProducts": READ,
    "UpsertProducts": WRITE,
    "DeleteProducts": WRITE,
}


def qdrant_credentials(config: RankerConfig) -> tuple[str | None, str | None]:
    """The Qdrant API key (a value or @FILE) and the CA file to verify its TLS certificate with, checked
    at start-up so that a bad setting exits 2 at once."""
    key = parse_token(config.qdrant_api_key, named(ENV_PREFIX, "qdrant_api_key"), foreign=True) or None
    if config.qdrant_tls_ca:
        try:
            ssl.create_default_context(cafile=config.qdrant_tls_ca)
        except (OSError, ssl.SSLError) as exc:
            raise SecurityConfigError(f"qdrant_tls_ca: cannot load {config.qdrant_tls_ca}: {exc}") from exc
    url = urlsplit(config.qdrant_url)
    if key and url.scheme == "http" and not is_loopback(url.hostname or ""):
        log.warning("the Qdrant API key goes in plaintext to %s: use an https:// URL", config.qdrant_url)
    return key, config.qdrant_tls_ca or None


async def open_store(
    config: RankerConfig, info: ModelInfo, qdrant: tuple[str | None, str | None] = (None, None)
) -> ProductStore:
    """The embedded store (default) or a Qdrant server's collection, for the encoder's model version;
    `qdrant` is what `qdrant_credentials` gave."""
    location = config.store_location(info.model_version)
    if config.qdrant_url:
        api_key, tls_ca = qdrant
        return await open_client_store(
            config.qdrant_url,
            info.model_version,
            info.embedding_dim,
            collection=location,
            api_key=api_key,
            verify=tls_ca,
            timeout=config.qdrant_timeout_s,
            shards=config.qdrant_shards or None,
            replication_factor=config.qdrant_replication_factor or None,
        )
    return await open_edge_store(location, info.model_version, info.embedding_dim)


class ProbeErrorLog:
    """How the dependency probe logs a failure of its own (a bug, not a dependency down): the traceback
    once per distinct error (its type and the line that raised it: a message may carry a changing
    detail), then, while the same error persists, one line at most every `repeat_s` seconds saying how
    often it failed since; the next success forgets it, so that a recurrence shows its traceback again."""

    def __init__(self, repeat_s: float = PROBE_ERROR_REPEAT_S, clock: Callable[[], float] = time.monotonic):
        self.repeat_s = repeat_s
        self._clock = clock
        self._error: tuple[str, str, int | None] | None = None
        self._logged_at = 0.0
        self._since = 0  # failures since the last line

    @staticmethod
    def _key(exc: BaseException) -> tuple[str, str, int | None]:
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = (tb.tb_frame.f_code.co_filename, tb.tb_lineno) if tb is not None else ("", None)
        return (type(exc).__qualname__, *where)

    def failed(self, exc: BaseException) -> None:
        now, key = self._clock(), self._key(exc)
        if key != self._error:
            self._error, self._logged_at, self._since = key, now, 0
            log.error("the dependency probe failed", exc_info=exc)
            return
        self._since += 1
        if now - self._logged_at >= self.repeat_s:
            log.error(
                "the dependency probe still fails: %d more times in %.0f s, now: %s: %s",
                self._since,
                now - self._logged_at,
                type(exc).__name__,
                exc,
            )
            self._logged_at, self._since = now, 0

    def succeeded(self) -> None:
        self._error = None


class Ranker(Service):
    """The ranker server and what it owns (encoder client, app, store); its life is
    `ctl.lifecycle.Service`'s."""

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
            # read again when its file changes: the encoder reads its own tokens again too
            token=Tokens(config.encoder_token, named(ENV_PREFIX, "encoder_token"), single=True),
        )
        self.app = RankerApp(config, self.encoder, self.metrics)
        server = build_service_server(
            config,
            service_name=SERVICE_NAME,
            add_servicer=lambda s: ranker_pb2_grpc.add_RankerServiceServicer_to_server(
                RankerServicer(self.app), s
            ),
            metrics=self.metrics,
            scopes={
                READ: Tokens(config.read_tokens, named(ENV_PREFIX, "read_tokens")),
                WRITE: Tokens(config.write_tokens, named(ENV_PREFIX, "write_tokens")),
            },
            method_scopes=METHOD_SCOPES,
        )
        # a bad key file or CA file: exit 2 now, not once the encoder answered
        self._qdrant = qdrant_credentials(config) if config.qdrant_url else (None, None)
        self.store: ProductStore | None = None
        self._probe_log = ProbeErrorLog()
        super().__init__(server, config)

    async def _until_up(
        self, what: str, attempt: Callable[[], Awaitable[T]], transient: type[Exception]
    ) -> T:
        """Runs `attempt` until it stops raising `transient` (backing off 0.2 s up to 5 s), up to
        startup_timeout_s; meanwhile calls are answered UNAVAILABLE with the reason. A dependency that
        starts after us, or a store still held by the ranker we replace, is waited for, not fatal."""
        self.app.waiting_for = what
        timeout = self.config.startup_timeout_s
        deadline = time.monotonic() + timeout if timeout else None
        pauses = backoff(STARTUP_BACKOFF_S, STARTUP_BACKOFF_CAP_S)
        while True:
            try:
                return await attempt()
            except transient as exc:
                pause = next(pauses)
                if deadline is not None and time.monotonic() + pause > deadline:
                    raise type(exc)(f"gave up after {timeout:.0f} s: {exc}") from exc
                self.app.waiting_for = f"{what} ({exc})"
                log.warning("waiting for %s: %s", what, exc)
                await asyncio.sleep(pause)

    async def bring_up(self) -> None:
        """Encoder answered, store opened: SERVING, and the dependency probe starts."""
        encoder = f"the encoder at {self.config.encoder}"
        info = await self._until_up(encoder, self.encoder.model_info, EncoderUnavailable)
        self.store = await self._until_up(
            "the store", lambda: open_store(self.config, info, self._qdrant), StoreError
        )
        await self.app.attach(info, self.store)
        log.info(
            "model %s (%d regions, %d-d) from the encoder at %s; store: %s",
            info.model_version,
            info.regions,
            info.embedding_dim,
            self.config.encoder,
            self.store.description,
        )
        await self.server.set_serving(True)
        self.keep(self._probe_dependencies(self.store, info), name="ranker-probe")

    async def _failing_dependency(self, store: ProductStore, info: ModelInfo) -> str | None:
        """Why the ranker cannot serve now (encoder or store down, or either on another model than `info`,
        the one the catalog was opened for), or None."""
        timeout = min(2.0, self.config.probe_interval_s)
        if not await self.encoder.serving(timeout=timeout):
            return f"the encoder at {self.config.encoder} is not serving"
        try:
            now = await self.encoder.model_info(timeout)
        except RankerError as exc:
            return f"the encoder at {self.config.encoder} did not give its model info: {exc}"

        def served(i: ModelInfo) -> tuple[str, int, int]:
            return i.model_version, i.regions, i.embedding_dim

        if served(now) != served(info):
            return (
                f"the encoder at {self.config.encoder} now serves model {now.model_version} ({now.regions} "
                f"regions, {now.embedding_dim}-d), but this ranker's catalog ({store.description}) holds "
                f"model {info.model_version} ({info.regions} regions, {info.embedding_dim}-d); calls are "
                "refused (FAILED_PRECONDITION): restart the ranker to serve the new model with its own "
                "catalog, or bring back the encoder of the old one"
            )
        try:
            await asyncio.wait_for(store.check(), timeout=max(2.0, self.config.qdrant_timeout_s))
        except VersionMismatch as exc:
            return f"the store now holds another model's vectors: {exc}"
        except (StoreError, TimeoutError) as exc:
            return f"the store is not serving: {exc or 'no answer in time'}"
        return None

    async def _probe_dependencies(self, store: ProductStore, info: ModelInfo) -> None:
        """Readiness follows the encoder and the store (liveness does not: a restart would not help). Each
        new reason for NOT_SERVING is logged once, when it changes (an encoder that was down, then serves
        another model: on-call must read the reason of now), not on every probe."""
        serving, reason = True, None
        while True:
            await asyncio.sleep(self.config.probe_interval_s)
            try:
                failing = await self._failing_dependency(store, info)
                self._probe_log.succeeded()
            except Exception as exc:  # a bug must not end the probe with health stuck where it was
                self._probe_log.failed(exc)
                failing = f"the dependency probe fails ({type(exc).__name__}, logged above)"
            if failing != reason:
                reason = failing
                log.warning(
                    "%s: %s",
                    failing or "the encoder and the store are back",
                    "NOT_SERVING" if failing else "SERVING",
                )
            if (failing is None) != serving:
                serving = failing is None
                await self.server.set_serving(serving)

    async def close(self) -> None:
        """Releases what `bring_up` opened (after the gRPC server stopped)."""
        await self.app.close()
        if self.store is not None:
            await self.store.close()
        await self.encoder.close()


async def run(config: RankerConfig, stop: asyncio.Event | None = None) -> None:
    """`ctl serve-ranker`: serve until SIGTERM/SIGINT (or `stop`), then drain and close."""
    await Ranker(config).run(stop)
