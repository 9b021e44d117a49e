"""The deployment files in deploy/: every YAML parses, has the fields its kind needs, runs `rayps train`, and names
the installed Ray version wherever a version appears (rayVersion, image tags, the Dockerfile's FROM, pinned pip
installs). No cluster is needed: Kubernetes manifests are checked field by field, `ray up` configs also through
Ray's own config preparation and JSON schema, shell commands with `bash -n`."""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from manifest_lint import checks as manifests  # noqa: E402
from manifest_lint.checks import (  # noqa: E402
    ManifestError,
    check_dockerfile,
    check_manifest,
    dockerfile_base_images,
    expected_ray_version,
    image_ray_version,
    iter_containers,
    iter_images,
    load_manifest,
    manifest_paths,
)

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
RAY_VERSION = expected_ray_version()
PATHS = manifest_paths()
KUBERAY = [p for p in PATHS if load_manifest(p).get("kind") in ("RayJob", "RayCluster")]
RAY_UP = [p for p in PATHS if "provider" in load_manifest(p)]


def _cluster_spec(doc):
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _rayjob():
    return load_manifest(DEPLOY / "rayjob.yaml")


def _problems(doc, name="m.yaml"):
    return check_manifest(doc, name, RAY_VERSION)


# --- the shipped files ------------------------------------------------------------------------------------------

def test_deploy_holds_the_expected_files():
    names = {p.name for p in PATHS}
    assert {"ray-cluster-local.yaml", "ray-cluster-aws.yaml", "rayjob.yaml", "raycluster.yaml"} <= names
    assert (DEPLOY / "Dockerfile").is_file()
    assert all(p.parent == DEPLOY for p in PATHS)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_every_manifest_parses_and_has_no_problems(path):
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    assert check_manifest(doc, path) == []


def test_the_dockerfile_has_no_problems():
    path = DEPLOY / "Dockerfile"
    assert check_dockerfile(path.read_text(encoding="utf-8"), path) == []


def test_the_command_line_check_passes_on_the_shipped_files(capsys):
    assert manifests.main([]) == 0
    assert capsys.readouterr().out == ""


def test_expected_ray_version_is_the_installed_one():
    import importlib.metadata

    assert RAY_VERSION == importlib.metadata.version("ray")
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", RAY_VERSION)


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifests_pin_the_installed_ray(path):
    doc = load_manifest(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert str(_cluster_spec(doc)["rayVersion"]) == RAY_VERSION
    images = [value for _, value in iter_images(doc)]
    assert images, "no image in the manifest"
    for image in images:
        assert image.startswith(f"rayproject/ray:{RAY_VERSION}-py311"), image


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_every_image_tag_is_the_installed_ray(path):
    for field, image in iter_images(load_manifest(path)):
        assert image_ray_version(image) == RAY_VERSION, f"{path.name}: {field} = {image}"


def test_the_dockerfile_builds_on_the_installed_ray_image():
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert dockerfile_base_images(text) == [f"rayproject/ray:{RAY_VERSION}-py311"]
    assert re.search(r'^CMD \["rayps", "train"\]$', text, flags=re.MULTILINE)


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_every_container_states_requests_and_limits(path):
    doc = load_manifest(path)
    containers = list(iter_containers(doc))
    assert len(containers) >= 2  # a head and at least one worker group
    for where, container in containers:
        resources = container.get("resources", {})
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(part, {})), f"{path.name}: {where}.resources.{part}"
    for group in [_cluster_spec(doc)["headGroupSpec"], *_cluster_spec(doc)["workerGroupSpecs"]]:
        assert isinstance(group["rayStartParams"], dict)
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        ray_container = group["template"]["spec"]["containers"][0]
        # Ray sizes itself to what the pod may use: num-cpus equals the cpu limit (or 0 on the head)
        if "num-cpus" in group["rayStartParams"]:
            assert float(group["rayStartParams"]["num-cpus"]) <= float(ray_container["resources"]["limits"]["cpu"])


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_every_pod_mounts_a_memory_volume_at_dev_shm(path):
    """Ray's object store and rayps' same-node shared memory live in /dev/shm, which a container gets at 64 MB
    unless the pod mounts memory there."""
    doc = load_manifest(path)
    for group in [_cluster_spec(doc)["headGroupSpec"], *_cluster_spec(doc)["workerGroupSpecs"]]:
        spec = group["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0].get("volumeMounts", [])}
        assert "/dev/shm" in mounts, f"{path.name}: {group.get('groupName', 'head')} mounts nothing at /dev/shm"
        volume = next(v for v in spec["volumes"] if v["name"] == mounts["/dev/shm"])
        assert volume["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifests_keep_token_authentication_on(path):
    assert _cluster_spec(load_manifest(path))["authOptions"] == {"mode": "token"}


def test_the_rayjob_entrypoint_runs_rayps_train_with_a_shared_checkpoint_dir():
    doc = _rayjob()
    words = shlex.split(doc["spec"]["entrypoint"])
    assert words[:2] == ["rayps", "train"]
    checkpoint_dir = words[words.index("--checkpoint-dir") + 1]
    groups = [_cluster_spec(doc)["headGroupSpec"], *_cluster_spec(doc)["workerGroupSpecs"]]
    claims = set()
    for group in groups:
        pod = group["template"]["spec"]
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        volume = next(v for v in pod["volumes"] if v["name"] in mounts and checkpoint_dir.startswith(
            mounts[v["name"]] + "/"))
        claims.add(volume["persistentVolumeClaim"]["claimName"])
    assert len(claims) == 1  # one shared claim, mounted by the head and every worker group


def test_the_rayjob_entrypoint_parses_with_the_rayps_command_line():
    from rayps.deploy.cli import build_parser

    parser = build_parser()
    words = shlex.split(_rayjob()["spec"]["entrypoint"])
    try:
        args = parser.parse_args(words[1:])
    except SystemExit as error:  # argparse: an unknown flag or a bad value in the manifest
        pytest.fail(f"deploy/rayjob.yaml entrypoint does not parse: {error}")
    assert args.command == "train"
    assert args.checkpoint_dir.startswith("/mnt/rayps/")


def test_the_rayjob_asks_for_no_more_than_its_workers_provide():
    doc = _rayjob()
    words = shlex.split(doc["spec"]["entrypoint"])

    def flag(name):
        return float(words[words.index(name) + 1])

    needed = flag("--shards") * flag("--cpus-per-shard") + flag("--workers") * flag("--cpus-per-worker")
    groups = _cluster_spec(doc)["workerGroupSpecs"]
    available = sum(g["minReplicas"] * float(g["rayStartParams"]["num-cpus"]) for g in groups)
    assert needed <= available
    assert sum(g["minReplicas"] for g in groups) >= flag("--shards")  # room to put each shard on its own pod


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_ray_up_configs_install_rayps_and_pin_ray(path):
    doc = load_manifest(path)
    setup = [c for field in manifests.RAY_UP_SETUP_FIELDS for c in doc.get(field) or []]
    assert any("pip install" in c and "rayps" in c for c in setup)
    for command in setup:
        for pinned in re.findall(r"ray(?:\[[^\]]*\])?==([\w.]+)", command):
            assert pinned == RAY_VERSION
    starts = [c for c in doc["head_start_ray_commands"] + doc["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert doc["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_the_local_config_names_its_machines_and_their_resources():
    doc = load_manifest(DEPLOY / "ray-cluster-local.yaml")
    assert doc["provider"]["type"] == "local"
    assert isinstance(doc["provider"]["head_ip"], str) and isinstance(doc["provider"]["worker_ips"], list)
    for field in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in doc[field] if "ray start" in c)
        assert "--num-cpus=" in start and "--num-gpus=" in start


def test_the_aws_config_states_the_resources_of_every_node_type():
    doc = load_manifest(DEPLOY / "ray-cluster-aws.yaml")
    assert doc["provider"]["type"] == "aws"
    assert doc["head_node_type"] in doc["available_node_types"]
    for name, node_type in doc["available_node_types"].items():
        assert {"CPU", "GPU"} <= set(node_type["resources"]), name
    assert any(node_type["resources"]["GPU"] > 0 for node_type in doc["available_node_types"].values())


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_ray_accepts_the_ray_up_configs(path):
    """What `ray up` does first: fill in the provider defaults, then validate against Ray's JSON schema."""
    pytest.importorskip("jsonschema")
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:  # a private module: skip rather than fail if a Ray release moves it
        pytest.skip("ray.autoscaler._private.util is not importable in this Ray")
    prepared = prepare_config(copy.deepcopy(load_manifest(path)))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_ray_up_commands_are_valid_shell(path):
    doc = load_manifest(path)
    fields = (*manifests.RAY_UP_SETUP_FIELDS, "head_start_ray_commands", "worker_start_ray_commands")
    for field in fields:
        for command in doc.get(field) or []:
            result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
            assert result.returncode == 0, f"{path.name}: {field}: {command!r}: {result.stderr}"


def test_the_aws_config_stops_until_shared_storage_is_configured(tmp_path):
    command = load_manifest(DEPLOY / "ray-cluster-aws.yaml")["initialization_commands"][0]
    assert "fs-REPLACE-ME" in command
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    assert "deploy/ray-cluster-aws.yaml: set EFS_DNS" in result.stderr


def test_the_yaml_and_dockerfile_are_packaged_with_rayps_deploy():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert {"*.yaml", "Dockerfile"} <= set(pyproject["tool"]["setuptools"]["package-data"]["rayps.deploy"])
    assert manifests.DEPLOY_DIR == DEPLOY.resolve()


def test_docs_name_only_deploy_files_that_exist():
    text = (REPO / "docs" / "deploy.md").read_text(encoding="utf-8")
    named = set(re.findall(r"deploy/[\w.-]+\.(?:yaml|py)|deploy/Dockerfile", text))
    assert {"deploy/rayjob.yaml", "deploy/raycluster.yaml", "deploy/ray-cluster-aws.yaml",
            "deploy/ray-cluster-local.yaml", "deploy/Dockerfile"} <= named
    for name in named:
        assert (REPO / name).is_file(), name


# --- problems are found and named -------------------------------------------------------------------------------

def test_a_missing_ray_version_is_named():
    doc = _rayjob()
    del doc["spec"]["rayClusterSpec"]["rayVersion"]
    problems = _problems(doc, "job.yaml")
    assert problems == [f"job.yaml: spec.rayClusterSpec.rayVersion: missing (expected '{RAY_VERSION}')"]


def test_a_mismatched_ray_version_is_named():
    doc = load_manifest(DEPLOY / "raycluster.yaml")
    doc["spec"]["rayVersion"] = "2.9.0"
    assert _problems(doc) == [f"m.yaml: spec.rayVersion: '2.9.0', expected '{RAY_VERSION}' (the installed Ray)"]


def test_a_mismatched_image_tag_is_named():
    doc = _rayjob()
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"] = (
        "rayproject/ray:2.9.0-py311")
    problems = _problems(doc)
    assert len(problems) == 1
    assert problems[0].startswith(
        "m.yaml: spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].image: "
        "'rayproject/ray:2.9.0-py311' is Ray 2.9.0")
    assert f"expected Ray {RAY_VERSION}" in problems[0]


@pytest.mark.parametrize("image", ["rayproject/ray", "rayproject/ray:latest", "myorg/rayps:0.1.0"])
def test_an_image_that_does_not_tell_its_ray_version_is_named(image):
    doc = _rayjob()
    doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] = image
    problems = _problems(doc)
    assert len(problems) == 1 and "headGroupSpec.template.spec.containers[0].image" in problems[0]
    assert "does not tell its Ray version" in problems[0]


def test_a_custom_image_tagged_with_the_ray_version_is_accepted():
    doc = _rayjob()
    for group in [_cluster_spec(doc)["headGroupSpec"], *_cluster_spec(doc)["workerGroupSpecs"]]:
        group["template"]["spec"]["containers"][0]["image"] = f"ghcr.io/org/rayps:0.1.0-ray{RAY_VERSION}-py311"
    assert _problems(doc) == []


def test_an_entrypoint_without_rayps_train_is_named():
    doc = _rayjob()
    doc["spec"]["entrypoint"] = "python train.py --epochs 3"
    assert _problems(doc) == ["m.yaml: spec.entrypoint: 'python train.py --epochs 3' does not run `rayps train`"]


def test_python_dash_m_rayps_train_counts_as_rayps_train():
    doc = _rayjob()
    doc["spec"]["entrypoint"] = doc["spec"]["entrypoint"].replace("rayps train", "python -m rayps.deploy.cli train")
    assert _problems(doc) == []


def test_a_missing_entrypoint_is_named():
    doc = _rayjob()
    del doc["spec"]["entrypoint"]
    assert _problems(doc) == ["m.yaml: spec.entrypoint: missing (expected a `rayps train ...` command)"]


def test_a_checkpoint_dir_off_the_shared_volume_is_named():
    doc = _rayjob()
    doc["spec"]["entrypoint"] = doc["spec"]["entrypoint"].replace("/mnt/rayps/checkpoints", "/tmp/checkpoints")
    problems = _problems(doc)
    assert len(problems) == 2  # the head and the worker group
    assert all("no volume holds --checkpoint-dir '/tmp/checkpoints/digits-mlp'" in p for p in problems)


def test_a_container_without_requests_is_named():
    doc = _rayjob()
    worker = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    del worker["resources"]["requests"]
    del worker["resources"]["limits"]["memory"]
    assert _problems(doc) == [
        "m.yaml: spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].resources.requests: missing "
        "(state cpu and memory explicitly)",
        "m.yaml: spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].resources.limits.memory: "
        "missing"]


def test_a_numeric_ray_start_param_and_too_many_cpus_are_named():
    doc = load_manifest(DEPLOY / "raycluster.yaml")
    doc["spec"]["workerGroupSpecs"][0]["rayStartParams"]["num-cpus"] = 4
    doc["spec"]["workerGroupSpecs"][1]["rayStartParams"]["num-cpus"] = "16"
    problems = _problems(doc)
    assert problems == [
        "m.yaml: spec.workerGroupSpecs[0].rayStartParams.num-cpus: must be a string (KubeRay's "
        "map[string]string), got 4; quote it",
        "m.yaml: spec.workerGroupSpecs[1].rayStartParams.num-cpus: 16 is more than the container's cpu limit 4; "
        "Ray would schedule more than the pod may use"]


def test_token_authentication_off_is_named():
    doc = load_manifest(DEPLOY / "raycluster.yaml")
    del doc["spec"]["authOptions"]
    problems = _problems(doc)
    assert len(problems) == 1 and problems[0].startswith("m.yaml: spec.authOptions.mode: token authentication")


def test_token_authentication_by_environment_is_accepted():
    doc = load_manifest(DEPLOY / "raycluster.yaml")
    del doc["spec"]["authOptions"]
    for group in [doc["spec"]["headGroupSpec"], *doc["spec"]["workerGroupSpecs"]]:
        group["template"]["spec"]["containers"][0]["env"] = [
            {"name": "RAY_AUTH_MODE", "value": "token"},
            {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "rayps", "key": "auth_token"}}}]
    assert _problems(doc) == []


def test_wrong_api_version_and_missing_name_are_named():
    doc = _rayjob()
    doc["apiVersion"] = "ray.io/v1alpha1"
    del doc["metadata"]["name"]
    assert _problems(doc) == ["m.yaml: apiVersion: 'ray.io/v1alpha1', expected 'ray.io/v1'",
                              "m.yaml: metadata.name: missing"]


def test_an_unknown_document_is_named():
    assert _problems({"kind": "Deployment"}) == [
        "m.yaml: kind: 'Deployment' is not one of RayJob, RayCluster, and the document has no cluster_name/provider "
        "of a `ray up` config"]


def test_a_local_config_without_ips_or_with_node_types_is_named():
    doc = load_manifest(DEPLOY / "ray-cluster-local.yaml")
    del doc["provider"]["worker_ips"]
    del doc["provider"]["head_ip"]
    doc["available_node_types"] = {"x": {"resources": {"CPU": 1}, "node_config": {}}}
    assert _problems(doc) == [
        "m.yaml: provider.head_ip: missing (the head machine's address)",
        "m.yaml: provider.worker_ips: missing (a list of worker machine addresses, [] for none)",
        "m.yaml: available_node_types: not allowed with provider.type local (ray up aborts); state resources with "
        "--num-cpus/--num-gpus in the ray start commands"]


def test_a_ray_up_config_without_rayps_or_with_another_ray_is_named():
    doc = load_manifest(DEPLOY / "ray-cluster-local.yaml")
    doc["setup_commands"] = [c.replace(" ~/rayps", "").replace(f"=={RAY_VERSION}", "==2.9.0")
                             for c in doc["setup_commands"]]
    problems = _problems(doc)
    assert problems == [
        "m.yaml: setup_commands: no command installs rayps (looked in initialization_commands, setup_commands, "
        "head_setup_commands, worker_setup_commands)",
        f"m.yaml: setup_commands: pins ray==2.9.0, expected ray=={RAY_VERSION} (the installed Ray)"]


def test_a_cloud_config_without_resources_or_auth_is_named():
    doc = load_manifest(DEPLOY / "ray-cluster-aws.yaml")
    del doc["available_node_types"]["ray.worker.cpu"]["resources"]
    doc["head_node_type"] = "ray.head.gone"
    doc["worker_start_ray_commands"] = [c.replace("RAY_AUTH_MODE=token ", "") for c in doc["worker_start_ray_commands"]]
    doc["docker"]["image"] = "rayproject/ray:2.9.0-py311"
    assert _problems(doc) == [
        "m.yaml: head_node_type: 'ray.head.gone' is not in available_node_types",
        "m.yaml: available_node_types.ray.worker.cpu.resources: state CPU (and GPU where there are any) explicitly",
        f"m.yaml: docker.image: 'rayproject/ray:2.9.0-py311' is Ray 2.9.0, expected Ray {RAY_VERSION} (the "
        "installed version)",
        "m.yaml: worker_start_ray_commands: `ray start` without RAY_AUTH_MODE=token; keep token authentication on"]


def test_a_dockerfile_on_another_base_is_named():
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8").replace(
        f"FROM rayproject/ray:{RAY_VERSION}-py311", "FROM rayproject/ray:2.9.0-py311")
    assert check_dockerfile(text, "Dockerfile", RAY_VERSION) == [
        f"Dockerfile: FROM: 'rayproject/ray:2.9.0-py311' is Ray 2.9.0, expected Ray {RAY_VERSION} (the installed "
        "version)"]
    assert check_dockerfile("FROM python:3.11\nRUN pip install .\n", "Dockerfile", RAY_VERSION) == [
        "Dockerfile: FROM: 'python:3.11' is not an official rayproject/ray:<version> image",
        "Dockerfile: CMD: expected the default command `rayps train`"]


@pytest.mark.parametrize(("image", "version"), [
    ("rayproject/ray:2.60.0-py311", "2.60.0"),
    ("docker.io/rayproject/ray:2.60.0-py311-gpu", "2.60.0"),
    ("rayproject/ray:2.60.0", "2.60.0"),
    ("rayproject/ray:2.60.0-py311@sha256:abc", "2.60.0"),
    ("registry:5000/team/rayps:0.1.0-ray2.60.0-py311", "2.60.0"),
    ("rayproject/ray:latest", None),
    ("rayproject/ray", None),
    ("registry:5000/team/rayps", None),
])
def test_image_ray_version(image, version):
    assert image_ray_version(image) == version


# --- loading ----------------------------------------------------------------------------------------------------

def test_load_manifest_names_the_file_on_bad_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("spec:\n  entrypoint: [unclosed\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"broken\.yaml: not valid YAML"):
        load_manifest(path)


def test_load_manifest_names_the_file_when_missing_or_not_a_mapping(tmp_path):
    with pytest.raises(ManifestError, match=r"absent\.yaml: cannot read"):
        load_manifest(tmp_path / "absent.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"list\.yaml: expected a mapping at the top level, got list"):
        load_manifest(tmp_path / "list.yaml")


def test_the_command_line_check_reports_problems(tmp_path, capsys):
    doc = _rayjob()
    doc["spec"]["rayClusterSpec"]["rayVersion"] = "2.9.0"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    assert manifests.main([str(path)]) == 1
    assert f"{path}: spec.rayClusterSpec.rayVersion: '2.9.0'" in capsys.readouterr().out


def test_manifest_paths_lists_yaml_only(tmp_path):
    for name in ("b.yaml", "a.yml", "Dockerfile", "notes.md"):
        (tmp_path / name).write_text("x: 1\n", encoding="utf-8")
    assert [p.name for p in manifest_paths(tmp_path)] == ["a.yml", "b.yaml"]
