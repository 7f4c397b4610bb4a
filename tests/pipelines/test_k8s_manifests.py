"""k8s/: every manifest and every overlay's build checked against Kubernetes' own OpenAPI schemas
(kubernetes-validate ships them, so this runs offline), plus the policies they promise: non-root
pods with limits, least-privilege RBAC, MLflow kept inside the namespace, no secret values.

The overlays are rendered here by the subset of kustomize they use (resources, strategic-merge
patches); where a kustomize binary exists (kubectl kustomize) the render is checked against it.
"""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from regmix.config.loading import load_config

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate (the dev extra) ships the schemas")

K8S = Path("k8s")
KUBERNETES = "1.32"
OVERLAYS = ["base", "overlays/dev", "overlays/prod"]
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "patches"}


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def merge(base: dict, patch: dict) -> None:
    """A strategic-merge patch for the fields k8s/ patches: maps merge; lists of named items
    (containers, env, volumes, volumeMounts) merge by name, the patch's items first as
    kustomize orders them; other values are replaced."""
    for key, value in patch.items():
        old = base.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            merge(old, value)
        elif (isinstance(value, list) and isinstance(old, list)
              and all(isinstance(v, dict) and "name" in v for v in old + value)):
            by_name = {item["name"]: item for item in old}
            for item in value:
                if item["name"] in by_name:
                    merge(by_name[item["name"]], item)
            base[key] = [by_name.pop(item["name"], item) for item in value] + [*by_name.values()]
        else:
            base[key] = value


def kustomize(folder: Path) -> list[dict]:
    """`kustomize build` for the features k8s/ uses; anything else fails here, not silently."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(kustomization) <= KUSTOMIZATION_KEYS, "teach kustomize() the new feature"
    docs = []
    for resource in kustomization.get("resources", []):
        path = folder / resource
        docs += kustomize(path) if path.is_dir() else load_all(path)
    for entry in kustomization.get("patches", []):
        patch = yaml.safe_load((folder / entry["path"]).read_text())
        (target,) = [d for d in docs if (d["kind"], d["metadata"]["name"])
                     == (patch["kind"], patch["metadata"]["name"])]
        merge(target, patch)
    return docs


def by_kind_name(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs
            if d["kind"] in ("Deployment", "StatefulSet")}


@pytest.fixture(scope="module")
def builds() -> dict[str, list[dict]]:
    return {overlay: kustomize(K8S / overlay) for overlay in OVERLAYS}


def manifest_files() -> list[Path]:
    """Every complete manifest: resources and Secret templates (patches are checked built)."""
    patches = {K8S / overlay / p["path"] for overlay in OVERLAYS for p in
               yaml.safe_load((K8S / overlay / "kustomization.yaml").read_text()).get("patches", [])}
    return sorted(p for p in K8S.rglob("*.yaml")
                  if p.name != "kustomization.yaml" and p not in patches)


@pytest.mark.parametrize("path", manifest_files(), ids=str)
def test_every_manifest_file_matches_the_kubernetes_schema(path):
    for doc in load_all(path):
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_builds_to_schema_valid_objects(builds, overlay):
    docs = builds[overlay]
    assert len(by_kind_name(docs)) == len(docs)  # no duplicates
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    assert all(d["metadata"].get("namespace", "regmix") == "regmix" for d in docs)


@pytest.mark.skipif(not shutil.which("kubectl"), reason="no kubectl here to cross-check with")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_render_matches_kubectl_kustomize(builds, overlay):
    out = subprocess.run(["kubectl", "kustomize", str(K8S / overlay)], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    assert by_kind_name(yaml.safe_load_all(out)) == by_kind_name(builds[overlay])


@pytest.mark.parametrize("overlay", ["overlays/dev", "overlays/prod"])
def test_pods_run_as_non_root_with_limits_and_read_only_roots(builds, overlay):
    pods = pod_specs(builds[overlay])
    assert pods
    for name, pod in pods.items():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] > 0, name
        assert pod["automountServiceAccountToken"] is False, name
        for container in pod["containers"]:
            limits = container["resources"]["limits"]
            assert {"cpu", "memory"} <= set(limits), name
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name


def test_the_overlays_choose_mlflow_stores(builds):
    def env(overlay: str) -> dict:
        (container,) = pod_specs(builds[overlay])["mlflow"]["containers"]
        return {e["name"]: e for e in container["env"]}

    dev, prod = env("overlays/dev"), env("overlays/prod")
    assert dev["MLFLOW_ARTIFACTS_DESTINATION"]["value"] == "/mlartifacts"
    assert {"name": "artifacts", "mountPath": "/mlartifacts"} in (
        pod_specs(builds["overlays/dev"])["mlflow"]["containers"][0]["volumeMounts"])
    assert ("StatefulSet", "mlflow-postgres") in by_kind_name(builds["overlays/dev"])
    assert prod["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"} <= set(prod)
    assert ("StatefulSet", "mlflow-postgres") not in by_kind_name(builds["overlays/prod"])
    for overlay_env in (dev, prod):  # the DSN only ever comes from the Secret
        assert overlay_env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == (
            "regmix-mlflow-backend")


def test_rbac_allows_only_what_the_launcher_does(builds):
    objects = by_kind_name(builds["base"])
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): r["verbs"]
             for r in objects["Role", "regmix-launcher"]["rules"]}
    assert rules == {(("kubeflow.org",), ("pytorchjobs",)): ["create", "get", "delete"],
                     (("",), ("pods",)): ["get"], (("",), ("pods/log",)): ["get"]}
    assert not any(kind in ("ClusterRole", "ClusterRoleBinding") for kind, _ in objects)


def test_mlflow_is_reachable_only_from_inside_the_namespace(builds):
    objects = by_kind_name(builds["overlays/dev"])
    assert objects["Service", "mlflow"]["spec"]["type"] == "ClusterIP"
    policy = objects["NetworkPolicy", "mlflow"]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "mlflow"}
    (rule,) = policy["ingress"]
    assert rule["from"] == [{"podSelector": {}}]  # no namespaceSelector, no ipBlock
    database = objects["NetworkPolicy", "mlflow-postgres"]["spec"]["ingress"]
    assert database == [{"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}],
                         "ports": [{"port": 5432, "protocol": "TCP"}]}]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servers_take_no_istio_sidecar_since_their_clients_have_none(builds, overlay):
    # KFP's pipeline pods and the PyTorchJob's pods run without a sidecar; in a Kubeflow profile
    # namespace a sidecar on the server would refuse their plain-HTTP requests.
    servers = [d for d in builds[overlay] if d["kind"] in ("Deployment", "StatefulSet")]
    assert {d["metadata"]["name"] for d in servers} >= {"mlflow"}
    for server in servers:
        annotations = server["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("sidecar.istio.io/inject") == "false", server["metadata"]["name"]


def test_secret_templates_hold_no_values_and_are_never_applied_by_kustomize(builds):
    secrets = [d for path in (K8S / "secrets").glob("*.yaml") for d in load_all(path)]
    assert {s["metadata"]["name"] for s in secrets} == {
        "regmix-mlflow-client", "regmix-mlflow-backend", "regmix-mlflow-s3"}
    for secret in secrets:
        for key, value in secret["stringData"].items():
            assert value == "" or "CHANGE-ME" in value or key == "MLFLOW_TRACKING_URI", key
    assert not any(d["kind"] == "Secret" for docs in builds.values() for d in docs)


def test_the_cluster_config_names_what_k8s_creates(builds):
    cluster = load_config("configs/pile.yaml").cluster
    objects = by_kind_name(builds["base"])
    assert ("Namespace", cluster.namespace) in objects
    claim = objects["PersistentVolumeClaim", cluster.volume.claim]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # shared by a multi-node job
    # the default class is often block storage, which cannot share: the user names one that can
    for docs in builds.values():
        assert by_kind_name(docs)["PersistentVolumeClaim", cluster.volume.claim]["spec"][
            "storageClassName"]
    assert "`k8s/base/data-pvc.yaml` (`storageClassName:`" in Path("docs/deploy.md").read_text()
    client_secret = yaml.safe_load((K8S / "secrets/mlflow-client.yaml").read_text())
    assert client_secret["metadata"]["name"] == cluster.mlflow_secret
    uri = client_secret["stringData"]["MLFLOW_TRACKING_URI"]
    assert uri == f"http://mlflow.{cluster.namespace}.svc.cluster.local:5000"
