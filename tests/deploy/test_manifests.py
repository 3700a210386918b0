"""deploy/k8s/ and deploy/slurm/ cannot run here (no cluster): they must agree with the code.

Kubernetes' own kinds are validated with ``kubernetes-validate`` (the API's schemas, bundled),
KEDA's against the CRDs kept in ``deploy/k8s/schemas/`` (strict: an unknown field fails, as
``kubectl apply`` refuses it), every ``ALPHAWATCH_*`` name must be a setting, every command must
parse with the CLI, the KEDA query must be the code's, and the grace periods must hold the
worker's stop grace.
"""

from __future__ import annotations

import functools
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from alphawatch.cli import build_parser
from alphawatch.service.api.hosts import allowed_hosts
from alphawatch.service.db import queue
from alphawatch.settings import Settings

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SLURM = ROOT / "deploy" / "slurm"
# The oldest Kubernetes the manifests are written for (batch/v1 Job ttl, networking.k8s.io/v1).
KUBERNETES = "1.29.0"
# Files beside kustomization.yaml that are alternatives to its resources, not part of them.
OPTIONAL = {"worker-deployment.yaml"}
CRDS = {
    "ScaledJob": "keda.sh_scaledjobs.yaml",
    "TriggerAuthentication": "keda.sh_triggerauthentications.yaml",
}
# Time a worker needs beyond ALPHAWATCH_STOP_GRACE_S: stop the analysis (or write its results),
# give the job back, close its connections.
EXIT_MARGIN_S = 30


def _manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in _manifests():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path, doc


DOCS = list(_documents())


def _id(item: tuple[Path, dict[str, Any]]) -> str:
    path, doc = item
    return f"{path.name}:{doc['kind']}"


def _config() -> dict[str, str]:
    (config,) = (d for _, d in DOCS if d["kind"] == "ConfigMap")
    return dict(config["data"])


def _pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod template: (its object's name, the pod spec)."""
    for _, doc in DOCS:
        spec = doc.get("spec", {})
        if doc["kind"] == "ScaledJob":
            yield doc["metadata"]["name"], spec["jobTargetRef"]["template"]["spec"]
        elif "template" in spec:
            yield doc["metadata"]["name"], spec["template"]["spec"]


def _containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, pod in _pod_specs():
        for container in pod["containers"]:
            yield name, container


def _strict(schema: Any) -> Any:
    """The CRD's schema, refusing fields it does not name (what ``kubectl apply`` does)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def _crd(kind: str) -> dict[str, Any]:
    # The C loader when PyYAML has it: the ScaledJob CRD is 650 kB.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((K8S / "schemas" / CRDS[kind]).read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    return dict(crd)


@functools.cache
def _validator(kind: str) -> Any:
    crd = _crd(kind)
    (version,) = (v for v in crd["spec"]["versions"] if v["served"] and v["storage"])
    schema = _strict(version["schema"]["openAPIV3Schema"])
    # The API server checks metadata itself; the CRD leaves it open.
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def _crd_errors(doc: dict[str, Any]) -> list[str]:
    crd = _crd(doc["kind"])
    group = crd["spec"]["group"]
    versions = {f"{group}/{v['name']}" for v in crd["spec"]["versions"] if v["served"]}
    errors = [] if doc["apiVersion"] in versions else [f"apiVersion {doc['apiVersion']}"]
    validator = _validator(doc["kind"])
    return errors + [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


@pytest.mark.parametrize("item", [d for d in DOCS if d[1]["kind"] not in CRDS], ids=_id)
def test_core_manifests_are_valid_kubernetes(item: tuple[Path, dict[str, Any]]) -> None:
    _, doc = item
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


@pytest.mark.parametrize("item", [d for d in DOCS if d[1]["kind"] in CRDS], ids=_id)
def test_keda_objects_are_valid_against_kedas_crds(item: tuple[Path, dict[str, Any]]) -> None:
    _, doc = item
    assert _crd_errors(doc) == []


def test_the_validation_would_catch_a_mistake() -> None:
    (job,) = (d for _, d in DOCS if d["kind"] == "ScaledJob")
    typo = {**job, "spec": {**job["spec"], "maxReplicaCont": 3}}
    assert any("maxReplicaCont" in e for e in _crd_errors(typo))
    wrong = {**job, "spec": {**job["spec"], "pollingInterval": "often"}}
    assert any("pollingInterval" in e for e in _crd_errors(wrong))
    (api,) = (d for _, d in DOCS if d["kind"] == "Deployment" and "api" in d["metadata"]["name"])
    broken = {**api, "spec": {**api["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in _manifests()} - OPTIONAL
    (image,) = kustomization["images"]
    # Every container runs the image kustomize rewrites.
    assert {c["image"] for _, c in _containers()} == {image["name"]}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its kustomize) not installed")
def test_kustomize_builds_the_whole_deployment() -> None:
    built = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True
    ).stdout
    objects = [d for d in yaml.safe_load_all(built) if d]
    assert len(objects) == sum(1 for p, _ in DOCS if p.name not in OPTIONAL)
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    images = set(re.findall(r"^\s*image: (\S+)$", built, flags=re.MULTILINE))
    # The image of every pod, the ScaledJob's included, is the one kustomize was told.
    assert images == {f"{image['newName']}:{image['newTag']}"}
    assert built.count("image:") == len(list(_containers())) - 1  # but the optional pool's
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "alphawatch", obj["metadata"]["name"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "alphawatch"


def test_the_keda_query_is_the_queue_depth_of_the_code() -> None:
    triggers = [t for _, d in DOCS if d["kind"] == "ScaledJob" for t in d["spec"]["triggers"]]
    assert [t["type"] for t in triggers] == ["postgresql"]
    assert triggers[0]["metadata"]["query"] == queue.QUEUE_DEPTH_SQL
    # Scale to zero: no worker while nothing is claimable.
    (job,) = (d for _, d in DOCS if d["kind"] == "ScaledJob")
    assert job["spec"]["minReplicaCount"] == 0
    assert triggers[0]["authenticationRef"]["name"] in {
        d["metadata"]["name"] for _, d in DOCS if d["kind"] == "TriggerAuthentication"
    }
    # The printed query (`alphawatch db queue-depth --sql`) is the same text.
    printed = subprocess.run(
        [*_alphawatch(), "db", "queue-depth", "--sql"], capture_output=True, text=True, check=True
    )
    assert printed.stdout.strip() == triggers[0]["metadata"]["query"]
    # The deployment guide shows the same text.
    assert queue.QUEUE_DEPTH_SQL in (ROOT / "docs" / "DEPLOY.md").read_text()


def _alphawatch() -> list[str]:
    import sys

    return [sys.executable, "-m", "alphawatch"]


def test_commands_parse_with_the_cli() -> None:
    parser = build_parser()
    commands = [c["command"] for _, c in _containers()]
    assert commands
    for argv in commands:
        assert argv[0] == "alphawatch"
        parser.parse_args(argv[1:])  # raises SystemExit on an unknown option


def test_gpu_workers_ask_for_a_gpu_and_stop_within_their_grace_period() -> None:
    stop_grace = float(_config()["ALPHAWATCH_STOP_GRACE_S"])
    lease = float(_config()["ALPHAWATCH_LEASE_S"])
    heartbeat = float(_config()["ALPHAWATCH_HEARTBEAT_S"])
    workers = [(n, p) for n, p in _pod_specs() if "worker" in n]
    assert len(workers) == 2  # the ScaledJob's and the fixed pool's
    for name, pod in workers:
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1, name
        assert "--device" in container["command"] and "cuda" in container["command"], name
        # SIGTERM, then stop_grace_s to finish the job in hand, then the time to give it back:
        # all before the kubelet's SIGKILL, which would leave the job to its lease.
        assert pod["terminationGracePeriodSeconds"] >= stop_grace + EXIT_MARGIN_S, name
        assert container["livenessProbe"]["httpGet"]["path"] == "/health", name
    # A lease outlives a few missed heartbeats, and is short beside the grace period: a worker
    # killed without warning costs its job one lease of waiting.
    assert lease >= 4 * heartbeat
    (job,) = (d for _, d in DOCS if d["kind"] == "ScaledJob")
    argv = job["spec"]["jobTargetRef"]["template"]["spec"]["containers"][0]["command"]
    args = build_parser().parse_args(argv[1:])
    assert args.exit_when_idle > 0 and args.max_jobs >= 1 and args.health_port == 8081
    assert job["spec"]["jobTargetRef"]["template"]["spec"]["restartPolicy"] == "Never"


def test_discovery_runs_always_and_analyses_nothing() -> None:
    (discovery,) = (d for _, d in DOCS if d["metadata"]["name"] == "alphawatch-discovery")
    assert discovery["kind"] == "Deployment" and discovery["spec"]["replicas"] == 1
    (container,) = discovery["spec"]["template"]["spec"]["containers"]
    assert build_parser().parse_args(container["command"][1:]).discover_only
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})


def test_api_probes_are_answered(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette.testclient import TestClient

    from alphawatch.service.api import create_app
    from alphawatch.service.db.migrations import upgrade

    (api,) = (d for _, d in DOCS if d["metadata"]["name"] == "alphawatch-api")
    (container,) = api["spec"]["template"]["spec"]["containers"]
    for key, value in _config().items():
        monkeypatch.setenv(key, value)
    upgrade(sqlite_url)
    settings = Settings(database_url=sqlite_url)
    hosts = allowed_hosts(settings.allowed_hosts, "0.0.0.0")
    assert hosts is not None
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        (header,) = get["httpHeaders"]
        assert header["name"] == "Host" and hosts.allows(f"{header['value']}:8000")
        with TestClient(create_app(settings), base_url=f"http://{header['value']}:8000") as c:
            assert c.get(get["path"]).status_code == 200, probe
    # The Service's and the Ingress's names are answered, a stranger's is not.
    (ingress,) = (d for _, d in DOCS if d["kind"] == "Ingress")
    for host in (
        "alphawatch:8000",
        "alphawatch.alphawatch.svc:8000",
        ingress["spec"]["rules"][0]["host"],
    ):
        assert hosts.allows(host), host
    assert not hosts.allows("rebound.example")


def _setting_exists(name: str) -> bool:
    """Whether ``ALPHAWATCH_<NAME>`` (nested with ``__``) names a field of :class:`Settings`."""
    model: Any = Settings
    for part in name.removeprefix("ALPHAWATCH_").lower().split("__"):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return False
        model = fields[part].annotation
    return True


def _named(text: str) -> set[str]:
    return set(re.findall(r"\bALPHAWATCH_[A-Z0-9_]+", text))


DEPLOY_FILES = [*sorted(K8S.glob("*.yaml")), *sorted(SLURM.iterdir())]


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=lambda p: p.name)
def test_every_alphawatch_variable_is_a_setting(path: Path) -> None:
    names = _named(path.read_text())
    assert {n for n in names if not _setting_exists(n)} == set()


def test_the_setting_check_would_catch_a_misspelling() -> None:
    assert _setting_exists("ALPHAWATCH_STOP_GRACE_S")
    assert _setting_exists("ALPHAWATCH_GATE__MAX_ALPHA")
    assert not _setting_exists("ALPHAWATCH_STOP_GRACE")
    assert not _setting_exists("ALPHAWATCH_GATE__MAX_ALHPA")
    assert _named("x ALPHAWATCH_LEASE_S=1 ${ALPHAWATCH_IDLE:-3}") == {
        "ALPHAWATCH_LEASE_S",
        "ALPHAWATCH_IDLE",
    }


def test_the_configuration_makes_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    (secret,) = (d for _, d in DOCS if d["kind"] == "Secret")
    for key, value in {**_config(), **secret["stringData"]}.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert settings.allowed_roots == [Path("/runs")]
    assert settings.stop_grace_s == 120


def test_the_sbatch_script(tmp_path: Path) -> None:
    script = SLURM / "alphawatch-workers.sbatch"
    text = script.read_text()
    for path in (script, SLURM / "scale-workers.sh"):
        subprocess.run(["bash", "-n", str(path)], check=True)
    directives = dict(
        re.match(r"#SBATCH --([a-z-]+)=?(.*)", line).groups()  # type: ignore[union-attr]
        for line in text.splitlines()
        if line.startswith("#SBATCH")
    )
    assert directives["gres"] == "gpu:1" and "array" in directives
    # Slurm's SIGTERM comes this long before the time limit; the worker's grace fits in it.
    warning_s = int(directives["signal"].removeprefix("TERM@"))
    grace = re.search(r"ALPHAWATCH_STOP_GRACE_S=\"\$\{ALPHAWATCH_STOP_GRACE_S:-(\d+)\}\"", text)
    assert grace is not None and int(grace.group(1)) + EXIT_MARGIN_S <= warning_s
    # The worker's command parses, with --exit-when-idle, and replaces the shell (exec) so that
    # the signal reaches it.
    (line,) = [ln for ln in text.splitlines() if ln.startswith("exec ")]
    argv = shlex.split(line.replace('"$ALPHAWATCH"', "alphawatch").replace('"$IDLE_S"', "600"))
    argv = [a for a in argv if a != "$@"]
    assert argv[:2] == ["exec", "alphawatch"]
    args = build_parser().parse_args(argv[2:])
    assert args.command == "watch" and args.exit_when_idle == 600 and args.device == "cuda"
    # Without a database URL the script refuses to start, with the reason.
    failed = subprocess.run(
        ["bash", str(script)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert failed.returncode != 0 and "ALPHAWATCH_DATABASE_URL" in failed.stderr
