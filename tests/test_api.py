"""The committed gRPC code is what the .proto files generate, and the pinned versions agree."""

import filecmp
import importlib.metadata as md

from ctl import codegen


def test_generated_code_is_current(tmp_path):
    files = codegen.generate(tmp_path)
    committed = codegen.ROOT / codegen.PACKAGE_DIR
    names = sorted(f.name for f in files)
    assert sorted(p.name for p in committed.iterdir() if p.is_file()) == names, "run `make protos`"
    stale = [
        n for n in names if not filecmp.cmp(tmp_path / codegen.PACKAGE_DIR / n, committed / n, shallow=False)
    ]
    assert not stale, f"ctl/v1 is stale ({', '.join(stale)}): run `make protos` and commit"


def test_pinned_versions_are_consistent():
    """tritonclient 2.73 needs protobuf < 7; the generated code needs the protobuf grpcio-tools 1.81 targets.
    pip would otherwise resolve a years-old tritonclient without a word."""
    protobuf = tuple(int(x) for x in md.version("protobuf").split(".")[:2])
    assert (6, 33) <= protobuf < (7, 0)
    assert md.version("grpcio-tools").startswith("1.81.")
    assert md.version("grpcio").startswith("1.81.")
    assert md.version("tritonclient").startswith("2.73.")
    import tritonclient.grpc.aio  # noqa: F401  (imports with this protobuf)

    from ctl.v1 import encoder_pb2, ranker_pb2

    assert ranker_pb2.DESCRIPTOR.services_by_name["RankerService"].full_name == "ctl.v1.RankerService"
    assert encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name == "ctl.v1.EncoderService"
