"""deploy/ checked offline: schemas, linters, rendered command lines; the same topology as local processes.

No container engine or cluster is needed: compose is validated against the compose-spec schema
vendored in check-jsonschema, Kubernetes built-in kinds with kubernetes-validate, the
``DaskCluster`` against the operator CRD's own schema (tests/schemas/), the Dockerfile with
hadolint, every YAML file with yamllint, and the SLURM settings through
``SLURMCluster(...).job_script()``.  The last tests start ``dask scheduler`` + two
``dask worker`` processes on 127.0.0.1 with the preload the deployment files use, and run
dask_loom jobs through them.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import dask
import numpy as np
import pytest
import yaml

import dask_loom
from dask_loom import worker_setup
from dask_loom.errors import ConfigError
from tests._processes import start_scheduler, start_worker, stop

REPO = pathlib.Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
SCHEMAS = pathlib.Path(__file__).resolve().parent / "schemas"
PRELOAD = ["--preload", "dask_loom.worker_setup"]
HYPHENATED = {"dask-scheduler", "dask-worker", "dask-ssh"}


def _tool(name: str) -> str:
    """A console script installed next to this Python (the test extra's linters), else on PATH."""
    here = pathlib.Path(sys.executable).with_name(name)
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (it is in the 'test' extra of pyproject.toml)")
    return found


def _load(path: pathlib.Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _argv_ok(argv: list[str], sub: str) -> None:
    """``dask <sub> ...`` as separate argv items, never a removed hyphenated executable."""
    assert argv[:2] == ["dask", sub], argv
    assert not HYPHENATED & set(argv), argv


def _has_preload(argv: list[str]) -> bool:
    return any(argv[i : i + 2] == PRELOAD for i in range(len(argv) - 1))


# --------------------------------------------------------------------------- linters


def test_yamllint_all_deploy_yaml():
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))
    assert len(files) >= 7
    out = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-c", str(DEPLOY / ".yamllint.yaml"), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_yamllint_catches_a_broken_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("services:\n  a: 1\n  a: 2\n")
    out = subprocess.run(
        [sys.executable, "-m", "yamllint", "-c", str(DEPLOY / ".yamllint.yaml"), str(bad)], capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "duplication of key" in out.stdout


def test_hadolint_dockerfile():
    out = subprocess.run([_tool("hadolint"), str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_catches_unpinned_images(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install dask_loom\n")
    out = subprocess.run([_tool("hadolint"), str(bad)], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "DL3007" in out.stdout  # ":latest"
    assert "DL3013" in out.stdout  # unpinned pip install


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_structure():
    instrs = _dockerfile()
    args = dict(rest.split("=", 1) for word, rest in instrs if word == "ARG")
    froms = [rest for word, rest in instrs if word == "FROM"]
    resolved = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], f.split(" AS ")[0]) for f in froms]
    # Pinned official images: the dask release and the Python version in the tag.
    assert re.fullmatch(r"\d{4}\.\d+\.\d+", args["DASK_VERSION"])
    assert f"ghcr.io/dask/dask:{args['DASK_VERSION']}-py3.12" in resolved
    assert f"ghcr.io/dask/dask-notebook:{args['DASK_VERSION']}-py3.12" in resolved
    assert all(":" in img and not img.endswith(":latest") for img in resolved)
    stages = [f.split(" AS ")[1] for f in froms]
    assert stages == ["wheel", "notebook", "runtime"]  # runtime last: the default target
    runs = " ".join(rest for word, rest in instrs if word == "RUN")
    assert "pip wheel" in runs
    assert runs.count("install --no-cache-dir /tmp/dist/dask_loom-*.whl") == 2  # both images get the wheel
    # Everything COPY'd from the build context exists and passes the .dockerignore.
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for word, rest in instrs:
        if word == "COPY" and "--from" not in rest:
            for src in rest.split()[:-1]:
                assert (REPO / src).exists(), src
                assert f"!{src.rstrip('/')}" in ignore or f"!{src.rstrip('/')}/" in ignore, src
    cmd = json.loads(next(rest for word, rest in instrs if word == "CMD"))
    _argv_ok(cmd, "scheduler")


def test_distributed_yaml_matches_distributed_schema():
    """The baked-in config validates against distributed's own JSON schema and holds real dask_loom keys."""
    import distributed
    import jsonschema

    schema = yaml.safe_load((pathlib.Path(distributed.__file__).parent / "distributed-schema.yaml").read_text())
    cfg = _load(DEPLOY / "distributed.yaml")[0]
    jsonschema.validate(cfg, schema)
    assert set(cfg["dask_loom"]) <= set(dask_loom._config.DEFAULTS)
    # The dashboard link template formats the way distributed formats it.
    link = cfg["distributed"]["dashboard"]["link"].format(scheme="http", host="h", port=8787, **os.environ)
    assert link == "http://h:8787/status"
    bad = copy.deepcopy(cfg)
    bad["distributed"]["worker"]["memory"]["target"] = "sixty"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


# --------------------------------------------------------------------------- compose


def test_compose_schema():
    out = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_schema_catches_mistakes(tmp_path):
    compose = _load(DEPLOY / "compose.yaml")[0]
    compose["services"]["scheduler"]["ports"] = 8786  # must be a list
    compose["services"]["worker-1"]["comand"] = ["dask", "worker"]  # unknown key
    bad = tmp_path / "compose.yaml"
    bad.write_text(yaml.safe_dump(compose))
    out = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "ports" in out.stdout
    assert "comand" in out.stdout


def test_compose_topology():
    compose = _load(DEPLOY / "compose.yaml")[0]
    services = compose["services"]
    assert set(services) == {"scheduler", "worker-1", "worker-2", "jupyter"}
    sched = services["scheduler"]
    _argv_ok(sched["command"], "scheduler")
    assert "8786:8786" in sched["ports"]
    assert "8787:8787" in sched["ports"]
    assert "/health" in " ".join(sched["healthcheck"]["test"])
    for name in ("worker-1", "worker-2"):
        w = services[name]
        _argv_ok(w["command"], "worker")
        assert w["command"][2] == "tcp://scheduler:8786"
        assert _has_preload(w["command"])
        assert w["command"][w["command"].index("--name") + 1] == name
        assert w["depends_on"]["scheduler"]["condition"] == "service_healthy"
        # Their dask_loom settings are real ones (the preload would reject them otherwise).
        settings = [f"{k[len('DASK_LOOM_'):]}={v}" for k, v in w["environment"].items() if k.startswith("DASK_LOOM_")]
        worker_setup.parse_settings(settings)
        assert any(v.endswith(":/data:ro") for v in w["volumes"])
    # Every service runs an image built from deploy/Dockerfile, so all have dask_loom.
    images = {name: s["image"] for name, s in services.items()}
    builds = {s["image"]: s["build"] for s in services.values() if "build" in s}
    assert set(images.values()) <= set(builds)
    for build in builds.values():
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile").resolve()
    assert {b["target"] for b in builds.values()} == {"runtime", "notebook"}
    jupyter = services["jupyter"]
    assert builds[jupyter["image"]]["target"] == "notebook"
    assert jupyter["environment"]["DASK_SCHEDULER_ADDRESS"] == "tcp://scheduler:8786"
    assert jupyter["environment"]["DASK_LOOM_SCHEDULER"] == "tcp://scheduler:8786"
    assert (DEPLOY / "../notebooks").resolve() == REPO / "notebooks"


# --------------------------------------------------------------------------- Kubernetes


def _daskcluster_schema() -> dict:
    """The CRD's openAPIV3Schema as the API server applies it (see tests/schemas/README.md)."""
    crd = json.loads((SCHEMAS / "daskcluster-v1.openapi.json").read_text())
    crd.pop("$comment", None)

    def strict(node):
        if isinstance(node, dict):
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            for v in node.values():
                strict(v)
        elif isinstance(node, list):
            for v in node:
                strict(v)

    strict(crd)
    crd["properties"]["apiVersion"] = {"const": "kubernetes.dask.org/v1"}
    crd["properties"]["kind"] = {"const": "DaskCluster"}
    crd["properties"]["metadata"] = {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}},
    }
    crd["required"] = sorted({*crd.get("required", []), "apiVersion", "kind", "metadata"})
    return crd


def _validate_daskcluster(doc: dict) -> list[str]:
    import jsonschema

    v = jsonschema.Draft7Validator(_daskcluster_schema())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


def test_daskcluster_validates_against_the_operator_crd():
    (doc,) = _load(DEPLOY / "kubernetes" / "daskcluster.yaml")
    assert _validate_daskcluster(doc) == []


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("spec", "worker", "replicas"), "two", "'two' is not of type 'integer'"),
        (("spec", "worker", "replica"), 2, "Additional properties are not allowed ('replica'"),
        (("spec", "scheduler"), None, "'scheduler' is a required property"),
        (("spec", "idleTimeout"), "1h", "is not of type 'integer'"),
        (("kind",), "DaskClusters", "'DaskCluster' was expected"),
    ],
)
def test_daskcluster_schema_catches_mistakes(path, value, expected):
    (doc,) = _load(DEPLOY / "kubernetes" / "daskcluster.yaml")
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    errors = _validate_daskcluster(doc)
    assert any(expected in e for e in errors), errors


def test_daskcluster_commands_and_wiring():
    (doc,) = _load(DEPLOY / "kubernetes" / "daskcluster.yaml")
    name = doc["metadata"]["name"]
    spec = doc["spec"]
    (worker,) = spec["worker"]["spec"]["containers"]
    (sched,) = spec["scheduler"]["spec"]["containers"]
    _argv_ok(worker["args"], "worker")
    _argv_ok(sched["args"], "scheduler")
    assert _has_preload(worker["args"])
    # No address: the operator sets DASK_SCHEDULER_ADDRESS, which `dask worker` reads.
    assert not any(a.startswith("tcp://") for a in worker["args"])
    assert worker["image"] == sched["image"]
    assert spec["worker"]["replicas"] == 2
    service = spec["scheduler"]["service"]
    assert service["selector"] == {"dask.org/cluster-name": name, "dask.org/component": "scheduler"}
    port_names = {p["name"] for p in sched["ports"]}
    assert {p["targetPort"] for p in service["ports"]} <= port_names
    assert sched["readinessProbe"]["httpGet"] == {"port": "http-dashboard", "path": "/health"}
    settings = [f"{e['name'][len('DASK_LOOM_'):]}={e['value']}" for e in worker.get("env", []) if e["name"].startswith("DASK_LOOM_")]
    worker_setup.parse_settings(settings)
    # The Jupyter manifest talks to this cluster's scheduler Service (<name>-scheduler).
    docs = _load(DEPLOY / "kubernetes" / "jupyter.yaml")
    env = {e["name"]: e["value"] for e in docs[0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DASK_SCHEDULER_ADDRESS"] == f"tcp://{name}-scheduler:8786"


def test_kubernetes_builtin_kinds_validate():
    import kubernetes_validate

    docs = _load(DEPLOY / "kubernetes" / "jupyter.yaml")
    assert [d["kind"] for d in docs] == ["Deployment", "Service"]
    for d in docs:
        kubernetes_validate.validate(d, "1.31", strict=True)
    bad = copy.deepcopy(docs[0])
    bad["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.31", strict=True)
    bad = copy.deepcopy(docs[1])
    bad["spec"]["prots"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.31", strict=True)


# --------------------------------------------------------------------------- Helm

# Key paths of the dask/dask chart's values.yaml (dask/helm-chart @ e25bf511, 2026-06-12), down to
# the free-form maps (env, resources, probes, ...), plus the keys its templates read that the file
# only mentions in comments (threads_per_worker, port, serviceAccountName).
CHART_KEYS = {
    "nameOverride", "fullnameOverride", "additional_worker_groups",
    "scheduler", "scheduler.name", "scheduler.enabled", "scheduler.image", "scheduler.image.repository",
    "scheduler.image.tag", "scheduler.image.pullPolicy", "scheduler.image.pullSecrets", "scheduler.replicas",
    "scheduler.serviceType", "scheduler.loadBalancerIP", "scheduler.servicePort", "scheduler.serviceAnnotations",
    "scheduler.env", "scheduler.extraArgs", "scheduler.resources", "scheduler.tolerations", "scheduler.affinity",
    "scheduler.nodeSelector", "scheduler.securityContext", "scheduler.serviceAccountName", "scheduler.metrics",
    "scheduler.metrics.enabled", "scheduler.metrics.serviceMonitor", "scheduler.livenessProbe",
    "scheduler.readinessProbe",
    "webUI", "webUI.name", "webUI.servicePort", "webUI.ingress",
    "worker", "worker.name", "worker.image", "worker.image.repository", "worker.image.tag",
    "worker.image.pullPolicy", "worker.image.dask_worker", "worker.image.pullSecrets", "worker.replicas",
    "worker.strategy", "worker.custom_scheduler_url", "worker.default_resources", "worker.env", "worker.extraArgs",
    "worker.resources", "worker.mounts", "worker.annotations", "worker.tolerations", "worker.affinity",
    "worker.nodeSelector", "worker.securityContext", "worker.serviceAccountName", "worker.port",
    "worker.portDashboard", "worker.threads_per_worker", "worker.metrics", "worker.livenessProbe",
    "worker.readinessProbe",
    "jupyter", "jupyter.name", "jupyter.enabled", "jupyter.rbac", "jupyter.image", "jupyter.image.repository",
    "jupyter.image.tag", "jupyter.image.pullPolicy", "jupyter.image.pullSecrets", "jupyter.serviceType",
    "jupyter.servicePort", "jupyter.password", "jupyter.passwordHint", "jupyter.env", "jupyter.command",
    "jupyter.args", "jupyter.extraConfig", "jupyter.resources", "jupyter.mounts", "jupyter.tolerations",
    "jupyter.affinity", "jupyter.nodeSelector", "jupyter.securityContext", "jupyter.serviceAccountName",
    "jupyter.ingress", "jupyter.livenessProbe", "jupyter.readinessProbe",
}  # fmt: skip


def _key_paths(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        p = f"{prefix}{k}"
        out.add(p)
        if isinstance(v, dict) and any(f"{p}.{kk}" in CHART_KEYS for kk in v):
            out |= _key_paths(v, p + ".")
    return out


def test_helm_values_use_chart_keys():
    values = _load(DEPLOY / "helm" / "values.yaml")[0]
    unknown = _key_paths(values) - CHART_KEYS
    assert not unknown, f"not keys of the dask chart: {sorted(unknown)}"
    w = values["worker"]
    assert w["extraArgs"] == PRELOAD
    assert w["image"]["repository"] == values["scheduler"]["image"]["repository"]
    # Left at the chart default: the overlay tests for it before replacing it.
    assert w["image"]["dask_worker"] == "dask-worker"
    assert values["jupyter"]["image"]["repository"].endswith("dask-loom-notebook")
    for block in (w, values["scheduler"]):
        settings = [f"{e['name'][len('DASK_LOOM_'):]}={e['value']}" for e in block["env"] if e["name"].startswith("DASK_LOOM_")]
        worker_setup.parse_settings(settings)


def _json_patch(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 test/replace/add on list and dict paths (what the overlay uses)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        key = int(last) if isinstance(node, list) and last != "-" else last
        if op["op"] == "test":
            if node[key] != op["value"]:
                raise ValueError(f"test failed at {op['path']}: {node[key]!r} != {op['value']!r}")
        elif op["op"] == "replace":
            node[key] = op["value"]
        elif op["op"] == "add":
            if isinstance(node, list):
                node.insert(len(node) if key == "-" else key, op["value"])
            else:
                node[key] = op["value"]
        else:
            raise ValueError(f"unsupported op {op['op']}")
    return doc


def _apply_overlay(manifests: list[dict]) -> list[dict]:
    kust = _load(DEPLOY / "helm" / "kustomization.yaml")[0]
    assert kust["resources"] == ["rendered.yaml"]
    out = []
    for m in manifests:
        for patch in kust["patches"]:
            t = patch["target"]
            if m.get("kind") == t["kind"] and m["metadata"]["name"] == t["name"] and m["apiVersion"] == f"{t['group']}/{t['version']}":
                m = _json_patch(m, yaml.safe_load(patch["patch"]))
        out.append(m)
    return out


def _chart_deployment(name: str, args: list[str]) -> dict:
    """A Deployment shaped as the chart renders it (only what the overlay touches)."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"template": {"spec": {"containers": [{"name": name, "args": args}]}}},
    }


def test_helm_overlay_rewrites_the_chart_argv():
    """The chart's argv (templates at e25bf511) emulated from our values, then the kustomize patches."""
    values = _load(DEPLOY / "helm" / "values.yaml")[0]
    w, s = values["worker"], values["scheduler"]
    # dask-scheduler-deployment.yaml: hard-coded argv[0] plus extraArgs.
    sched_args = ["dask-scheduler", f"--port={s['servicePort']}", "--dashboard-address=:8787", *s.get("extraArgs", [])]
    # dask-worker-deployment.yaml: argv[0] from values, the scheduler Service, limits -> threads/memory.
    worker_args = [w["image"]["dask_worker"], f"dask-loom-scheduler:{s['servicePort']}"]
    if w["resources"].get("limits"):
        worker_args += ["--nthreads", str(w.get("threads_per_worker") or w["resources"]["limits"]["cpu"])]
        worker_args += ["--memory-limit", str(w["resources"]["limits"]["memory"])]
    worker_args += ["--no-dashboard", "--dashboard-address", "8790", *w["extraArgs"]]
    rendered = [_chart_deployment("dask-loom-scheduler", sched_args), _chart_deployment("dask-loom-worker", worker_args)]
    sched, worker = (m["spec"]["template"]["spec"]["containers"][0]["args"] for m in _apply_overlay(rendered))
    assert sched == ["dask", "scheduler", "--port=8786", "--dashboard-address=:8787"]
    _argv_ok(worker, "worker")
    assert worker[2] == "dask-loom-scheduler:8786"
    assert _has_preload(worker)
    # The `test` ops guard against a chart whose argv changed.
    changed = [_chart_deployment("dask-loom-worker", ["dask-cuda-worker", *worker_args[1:]])]
    with pytest.raises(ValueError, match="test failed"):
        _apply_overlay(changed)


def test_helm_chart_renders_with_the_overlay():
    """The real chart rendered with our values (needs helm-python-sdk and a dask/helm-chart checkout)."""
    chart = os.environ.get("DASK_HELM_CHART")
    if not chart:
        pytest.skip("set DASK_HELM_CHART to a dask/helm-chart 'dask' chart folder to render it (no chart in the repo)")
    helm_python = pytest.importorskip("helm_python", reason="helm-python-sdk renders charts offline")
    import kubernetes_validate

    values = _load(DEPLOY / "helm" / "values.yaml")[0]
    c = helm_python.Chart.load(chart)
    try:
        files = c.render(values, name="dask-loom", namespace="dask")
    finally:
        c.close()
    manifests = [d for path, text in files.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
    patched = _apply_overlay(manifests)
    deployments = {m["metadata"]["name"]: m for m in patched if m["kind"] == "Deployment"}
    assert set(deployments) == {"dask-loom-scheduler", "dask-loom-worker", "dask-loom-jupyter"}
    sched = deployments["dask-loom-scheduler"]["spec"]["template"]["spec"]["containers"][0]
    worker = deployments["dask-loom-worker"]["spec"]["template"]["spec"]["containers"][0]
    _argv_ok(sched["args"], "scheduler")
    _argv_ok(worker["args"], "worker")
    assert _has_preload(worker["args"])
    assert worker["args"][worker["args"].index("--nthreads") + 1] == "2"
    assert worker["image"] == "registry.example.org/dask-loom:0.1.0"
    for m in patched:
        kubernetes_validate.validate(m, "1.31", strict=True)


# --------------------------------------------------------------------------- SLURM


def _jobqueue_settings() -> dict:
    cfg = _load(DEPLOY / "slurm" / "jobqueue.yaml")[0]
    return {f"jobqueue.slurm.{k}": v for k, v in cfg["jobqueue"]["slurm"].items()}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_slurm_job_script():
    from dask_jobqueue import SLURMCluster

    with dask.config.set(_jobqueue_settings()):
        with SLURMCluster(scheduler_options={"host": "127.0.0.1", "dashboard_address": ":0"}) as cluster:
            script = cluster.job_script()
    lines = script.splitlines()
    header = [ln for ln in lines if ln.startswith("#SBATCH")]
    assert header == [
        "#SBATCH -J dask-loom-worker",
        "#SBATCH -e logs/dask/dask-loom-worker-%J.err",
        "#SBATCH -o logs/dask/dask-loom-worker-%J.out",
        "#SBATCH -p normal",
        "#SBATCH -n 1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=30G",
        "#SBATCH -t 02:00:00",
    ]
    assert 'source "${DASK_LOOM_VENV:-$HOME/venvs/dask-loom}/bin/activate"' in lines
    assert "export DASK_LOOM_BLOCK_SIZE=64MiB" in lines
    (cmd,) = [ln for ln in lines if "distributed.cli.dask_worker" in ln]
    argv = shlex.split(cmd)
    assert argv[1:3] == ["-m", "distributed.cli.dask_worker"]
    assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", argv[3])
    assert cmd.endswith(
        "--nthreads 4 --memory-limit 14.90GiB --nworkers 2 --nanny --death-timeout 120 "
        "--local-directory /tmp --preload dask_loom.worker_setup"
    )
    assert not HYPHENATED & set(argv)
    # The prologue's setting is one the preload accepts.
    worker_setup.parse_settings(["block-size=64MiB"])


def test_slurm_batch_script():
    path = DEPLOY / "slurm" / "loom-stats.sbatch"
    text = path.read_text()
    assert os.access(path, os.X_OK)
    assert text.startswith("#!/bin/bash\n")
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    directives = dict(
        ln[len("#SBATCH ") :].split("=", 1) for ln in text.splitlines() if ln.startswith("#SBATCH --") and "=" in ln
    )
    assert directives["--job-name"] == "dask-loom-driver"
    assert re.fullmatch(r"\d\d:\d\d:\d\d", directives["--time"])
    assert 'export DASK_CONFIG="$PWD/deploy/slurm"' in text
    assert "python deploy/slurm/loom_stats.py" in text
    assert (DEPLOY / "slurm" / "loom_stats.py").exists()
    # Without arguments it stops with a usage message (exit 2), before touching any environment.
    out = subprocess.run(["bash", str(path)], capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert out.returncode == 2
    assert "usage: sbatch" in out.stderr


def test_slurm_driver_prints_the_job_script_from_dask_config():
    """What the batch job does: DASK_CONFIG=deploy/slurm, then SLURMCluster() with no arguments."""
    env = {**os.environ, "DASK_CONFIG": str(DEPLOY / "slurm")}
    out = subprocess.run(
        [sys.executable, str(DEPLOY / "slurm" / "loom_stats.py"), "--print-job-script"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "#SBATCH -J dask-loom-worker" in out.stdout
    assert "--preload dask_loom.worker_setup" in out.stdout


@pytest.mark.slow
@pytest.mark.cluster
def test_slurm_driver_local_run(data_dir, tmp_path):
    """loom_stats.py --local on a real Loom file: the table equals numpy on the file's matrix."""
    import h5py

    src = data_dir / "loom" / "loomexperiment" / "L1_DRG_20_example.loom"
    out = tmp_path / "stats.tsv"
    run = subprocess.run(
        [sys.executable, str(DEPLOY / "slurm" / "loom_stats.py"), str(src), "--local", "--jobs", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    with h5py.File(src, "r") as f:
        m = f["matrix"][:]
        genes = [g.decode() if isinstance(g, bytes) else g for g in f["row_attrs/Gene"][:]]
    rows = [ln.split("\t") for ln in out.read_text().splitlines()]
    assert rows[0] == ["gene", "mean", "std", "nonzero"]
    assert [r[0] for r in rows[1:]] == genes
    got = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    np.testing.assert_allclose(got[:, 0], m.mean(axis=1), rtol=1e-8)
    np.testing.assert_allclose(got[:, 1], m.std(axis=1), rtol=1e-8)
    np.testing.assert_array_equal(got[:, 2], np.count_nonzero(m, axis=1))


# --------------------------------------------------------------------------- worker_setup


class _FakeServer:
    address = "tcp://127.0.0.1:1"


@pytest.fixture
def clean_config():
    """setup() changes this process's dask config for good (as in a worker): undo it after the test."""
    saved = copy.deepcopy(dask.config.config)
    yield
    dask.config.config.clear()
    dask.config.config.update(saved)


def test_worker_setup_applies_environment_and_arguments(monkeypatch, caplog, clean_config):
    monkeypatch.setenv("DASK_LOOM_BLOCK_SIZE", "8MiB")
    monkeypatch.setenv("DASK_LOOM_BLOKSIZE", "1")  # a typo: warned about, not applied
    with caplog.at_level(logging.INFO, logger="distributed.worker.dask_loom"):
        info = worker_setup.setup(_FakeServer(), ["scan-prefetch=5", "loom_chunks=[32, 32]"])
        assert dask.config.get("dask_loom.block-size") == "8MiB"
        assert dask_loom._config.block_size_bytes() == 8 * 2**20
        assert dask.config.get("dask_loom.scan-prefetch") == 5
        assert info["config"]["loom-chunks"] == [32, 32]
    assert info["dask_loom"] == dask_loom.__version__
    assert info["libraries"]["numpy"] == np.__version__
    assert "DASK_LOOM_BLOKSIZE" in caplog.text
    assert f"dask_loom {dask_loom.__version__} ready on tcp://127.0.0.1:1" in caplog.text
    assert "scan-prefetch=5" in caplog.text


@pytest.mark.parametrize(
    ("settings", "env", "message"),
    [
        (["blocksize=1"], {}, "unknown dask_loom setting 'blocksize'"),
        (["block-size"], {}, "not of the form KEY=VALUE"),
        ([], {"DASK_LOOM_BLOCK_SIZE": "-5"}, "dask_loom.block-size is invalid"),
        (["scan-prefetch=-1"], {}, "dask_loom.scan-prefetch must be a non-negative integer"),
    ],
)
def test_worker_setup_rejects_bad_settings(settings, env, message, monkeypatch, clean_config):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=message):
        worker_setup.setup(_FakeServer(), settings)


def test_worker_setup_teardown_closes_cached_files(data_dir):
    from dask_loom.hdf5 import _files, open_h5_read, read_ranges
    from dask_loom.storage import FileSpec

    spec = FileSpec.from_path(str(data_dir / "loom" / "loompy-test" / "test_2018-07.loom"))
    with open_h5_read(spec) as f:
        assert f["matrix"].shape == (1000, 100)
    assert read_ranges(spec, [0], [8]) == [b"\x89HDF\r\n\x1a\n"]  # keeps a descriptor open
    entry = _files._entries.peek(spec.url)
    assert entry.fd is not None
    worker_setup.teardown(_FakeServer())
    assert spec.url not in _files._entries
    assert entry.fd is None


# glibc's struct mallinfo2, and how many mmapped blocks one 1 MiB malloc adds (1: an mmap, 0: the heap).
_PROBE = r"""
import ctypes

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

def mmapped_by_a_1mib_malloc():
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info
    libc.malloc.restype = ctypes.c_void_p
    before = libc.mallinfo2().hblks
    p = libc.malloc(1 << 20)
    grew = libc.mallinfo2().hblks - before
    libc.free(ctypes.c_void_p(p))
    return grew
"""

_MMAPS = _PROBE + r"""
import json
from dask_loom.worker_setup import tune_allocator

first = mmapped_by_a_1mib_malloc()
tuned = tune_allocator()
print(json.dumps([first, tuned, mmapped_by_a_1mib_malloc()]))
"""


def _glibc() -> bool:
    import platform

    return sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({"MALLOC_TRIM_THRESHOLD_": "65536"}, [1, True, 0]),  # a nanny's worker: 1 MiB was an mmap, then heap
        ({}, [1, False, 0]),  # no trim setting: left alone (glibc raised its threshold itself at the free)
        ({"MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_MMAP_THRESHOLD_": "131072"}, [1, False, 1]),  # chosen: kept
    ],
)
def test_tune_allocator_serves_mid_size_buffers_from_the_heap(env, want):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if not _glibc():
        # Elsewhere there is no such setting: the call says it changed nothing.
        script = "from dask_loom.worker_setup import tune_allocator; print(tune_allocator())"
        out = subprocess.run([sys.executable, "-c", script], env={**clean, **env}, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().splitlines()[-1] == "False"
        return
    out = subprocess.run([sys.executable, "-c", _MMAPS], env={**clean, **env}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == want


def test_a_worker_without_the_preload_is_tuned_by_its_first_block_read(tmp_path):
    """A plain process ``LocalCluster`` (its nanny pins the mmap threshold): the first task lifts it."""
    from distributed import Client, LocalCluster

    glibc = _glibc()

    def probe() -> list:  # local: pickled by value to the worker
        import os

        from dask_loom import _allocator

        if not glibc:
            return [os.environ.get("MALLOC_TRIM_THRESHOLD_"), _allocator._tuned_pid == os.getpid()]
        ns: dict = {}
        exec(_PROBE, ns)
        return [os.environ.get("MALLOC_TRIM_THRESHOLD_"), ns["mmapped_by_a_1mib_malloc"]()]

    m = np.arange(200 * 300, dtype="f4").reshape(200, 300)
    fn = tmp_path / "t.loom.zarr"
    dask_loom.create(str(fn), m, {"g": np.arange(200)}, {"c": np.arange(300)}, scheduler="sync")
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        # glibc: a 1 MiB malloc is an mmap under the nanny's pin, from the heap after the first task.
        # Elsewhere: the first task made the (no-op) call once in the worker process.
        before, after = ([["65536", 1]], [["65536", 0]]) if glibc else ([["65536", False]], [["65536", True]])
        assert list(client.run(probe).values()) == before
        with dask_loom.connect(str(fn), "r") as ds:
            mean = ds.map([np.mean], axis=0, client=client)[0]
        assert list(client.run(probe).values()) == after
    np.testing.assert_allclose(mean, m.mean(axis=1), rtol=1e-6)


def test_dask_setup_is_a_click_command():
    import click

    assert isinstance(worker_setup.dask_setup, click.Command)
    ctx = worker_setup.dask_setup.make_context("dask_setup", ["--dask-loom-config", "block-size=1MiB"])
    assert ctx.params == {"settings": ("block-size=1MiB",)}


# --------------------------------------------------------------------------- the topology, as processes


@pytest.fixture(scope="module")
def topology(tmp_path_factory):
    """compose.yaml as local processes: `dask scheduler` and two `dask worker` with the preload.

    Worker 1 gets its settings from the environment (as compose's ``environment:``), worker 2
    also from preload arguments (``--dask-loom-config``).  Yields ``(address, logs)``.
    """
    from distributed import Client

    logs = tmp_path_factory.mktemp("topology-logs")
    files = [open(logs / name, "w") for name in ("scheduler.log", "worker-1.log", "worker-2.log")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_LOOM_")}
    env["DASK_LOOM_BLOCK_SIZE"] = "1MiB"
    scheduler, address = start_scheduler(files[0], env=env)
    procs = [scheduler]
    try:
        for i, extra in enumerate([[], ["--dask-loom-config", "scan-prefetch=3"]], start=1):
            procs.append(start_worker(address, f"worker-{i}", files[i], args=[*PRELOAD, *extra], env=env))
        c = Client(address, timeout=10)
        c.wait_for_workers(2, timeout=90)
        c.close()
        yield address, logs
    finally:
        stop(procs)
        for f in files:
            f.close()


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.xdist_group("deploy-topology")
def test_topology_workers_ran_the_preload(topology):
    from distributed import Client

    address, logs = topology
    with Client(address) as client:
        info = client.run(worker_setup.worker_info)
        names = {addr: w["name"] for addr, w in client.scheduler_info()["workers"].items()}
    assert len(info) == 2
    by_name = {names[addr]: i for addr, i in info.items()}
    assert set(by_name) == {"worker-1", "worker-2"}
    for i in by_name.values():
        assert i["dask_loom"] == dask_loom.__version__
        assert i["config"]["block-size"] == "1MiB"  # from DASK_LOOM_BLOCK_SIZE
    assert by_name["worker-1"]["config"]["scan-prefetch"] == dask_loom._config.DEFAULTS["scan-prefetch"]
    assert by_name["worker-2"]["config"]["scan-prefetch"] == 3  # from the preload argument
    for i in (1, 2):
        log = (logs / f"worker-{i}.log").read_text()
        assert f"dask_loom {dask_loom.__version__} ready on tcp://127.0.0.1:" in log


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.xdist_group("deploy-topology")
def test_topology_runs_a_dask_loom_job(topology, data_dir):
    """ds.map and ds.aggregate on a real Loom file, computed by the two worker processes."""
    import h5py
    from distributed import Client

    address, _ = topology
    path = data_dir / "loom" / "loomexperiment" / "L1_DRG_20_example.loom"
    with h5py.File(path, "r") as f:
        m = f["matrix"][:]
        clusters = f["col_attrs/Clusters"][:]
    with Client(address) as client, dask_loom.connect(path, "r", validate=False, client=client) as ds:
        mean, std = ds.map([np.mean, np.std], axis=0)
        grouped = ds.aggregate(group_by="Clusters", aggr_by="sum")
        prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    np.testing.assert_allclose(mean, m.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(std, m.std(axis=1), rtol=1e-12)
    expected = np.stack([m[:, clusters == c].sum(axis=1) for c in np.unique(clusters)], axis=1)
    np.testing.assert_allclose(grouped, expected, rtol=1e-12)
    assert {"loom-map", "loom-aggregate"} <= set(prefixes)


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.xdist_group("deploy-topology")
def test_topology_rejects_a_misconfigured_worker(topology, tmp_path):
    """A worker with an unknown dask_loom setting closes (with its nanny) instead of joining."""
    address, _ = topology
    log = tmp_path / "bad-worker.log"
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "distributed.cli.dask_worker", address, "--name", "bad", "--nthreads", "1",
             "--host", "127.0.0.1", *PRELOAD, "--dask-loom-config", "blocksize=1"],
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=120,
        )  # fmt: skip
    text = log.read_text()
    assert "unknown dask_loom setting 'blocksize'" in text
    assert "dask_loom-config-error" in text
    assert proc.returncode is not None
