"""The committed Triton repository is the generator's output, and exported files stay loadable by the
older libtorch of NVIDIA's Triton container (old file format, long-standing operators only)."""

import zipfile
from pathlib import Path

import torch

from ctl.encoder_contract import ENCODERS, config_file, model_file
from style_model.config import ModelConfig
from style_model.export import model_configs

REPO = Path(__file__).resolve().parents[1]
PAPER = ModelConfig(backbone="resnet50", input_size=224, grid=4, embed_dim=128)
PLACEHOLDER_VERSION = "written-by-ctl-export"

# Every aten operator the exported encoders use. All exist, with these schemas, in libtorch 2.0 and later
# (the NGC Triton containers named in deploy/triton/README.md ship 2.x); a new operator here must be checked
# against the container's libtorch before it is added.
OPERATORS = {
    "aten::Int",
    "aten::_convolution",
    "aten::adaptive_avg_pool2d",
    "aten::add",
    "aten::add_",
    "aten::batch_norm",
    "aten::clamp_min",
    "aten::div",
    "aten::dropout",
    "aten::expand_as",
    "aten::flatten",
    "aten::linalg_vector_norm",
    "aten::linear",
    "aten::max_pool2d",
    "aten::mean",
    "aten::mul",
    "aten::permute",
    "aten::relu",
    "aten::relu_",
    "aten::reshape",
    "aten::size",
    "aten::sub",
    "aten::to",
    "aten::transpose",
}
MAX_FILE_FORMAT = 6  # libtorch 2.x reads formats up to 10; TorchScript writers have produced 4-6 for years


def test_committed_configs_are_the_contracts():
    """Triton reads the committed files; they are what `ctl.encoder_contract` renders for the paper preset."""
    configs = model_configs(PAPER, PLACEHOLDER_VERSION)
    assert sorted(configs) == sorted(ENCODERS)
    for name, text in configs.items():
        committed = config_file(REPO / "triton_repo", name).read_text()
        assert committed == text, f"triton_repo/{name}/config.pbtxt differs from the contract's config_pbtxt"


def _operators(module: torch.jit.ScriptModule) -> set[str]:
    kinds: set[str] = set()

    def walk(graph) -> None:
        for node in graph.nodes():
            kinds.add(node.kind())
            for block in node.blocks():
                walk(block)

    walk(module.inlined_graph)
    return {k for k in kinds if k.startswith("aten::")}


def test_exported_files_use_an_old_format_and_known_operators(exported_repo):
    for name in ENCODERS:
        path = model_file(exported_repo, name)
        with zipfile.ZipFile(path) as archive:
            (version_file,) = [n for n in archive.namelist() if n.endswith("/version") and n.count("/") == 1]
            assert int(archive.read(version_file)) <= MAX_FILE_FORMAT
        used = _operators(torch.jit.load(str(path)))
        assert used <= OPERATORS, (
            f"{name} uses operators not checked against Triton's libtorch: {used - OPERATORS}"
        )
