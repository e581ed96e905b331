"""The CPU twin of an exported model repository: the same configs, served by Triton's Python backend
running `twin_model.py` on the very same TorchScript files instead of the libtorch backend (which is
not in the nvidia-pytriton wheel)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ctl import encoder_contract as contract
from tools.triton_cpu.errors import TritonCpuError

log = logging.getLogger(__name__)

TWIN_MODEL = Path(__file__).with_name("twin_model.py")  # copied as <version>/model.py (not imported here)


def model_dirs(repo: Path) -> list[Path]:
    """The models of a repository: the folders that hold a config."""
    return sorted(p.parent for p in repo.glob(f"*/{contract.CONFIG_FILE}"))


def write_twin(exported_repo: Path | str, out: Path | str, *, torch_threads: int | None = None) -> Path:
    """Write the CPU twin of an exported repository to OUT (created; existing models are replaced).

    Each model keeps its config (name, tensors, dims, max_batch_size, dynamic batching, parameters)
    with `backend: "python"` instead of its platform, KIND_CPU instances, and the parameters
    `torchscript_path` (absolute path of the exported model.pt of the version Triton would serve: the
    highest) and `torch_threads` (default: the cores shared by the instances, at most 2).
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    exported_repo, out = Path(exported_repo).resolve(), Path(out)
    models = model_dirs(exported_repo)
    if not models:
        raise TritonCpuError(f"{exported_repo} holds no */config.pbtxt: not a Triton model repository")
    out.mkdir(parents=True, exist_ok=True)
    for model_dir in models:
        config = model_config_pb2.ModelConfig()
        text_format.Parse((model_dir / contract.CONFIG_FILE).read_text(), config)
        filename = config.default_model_filename or contract.MODEL_FILE
        versions = sorted(
            (int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and (p / filename).is_file()),
            reverse=True,
        )
        if not versions:
            raise TritonCpuError(f"{model_dir} has no <version>/{filename}")
        version = versions[0]
        config.ClearField("platform")
        config.ClearField("default_model_filename")
        config.backend = "python"
        if not config.instance_group:
            config.instance_group.add(count=1)
        instances = 0
        for group in config.instance_group:
            group.kind = model_config_pb2.ModelInstanceGroup.KIND_CPU
            group.ClearField("gpus")
            instances += group.count or 1
        threads = torch_threads or max(1, min(2, (os.cpu_count() or 1) // instances))
        config.parameters["torchscript_path"].string_value = str(model_dir / str(version) / filename)
        config.parameters["torch_threads"].string_value = str(threads)
        target = out / model_dir.name
        if target.exists():
            shutil.rmtree(target)
        (target / str(version)).mkdir(parents=True)
        (target / contract.CONFIG_FILE).write_text(text_format.MessageToString(config))
        shutil.copyfile(TWIN_MODEL, target / str(version) / "model.py")
        log.info(
            "twin %s: version %d runs %s (%d thread(s))",
            model_dir.name,
            version,
            model_dir / str(version) / filename,
            threads,
        )
    info = exported_repo / contract.MODEL_INFO_FILE
    if info.exists():
        shutil.copy2(info, out / info.name)
    return out


# --------------------------------------------------------------------------------------------- start
