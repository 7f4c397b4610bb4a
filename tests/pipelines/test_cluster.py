"""The pipeline compiled for a cluster (configs/pile.yaml): what every pod asks for, and that the
same settings leave kfp.local alone."""

import re
from pathlib import Path

import pytest
import yaml
from kfp import dsl, local

from regmix.components import IMAGE, component
from regmix.config.cluster import IMAGE_UID
from regmix.config.loading import load_config, parse_config
from regmix.errors import ConfigError
from regmix.pipelines.cluster import apply_task_settings
from regmix.pipelines.kfp_api import compile_package


def compiled(config_path: str, out) -> tuple[dict, dict]:
    """The pipeline spec and its Kubernetes platform config (the YAML's second document)."""
    docs = list(yaml.safe_load_all(compile_package(load_config(config_path), out).read_text()))
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    return docs[0], platform


def tasks(spec: dict) -> dict[str, dict]:
    """Every task of every DAG (the root's and the loops' and conditions' components)."""
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    return {name: task for dag in dags for name, task in dag["tasks"].items()}


def executor(spec: dict, task_name: str) -> tuple[str, dict]:
    """The executor label and container of a task."""
    label = spec["components"][tasks(spec)[task_name]["componentRef"]["name"]]["executorLabel"]
    return label, spec["deploymentSpec"]["executors"][label]["container"]


def nested_tasks(spec: dict, component: str) -> set[str]:
    found = set()
    for name, task in spec["components"][component].get("dag", {}).get("tasks", {}).items():
        found |= {name} | nested_tasks(spec, task["componentRef"]["name"])
    return found


@pytest.fixture(scope="module")
def pile(tmp_path_factory) -> tuple[dict, dict]:
    return compiled("configs/pile.yaml", tmp_path_factory.mktemp("pile") / "pipeline.yaml")


def test_proxies_loop_over_the_mixtures_one_gpu_pod_each(pile):
    spec, platform = pile
    loop = tasks(spec)["for-loop-2"]
    assert loop["parameterIterator"]["items"]["inputParameter"]  # the sampler's mixture plan
    assert loop["iteratorPolicy"]["parallelismLimit"] == 32
    assert "train-proxy-op" in nested_tasks(spec, loop["componentRef"]["name"])
    label, container = executor(spec, "train-proxy-op")
    resources = container["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert resources["accelerator"]["resourceCount"] == "1"
    assert resources["resourceCpuRequest"] == resources["resourceCpuLimit"] == "8"
    assert resources["resourceMemoryRequest"] == resources["resourceMemoryLimit"] == "32Gi"
    pod = platform[label]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                   "effect": "NoSchedule"}]
    assert pod["emptyDirMounts"] == [{"volumeName": "dshm", "mountPath": "/dev/shm",
                                      "medium": "Memory", "sizeLimit": "16Gi"}]
    # checkpoints and results kept for MLflow outlive the pod, so a retry resumes
    assert pod["pvcMount"][0]["mountPath"] == "/data"


def test_large_run_is_guarded_by_the_gate_and_asks_for_a_whole_gpu_node(pile):
    spec, platform = pile
    (condition,) = [t for t in tasks(spec).values() if "condition" in t.get("triggerPolicy", {})]
    assert "validate-prediction-op-Output" in condition["triggerPolicy"]["condition"]
    assert "train-target-op" in nested_tasks(spec, condition["componentRef"]["name"])
    label, container = executor(spec, "train-target-op")
    assert container["resources"]["accelerator"]["resourceCount"] == "8"
    pod = platform[label]
    assert pod["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["pvcMount"][0]["mountPath"] == "/data"
    # the large, baseline and rank-check runs loop at their own, lower, concurrency
    large_loops = [t for t in tasks(spec).values() if "iteratorPolicy" in t
                   and "train-target-op" in nested_tasks(spec, t["componentRef"]["name"])]
    assert large_loops and {t["iteratorPolicy"]["parallelismLimit"] for t in large_loops} == {2}


def test_a_multinode_large_run_task_only_launches_its_pytorchjob_from_a_cpu_pod(tmp_path):
    config = yaml.safe_load(Path("configs/pile.yaml").read_text())
    config["cluster"]["large"]["nodes"] = 2
    (tmp_path / "nodes.yaml").write_text(yaml.safe_dump(config))
    spec, platform = compiled(str(tmp_path / "nodes.yaml"), tmp_path / "pipeline.yaml")
    label, container = executor(spec, "train-target-op")
    assert "accelerator" not in container["resources"]  # the job's pods hold the GPUs
    cpu = config["cluster"]["cpu"]
    assert container["resources"]["resourceCpuLimit"] == str(cpu["cpu"])
    assert container["resources"]["resourceMemoryLimit"] == cpu["memory"]
    pod = platform[label]
    assert "nodeSelector" not in pod and "emptyDirMounts" not in pod
    assert pod["pvcMount"][0]["mountPath"] == "/data"  # it hands the data over on the volume
    assert pod["secretAsEnv"][0]["secretName"] == "regmix-mlflow-client"


def test_a_private_registrys_pull_secrets_reach_every_pod(tmp_path, pile):
    _, public = pile
    assert not any("imagePullSecret" in pod for pod in public.values())  # none asked, none set
    config = yaml.safe_load(Path("configs/pile.yaml").read_text())
    config["cluster"]["image_pull_secrets"] = ["registry-creds"]
    (tmp_path / "private.yaml").write_text(yaml.safe_dump(config))
    _, platform = compiled(str(tmp_path / "private.yaml"), tmp_path / "pipeline.yaml")
    assert platform  # every executor: data, CPU, proxy and large pods alike
    for pod in platform.values():
        assert [s["secretName"] for s in pod["imagePullSecret"]] == ["registry-creds"]


def test_every_pod_gets_the_image_mlflow_secret_retries_and_no_pip_install(pile):
    spec, platform = pile
    for name, task in tasks(spec).items():
        if "componentRef" not in task or "dag" in spec["components"][task["componentRef"]["name"]]:
            continue  # loops and conditions are not pods
        label, container = executor(spec, name)
        assert container["image"] == "ghcr.io/regmix/regmix:0.1.0"
        assert "pip install" not in " ".join(container["command"])  # the image has it all
        assert task["retryPolicy"] == {"maxRetryCount": 2, "backoffDuration": "120s",
                                       "backoffFactor": 2.0, "backoffMaxDuration": "3600s"}
        pod = platform[label]
        # A Secret holding only the URI (no auth proxy in front of MLflow) must start the pod.
        required, optional = pod["secretAsEnv"]
        assert required["secretName"] == optional["secretName"] == "regmix-mlflow-client"
        assert [e["envVar"] for e in required["keyToEnv"]] == ["MLFLOW_TRACKING_URI"]
        assert required["optional"] is False and optional["optional"] is True
        assert {e["envVar"] for e in optional["keyToEnv"]} == {
            "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
        assert pod["securityContext"]["runAsNonRoot"] is True
        # Only data preparation may be served from KFP's cache.
        assert task.get("cachingOptions", {}).get("enableCache", False) == (name == "prepare-data-op")


def test_data_preparation_caches_downloads_on_the_data_volume(pile):
    spec, platform = pile
    label, container = executor(spec, "prepare-data-op")
    assert platform[label]["pvcMount"][0]["pvcNameParameter"]["runtimeValue"]["constant"] == "regmix-data"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {"HF_HOME": "/data/cache/huggingface", "REGMIX_CACHE": "/data/cache/regmix",
                   "REGMIX_SHARED_TOKENS": "/data/tokens"}
    assert "accelerator" not in container["resources"]


def test_without_a_cluster_section_the_pipeline_asks_for_nothing(tmp_path):
    spec, platform = compiled("configs/local.yaml", tmp_path / "pipeline.yaml")
    # nothing but the uid the project's image (here the default one) is built to run as
    uid = str(IMAGE_UID)
    assert platform and all(pod == {"securityContext": {"runAsUser": uid, "runAsGroup": uid,
                                                        "runAsNonRoot": True}}
                            for pod in platform.values())
    for name, task in tasks(spec).items():
        assert "retryPolicy" not in task
        if name.endswith("-op"):
            container = executor(spec, name)[1]
            assert container["image"] == IMAGE and "resources" not in container


@component
def echo_op(text: str) -> str:
    return text


# kfp.local says it ignores the resources, and that it runs the image's code in this Python.
@pytest.mark.filterwarnings("ignore:Task 'echo-op'", "ignore:You may be attemping")
def test_kfp_local_runs_a_task_carrying_every_cluster_setting(tmp_path):
    cluster = load_config("configs/pile.yaml").cluster

    @dsl.pipeline
    def echo(text: str = "ok") -> str:
        task = echo_op(text=text)
        apply_task_settings(task, cluster, "large")  # GPUs, volume, secret, retries, tolerations
        return task.output

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path))
    assert echo().output == "ok"


@pytest.mark.parametrize(("cluster", "message"), [
    ({"proxy": {"memory": "32 GB"}}, "cluster.proxy.memory"),
    ({"large": {"nodes": 2}}, "set cluster.image (its pods' image) and cluster.volume"),
    ({"proxy": {"tolerations": [{"key": "k", "effect": "Never"}]}}, "cluster.proxy.tolerations.0.effect"),
])
def test_bad_cluster_settings_fail_at_load_time_naming_the_field(cluster, message):
    data = yaml.safe_load(Path("configs/tiny.yaml").read_text())
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({**data, "cluster": cluster})
