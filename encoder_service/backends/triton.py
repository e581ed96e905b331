"""The Triton backend: the same exported encoders, served by a Triton Inference Server (GPU) over gRPC.

The contract is the model config `ctl export` writes (`ctl.encoder_contract`, DESIGN.md §2): the two
encoders' tensors, batch first, and the model version in the config's `parameters`. Input size, regions
and embedding size are read from that config, so the service needs no local copy of the model. One
`tritonclient.grpc.aio` client per backend (one backend per process), reused, with `client_timeout` on
every call; tritonclient's errors become BackendUnavailable with the cause kept.

The model can change under a running encoder: Triton restarted or reloaded with another repository. The
version read at start is what this process labels its vectors with (and what GetModelInfo told the
ranker that chose its catalog by it), so it is checked where it can change: every readiness probe reads
both configs again, and every inference batch is confirmed by a config read sent after its answer came
(batches that finish together share one read). Triton loads a model's config and weights together, so a
batch answered by another model is followed by a read that shows its config (short of a change and a
change back between the two). A config that differs (version, tensors, max batch) makes the backend
refuse: ModelChanged (FAILED_PRECONDITION) from every call and `info`, and `ready()` False, until Triton
serves the started model again. Adopting the new model instead would relabel a running service under
its callers, whose catalogs were made by the old one: restart the encoder to serve the new model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from ctl import encoder_contract as contract
from ctl.encoding import ModelInfo
from encoder_service.backends.base import (
    EncoderBackend,
    ProductOutputs,
    SceneOutputs,
    check_images,
    check_outputs,
    encoder_specs,
    in_chunks,
)
from encoder_service.errors import BackendUnavailable, ModelChanged

log = logging.getLogger(__name__)

SCENE, PRODUCT = contract.SCENE_ENCODER, contract.PRODUCT_ENCODER


class TritonBackend(EncoderBackend):
    """Both encoders on a Triton server at `url` ("host:8001"); `timeout_s` bounds every call.

    `model_repo`, when it holds the exported `model_info.json` of the same model version, supplies the
    model's full config for GetModelInfo (Triton's config carries only the version)."""

    name = "triton"

    def __init__(self, url: str, timeout_s: float, model_repo: Path | str | None = None):
        self.url = url
        self.timeout_s = timeout_s
        self.model_repo = Path(model_repo) if model_repo is not None else None
        self._client: Any = None
        self._info: ModelInfo | None = None
        self._max_batch = 0
        self._contracts: dict[str, tuple] = {}  # per model: what its config promised at start
        self._changed = ""  # why the backend refuses (the model changed under it), or ""
        self._next_check: dict[str, asyncio.Task] = {}  # per model: the config read not yet sent

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """tritonclient (and grpc) errors -> BackendUnavailable naming the server and the step."""
        from tritonclient.utils import InferenceServerException

        try:
            yield
        except InferenceServerException as exc:
            raise BackendUnavailable(f"Triton at {self.url}: {what}: {exc}") from exc
        except (grpc.RpcError, grpc.aio.UsageError) as exc:  # raised past tritonclient (closed channel)
            raise BackendUnavailable(f"Triton at {self.url}: {what}: {type(exc).__name__}: {exc}") from exc

    async def start(self) -> None:
        try:
            from tritonclient.grpc import aio as triton_aio
        except ImportError as exc:
            raise BackendUnavailable(
                "backend triton needs tritonclient[grpc]: pip install 'ctl[triton]'"
            ) from exc
        if self._client is None:
            # created here, inside the running event loop that will use it
            self._client = triton_aio.InferenceServerClient(url=self.url)
        for model in (SCENE, PRODUCT):
            with self._errors(f"is model {model} ready"):
                ready = await self._client.is_model_ready(model, client_timeout=self.timeout_s)
            if not ready:
                raise BackendUnavailable(f"Triton at {self.url}: model {model} is not loaded or not ready")
        configs = {model: await self._config(model) for model in (SCENE, PRODUCT)}
        self._info, self._max_batch = self._read_configs(configs[SCENE], configs[PRODUCT])
        self._contracts = {model: _contract(config) for model, config in configs.items()}
        self._changed = ""
        log.info(
            "Triton at %s serves model version %s: %d px, %d regions, %d-d, max batch %d",
            self.url,
            self._info.model_version,
            self._info.input_size,
            self._info.regions,
            self._info.embedding_dim,
            self._max_batch,
        )

    async def _config(self, model: str) -> Any:
        """The config Triton serves `model` with now (model_config_pb2.ModelConfig)."""
        if self._client is None:
            raise BackendUnavailable(f"Triton at {self.url}: the client is closed")
        with self._errors(f"get the config of {model}"):
            return (await self._client.get_model_config(model, client_timeout=self.timeout_s)).config

    def _check_served(self, model: str, config: Any) -> None:
        """ModelChanged (remembered: every call refuses) unless `config` is the one `model` had at start."""
        if self._info is None or _contract(config) == self._contracts[model]:
            return
        old, new = self._info.model_version, _parameter(config, contract.VERSION_PARAMETER)
        if new != old:
            what = f"model version {new!r}" if new else "a model without a model_version parameter"
        else:
            what = f"another config (tensors or max_batch_size) under the same model version {old!r}"
        why = (
            f"Triton at {self.url} now serves {model} as {what}, but this encoder started with model "
            f"version {old!r} and labels its vectors with it; it refuses to encode until Triton serves "
            f"{old!r} again. To serve the new model, restart the encoder (it adopts what Triton serves) "
            "and serve it with a catalog ingested by that model (a new collection or store)"
        )
        if why != self._changed:
            log.error("%s", why)
            self._changed = why
        raise ModelChanged(why)

    async def _confirm(self, model: str) -> None:
        """Raises ModelChanged unless a config read sent after this call reached here shows the model
        this process started with. Batches that finish before a read is sent share it."""
        task = self._next_check.get(model)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._check_once(model))
            task.add_done_callback(_retrieved)  # every waiter may have been cancelled
            self._next_check[model] = task
        await asyncio.shield(task)

    async def _check_once(self, model: str) -> None:
        if self._next_check.get(model) is asyncio.current_task():
            del self._next_check[model]  # sent from now on: later batches need the next read
        self._check_served(model, await self._config(model))

    def _read_configs(self, scene: Any, product: Any) -> tuple[ModelInfo, int]:
        """ModelInfo and the max batch from the two model configs (model_config_pb2.ModelConfig)."""
        versions = {
            m: _parameter(c, contract.VERSION_PARAMETER) for m, c in ((SCENE, scene), (PRODUCT, product))
        }
        if not versions[SCENE] or versions[SCENE] != versions[PRODUCT]:
            raise BackendUnavailable(
                f"Triton at {self.url}: model versions {versions} (config parameter model_version) are "
                "missing or differ; load both encoders from one `ctl export`"
            )
        size = _input_size(scene, SCENE)
        if _input_size(product, PRODUCT) != size:
            raise BackendUnavailable(
                f"Triton at {self.url}: {SCENE} and {PRODUCT} take different input sizes"
            )
        outputs = _output_dims(scene, SCENE, contract.SCENE_OUTPUTS)
        product_outputs = _output_dims(product, PRODUCT, contract.PRODUCT_OUTPUTS)
        # the scene's global embedding gives D, its local embeddings R: the rest must follow from them
        global_dims, local_dims = outputs[contract.SCENE_OUTPUTS[0]], outputs[contract.SCENE_OUTPUTS[1]]
        embedding_dim = global_dims[0] if len(global_dims) == 1 else 0
        regions = local_dims[0] if len(local_dims) == 2 else 0
        grid = math.isqrt(regions)
        specs = contract.encoders(size, regions, embedding_dim)
        expected = {t.name: list(t.dims) for t in specs[SCENE].outputs}
        if not embedding_dim or grid * grid != regions or outputs != expected:
            raise BackendUnavailable(
                f"Triton at {self.url}: {SCENE} outputs {outputs} do not match {expected}"
            )
        if product_outputs != {t.name: list(t.dims) for t in specs[PRODUCT].outputs}:
            raise BackendUnavailable(
                f"Triton at {self.url}: {PRODUCT} outputs {product_outputs} are not [{embedding_dim}]"
            )
        max_batch = min(int(scene.max_batch_size), int(product.max_batch_size))
        if max_batch < 1:
            raise BackendUnavailable(f"Triton at {self.url}: the encoders need max_batch_size > 0 (batching)")
        config = _parameter(scene, contract.CONFIG_PARAMETER)
        model_config = json.loads(config) if config else self._local_model_config(versions[SCENE])
        info = ModelInfo(
            model_version=versions[SCENE],
            input_size=size,
            grid=grid,
            regions=regions,
            embedding_dim=embedding_dim,
            backend=self.name,
            model_config=model_config,
        )
        return info, max_batch

    def _local_model_config(self, version: str) -> dict[str, Any]:
        path = self.model_repo / contract.MODEL_INFO_FILE if self.model_repo is not None else None
        if path is None or not path.is_file():
            return {}
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s: %s", path, exc)
            return {}
        if summary.get("model_version") != version:
            log.warning(
                "%s is model version %s, Triton serves %s", path, summary.get("model_version"), version
            )
            return {}
        return dict(summary.get("config") or {})

    @property
    def info(self) -> ModelInfo:
        """The model served since start; ModelChanged while Triton serves another one."""
        if self._info is None:
            raise BackendUnavailable(f"Triton at {self.url}: not connected yet")
        if self._changed:
            raise ModelChanged(self._changed)
        return self._info

    async def _infer(self, spec: contract.EncoderSpec, images: np.ndarray) -> tuple[np.ndarray, ...]:
        from tritonclient.grpc import InferInput, InferRequestedOutput

        if self._client is None:
            raise BackendUnavailable(f"Triton at {self.url}: the client is closed")
        with self._errors(f"infer {spec.name}"):
            tensor = InferInput(spec.input.name, list(images.shape), spec.input.dtype)
            tensor.set_data_from_numpy(images)
            result = await self._client.infer(
                spec.name,
                [tensor],
                outputs=[InferRequestedOutput(t.name) for t in spec.outputs],
                client_timeout=self.timeout_s,
            )
        await self._confirm(spec.name)  # the answer is the started model's, not a newly loaded one's
        return tuple(result.as_numpy(t.name) for t in spec.outputs)

    async def encode_scenes(self, images: np.ndarray) -> SceneOutputs:
        return await self._encode(SCENE, images)  # type: ignore[return-value]

    async def encode_products(self, images: np.ndarray) -> ProductOutputs:
        return await self._encode(PRODUCT, images)  # type: ignore[return-value]

    async def _encode(self, model: str, images: np.ndarray) -> tuple[np.ndarray, ...]:
        info = self.info
        images = check_images(images, info.input_size)
        spec = encoder_specs(info)[model]

        async def forward(chunk: np.ndarray) -> tuple[np.ndarray, ...]:
            arrays = await self._infer(spec, chunk)
            return check_outputs(arrays, spec, len(chunk), f"Triton {model}")

        return await in_chunks(images, self._max_batch, forward)

    async def ready(self) -> bool:
        """Both models ready, and still the ones this process started with (configs read again)."""
        if self._client is None or self._info is None:
            return False
        try:
            with self._errors("readiness"):
                for model in (SCENE, PRODUCT):
                    if not await self._client.is_model_ready(model, client_timeout=self.timeout_s):
                        return False
            configs = {model: await self._config(model) for model in (SCENE, PRODUCT)}
        except BackendUnavailable as exc:
            log.warning("%s", exc)
            return False
        try:
            for model, config in configs.items():
                self._check_served(model, config)
        except ModelChanged:
            return False
        if self._changed:
            version = self._info.model_version
            log.warning("Triton at %s serves model version %s again: encoding resumes", self.url, version)
            self._changed = ""
        return True

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


def _retrieved(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()  # retrieved here: a waiter that was cancelled no longer can


def _contract(config: Any) -> tuple:
    """What a model config promises the encoder: model version, tensors and max batch (not instances,
    batching delays or other tuning, which may change under the same model)."""
    return (
        _parameter(config, contract.VERSION_PARAMETER),
        tuple((t.name, t.data_type, tuple(t.dims)) for t in config.input),
        tuple((t.name, t.data_type, tuple(t.dims)) for t in config.output),
        int(config.max_batch_size),
    )


def _parameter(config: Any, key: str) -> str:
    return config.parameters[key].string_value if key in config.parameters else ""


def _data_type(dtype: str) -> int:
    """The model_config_pb2.DataType value of a contract dtype ("UINT8")."""
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Value(contract.triton_type(dtype))


def _input_size(config: Any, model: str) -> int:
    name, dtype = contract.INPUT, contract.INPUT_DTYPE
    inputs = {i.name: i for i in config.input}
    spec = inputs.get(name)
    dims = list(spec.dims) if spec is not None else []
    if spec is None or spec.data_type != _data_type(dtype) or len(dims) != 3 or dims[2] != 3:
        raise BackendUnavailable(
            f"Triton {model}: expected input {name} {dtype} [S, S, 3], got {list(inputs)}"
        )
    if dims[0] != dims[1] or dims[0] < 1:
        raise BackendUnavailable(f"Triton {model}: input {name} dims {dims} are not a square image")
    return int(dims[0])


def _output_dims(config: Any, model: str, names: tuple[str, ...]) -> dict[str, list[int]]:
    dtype = contract.OUTPUT_DTYPE
    found = {o.name: o for o in config.output}
    missing = [n for n in names if n not in found or found[n].data_type != _data_type(dtype)]
    if missing:
        raise BackendUnavailable(
            f"Triton {model}: expected {dtype} outputs {list(names)}, missing or not {dtype} {missing}"
        )
    return {n: [int(d) for d in found[n].dims] for n in names}
