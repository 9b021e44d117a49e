"""The parts of a deployment file that every check reads: where the files are, which Ray they must pin,
dotted-field access, container and image walks, and the resource and image checks shared by KubeRay and
``ray up`` configs (``checks.py`` holds the per-kind checks)."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Any, Iterator

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy"  # tests/manifest_lint/ -> the checkout's deploy/
KUBERAY_API_VERSION = "ray.io/v1"
KUBERAY_KINDS = ("RayJob", "RayCluster")
RAY_IMAGE_REPOSITORY = "rayproject/ray"
RAY_UP_SETUP_FIELDS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")
# a version inside a custom image's tag, e.g. rayps:0.1.0-ray2.60.0-py311
_CUSTOM_TAG_RAY_VERSION = re.compile(r"ray(\d+\.\d+\.\d+\w*)")
PINNED_RAY = re.compile(r"""\bray(?:\[[^\]]*\])?==([0-9][0-9A-Za-z.+-]*)""")
# how a pip argument names rayps: the name (with a version or extras), the checkout, a wheel, a git URL
RAYPS_REQUIREMENT = re.compile(r"^(rayps($|[\[=<>~!]))|(^|/)rayps/?$|^\.$|(^|/)rayps-[^/]*\.whl$|^git\+.*rayps")
_CPU_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m?)$")


class ManifestError(ValueError):
    """A deployment file that cannot be read or parsed; the message names the file."""


def expected_ray_version() -> str:
    """The installed Ray version (``importlib.metadata.version("ray")``): images and rayVersion must match it."""
    try:
        return importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError as error:
        raise ManifestError("ray is not installed: cannot tell which Ray version the manifests must use") from error


def manifest_paths(directory: str | Path | None = None) -> list[Path]:
    """Every YAML file (``*.yaml``, ``*.yml``) in ``directory`` (default: deploy/), sorted by name."""
    folder = Path(directory) if directory is not None else DEPLOY_DIR
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml"))


def dockerfile_path(directory: str | Path | None = None) -> Path:
    """deploy/Dockerfile (or the Dockerfile in ``directory``)."""
    return (Path(directory) if directory is not None else DEPLOY_DIR) / "Dockerfile"


def load_manifest(path: str | Path) -> dict:
    """Parse one YAML document with ``yaml.safe_load``; ManifestError naming the file if that is not possible."""
    path = Path(path)
    try:
        import yaml  # noqa: PLC0415  (optional dependency: pip install "rayps[test]" or pyyaml)
    except ImportError as error:
        raise ManifestError(f"{path}: cannot parse YAML: PyYAML is not installed (pip install pyyaml)") from error
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ManifestError(f"{path}: cannot read: {error.strerror or error}") from error
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ManifestError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from error
    if not isinstance(doc, dict):
        raise ManifestError(f"{path}: expected a mapping at the top level, got {type(doc).__name__}")
    return doc


# ---------------------------------------------------------------------------------------------------------------
# images


def image_ray_version(image: str) -> str | None:
    """The Ray version an image reference carries, or None if it does not tell.

    ``[registry/]rayproject/ray:2.60.0-py311[-gpu]`` -> ``"2.60.0"``; a custom image tells it in its tag as
    ``ray<version>`` (``rayps:0.1.0-ray2.60.0-py311`` -> ``"2.60.0"``). A digest (``@sha256:...``) is ignored.
    """
    reference = image.split("@", 1)[0]
    name, _, tag = reference.rpartition(":")
    if not name or "/" in tag:  # no tag at all (the colon belonged to a registry port)
        return None
    if name == RAY_IMAGE_REPOSITORY or name.endswith("/" + RAY_IMAGE_REPOSITORY):
        version = tag.split("-", 1)[0]
        return version if re.fullmatch(r"\d+\.\d+\.\d+\w*", version) else None
    match = _CUSTOM_TAG_RAY_VERSION.search(tag)
    return match.group(1) if match else None


def check_image(image: Any, field: str, ray_version: str) -> list[str]:
    """Problems with the image named at ``field``: it must carry the installed Ray version in its tag."""
    if not isinstance(image, str) or not image.strip():
        return [f"{field}: missing (expected {RAY_IMAGE_REPOSITORY}:{ray_version}-py311)"]
    found = image_ray_version(image)
    if found is None:
        return [f"{field}: {image!r} does not tell its Ray version; use {RAY_IMAGE_REPOSITORY}:{ray_version}"
                f"-py311 or tag your image with ray{ray_version} (e.g. rayps:0.1.0-ray{ray_version}-py311)"]
    if found != ray_version:
        return [f"{field}: {image!r} is Ray {found}, expected Ray {ray_version} (the installed version)"]
    return []


# ---------------------------------------------------------------------------------------------------------------
# KubeRay


def field_at(doc: Any, dotted: str) -> Any:
    node = doc
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def cpu_cores(quantity: Any) -> float | None:
    match = _CPU_QUANTITY.match(str(quantity).strip())
    if not match:
        return None
    value = float(match.group(1))
    return value / 1000.0 if match.group(2) else value


def ray_groups(doc: dict) -> Iterator[tuple[str, dict]]:
    """(field path, group spec) for the head group and every worker group of a RayJob or RayCluster."""
    spec_path = "spec.rayClusterSpec" if doc.get("kind") == "RayJob" else "spec"
    cluster = field_at(doc, spec_path)
    if not isinstance(cluster, dict):
        return
    head = cluster.get("headGroupSpec")
    if isinstance(head, dict):
        yield f"{spec_path}.headGroupSpec", head
    workers = cluster.get("workerGroupSpecs")
    if isinstance(workers, list):
        for i, group in enumerate(workers):
            if isinstance(group, dict):
                yield f"{spec_path}.workerGroupSpecs[{i}]", group


def iter_containers(doc: Any, path: str = "") -> Iterator[tuple[str, dict]]:
    """(field path, container) for every entry of every ``containers`` list anywhere in the document."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            here = f"{path}.{key}" if path else str(key)
            if key in ("containers", "initContainers") and isinstance(value, list):
                for i, container in enumerate(value):
                    if isinstance(container, dict):
                        yield f"{here}[{i}]", container
            else:
                yield from iter_containers(value, here)
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from iter_containers(value, f"{path}[{i}]")


def iter_images(doc: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(field path, value) for every ``image`` key anywhere in the document (containers, docker sections...)."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            here = f"{path}.{key}" if path else str(key)
            if key in ("image", "head_image", "worker_image") and not isinstance(value, (dict, list)):
                yield here, value
            else:
                yield from iter_images(value, here)
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from iter_images(value, f"{path}[{i}]")


def check_container_resources(container: dict, where: str) -> list[str]:
    """Requests and limits must both state cpu and memory (Ray sizes itself from the limits)."""
    problems = []
    resources = container.get("resources")
    for part in ("requests", "limits"):
        amounts = resources.get(part) if isinstance(resources, dict) else None
        if not isinstance(amounts, dict) or not amounts:
            problems.append(f"{where}.resources.{part}: missing (state cpu and memory explicitly)")
            continue
        for resource in ("cpu", "memory"):
            if resource not in amounts:
                problems.append(f"{where}.resources.{part}.{resource}: missing")
    return problems
