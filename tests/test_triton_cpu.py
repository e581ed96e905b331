"""The exported Triton repository: its configs against the TorchScript modules (DESIGN.md §2), and a real
Triton server (tools/triton_cpu: the nvidia-pytriton wheel's tritonserver 2.51 on this CPU) serving
its CPU twin - the same configs and model.pt files behind the Python backend instead of libtorch.

The server tests need `make triton-cpu` first (nothing is downloaded during tests)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from ctl import encoder_contract as contract
from tools.triton_cpu.errors import NotSetUpError, TritonCpuError
from tools.triton_cpu.home import TRITONSERVER_VERSION, TritonHome, default_home
from tools.triton_cpu.install import setup
from tools.triton_cpu.server import TritonProcess, start
from tools.triton_cpu.twin import TWIN_MODEL, write_twin

MODELS = contract.ENCODERS
TOL = 1e-5
Config = model_config_pb2.ModelConfig


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), Config())


def run_module(module: torch.jit.ScriptModule, images: np.ndarray) -> tuple[torch.Tensor, ...]:
    with torch.inference_mode():
        out = module(torch.from_numpy(images))
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


def images(batch: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def info(exported_repo: Path) -> dict:
    return json.loads((exported_repo / "model_info.json").read_text())


@pytest.fixture(scope="module")
def modules(exported_repo: Path) -> dict[str, torch.jit.ScriptModule]:
    return {name: torch.jit.load(str(contract.model_file(exported_repo, name))).eval() for name in MODELS}


# ----------------------------------------------------------------- the contract of what `ctl export` writes


@pytest.mark.parametrize("batch", [1, 3])
def test_exported_configs_match_the_torchscript_modules(exported_repo, info, batch):
    """Every config.pbtxt parses as Triton's ModelConfig, and its tensors are what the module really does."""
    from style_model.export import load_encoder

    cfg = info["config"]
    size, embedding_dim, regions = cfg["input_size"], cfg["embed_dim"], cfg["grid"] ** 2
    designed = contract.encoders(size, regions, embedding_dim)
    configs = sorted(exported_repo.glob(f"*/{contract.CONFIG_FILE}"))
    assert sorted(p.parent.name for p in configs) == sorted(MODELS)
    for path in configs:
        name = path.parent.name
        config = parse_config(path)
        assert config.name == name
        assert config.platform == contract.PLATFORM
        assert config.max_batch_size == contract.MAX_BATCH_SIZE
        assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
            (contract.INPUT, model_config_pb2.TYPE_UINT8, [size, size, 3])
        ]
        assert [list(t.dims) for t in config.output] == [list(t.dims) for t in designed[name].outputs]
        assert config.HasField("dynamic_batching")
        assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
        assert config.parameters["model_version"].string_value == info["model_version"]

        module, meta = load_encoder(contract.model_file(exported_repo, name))
        assert meta["model_version"] == info["model_version"]
        outputs = run_module(module, images(batch, size, seed=batch))
        assert [t.name for t in config.output] == [t.name for t in designed[name].outputs]
        assert len(config.output) == len(outputs)
        for spec, tensor in zip(config.output, outputs, strict=True):
            assert spec.data_type == model_config_pb2.TYPE_FP32 and tensor.dtype == torch.float32, spec.name
            assert list(tensor.shape) == [batch, *spec.dims], spec.name
        # model_info.json says the same
        assert info["models"][name] == {
            "input": {contract.INPUT: [contract.INPUT_DTYPE, [size, size, 3]]},
            "outputs": {t.name: [contract.OUTPUT_DTYPE, list(t.dims)] for t in config.output},
        }


# ---------------------------------------------------------------------------------------- the CPU twin


def test_twin_keeps_the_config_but_the_backend(exported_repo, tmp_path):
    twin = write_twin(exported_repo, tmp_path / "twin")
    assert sorted(p.parent.name for p in twin.glob(f"*/{contract.CONFIG_FILE}")) == sorted(MODELS)
    for name in MODELS:
        exported = parse_config(contract.config_file(exported_repo, name))
        served = parse_config(contract.config_file(twin, name))
        path = Path(served.parameters["torchscript_path"].string_value)
        assert path.is_absolute() and path == contract.model_file(exported_repo, name).resolve()
        assert served.parameters["torch_threads"].string_value in ("1", "2")
        assert served.parameters["model_version"] == exported.parameters["model_version"]
        expected = Config()
        expected.CopyFrom(exported)
        expected.ClearField("platform")
        expected.backend = "python"
        for group in expected.instance_group:
            group.kind = model_config_pb2.ModelInstanceGroup.KIND_CPU
        for key in ("torchscript_path", "torch_threads"):
            expected.parameters[key].CopyFrom(served.parameters[key])
        assert served == expected
        model_py = (twin / name / contract.VERSION_DIR / "model.py").read_text()
        compile(model_py, "model.py", "exec")  # valid Python
        assert model_py == TWIN_MODEL.read_text()  # the tested module, as it is
    info = contract.MODEL_INFO_FILE
    assert (twin / info).read_text() == (exported_repo / info).read_text()


def test_setup_without_install_says_what_to_run(tmp_path):
    with pytest.raises(NotSetUpError, match=r"make triton-cpu"):
        setup(tmp_path / "nothing-here", install=False)
    assert not (tmp_path / "nothing-here").exists()  # and it touched nothing


# ------------------------------------------------------------------------------------ a real Triton


class Served:
    """The module's server; the restart test replaces it with a new one on the same port."""

    def __init__(self, home: TritonHome, twin: Path, logs: Path):
        self.home, self.twin, self.logs = home, twin, logs
        self.server: TritonProcess | None = None
        self.starts = 0

    def start(self, grpc_port: int = 0) -> TritonProcess:
        self.starts += 1
        self.server = start(
            self.home, self.twin, grpc_port=grpc_port, log_path=self.logs / f"triton-{self.starts}.log"
        )
        return self.server.wait_ready(120)  # kills the server if it fails


@pytest.fixture(scope="module")
def triton_home() -> TritonHome:
    try:
        return setup(default_home(), install=False)
    except NotSetUpError as error:
        problem = str(error)
    pytest.fail(problem, pytrace=False)  # outside the except: no chained traceback


@pytest.fixture(scope="module")
def served(triton_home, exported_repo, tmp_path_factory):
    twin = write_twin(exported_repo, tmp_path_factory.mktemp("triton-twin"))
    state = Served(triton_home, twin, tmp_path_factory.mktemp("triton-logs"))
    state.start()
    yield state
    if state.server is not None:
        state.server.stop()


def client(served: Served):
    import tritonclient.grpc as grpcclient

    assert served.server is not None
    return grpcclient.InferenceServerClient(served.server.grpc_url)


def infer(served: Served, name: str, batch: np.ndarray, outputs: int) -> list[np.ndarray]:
    import tritonclient.grpc as grpcclient

    request = grpcclient.InferInput(contract.INPUT, list(batch.shape), contract.INPUT_DTYPE)
    request.set_data_from_numpy(batch)
    with client(served) as c:
        result = c.infer(name, [request], client_timeout=60)
    return [result.as_numpy(output_name(name, i)) for i in range(outputs)]


def output_name(model: str, i: int) -> str:
    """The name of the i-th output of a model (the order of the module's results)."""
    names = contract.SCENE_OUTPUTS if model == contract.SCENE_ENCODER else contract.PRODUCT_OUTPUTS
    return names[i]


def test_server_is_triton_with_the_twin_configs(served, exported_repo):
    with client(served) as c:
        assert c.get_server_metadata().version == TRITONSERVER_VERSION
        for name in MODELS:
            served_config = c.get_model_config(name).config
            exported = parse_config(contract.config_file(exported_repo, name))
            assert served_config.backend == "python"
            assert served_config.max_batch_size == exported.max_batch_size
            assert list(served_config.input) == list(exported.input)
            assert list(served_config.output) == list(exported.output)
            assert served_config.dynamic_batching == exported.dynamic_batching
            assert [g.kind for g in served_config.instance_group] == [
                model_config_pb2.ModelInstanceGroup.KIND_CPU
            ]
            assert served_config.parameters["model_version"] == exported.parameters["model_version"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batch", [1, 5])
def test_outputs_equal_the_torchscript_module(served, modules, info, name, batch):
    size = info["config"]["input_size"]
    x = images(batch, size, seed=10 + batch)
    expected = run_module(modules[name], x)
    got = infer(served, name, x, len(expected))
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.dtype == np.float32 and g.shape == tuple(e.shape), output_name(name, i)
        np.testing.assert_allclose(g, e.numpy(), rtol=0, atol=TOL, err_msg=f"{name} {output_name(name, i)}")


def test_dynamic_batcher_merges_concurrent_requests(served, modules, info):
    """Many concurrent single-image requests: fewer executions than inferences, each answer its own."""
    import tritonclient.grpc.aio as aioclient

    name, count, size = contract.SCENE_ENCODER, 24, info["config"]["input_size"]
    x = images(count, size, seed=99)
    expected = run_module(modules[name], x)
    assert served.server is not None

    async def burst():
        async with aioclient.InferenceServerClient(served.server.grpc_url) as c:
            first = (await c.get_inference_statistics(name)).model_stats[0]
            before = (first.inference_count, first.execution_count)

            async def one(i: int):
                request = aioclient.InferInput(contract.INPUT, [1, size, size, 3], contract.INPUT_DTYPE)
                request.set_data_from_numpy(x[i : i + 1])
                return await c.infer(name, [request], client_timeout=60)

            results = await asyncio.gather(*(one(i) for i in range(count)))
            # Triton counts a batch after it has sent the responses: wait for the statistics to catch up
            deadline = time.monotonic() + 60  # a bound against a hang, not a speed: it ends when counted
            while True:
                after = (await c.get_inference_statistics(name)).model_stats[0]
                if after.inference_count - before[0] >= count or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            return results, before, after

    results, before, after = asyncio.run(burst())
    inferences, executions = after.inference_count - before[0], after.execution_count - before[1]
    assert inferences == count
    assert executions < inferences, f"{executions} executions for {inferences} inferences: nothing merged"
    assert max(s.batch_size for s in after.batch_stats) > 1
    for i, result in enumerate(results):
        for j, e in enumerate(expected):
            got = result.as_numpy(output_name(name, j))[0]
            np.testing.assert_allclose(got, e[i].numpy(), rtol=0, atol=TOL)


def test_restart_on_the_same_port_but_never_beside_a_running_server(served, modules, info):
    assert served.server is not None
    x = images(2, info["config"]["input_size"], seed=7)
    expected = run_module(modules[contract.PRODUCT_ENCODER], x)[0].numpy()
    port = served.server.grpc_port
    for how in ("stop", "kill"):
        old = served.server
        assert old is not None and len(old.group_members()) >= 3  # the server and one stub per model
        code = old.stop() if how == "stop" else old.kill()
        assert not old.running()
        assert code == (0 if how == "stop" else -9), how
        assert not list(Path("/dev/shm").glob(f"{old.shm_prefix}*")), "shared memory left behind"
        assert not old.group_members(), f"processes left after {how}"
        served.start(grpc_port=port)
        assert served.server.grpc_port == port
        got = infer(served, contract.PRODUCT_ENCODER, x, 2)[0]
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)
    # gRPC binds with SO_REUSEPORT: without the check a second server would share the port unnoticed
    with pytest.raises(TritonCpuError, match=f"port 127.0.0.1:{port} is taken"):
        start(served.home, served.twin, grpc_port=port)


def test_the_server_runs_without_the_callers_python_environment(triton_home):
    """PYTHONPATH & co. of the caller are dropped; the stub's packages come from the home's pyenv."""
    env = triton_home.environment({"PATH": "/usr/bin", "PYTHONPATH": "/elsewhere", "PYTHONHOME": "/x"})
    assert "PYTHONPATH" not in env and "PYTHONHOME" not in env and env["PYTHONNOUSERSITE"] == "1"
    assert env["PATH"].split(os.pathsep)[0] == str(triton_home.pyenv / "bin")
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == str(triton_home.python_libdir)


def test_a_model_that_cannot_load_is_reported_and_cleaned_up(triton_home, exported_repo, tmp_path):
    twin = write_twin(exported_repo, tmp_path / "twin")
    path = contract.config_file(twin, contract.PRODUCT_ENCODER)
    config = parse_config(path)
    config.parameters["torchscript_path"].string_value = str(contract.model_file(tmp_path / "missing", "x"))
    path.write_text(text_format.MessageToString(config))
    server = start(triton_home, twin, log_path=tmp_path / "triton.log")
    with pytest.raises(TritonCpuError, match=r"exited with status 1 before it was ready") as failure:
        server.wait_ready(120)
    # the log's tail comes with it
    assert f"failed to load '{contract.PRODUCT_ENCODER}'" in str(failure.value)
    assert not server.running() and not server.group_members()
    assert not list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))
