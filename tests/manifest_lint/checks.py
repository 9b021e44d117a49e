"""Checks for the deployment files in deploy/: `ray up` cluster configs, KubeRay manifests, the Dockerfile.

Every YAML in deploy/ is one document of one of three shapes, told apart by its keys:

- a KubeRay ``RayJob`` or ``RayCluster`` (it has ``kind``): ``apiVersion: ray.io/v1``, ``metadata.name``,
  ``rayVersion`` equal to the installed Ray, a head group and worker groups whose containers all name an image of
  that Ray version and set ``resources.requests`` and ``resources.limits`` (cpu and memory), ``rayStartParams``
  as strings, token authentication on; a RayJob's ``entrypoint`` runs ``rayps train`` and its
  ``--checkpoint-dir`` lies on a volume mounted in every Ray container (shards restart on other pods);
- a ``ray up`` config (it has ``cluster_name``/``provider``): ``provider.type``; with ``type: local`` a
  ``head_ip`` and a list of ``worker_ips`` and explicit ``--num-cpus`` on both ``ray start`` commands, otherwise
  ``head_node_type`` among ``available_node_types`` whose every type states its ``resources`` (CPU at least);
  setup or initialization commands that pip-install rayps and pin ``ray==<installed version>``; ``ray start``
  with ``RAY_AUTH_MODE=token``.

``check_manifest(doc, path)`` returns the problems as one line each (``"<file>: <field>: <what is wrong>"``),
``[]`` when there are none. ``python -m manifest_lint [FILE ...]`` (from tests/) prints them for the shipped files (or
the named ones) and exits 1 if there are any. No Ray import here: the expected Ray version comes from the
installed distribution's metadata.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Any

from .fields import (  # noqa: F401 - re-exported: the checks' public names live here too
    cpu_cores,
    field_at,
    PINNED_RAY,
    RAYPS_REQUIREMENT,
    check_container_resources,
    check_image,
    DEPLOY_DIR,
    dockerfile_path,
    expected_ray_version,
    image_ray_version,
    iter_containers,
    iter_images,
    KUBERAY_API_VERSION,
    KUBERAY_KINDS,
    load_manifest,
    manifest_paths,
    ManifestError,
    ray_groups,
    RAY_IMAGE_REPOSITORY,
    RAY_UP_SETUP_FIELDS,
)


def _ray_container(group: dict) -> tuple[int, dict] | None:
    containers = field_at(group, "template.spec.containers")
    if isinstance(containers, list) and containers and isinstance(containers[0], dict):
        return 0, containers[0]  # KubeRay runs Ray in the first container
    return None


def _check_group(group: dict, where: str, ray_version: str) -> list[str]:
    problems = []
    params = group.get("rayStartParams")
    if not isinstance(params, dict):
        problems.append(f"{where}.rayStartParams: missing (a mapping of `ray start` flags, {{}} for none)")
        params = {}
    for key, value in params.items():
        if not isinstance(value, str):
            problems.append(f"{where}.rayStartParams.{key}: must be a string (KubeRay's map[string]string), "
                            f"got {value!r}; quote it")
    containers = field_at(group, "template.spec.containers")
    if not isinstance(containers, list) or not containers:
        problems.append(f"{where}.template.spec.containers: missing (the Ray container comes first)")
        return problems
    for i, container in enumerate(containers):
        cwhere = f"{where}.template.spec.containers[{i}]"
        if not isinstance(container, dict):
            problems.append(f"{cwhere}: expected a mapping")
            continue
        problems += check_image(container.get("image"), f"{cwhere}.image", ray_version)
        problems += check_container_resources(container, cwhere)
    first = _ray_container(group)
    if first is not None:
        limit = cpu_cores(field_at(first[1], "resources.limits.cpu"))
        num_cpus = params.get("num-cpus")
        if limit is not None and isinstance(num_cpus, str):
            try:
                declared = float(num_cpus)
            except ValueError:
                problems.append(f"{where}.rayStartParams.num-cpus: {num_cpus!r} is not a number")
            else:
                if declared > limit:
                    problems.append(f"{where}.rayStartParams.num-cpus: {num_cpus} is more than the container's "
                                    f"cpu limit {limit:g}; Ray would schedule more than the pod may use")
    return problems


def _token_auth_on(doc: dict) -> bool:
    spec_path = "spec.rayClusterSpec" if doc.get("kind") == "RayJob" else "spec"
    if field_at(doc, f"{spec_path}.authOptions.mode") == "token":
        return True
    groups = list(ray_groups(doc))
    if not groups:
        return False
    for _, group in groups:
        first = _ray_container(group)
        env = first[1].get("env") if first else None
        if not isinstance(env, list) or not any(
                isinstance(e, dict) and e.get("name") == "RAY_AUTH_MODE" and e.get("value") == "token" for e in env):
            return False
    return True


def entrypoint_checkpoint_dir(entrypoint: str) -> str | None:
    """The value of ``--checkpoint-dir`` in a command line, or None."""
    try:
        words = shlex.split(entrypoint)
    except ValueError:
        return None
    for i, word in enumerate(words):
        if word == "--checkpoint-dir" and i + 1 < len(words):
            return words[i + 1]
        if word.startswith("--checkpoint-dir="):
            return word.split("=", 1)[1]
    return None


def _runs_rayps_train(command: str) -> bool:
    try:
        words = shlex.split(command)
    except ValueError:
        return False
    for i in range(len(words) - 1):
        if Path(words[i]).name == "rayps" and words[i + 1] == "train":
            return True
        if words[i] == "-m" and words[i + 1] == "rayps.deploy.cli" and words[i + 2:i + 3] == ["train"]:
            return True
    return False


def _check_checkpoint_volume(doc: dict, checkpoint_dir: str) -> list[str]:
    problems = []
    if not checkpoint_dir.startswith("/"):
        return [f"spec.entrypoint: --checkpoint-dir {checkpoint_dir!r} must be an absolute path on a shared volume"]
    for where, group in ray_groups(doc):
        first = _ray_container(group)
        if first is None:
            continue
        mounts = first[1].get("volumeMounts") or []
        paths = [m.get("mountPath", "").rstrip("/") for m in mounts if isinstance(m, dict)]
        if not any(p and (checkpoint_dir == p or checkpoint_dir.startswith(p + "/")) for p in paths):
            problems.append(f"{where}.template.spec.containers[0].volumeMounts: no volume holds --checkpoint-dir "
                            f"{checkpoint_dir!r}; mount the shared checkpoint volume in every Ray container")
    return problems


def _check_kuberay(doc: dict, ray_version: str) -> list[str]:
    problems = []
    kind = doc.get("kind")
    if doc.get("apiVersion") != KUBERAY_API_VERSION:
        problems.append(f"apiVersion: {doc.get('apiVersion')!r}, expected {KUBERAY_API_VERSION!r}")
    name = field_at(doc, "metadata.name")
    if not isinstance(name, str) or not name:
        problems.append("metadata.name: missing")
    spec_path = "spec.rayClusterSpec" if kind == "RayJob" else "spec"
    cluster = field_at(doc, spec_path)
    if not isinstance(cluster, dict):
        return problems + [f"{spec_path}: missing"]
    version = cluster.get("rayVersion")
    if version is None:
        problems.append(f"{spec_path}.rayVersion: missing (expected {ray_version!r})")
    elif str(version) != ray_version:
        problems.append(f"{spec_path}.rayVersion: {version!r}, expected {ray_version!r} (the installed Ray)")
    if not isinstance(cluster.get("headGroupSpec"), dict):
        problems.append(f"{spec_path}.headGroupSpec: missing")
    workers = cluster.get("workerGroupSpecs")
    if not isinstance(workers, list) or not workers:
        problems.append(f"{spec_path}.workerGroupSpecs: missing (shards and workers run on worker pods)")
    else:
        for i, group in enumerate(workers):
            if not isinstance(group, dict) or not group.get("groupName"):
                problems.append(f"{spec_path}.workerGroupSpecs[{i}].groupName: missing")
    for where, group in ray_groups(doc):
        problems += _check_group(group, where, ray_version)
    if not _token_auth_on(doc):
        problems.append(f"{spec_path}.authOptions.mode: token authentication is off; set authOptions: "
                        "{mode: token} (KubeRay >= 1.5.1) or RAY_AUTH_MODE=token with RAY_AUTH_TOKEN in every "
                        "Ray container")
    if kind == "RayJob":
        entrypoint = field_at(doc, "spec.entrypoint")
        if not isinstance(entrypoint, str) or not entrypoint.strip():
            problems.append("spec.entrypoint: missing (expected a `rayps train ...` command)")
        elif not _runs_rayps_train(entrypoint):
            problems.append(f"spec.entrypoint: {entrypoint.strip()[:60]!r} does not run `rayps train`")
        else:
            checkpoint_dir = entrypoint_checkpoint_dir(entrypoint)
            if checkpoint_dir is None:
                problems.append("spec.entrypoint: no --checkpoint-dir; shards restored on another pod need a "
                                "checkpoint on shared storage")
            else:
                problems += _check_checkpoint_volume(doc, checkpoint_dir)
    # images outside the Ray groups (a submitterPodTemplate, sidecars...) must match too
    group_prefixes = tuple(where + "." for where, _ in ray_groups(doc))
    for where, container in iter_containers(doc):
        if where.startswith(group_prefixes):
            continue
        problems += check_image(container.get("image"), f"{where}.image", ray_version)
        problems += check_container_resources(container, where)
    return problems


# ---------------------------------------------------------------------------------------------------------------
# ray up


def _commands(doc: dict, *fields: str) -> list[str]:
    found = []
    for field in fields:
        value = doc.get(field)
        if isinstance(value, list):
            found += [c for c in value if isinstance(c, str)]
    return found


def installs_rayps(command: str) -> bool:
    """Whether a shell command pip-installs rayps: ``rayps``/``rayps==...``, a path to the checkout
    (``~/rayps``, ``.``), a ``rayps-*.whl`` or a ``git+...rayps`` URL among the arguments of ``pip install``."""
    try:
        words = shlex.split(command)
    except ValueError:
        return False
    for i, word in enumerate(words):
        if word != "install" or i == 0 or not re.search(r"(^|/)(pip3?|uv)$", words[i - 1].split(" ")[-1]):
            continue
        for argument in words[i + 1:]:
            argument = argument.rstrip(";")
            if argument in ("&&", "||", "|", ";") or argument.endswith(";"):
                break
            if RAYPS_REQUIREMENT.search(argument):
                return True
    return False


def _ray_start(commands: list[str], head: bool) -> list[str]:
    return [c for c in commands if "ray start" in c and (("--head" in c) == head)]


def _check_ray_up(doc: dict, ray_version: str) -> list[str]:
    problems = []
    if not isinstance(doc.get("cluster_name"), str) or not doc.get("cluster_name"):
        problems.append("cluster_name: missing")
    provider = doc.get("provider")
    provider_type = provider.get("type") if isinstance(provider, dict) else None
    if not provider_type:
        problems.append("provider.type: missing (local, aws, gcp, azure, ...)")
    head_start = _commands(doc, "head_start_ray_commands")
    worker_start = _commands(doc, "worker_start_ray_commands")
    if provider_type == "local":
        if not isinstance(provider.get("head_ip"), str) or not provider.get("head_ip"):
            problems.append("provider.head_ip: missing (the head machine's address)")
        if not isinstance(provider.get("worker_ips"), list):
            problems.append("provider.worker_ips: missing (a list of worker machine addresses, [] for none)")
        if "available_node_types" in doc:
            problems.append("available_node_types: not allowed with provider.type local (ray up aborts); state "
                            "resources with --num-cpus/--num-gpus in the ray start commands")
        for field, commands, head in (("head_start_ray_commands", head_start, True),
                                      ("worker_start_ray_commands", worker_start, False)):
            starts = _ray_start(commands, head)
            if not starts:
                problems.append(f"{field}: no `ray start{' --head' if head else ''}` command")
            elif not any("--num-cpus" in c for c in starts):
                problems.append(f"{field}: `ray start` without --num-cpus; state each node's resources explicitly")
    elif provider_type:
        node_types = doc.get("available_node_types")
        head_type = doc.get("head_node_type")
        if not isinstance(node_types, dict) or not node_types:
            problems.append("available_node_types: missing")
            node_types = {}
        if not head_type:
            problems.append("head_node_type: missing")
        elif head_type not in node_types:
            problems.append(f"head_node_type: {head_type!r} is not in available_node_types")
        for name, node_type in node_types.items():
            resources = node_type.get("resources") if isinstance(node_type, dict) else None
            if not isinstance(resources, dict) or "CPU" not in resources:
                problems.append(f"available_node_types.{name}.resources: state CPU (and GPU where there are any) "
                                "explicitly")
    setup = _commands(doc, *RAY_UP_SETUP_FIELDS)
    if not any(installs_rayps(c) for c in setup):
        problems.append(f"setup_commands: no command installs rayps (looked in {', '.join(RAY_UP_SETUP_FIELDS)})")
    pins = [m.group(1) for c in setup for m in PINNED_RAY.finditer(c)]
    docker_images = [v for _, v in iter_images(doc.get("docker") or {})]
    if not pins and not docker_images:
        problems.append(f"setup_commands: Ray is not pinned; install \"ray[default]=={ray_version}\" (or use a "
                        f"{RAY_IMAGE_REPOSITORY}:{ray_version} docker image)")
    for pin in pins:
        if pin != ray_version:
            problems.append(f"setup_commands: pins ray=={pin}, expected ray=={ray_version} (the installed Ray)")
    for where, image in iter_images(doc):
        problems += check_image(image, where, ray_version)
    for field, commands in (("head_start_ray_commands", head_start), ("worker_start_ray_commands", worker_start)):
        starts = [c for c in commands if "ray start" in c]
        if starts and not all("RAY_AUTH_MODE=token" in c for c in starts):
            problems.append(f"{field}: `ray start` without RAY_AUTH_MODE=token; keep token authentication on")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# entry points


def manifest_kind(doc: dict) -> str:
    """"RayJob", "RayCluster", "ray-up" or "unknown"."""
    if "kind" in doc:
        return doc["kind"] if doc["kind"] in KUBERAY_KINDS else "unknown"
    if "provider" in doc or "cluster_name" in doc:
        return "ray-up"
    return "unknown"


def check_manifest(doc: Any, path: str | Path, ray_version: str | None = None) -> list[str]:
    """Problems with one parsed deployment document, each ``"<path>: <field>: <what is wrong>"``; [] if none."""
    ray_version = ray_version or expected_ray_version()
    name = str(path)
    if not isinstance(doc, dict):
        return [f"{name}: expected a mapping at the top level, got {type(doc).__name__}"]
    kind = manifest_kind(doc)
    if kind in KUBERAY_KINDS:
        problems = _check_kuberay(doc, ray_version)
    elif kind == "ray-up":
        problems = _check_ray_up(doc, ray_version)
    else:
        problems = [f"kind: {doc.get('kind')!r} is not one of {', '.join(KUBERAY_KINDS)}, and the document has no "
                    "cluster_name/provider of a `ray up` config"]
    return [f"{name}: {p}" for p in problems]


def dockerfile_base_images(text: str) -> list[str]:
    """The image of every ``FROM`` line (``FROM [--platform=...] image [AS name]``)."""
    images = []
    for line in text.splitlines():
        words = line.split()
        if words and words[0].upper() == "FROM":
            rest = [w for w in words[1:] if not w.startswith("--")]
            if rest:
                images.append(rest[0])
    return images


def check_dockerfile(text: str, path: str | Path, ray_version: str | None = None) -> list[str]:
    """The Dockerfile builds on rayproject/ray of the installed version, pip-installs rayps and runs rayps train."""
    ray_version = ray_version or expected_ray_version()
    name = str(path)
    problems = []
    images = dockerfile_base_images(text)
    if not images:
        problems.append("FROM: missing")
    for image in images:
        if image_ray_version(image) is None or not image.split("@", 1)[0].rpartition(":")[0].endswith(
                RAY_IMAGE_REPOSITORY):
            problems.append(f"FROM: {image!r} is not an official {RAY_IMAGE_REPOSITORY}:<version> image")
        else:
            problems += check_image(image, "FROM", ray_version)
    if not re.search(r"^\s*RUN\b.*\bpip3? install\b", text, flags=re.MULTILINE):
        problems.append("RUN: no `pip install` of the project")
    cmd = [line for line in text.splitlines() if line.strip().upper().startswith("CMD")]
    if not cmd or not re.search(r"rayps\W+train", cmd[-1]):
        problems.append("CMD: expected the default command `rayps train`")
    return [f"{name}: {p}" for p in problems]


def check_deploy_dir(directory: str | Path | None = None, ray_version: str | None = None) -> list[str]:
    """Problems in every YAML and the Dockerfile of ``directory`` (default deploy/)."""
    ray_version = ray_version or expected_ray_version()
    problems = []
    for path in manifest_paths(directory):
        try:
            problems += check_manifest(load_manifest(path), path, ray_version)
        except ManifestError as error:
            problems.append(str(error))
    dockerfile = dockerfile_path(directory)
    if dockerfile.is_file():
        problems += check_dockerfile(dockerfile.read_text(encoding="utf-8"), dockerfile, ray_version)
    return problems


def main(argv: list[str] | None = None) -> int:
    """``python -m manifest_lint [FILE ...]``: print the problems; exit 1 if there are any."""
    args = sys.argv[1:] if argv is None else argv
    try:
        if not args:
            problems = check_deploy_dir()
        else:
            problems = []
            for arg in args:
                path = Path(arg)
                if path.name == "Dockerfile" or path.suffix == ".Dockerfile":
                    problems += check_dockerfile(path.read_text(encoding="utf-8"), path)
                else:
                    problems += check_manifest(load_manifest(path), path)
    except (ManifestError, OSError) as error:
        print(error, file=sys.stderr)
        return 1
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
