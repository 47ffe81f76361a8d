"""The Kubernetes manifests (deploy/kubernetes): rendered with `kubectl kustomize` (no
cluster needed), validated offline against the Kubernetes 1.37 schema with
kubernetes-validate (strict: unknown fields are errors), and checked for what operators of an
edge proxy expect. The gateway configuration they carry passes `check-config`."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT, _write_tls, gateway_binary

KUSTOMIZATIONS = [REPO_ROOT / "deploy" / "kubernetes" / "base",
                  REPO_ROOT / "deploy" / "kubernetes" / "overlays" / "example"]
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"


def render(path: Path) -> str:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: run scripts/setup.sh (Debian's kubernetes-client)"
    r = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module", params=KUSTOMIZATIONS, ids=["base", "overlay-example"])
def rendered(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("k8s") / "all.yaml"
    text = render(request.param)
    out.write_text(text)
    docs = [d for d in yaml.safe_load_all(text) if d]
    return out, {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_every_resource_is_valid_against_the_kubernetes_schema(rendered):
    path, docs = rendered
    r = subprocess.run([str(VALIDATE), "--strict", "-k", "1.37.0", str(path)],
                       capture_output=True, text=True, timeout=120)
    lines = (r.stdout + r.stderr).splitlines()
    passed = [line for line in lines if " passed for resource " in line]
    problems = [line for line in lines if line.startswith(("ERROR", "WARN"))
                # The Prometheus Operator's CRD is not part of Kubernetes' schema; its shape
                # is checked below.
                and "kind ServiceMonitor" not in line]
    assert not problems, "\n".join(lines)
    assert len(passed) == len(docs) - 1, "\n".join(lines)


def test_what_an_operator_of_an_edge_proxy_expects(rendered, tmp_path):
    _, docs = rendered
    kinds = {k for k, _ in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
            "ServiceMonitor", "Secret", "ServiceAccount"} <= kinds
    dep = docs[("Deployment", "amqp-iam-gateway")]
    spec = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] >= 2
    assert {c["topologyKey"] for c in spec["topologySpreadConstraints"]} == {
        "topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    (c,) = spec["containers"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    # The configuration: from the generated Secret (hash-suffixed name: a change rolls out),
    # and certificates from the TLS Secret, which Reloader watches.
    volumes = {v["name"]: v for v in spec["volumes"]}
    config_secret = volumes["config"]["secret"]["secretName"]
    assert config_secret.startswith("amqp-iam-gateway-config-")
    assert volumes["tls"]["secret"]["secretName"] == "amqp-iam-gateway-tls"
    assert dep["metadata"]["annotations"]["secret.reloader.stakater.com/reload"] == "amqp-iam-gateway-tls"
    toml_text = base64.b64decode(docs[("Secret", config_secret)]["data"]["gateway.toml"]).decode()
    cfg = tomllib.loads(toml_text)
    # The drain finishes before the kubelet's SIGKILL.
    assert spec["terminationGracePeriodSeconds"] > cfg["listener"]["drain_deadline_ms"] / 1000
    # The NLB sends PROXY v2 headers, and the gateway expects them.
    svc = docs[("Service", "amqp-iam-gateway")]
    ann = svc["metadata"]["annotations"]
    assert ann["service.beta.kubernetes.io/aws-load-balancer-proxy-protocol"] == "*"
    assert ann["service.beta.kubernetes.io/aws-load-balancer-healthcheck-path"] == "/readyz"
    assert cfg["listener"]["proxy_protocol"] is True
    # The probes and the metrics reach the admin listener on the pod's address.
    admin_port = int(cfg["admin"]["address"].rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["admin"] == admin_port and cfg["admin"]["address"].startswith("0.0.0.0:")
    pdb = docs[("PodDisruptionBudget", "amqp-iam-gateway")]
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    hpa = docs[("HorizontalPodAutoscaler", "amqp-iam-gateway")]
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["scaleTargetRef"]["name"] == "amqp-iam-gateway"
    # The ServiceMonitor (a CRD, outside the schema above) selects the admin Service by its
    # labels and scrapes its named port.
    sm = docs[("ServiceMonitor", "amqp-iam-gateway")]
    admin_svc = docs[("Service", "amqp-iam-gateway-admin")]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= admin_svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in admin_svc["spec"]["ports"]}
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    # The configuration is one the gateway accepts (with this machine's certificate files in
    # place of the Secret's mount).
    _write_tls(tmp_path)
    local = (toml_text.replace("/etc/amqp-iam-gateway/tls/tls.crt", str(tmp_path / "server.pem"))
             .replace("/etc/amqp-iam-gateway/tls/tls.key", str(tmp_path / "server-key.pem")))
    (tmp_path / "gateway.toml").write_text(local)
    r = subprocess.run([str(gateway_binary()), "check-config", "--offline", "--config",
                        str(tmp_path / "gateway.toml")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
