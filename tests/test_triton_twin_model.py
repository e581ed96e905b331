"""The CPU twin's Python-backend model (tools/triton_cpu/twin_model.py) without a Triton server: its
execute path on the real exported TorchScript files, through a stand-in for `triton_python_backend_utils`
(which only Triton's stub can import). The real server runs the same file in tests/test_triton_cpu.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from ctl import encoder_contract as contract
from tools.triton_cpu.twin import write_twin
from tools.triton_cpu.twin_model import TritonPythonModel

DTYPES = {"TYPE_UINT8": np.uint8, "TYPE_FP32": np.float32}


class BackendUtils:
    """The part of `triton_python_backend_utils` the model calls, holding what it is handed."""

    class Tensor:
        def __init__(self, name: str, array: np.ndarray):
            self.name, self.array = name, array

        def as_numpy(self) -> np.ndarray:
            return self.array

    class TritonError:
        def __init__(self, message: str):
            self.message = message

    class InferenceResponse:
        def __init__(self, output_tensors: list[Any] | None = None, error: Any = None):
            self.output_tensors, self.error = output_tensors or [], error

    @staticmethod
    def triton_string_to_numpy(name: str) -> Any:
        return DTYPES[name]

    @staticmethod
    def get_input_tensor_by_name(request: dict[str, np.ndarray], name: str) -> Any:
        return BackendUtils.Tensor(name, request[name])


@pytest.fixture(scope="module")
def twin(exported_repo: Path, tmp_path_factory) -> Path:
    return write_twin(exported_repo, tmp_path_factory.mktemp("twin"))


def model_config(twin: Path, name: str) -> dict[str, Any]:
    """The JSON Triton hands to `initialize` (args["model_config"]), made from the twin's config."""
    config = text_format.Parse(contract.config_file(twin, name).read_text(), model_config_pb2.ModelConfig())
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


def loaded(config: dict[str, Any]) -> TritonPythonModel:
    model = TritonPythonModel(BackendUtils())
    model.initialize({"model_config": json.dumps(config)})
    return model


def images(batch: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", contract.ENCODERS)
def test_each_request_gets_its_rows_of_one_forward_pass(twin, exported_repo, name):
    size = json.loads((exported_repo / contract.MODEL_INFO_FILE).read_text())["config"]["input_size"]
    model = loaded(model_config(twin, name))
    batches = [images(1, size, seed=1), images(3, size, seed=2)]
    responses = model.execute([{contract.INPUT: b} for b in batches])

    module = torch.jit.load(str(contract.model_file(exported_repo, name))).eval()
    with torch.inference_mode():
        expected = [t.numpy() for t in module(torch.from_numpy(np.concatenate(batches)))]
    names = contract.SCENE_OUTPUTS if name == contract.SCENE_ENCODER else contract.PRODUCT_OUTPUTS
    assert len(responses) == len(batches)
    start = 0
    for response, batch in zip(responses, batches, strict=True):
        assert response.error is None
        assert [t.name for t in response.output_tensors] == list(names)
        for tensor, whole in zip(response.output_tensors, expected, strict=True):
            assert tensor.array.dtype == np.float32 and tensor.array.flags.c_contiguous
            np.testing.assert_array_equal(tensor.array, whole[start : start + len(batch)])
        start += len(batch)
    model.finalize()
    assert model.runner is None


def test_a_batch_that_cannot_run_fails_every_request_of_it(twin, exported_repo):
    size = json.loads((exported_repo / contract.MODEL_INFO_FILE).read_text())["config"]["input_size"]
    model = loaded(model_config(twin, contract.PRODUCT_ENCODER))
    requests = [{contract.INPUT: images(1, size, seed=3)}, {contract.INPUT: images(2, size + 1, seed=4)}]
    responses = model.execute(requests)  # the two cannot be stacked into one batch
    assert len(responses) == 2
    assert all(r.error is not None and not r.output_tensors for r in responses)
    assert responses[0].error.message.startswith("ValueError: ")


def test_a_config_that_lists_other_outputs_than_the_module_is_an_error_response(twin, exported_repo):
    size = json.loads((exported_repo / contract.MODEL_INFO_FILE).read_text())["config"]["input_size"]
    config = model_config(twin, contract.PRODUCT_ENCODER)
    config["output"].append({"name": "OUTPUT__2", "data_type": "TYPE_FP32", "dims": ["4"]})
    (response,) = loaded(config).execute([{contract.INPUT: images(1, size, seed=5)}])
    assert response.error.message == "RuntimeError: 2 outputs from the model, 3 in the config"
