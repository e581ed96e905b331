"""The encoder server: config -> backend -> EncoderApp -> servicer -> grpc server, and its life.

`Encoder(config)` (built on the event loop that will serve it) is bound, not started, so tests can read the
port before anything runs; its life is `ctl.lifecycle.Service`'s: the gRPC port opens at once (health
NOT_SERVING), the backend loads and answers a warm-up forward pass, then health turns SERVING; on SIGTERM
(or `stop`) health turns NOT_SERVING, in-flight calls get `grace_s` to finish, then batchers and backend
close. A watcher keeps health in step with the backend (a Triton that goes away, or now serves another
model than the one the encoder started with, turns the service NOT_SERVING).
"""

from __future__ import annotations

import asyncio
import logging

from ctl.lifecycle import Service, build_service_server
from ctl.security import Tokens
from ctl.serving import Metrics, Server
from ctl.settings import named
from ctl.v1 import encoder_pb2_grpc
from encoder_service.app import EncoderApp
from encoder_service.backends import make_backend
from encoder_service.config import ENV_PREFIX, EncoderConfig
from encoder_service.errors import BackendUnavailable, ModelChanged
from encoder_service.service import SERVICE_NAME, EncoderServicer

log = logging.getLogger(__name__)

HEALTH_POLL_S = 5.0


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


class Encoder(Service):
    """The encoder server and its app (backend, batchers); `health_poll_s`: how often the watcher asks the
    backend whether it is ready."""

    def __init__(self, config: EncoderConfig, *, health_poll_s: float = HEALTH_POLL_S):
        self.config = config
        self.health_poll_s = health_poll_s
        metrics = Metrics(SERVICE_NAME)
        self.app = EncoderApp(config, make_backend(config), metrics)
        server = build_service_server(
            config,
            service_name=SERVICE_NAME,
            add_servicer=lambda s: encoder_pb2_grpc.add_EncoderServiceServicer_to_server(
                EncoderServicer(self.app), s
            ),
            metrics=metrics,
            scopes={"encode": Tokens(config.tokens, named(ENV_PREFIX, "tokens"))},
        )
        super().__init__(server, config)

    async def bring_up(self) -> None:
        """The model loaded and warmed up: SERVING, and the backend watcher starts. Raises
        BackendUnavailable if the model cannot be served."""
        await self.app.start()
        await self.server.set_serving(True)
        self.keep(_watch_backend(self.server, self.app, self.health_poll_s), name="encoder-health")

    async def close(self) -> None:
        await self.app.close()


async def run(config: EncoderConfig, *, stop: asyncio.Event | None = None) -> None:
    """`ctl serve-encoder`: builds and serves the encoder until SIGTERM/SIGINT or `stop`."""
    await Encoder(config).run(stop)
