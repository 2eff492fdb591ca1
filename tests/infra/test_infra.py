"""The deployment files (infra/, jobs/configs/) against the code they run: every manifest parses and names
an image, every scheduled command is a command line the `mumic` CLI accepts today, the schedules are valid
cron, the image installs this package as a non-root user, and no credential is written anywhere.

No cluster and no Docker engine: the checks are static, plus the CronJobs' submit script run against a
fake `kubectl`.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from jobs import cli

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
MLFLOW_DOCKERFILE = ROOT / "infra" / "docker" / "mlflow.Dockerfile"
CONFIGS = ROOT / "jobs" / "configs"
IMAGE_APP_DIR = "/app"  # where the Dockerfile puts the repository's package folders (and jobs/configs)
RUN_DATE = "2026-11-20"

API_VERSIONS = {
    "RayCluster": "ray.io/v1",
    "RayJob": "ray.io/v1",
    "CronJob": "batch/v1",
    "Deployment": "apps/v1",
    "StatefulSet": "apps/v1",
    "Service": "v1",
    "ServiceAccount": "v1",
    "Namespace": "v1",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
}
EXPECTED_KINDS = {
    "raycluster.yaml": ["RayCluster"],
    "rayjob-retag.yaml": ["RayJob"],
    "rayjob-retrain.yaml": ["RayJob"],
    "cronjobs.yaml": ["ServiceAccount", "Role", "RoleBinding", "CronJob", "CronJob"],
    "mlflow.yaml": ["Deployment", "Service", "Service", "StatefulSet"],
    "namespace.yaml": ["Namespace"],
    "kustomization.yaml": ["Kustomization"],
}
# which command each RayJob runs, and the job config it reads
RAYJOBS = {
    "rayjob-retag.yaml": ("retag", "nightly_retag.yaml"),
    "rayjob-retrain.yaml": ("train", "weekly_retrain.yaml"),
}
CRONJOBS = {"mumic-nightly-retag": "rayjob-retag.yaml", "mumic-weekly-retrain": "rayjob-retrain.yaml"}


# ---- helpers --------------------------------------------------------------------------------------------


def manifests(name: str) -> list[dict]:
    with open(K8S / name) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def one(name: str, kind: str) -> dict:
    docs = [d for d in manifests(name) if d["kind"] == kind]
    assert len(docs) == 1, f"{name}: want one {kind}, found {len(docs)}"
    return docs[0]


def walk(node, path=()):
    """Every (path, mapping) in a parsed YAML tree."""
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from walk(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, (*path, i))


def containers(doc: dict) -> list[tuple[tuple, dict]]:
    return [
        ((*path, key, i), c)
        for path, node in walk(doc)
        for key in ("containers", "initContainers")
        if isinstance(node.get(key), list)
        for i, c in enumerate(node[key])
    ]


def strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


def pinned(package: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        m = re.fullmatch(rf"{re.escape(package)}(\[[^\]]*\])?==(\S+)", dep.strip())
        if m:
            return m.group(2)
    raise AssertionError(f"{package} is not pinned with == in pyproject.toml")


def parse_mumic(argv: list[str]) -> SimpleNamespace:
    """`jobs.cli.parse` (which loads --config files and validates every value) with no abbreviated flags:
    `--run-id` must not pass as an abbreviation of a renamed `--run-identifier`. Fails the test on a bad
    line; else the command and every option's value by name."""
    try:
        inv = cli.parse(argv, allow_abbrev=False)
    except SystemExit as e:
        pytest.fail(f"`mumic {shlex.join(argv)}` is not a valid command line (argparse exit {e.code})")
    except cli.UserError as e:
        pytest.fail(f"`mumic {shlex.join(argv)}`: {e}")
    return SimpleNamespace(command=inv.command, **inv.values)


def in_repo(token: str) -> str:
    """A path inside the image (/app/...) → the same file in this checkout."""
    if token == IMAGE_APP_DIR or token.startswith(IMAGE_APP_DIR + "/"):
        return str(ROOT) + token[len(IMAGE_APP_DIR) :]
    return token


def entrypoint_argv(rayjob: dict, run_date: str = RUN_DATE) -> list[str]:
    text = rayjob["spec"]["entrypoint"].replace("${RUN_DATE}", run_date)
    argv = shlex.split(text)
    assert argv[0] == "mumic", f"entrypoint should run the mumic CLI: {text}"
    assert "$" not in text, f"unfilled placeholder in entrypoint: {text}"
    return [in_repo(t) for t in argv[1:]]


def config_as_flags(command: str, config: dict) -> list[str]:
    """A job config written as the command-line flags it stands for."""
    options = cli.command_fields(command)
    argv = []
    for key, value in config.items():
        option = options[key]
        if option.is_bool:
            assert isinstance(value, bool), f"{key} is a switch: true or false, not {value!r}"
            argv += [option.flag if value else "--no-" + option.flag[2:]]
        else:
            assert not isinstance(value, (dict, list)), f"{key}: one value, not {value!r}"
            argv += [option.flag, str(value)]
    return argv


def gpu_workers(cluster_spec: dict) -> int:
    total = 0
    for group in cluster_spec["workerGroupSpecs"]:
        (c,) = group["template"]["spec"]["containers"]
        total += int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) * int(group["replicas"])
    return total


# ---- a strict cron validator (Kubernetes' dialect: 5 fields, names, ranges, steps, lists) ---------------

MONTHS = {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())}
WEEKDAYS = {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}
CRON_FIELDS = (  # name, lowest, highest, names, '?' allowed
    ("minute", 0, 59, {}, False),
    ("hour", 0, 23, {}, False),
    ("day of month", 1, 31, {}, True),
    ("month", 1, 12, MONTHS, False),
    ("day of week", 0, 6, WEEKDAYS, True),
)
CRON_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


def _cron_value(token: str, lo: int, hi: int, names: dict) -> int:
    if token.lower() in names:
        return names[token.lower()]
    if not token.isdigit():
        raise ValueError(f"{token!r} is not a number{' or a name' if names else ''}")
    value = int(token)
    if not lo <= value <= hi:
        raise ValueError(f"{value} is outside {lo}-{hi}")
    return value


def _cron_item_error(item: str, lo: int, hi: int, names: dict, question_ok: bool) -> str | None:
    base, slash, step = item.partition("/")
    if slash and not (step.isdigit() and int(step) > 0):
        return f"step {step!r} is not a positive number"
    if base == "*" or (question_ok and base == "?"):
        return None
    start, dash, end = base.partition("-")
    try:
        first = _cron_value(start, lo, hi, names)
        if dash:
            last = _cron_value(end, lo, hi, names)
            if first > last:
                return f"range {base} runs backwards"
    except ValueError as e:
        return str(e)
    return None


def cron_errors(schedule: str) -> list[str]:
    """Why `schedule` is not a valid Kubernetes CronJob schedule (empty list: it is)."""
    if schedule.strip() in CRON_DESCRIPTORS:
        return []
    fields = schedule.split()
    if len(fields) != 5:
        return [f"want 5 fields (minute hour day-of-month month day-of-week), got {len(fields)}"]
    errors = []
    for text, (name, lo, hi, names, question_ok) in zip(fields, CRON_FIELDS, strict=True):
        for item in text.split(","):
            error = _cron_item_error(item, lo, hi, names, question_ok)
            if error:
                errors.append(f"{name} {item!r}: {error}")
    return errors


@pytest.mark.parametrize(
    "schedule",
    [
        "0 2 * * *",
        "0 4 * * SUN",
        "*/15 0-6,22-23 1,15 JAN-mar mon-fri",
        "5/10 * ? * *",
        "0 0 1 */3 *",
        "@daily",
    ],
)
def test_cron_validator_accepts_valid_schedules(schedule):
    assert cron_errors(schedule) == []


@pytest.mark.parametrize(
    "schedule",
    [
        "0 2 * *",  # 4 fields
        "0 2 * * * *",  # 6 fields (seconds are not Kubernetes' dialect)
        "TZ=UTC 0 2 * * *",  # time zones go in spec.timeZone
        "60 * * * *",
        "0 24 * * *",
        "0 0 0 * *",
        "0 0 * 13 *",
        "0 0 * * 7",
        "*/0 * * * *",
        "5-1 * * * *",
        "0,,5 * * * *",
        "? * * * *",
        "MON * * * *",
        "0 0 * * FUNDAY",
        "0 0 * JANUARY *",
        "@fortnightly",
    ],
)
def test_cron_validator_rejects_invalid_schedules(schedule):
    assert cron_errors(schedule), f"{schedule!r} should be rejected"


# ---- manifests ------------------------------------------------------------------------------------------


def test_infra_folder_holds_exactly_the_known_manifests():
    assert sorted(p.name for p in K8S.glob("*.yaml")) == sorted(EXPECTED_KINDS)


@pytest.mark.parametrize("name", sorted(EXPECTED_KINDS))
def test_every_manifest_parses_with_the_right_api_version_and_kind(name):
    docs = manifests(name)
    assert [d.get("kind") for d in docs] == EXPECTED_KINDS[name]
    for d in docs:
        assert d.get("apiVersion") == API_VERSIONS[d["kind"]], f"{name}: {d['kind']} apiVersion"
        if d["kind"] != "Kustomization":
            meta = d.get("metadata") or {}
            assert meta.get("name") or meta.get("generateName"), f"{name}: {d['kind']} has no name"
        if d["kind"] not in ("Kustomization", "Namespace"):
            assert d["metadata"].get("namespace") == "mumic", f"{name}: {d['kind']} outside namespace mumic"


@pytest.mark.parametrize("name", sorted(set(EXPECTED_KINDS) - {"kustomization.yaml", "namespace.yaml"}))
def test_every_workload_names_a_pinned_image(name):
    found = [c for d in manifests(name) for _, c in containers(d)]
    if name in ("cronjobs.yaml", "mlflow.yaml", "raycluster.yaml") or name.startswith("rayjob-"):
        assert found, f"{name} runs no container"
    for c in found:
        image = c.get("image", "")
        assert image, f"{name}: container {c.get('name')} names no image"
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest", f"{name}: image {image} should be pinned to a tag"


def test_ray_pods_all_run_the_mumic_image():
    images = {
        c["image"]
        for name in ("raycluster.yaml", *RAYJOBS)
        for d in manifests(name)
        for _, c in containers(d)
    }
    assert len(images) == 1, f"the Ray head and workers should run one image, found {sorted(images)}"
    assert images.pop().rsplit("/", 1)[-1].startswith("mumic:")


def test_ray_versions_agree_across_pyproject_dockerfile_and_clusters():
    ray = pinned("ray")
    base = resolved_base_image(DOCKERFILE.read_text())
    if base.startswith("rayproject/"):
        assert base.split(":", 1)[1].startswith(ray + "-"), f"base image {base} is not Ray {ray}"
    assert one("raycluster.yaml", "RayCluster")["spec"]["rayVersion"] == ray
    for name in RAYJOBS:
        assert one(name, "RayJob")["spec"]["rayClusterSpec"]["rayVersion"] == ray


def test_raycluster_has_a_cpu_head_and_an_autoscaling_gpu_worker_group():
    spec = one("raycluster.yaml", "RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "the head should not take tasks or actors"
    for _, c in containers(head["template"]):
        for kind in ("requests", "limits"):
            assert "nvidia.com/gpu" not in c.get("resources", {}).get(kind, {}), "the head needs no GPU"
    (gpu,) = [
        g for g in spec["workerGroupSpecs"] if gpu_workers({"workerGroupSpecs": [{**g, "replicas": 1}]})
    ]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1 and gpu["replicas"] == 0
    (worker,) = gpu["template"]["spec"]["containers"]
    assert str(worker["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    tolerated = {t.get("key") for t in gpu["template"]["spec"].get("tolerations", [])}
    assert "nvidia.com/gpu" in tolerated, "GPU nodes are usually tainted: the workers must tolerate it"


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_ray_pods_read_s3_credentials_from_a_secret_and_know_the_mlflow_service():
    svc = next(
        d for d in manifests("mlflow.yaml") if d["kind"] == "Service" and d["metadata"]["name"] == "mlflow"
    )
    port = svc["spec"]["ports"][0]["port"]
    want_uri = f"http://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:{port}"
    for name in ("raycluster.yaml", *RAYJOBS):
        for path, c in containers(manifests(name)[0]):
            env = _env(c)
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert "secretKeyRef" in env[key].get("valueFrom", {}), (
                    f"{name} {path}: {key} not from a Secret"
                )
            assert env["MLFLOW_TRACKING_URI"]["value"] == want_uri, f"{name} {path}: MLFLOW_TRACKING_URI"


@pytest.mark.parametrize("name", sorted(RAYJOBS))
def test_rayjob_cluster_is_the_raycluster_spec_at_a_fixed_size(name):
    job = one(name, "RayJob")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    assert isinstance(job["ttlSecondsAfterFinished"], int) and job["ttlSecondsAfterFinished"] >= 0
    assert "clusterSelector" not in job
    mine, ref = job["rayClusterSpec"], one("raycluster.yaml", "RayCluster")["spec"]
    assert mine["headGroupSpec"] == ref["headGroupSpec"], "head differs from raycluster.yaml"
    assert [g["groupName"] for g in mine["workerGroupSpecs"]] == [
        g["groupName"] for g in ref["workerGroupSpecs"]
    ]
    for g, r in zip(mine["workerGroupSpecs"], ref["workerGroupSpecs"], strict=True):
        assert g["template"] == r["template"], (
            f"worker group {g['groupName']} pods differ from raycluster.yaml"
        )
        assert g["rayStartParams"] == r["rayStartParams"]
        assert g["replicas"] == g["minReplicas"] == g["maxReplicas"] >= 1, (
            "a RayJob's cluster has a fixed size"
        )
        assert g["maxReplicas"] <= r["maxReplicas"], "more workers than the shared cluster allows"


# ---- the commands the schedules run ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RAYJOBS))
def test_rayjob_entrypoint_is_a_real_mumic_command_line(name):
    command, config_name = RAYJOBS[name]
    job = one(name, "RayJob")
    argv = entrypoint_argv(job)
    assert argv[0] == command
    config = argv[argv.index("--config") + 1]
    assert Path(config) == CONFIGS / config_name, f"{name} should read jobs/configs/{config_name}"
    args = parse_mumic(argv)
    assert args.command == command
    if command == "retag":
        from pipelines.retag import RUN_ID_PATTERN

        assert args.model == "models:/mumic@champion"
        assert args.catalog.startswith("s3://") and args.output.startswith("s3://")
        assert args.run_date == RUN_DATE
        assert args.run_id == f"nightly-{RUN_DATE}", "one run id per night: a re-run resumes it"
        assert re.match(RUN_ID_PATTERN, args.run_id)
        assert gpu_workers(job["spec"]["rayClusterSpec"]) >= 1
        assert args.gpus == gpu_workers(job["spec"]["rayClusterSpec"]), "one inference actor per GPU worker"
    else:
        assert args.use_gpu is True
        assert args.workers == gpu_workers(job["spec"]["rayClusterSpec"]), (
            "one GPU worker per Ray Train worker"
        )
        assert args.register == "mumic"
        assert args.run_name == f"weekly-{RUN_DATE}", "one run name per week: a re-run resumes it"
        assert args.storage_path and args.storage_path.startswith("s3://"), (
            "checkpoints must be on shared storage"
        )


@pytest.mark.parametrize("name", sorted(RAYJOBS))
def test_rayjob_entrypoint_changes_with_the_run_date(name):
    job = one(name, "RayJob")
    assert entrypoint_argv(job, "2026-01-01") != entrypoint_argv(job, "2026-01-02")


@pytest.mark.parametrize("config_name,command", [(c, cmd) for cmd, c in RAYJOBS.values()])
def test_job_config_uses_only_options_the_command_knows_with_valid_values(config_name, command):
    config = cli.load_job_config(str(CONFIGS / config_name))
    known = set(cli.command_fields(command))
    assert config and set(config) <= known, f"unknown options: {sorted(set(config) - known)}"
    # the file as given and the same values as flags: both validated, and the required ones are there
    from_file = parse_mumic([command, "--config", str(CONFIGS / config_name)])
    from_flags = parse_mumic([command, *config_as_flags(command, config)])
    for key, value in config.items():
        assert getattr(from_flags, key) == value or str(getattr(from_flags, key)) == str(value), key
    assert from_file == from_flags


def test_example_taxonomy_loads():
    from mumic_core.taxonomy import Taxonomy

    taxonomy = Taxonomy.load(CONFIGS / "taxonomy.example.yaml")
    assert len(taxonomy) >= 5 and any(label.unseen for label in taxonomy.labels)


def test_cronjobs_are_valid_forbid_overlap_and_submit_the_rayjob_templates():
    docs = manifests("cronjobs.yaml")
    kustomization = one("kustomization.yaml", "Kustomization")
    (generator,) = [g for g in kustomization["configMapGenerator"] if g["name"] == "mumic-rayjobs"]
    assert generator.get("namespace") == "mumic"
    for f in generator["files"]:
        assert (K8S / f).is_file(), f"kustomization.yaml generates from a missing file {f}"
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file()
    assert "cronjobs.yaml" in kustomization["resources"] and "mlflow.yaml" in kustomization["resources"]

    cronjobs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "CronJob"}
    assert set(cronjobs) == set(CRONJOBS)
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    for name, cron in cronjobs.items():
        spec = cron["spec"]
        assert cron_errors(spec["schedule"]) == [], f"{name}: {cron_errors(spec['schedule'])}"
        assert spec["concurrencyPolicy"] == "Forbid"
        assert spec.get("timeZone"), f"{name}: say which time zone the schedule is in"
        job = spec["jobTemplate"]["spec"]
        assert job["backoffLimit"] == 0, f"{name}: a retried submitter would start a second RayJob"
        pod = job["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
        assert pod["serviceAccountName"] in accounts
        (container,) = pod["containers"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = container["volumeMounts"]
        assert volumes[mount["name"]]["configMap"]["name"] == generator["name"]
        script, template = container["command"][-2:]
        assert script == f"{mount['mountPath']}/submit-rayjob.sh"
        assert template == f"{mount['mountPath']}/{CRONJOBS[name]}"
        assert Path(template).name in generator["files"] and "submit-rayjob.sh" in generator["files"]


def test_scheduler_role_may_create_and_watch_rayjobs_and_nothing_else():
    docs = manifests("cronjobs.yaml")
    (role,) = [d for d in docs if d["kind"] == "Role"]
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    (account,) = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "mumic"} in binding[
        "subjects"
    ]
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert {"create", "get"} <= set(rule["verbs"]) <= {"create", "get", "list", "watch"}


# ---- the submit script, against a fake kubectl ----------------------------------------------------------

FAKE_KUBECTL = """#!{python}
import os, sys
state = os.environ["FAKE_KUBECTL_DIR"]
args = sys.argv[1:]
with open(os.path.join(state, "calls"), "a") as f:
    f.write(" ".join(args) + "\\n")
if args[0] == "create":
    open(os.path.join(state, "created.yaml"), "w").write(sys.stdin.read())
    sys.stdout.write("mumic mumic-job-x7k2p")
elif args[0] == "get" and "jsonpath={{.status.jobDeploymentStatus}}" in args:
    path = os.path.join(state, "deployment")
    states = open(path).read().split()
    open(path, "w").write(" ".join(states[1:] or states))
    sys.stdout.write(states[0])
elif args[0] == "get" and "jsonpath={{.status.jobStatus}}" in args:
    sys.stdout.write(os.environ["FAKE_JOB_STATUS"])
elif args[0] == "get":
    sys.stdout.write("AppFailed: the Ray job failed")
else:
    sys.exit("fake kubectl: unexpected " + " ".join(args))
"""


def run_submit(
    tmp_path: Path, template: str, deployment: str, job_status: str, run_date: str | None = RUN_DATE
):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.format(python=sys.executable))
    kubectl.chmod(0o755)
    (tmp_path / "deployment").write_text(deployment)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "FAKE_KUBECTL_DIR": str(tmp_path),
        "FAKE_JOB_STATUS": job_status,
        "POLL_SECONDS": "0",
    }
    if run_date is not None:
        env["RUN_DATE"] = run_date
    proc = subprocess.run(
        ["/bin/sh", str(K8S / "submit-rayjob.sh"), str(K8S / template)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
    return proc, calls


@pytest.mark.parametrize("template", sorted(RAYJOBS))
def test_submit_script_creates_the_rayjob_for_the_run_date_and_succeeds_with_it(template, tmp_path):
    proc, calls = run_submit(tmp_path, template, "Initializing Running Running Complete", "SUCCEEDED")
    assert proc.returncode == 0, proc.stderr
    assert calls[0].startswith("create -f -")
    assert all(c.startswith("get rayjob mumic-job-x7k2p -n mumic") for c in calls[1:])
    created = yaml.safe_load((tmp_path / "created.yaml").read_text())
    assert created["metadata"]["generateName"] and "name" not in created["metadata"], (
        "one name per submission"
    )
    argv = entrypoint_argv(created, run_date="unused")  # already filled in by the script
    assert RUN_DATE in " ".join(argv)
    parse_mumic(argv)


def test_submit_script_fails_when_the_ray_job_fails(tmp_path):
    proc, _ = run_submit(tmp_path, "rayjob-retag.yaml", "Running Failed", "FAILED")
    assert proc.returncode == 1
    assert "AppFailed" in proc.stderr


def test_submit_script_fails_when_the_job_completes_without_succeeding(tmp_path):
    proc, _ = run_submit(tmp_path, "rayjob-retag.yaml", "Complete", "STOPPED")
    assert proc.returncode == 1


def test_submit_script_defaults_to_today_in_utc_and_refuses_a_bad_date(tmp_path):
    import datetime as dt

    proc, _ = run_submit(tmp_path, "rayjob-retag.yaml", "Complete", "SUCCEEDED", run_date=None)
    assert proc.returncode == 0, proc.stderr
    today = dt.datetime.now(dt.UTC).date().isoformat()
    assert f"nightly-{today}" in (tmp_path / "created.yaml").read_text()
    (tmp_path / "bad").mkdir()
    proc, calls = run_submit(
        tmp_path / "bad", "rayjob-retag.yaml", "Complete", "SUCCEEDED", run_date="20-11-2026"
    )
    assert proc.returncode == 2 and not calls


# ---- MLflow ---------------------------------------------------------------------------------------------


def test_mlflow_server_uses_postgres_from_a_secret_and_an_s3_artifact_store():
    docs = manifests("mlflow.yaml")
    (deploy,) = [d for d in docs if d["kind"] == "Deployment"]
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    args = " ".join(c.get("command", []) + c.get("args", []))
    assert "mlflow server" in args and "--serve-artifacts" in args
    assert re.search(r"--artifacts-destination[= ]s3://", args)
    # s3:// artifact locations: retag's actors on every node read a registered model straight from S3
    assert re.search(r"--default-artifact-root[= ]s3://", args)
    env = _env(c)
    assert "secretKeyRef" in env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]
    assert "--backend-store-uri" not in args, "the store URI holds a password: from the Secret only"
    hosts = env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    assert "mlflow.mumic.svc.cluster.local:*" in hosts, "MLflow rejects Host headers it does not know"

    (pg,) = [d for d in docs if d["kind"] == "StatefulSet"]
    assert pg["spec"]["volumeClaimTemplates"], "the database needs a persistent volume"
    (pgc,) = pg["spec"]["template"]["spec"]["containers"]
    assert "secretKeyRef" in _env(pgc)["POSTGRES_PASSWORD"]["valueFrom"]
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    assert {"mlflow", pg["spec"]["serviceName"]} <= services
    assert f"mlflow:{pinned('mlflow')}" in c["image"], "server and clients should run the same MLflow"


# ---- credentials ----------------------------------------------------------------------------------------

SECRET_NAME = re.compile(
    r"SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|ACCESS_KEY|API_KEY|BACKEND_STORE_URI", re.I
)
SECRET_TEXT = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"://[^/\s:@$<]+:[^/\s@$<]+@"),  # user:password@ in a URI
    re.compile(r"(?i)(secret|password|passwd|token|access_key)\w*[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+_\-]{6,}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


def test_no_credentials_are_written_in_infra_or_job_configs():
    for path in sorted((ROOT / "infra").rglob("*")) + sorted(CONFIGS.glob("*.yaml")):
        if not path.is_file():
            continue
        text = path.read_text()
        if path.suffix == ".yaml":
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
            values = [s for d in docs for s in strings(d)]  # comments are not deployed
            for d in docs:
                assert d.get("kind") != "Secret", (
                    f"{path.name}: Secrets are created out of band, not committed"
                )
                for _, node in walk(d):
                    if isinstance(node.get("name"), str) and ("value" in node or "valueFrom" in node):
                        if SECRET_NAME.search(node["name"]):
                            assert "value" not in node, f"{path.name}: {node['name']} is inline"
                            assert "secretKeyRef" in node["valueFrom"], (
                                f"{path.name}: {node['name']} not from a Secret"
                            )
        else:
            values = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
            for ln in values:
                m = re.match(r"\s*(ENV|ARG)\s+(\S+)", ln)
                assert not (m and SECRET_NAME.search(m.group(2))), (
                    f"{path.name}: credential in the image: {ln}"
                )
        for value in values:
            for pattern in SECRET_TEXT:
                assert not pattern.search(value), (
                    f"{path.relative_to(ROOT)}: looks like a credential: {value!r}"
                )


def test_credential_check_would_catch_an_inline_secret():
    leaks = [
        "AKIAIOSFODNN7EXAMPLE",
        "postgresql://mlflow:hunter22@mlflow-postgres:5432/mlflow",
        "aws_secret_access_key = wJalrXUtnFEMIbPxRfiCYEXAMPLEKEY",
        'password: "correct-horse"',
    ]
    for leak in leaks:
        assert any(p.search(leak) for p in SECRET_TEXT), leak
    for fine in ("s3://mumic-tags", "http://mlflow.mumic.svc.cluster.local:5000", "models:/mumic@champion"):
        assert not any(p.search(fine) for p in SECRET_TEXT), fine


def test_every_secret_the_manifests_read_is_created_by_the_operations_guide():
    guide = (ROOT / "docs" / "operations.md").read_text()
    refs = {
        (node["secretKeyRef"]["name"], node["secretKeyRef"]["key"])
        for name in EXPECTED_KINDS
        for d in manifests(name)
        for _, node in walk(d)
        if isinstance(node.get("secretKeyRef"), dict)
    }
    assert refs
    for secret, key in sorted(refs):
        m = re.search(
            rf"kubectl create secret generic {re.escape(secret)}\b(.*?)(?:\n\s*\n|```)", guide, re.S
        )
        assert m, f"docs/operations.md does not say how to create Secret {secret}"
        assert f"--from-literal={key}=" in m.group(1) or f"--from-file={key}=" in m.group(1), (
            f"docs/operations.md: Secret {secret} is created without key {key}"
        )


# ---- the image ------------------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def resolved_base_image(text: str) -> str:
    instructions = dockerfile_instructions(text)
    args = {}
    for word, rest in instructions:
        if word == "FROM":
            break
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
    last_from = [rest for word, rest in instructions if word == "FROM"][-1].split()[0]
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], last_from)


def test_dockerfile_builds_on_a_gpu_image_with_python_311():
    base = resolved_base_image(DOCKERFILE.read_text())
    ray_gpu = re.fullmatch(r"rayproject/ray:[\d.]+-py311-(gpu|cu\d+)", base)
    cuda = re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?(base|runtime)-ubuntu[\d.]+", base)
    assert ray_gpu or cuda, f"{base} is not a CUDA or Ray GPU image"
    if cuda:
        assert "python3.11" in DOCKERFILE.read_text(), "a CUDA base needs Python 3.11 installed"


def test_dockerfile_installs_this_package_and_its_job_configs_as_a_non_root_user():
    steps = dockerfile_instructions(DOCKERFILE.read_text())
    assert "ENTRYPOINT" not in [w for w, _ in steps], "KubeRay sets the command: no ENTRYPOINT to wrap it"
    workdirs = [rest for w, rest in steps if w == "WORKDIR"]
    assert workdirs and workdirs[-1] == IMAGE_APP_DIR
    copied = {
        rest.split()[-2].rstrip("/"): rest.split()[-1].rstrip("/")
        for w, rest in steps
        if w == "COPY" and "--from" not in rest
    }
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"][
        "include"
    ]
    for pattern in packages:
        package = pattern.rstrip("*")
        assert copied.get(package) in (f"./{package}", f"{IMAGE_APP_DIR}/{package}"), (
            f"{package} is not copied"
        )
    runs = [rest for w, rest in steps if w == "RUN"]
    last_copy = max(i for i, (w, _) in enumerate(steps) if w == "COPY")
    installs = [rest for i, (w, rest) in enumerate(steps) if w == "RUN" and i > last_copy]
    assert any(re.search(r"pip install (?:[^&|;]*\s)?\.(\s|$)", r) for r in installs), (
        "the package should be pip-installed (`pip install .`) after its sources are copied"
    )
    assert not any("pip install -e" in r or "--editable" in r for r in runs)
    users = [rest for w, rest in steps if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    assert users[-1].split(":")[0].isdigit(), "a numeric USER lets Kubernetes check runAsNonRoot"


def test_mlflow_dockerfile_pins_the_same_mlflow_as_the_package_and_is_not_root():
    steps = dockerfile_instructions(MLFLOW_DOCKERFILE.read_text())
    runs = " ".join(rest for w, rest in steps if w == "RUN")
    assert f"mlflow=={pinned('mlflow')}" in runs and "psycopg2" in runs and "boto3==" in runs
    users = [rest for w, rest in steps if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


def _glob_regex(pattern: str) -> str:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        regex = _glob_regex(raw.removeprefix("!").strip("/"))
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not raw.startswith("!")
    return excluded


def test_dockerignore_sends_the_package_and_nothing_local():
    patterns = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    for needed in (
        "pyproject.toml",
        "README.md",
        "mumic_core/model.py",
        "mumic_core/model_configs/mumic-tiny.json",
        "pipelines/retag/run.py",
        "jobs/cli.py",
        "jobs/configs/nightly_retag.yaml",
    ):
        assert not dockerignored(needed, patterns), f"{needed} would be left out of the image"
    for local in (
        ".venv/bin/python",
        ".git/config",
        ".env",
        "tests/conftest.py",
        "mumic_core/__pycache__/model.cpython-311.pyc",
        "mumic.egg-info/PKG-INFO",
        "workdir/mlflow.db",
    ):
        assert dockerignored(local, patterns), f"{local} would be sent to the Docker build"


def test_repository_paths_the_image_needs_exist():
    # what the Dockerfile copies and the .dockerignore lets in must be real files of this checkout
    assert (ROOT / "mumic_core" / "model_configs" / "mumic-tiny.json").is_file()
    for name in ("nightly_retag.yaml", "weekly_retrain.yaml", "taxonomy.example.yaml"):
        assert (CONFIGS / name).is_file()
    assert os.access(K8S / "submit-rayjob.sh", os.X_OK)
