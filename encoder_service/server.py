"""Building and running the encoder server.

`build` wires config -> backend -> EncoderApp -> servicer -> grpc server (bound, not started), so tests
can read the port before anything runs. `serve` starts it: the gRPC port opens at once (health NOT_SERVING),
the backend loads and answers a warm-up forward pass, then health turns SERVING; on SIGTERM (or `stop`)
health turns NOT_SERVING, in-flight calls get `grace_s` to finish, then batchers and backend close.
A watcher keeps health in step with the backend (a Triton that goes away, or now serves another model than
the one the encoder started with, turns the service NOT_SERVING).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

from ctl.security import Tokens, server_credentials, token_auth, warn_unauthenticated
from ctl.serving import Metrics, Server, build_server, serve_forever
from ctl.settings import named
from ctl.v1 import encoder_pb2_grpc
from encoder_service.app import EncoderApp
from encoder_service.backends import make_backend
from encoder_service.config import ENV_PREFIX, EncoderConfig
from encoder_service.errors import BackendUnavailable, ModelChanged
from encoder_service.service import SERVICE_NAME, EncoderServicer

log = logging.getLogger(__name__)

HEALTH_POLL_S = 5.0


async def build(config: EncoderConfig) -> tuple[Server, EncoderApp]:
    """The server bound to `config.address` (port 0: read `Server.port`) and its app; nothing started."""
    metrics = Metrics(SERVICE_NAME)
    app = EncoderApp(config, make_backend(config), metrics)
    scopes = {"encode": Tokens(config.tokens, named(ENV_PREFIX, "tokens"))}
    auth = token_auth(scopes, {}, protect_open=config.protect_health)
    server = build_server(
        service_names=(SERVICE_NAME,),
        add_servicers=lambda s: encoder_pb2_grpc.add_EncoderServiceServicer_to_server(
            EncoderServicer(app), s
        ),
        address=config.address,
        metrics=metrics,
        max_message_bytes=config.max_message_bytes,
        max_concurrent_calls=config.max_concurrent_calls,
        auth=auth,
        credentials=server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca),
        health_address=f"{config.address.rsplit(':', 1)[0]}:{config.health_port}"
        if config.health_port >= 0
        else None,
    )
    if auth is None:
        server.notices.append(
            functools.partial(warn_unauthenticated, scopes, service=SERVICE_NAME, host=config.host)
        )
    return server, app


def _why_not_ready(app: EncoderApp) -> str:
    """The backend's own reason when it refuses a model that changed under it, else the plain one."""
    try:
        app.backend.info  # noqa: B018 - the property raises the reason
    except ModelChanged as exc:
        return str(exc)
    except BackendUnavailable:
        pass
    return "the backend is not ready"


async def _watch_backend(server: Server, app: EncoderApp, interval: float) -> None:
    """Keeps health in step with the backend (`ready()` every `interval` seconds)."""
    serving = True
    while True:
        await asyncio.sleep(interval)
        try:
            ready = await app.backend.ready()
        except Exception:
            log.exception("the backend's readiness check failed")
            ready = False
        if ready != serving:
            state = "SERVING: the backend answers again" if ready else f"NOT_SERVING: {_why_not_ready(app)}"
            log.warning("health %s", state)
            await server.set_serving(ready)
            serving = ready


async def serve(
    server: Server,
    app: EncoderApp,
    *,
    stop: asyncio.Event | None = None,
    health_poll_s: float = HEALTH_POLL_S,
) -> None:
    """Runs a built server until SIGTERM/SIGINT or `stop` is set; raises BackendUnavailable if the model
    cannot be served at start."""
    config = app.config
    watcher: asyncio.Task | None = None
    if config.metrics_port >= 0:
        port = server.metrics.serve_http(config.host.strip("[]"), config.metrics_port)
        log.info("metrics on http://%s:%d/metrics", config.host, port)

    async def on_start() -> None:
        nonlocal watcher
        await app.start()
        await server.set_serving(True)
        watcher = asyncio.create_task(_watch_backend(server, app, health_poll_s), name="encoder-health")

    async def on_stop() -> None:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await app.close()

    try:
        await serve_forever(server, grace=config.grace_s, on_start=on_start, on_stop=on_stop, stop=stop)
    finally:
        await asyncio.to_thread(server.metrics.stop_http)  # joins the HTTP thread (up to 0.5 s)


async def run(config: EncoderConfig, *, stop: asyncio.Event | None = None) -> None:
    """Builds and serves the encoder (`ctl serve-encoder`) until SIGTERM/SIGINT or `stop`."""
    server, app = await build(config)
    await serve(server, app, stop=stop)
