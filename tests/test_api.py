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


def test_every_retrieval_mode_has_its_api_value_and_back():
    """One list of modes (RetrievalMode), mapped to the API's enum by name: a mode added to one and not the
    other fails here, not in a caller's request."""
    from ctl.v1 import ranker_pb2
    from ranker_service.retrieval_mode import RetrievalMode
    from ranker_service.service import mode_from_proto, mode_to_proto

    for mode in RetrievalMode:
        assert mode_from_proto(mode_to_proto(mode)) is mode
    values = [v for v in ranker_pb2.RetrievalMode.values() if v != ranker_pb2.RETRIEVAL_MODE_UNSPECIFIED]
    assert sorted(mode_to_proto(mode_from_proto(v)) for v in values) == sorted(values)
    assert mode_from_proto(ranker_pb2.RETRIEVAL_MODE_UNSPECIFIED) is RetrievalMode.POOLED
