"""Check the KubeRay files against the schemas Kubernetes and KubeRay validate them with.

    python scripts/check_manifests.py                      # pod templates: offline, in the tests
    python scripts/check_manifests.py --crds DIR           # also KubeRay's CRDs (ray.io_*.yaml)

Every pod template (head and worker groups) and every core document (a Secret, a PVC) is
validated with Kubernetes' own strict schemas (kubernetes-validate ships them), so an unknown or
misplaced field fails here rather than being dropped by the API server. With `--crds DIR` (the
`ray-operator/config/crd/bases` folder of a KubeRay release) the RayCluster and RayJob documents
are validated against the CRDs' `openAPIV3Schema`, with unknown fields refused as the API server
prunes them. The CRDs are not shipped here; CI checks the pod templates only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = [REPO / "cluster/kuberay-raycluster.yaml", *sorted((REPO / "manifests").glob("*.yaml"))]
# The Kubernetes minor version whose schemas the pods are checked against (EKS and GKE offer it).
KUBERNETES_VERSION = "1.33.0"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _pod_templates(doc: dict) -> list[tuple[str, dict]]:
    cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    groups = [("headGroupSpec", cluster["headGroupSpec"])]
    groups += [(f"workerGroupSpecs[{g.get('groupName', i)}]", g) for i, g in enumerate(cluster["workerGroupSpecs"])]
    return [(where, group["template"]) for where, group in groups]


def pod_errors(path: Path) -> list[str]:
    """Problems Kubernetes' strict schemas find in the file's pods and core documents."""
    import kubernetes_validate

    errors = []
    for doc in _documents(path):
        if doc["kind"] in CRD_FILES:
            checked = [(f"{doc['kind']} {where}", {"apiVersion": "v1", "kind": "Pod",
                                                    "metadata": {"name": "check", **template.get("metadata", {})},
                                                    "spec": template["spec"]})
                       for where, template in _pod_templates(doc)]
        else:
            checked = [(doc["kind"], doc)]
        for where, resource in checked:
            try:
                kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as err:
                errors.append(f"{path.name}: {where}: {err.message} (at {'.'.join(map(str, err.absolute_path))})")
    return errors


def _closed(schema: object) -> None:
    """Refuse unknown fields where the API server would prune them (structural schemas)."""
    if isinstance(schema, dict):
        if schema.get("x-kubernetes-int-or-string"):
            schema.pop("type", None)
        if (schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for value in schema.values():
            _closed(value)
    elif isinstance(schema, list):
        for value in schema:
            _closed(value)


def crd_errors(path: Path, crds: Path) -> list[str]:
    """Problems KubeRay's CRD schemas (v1) find in the file's RayCluster and RayJob documents."""
    import jsonschema

    errors = []
    for doc in _documents(path):
        if doc["kind"] not in CRD_FILES:
            continue
        crd = yaml.safe_load((crds / CRD_FILES[doc["kind"]]).read_text())
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == doc["apiVersion"].split("/")[1]]
        schema = version["schema"]["openAPIV3Schema"]
        _closed(schema)
        for err in jsonschema.Draft7Validator(schema).iter_errors(doc):
            errors.append(f"{path.name}: {doc['kind']}: {err.message} (at {'.'.join(map(str, err.absolute_path))})")
    return errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crds", type=Path, help="KubeRay's ray-operator/config/crd/bases folder")
    args = parser.parse_args()
    errors = [e for path in MANIFESTS for e in pod_errors(path)]
    if args.crds:
        errors += [e for path in MANIFESTS for e in crd_errors(path, args.crds)]
    for error in errors:
        print(error)
    checked = "pod templates" + (" and KubeRay CRDs" if args.crds else "")
    print(f"{len(MANIFESTS)} files, {checked}: {'ok' if not errors else f'{len(errors)} problem(s)'}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
