"""The Python-backend model of the CPU twin: what Triton's libtorch backend does with an exported
`model.pt`, done by `torch.jit.load` inside Triton's Python backend.

`twin.write_twin` copies this file as `<version>/model.py` of every model of the twin; the backend's stub
imports it with its own environment (torch, numpy < 2, `triton_python_backend_utils`), so it imports
nothing of the project. Each batch the dynamic batcher forms runs as one forward pass of the TorchScript
file named by the config's `torchscript_path` parameter: the inputs in config order, the module's outputs
in config order, one response per request in order, and when the batch fails one error response per
request (as the libtorch backend answers).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch


class BatchRunner:
    """An exported module and its config's tensors: runs the requests of one batch as one forward pass."""

    def __init__(self, module: Any, inputs: Sequence[str], outputs: Sequence[tuple[str, Any]]):
        self.module = module
        self.inputs = list(inputs)  # input tensor names, in the module's argument order
        self.outputs = list(outputs)  # (name, numpy dtype) of each output, in the module's result order

    @classmethod
    def from_config(cls, config: dict[str, Any], to_numpy: Callable[[str], Any]) -> BatchRunner:
        """Loads `torchscript_path` with `torch_threads` intra-op threads (both config parameters);
        `to_numpy` maps a Triton data type ("TYPE_FP32") to its numpy dtype."""
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        torch.set_num_threads(int(params.get("torch_threads", "1")))
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set in this process (a second instance)
            pass
        module = torch.jit.load(params["torchscript_path"], map_location="cpu").eval()
        inputs = [spec["name"] for spec in config["input"]]
        outputs = [(spec["name"], to_numpy(spec["data_type"])) for spec in config["output"]]
        return cls(module, inputs, outputs)

    def run(self, requests: Sequence[Sequence[np.ndarray]]) -> list[list[tuple[str, np.ndarray]]]:
        """Per request its input arrays (batch first, in `inputs` order) -> per request its outputs as
        (name, array) in `outputs` order. Raises when the batch cannot run."""
        sizes = [len(arrays[0]) for arrays in requests]
        columns = [np.concatenate([arrays[i] for arrays in requests]) for i in range(len(self.inputs))]
        with torch.inference_mode():
            result = self.module(*(torch.from_numpy(column) for column in columns))
        if isinstance(result, torch.Tensor):
            result = (result,)
        if len(result) != len(self.outputs):
            raise RuntimeError(f"{len(result)} outputs from the model, {len(self.outputs)} in the config")
        arrays = [t.contiguous().numpy() for t in result]
        answers, start = [], 0
        for size in sizes:
            answers.append(
                [
                    (name, np.ascontiguousarray(array[start : start + size], dtype=dtype))
                    for (name, dtype), array in zip(self.outputs, arrays)
                ]
            )
            start += size
        return answers


class TritonPythonModel:
    """The class Triton's Python backend instantiates (without arguments) for each model instance.

    `utils` is `triton_python_backend_utils`, which only the backend's stub can import; a caller outside
    Triton hands in an object with the same functions."""

    def __init__(self, utils: Any = None):
        self.utils = utils
        self.runner: BatchRunner | None = None

    def initialize(self, args: dict[str, str]) -> None:
        if self.utils is None:
            import triton_python_backend_utils

            self.utils = triton_python_backend_utils
        config = json.loads(args["model_config"])
        self.runner = BatchRunner.from_config(config, self.utils.triton_string_to_numpy)

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        utils, runner = self.utils, self.runner
        assert utils is not None and runner is not None, "initialize() first"
        try:
            inputs = [
                [utils.get_input_tensor_by_name(request, name).as_numpy() for name in runner.inputs]
                for request in requests
            ]
            answers = runner.run(inputs)
        except Exception as error:  # one error response per request, as the libtorch backend does
            message = f"{type(error).__name__}: {error}"
            return [utils.InferenceResponse(error=utils.TritonError(message)) for _ in requests]
        return [
            utils.InferenceResponse(output_tensors=[utils.Tensor(name, array) for name, array in answer])
            for answer in answers
        ]

    def finalize(self) -> None:
        self.runner = None
