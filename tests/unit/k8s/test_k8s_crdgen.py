"""The CRD is generated from the pydantic models; the committed YAML must equal the generator's output."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from damops.k8s import crdgen
from damops.k8s.models import WorkerPoolSpec

ROOT = Path(__file__).resolve().parents[3]
COMMITTED = [
    ROOT / "crds" / "workerpools.damops.dev.yaml",
    ROOT / "helm" / "damops" / "crds" / "workerpools.damops.dev.yaml",
]


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_crd_equals_generator_output(path: Path) -> None:
    assert path.exists(), f"{path} missing: run python -m damops.k8s.crdgen > {path}"
    assert path.read_text() == crdgen.render(), (
        f"{path.relative_to(ROOT)} is stale: regenerate with `python -m damops.k8s.crdgen > {path.relative_to(ROOT)}`"
    )


def _walk(node, path="$"):
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def test_schema_is_structural() -> None:
    schema = crdgen.openapi_schema()
    for path, node in _walk(schema):
        if not isinstance(node, dict) or path.endswith(".properties"):
            continue
        assert "$ref" not in node and "$defs" not in node, path
        assert "title" not in node and "const" not in node, path
        if "properties" in node or "items" in node:
            assert node.get("type") in ("object", "array"), path
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string") is True, f"{path}: anyOf only for int-or-string"
        if "default" in node:
            assert node["default"] is not None, path


def test_crd_names_subresources_and_columns() -> None:
    crd = crdgen.crd()
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "workerpools.damops.dev"
    assert spec["group"] == "damops.dev" and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "WorkerPool" and spec["names"]["shortNames"] == ["wp"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    for name in ("Desired", "Ready", "Free", "Active", "Queued", "Age"):
        assert name in columns
    assert columns["Queued"] == ".status.queuedOperations"


def test_validation_rules_come_from_the_models() -> None:
    spec = crdgen.openapi_schema()["properties"]["spec"]["properties"]
    assert spec["replicas"]["minimum"] == 0 and spec["replicas"]["maximum"] == 1000
    assert spec["replicas"]["default"] == 1
    assert spec["imagePullPolicy"]["enum"] == ["Always", "IfNotPresent", "Never"]
    assert spec["databaseSecretRef"]["required"] == ["name"]
    assert "pattern" in spec["timings"]["properties"]["schedulerHeartbeat"]
    assert spec["affinity"]["x-kubernetes-preserve-unknown-fields"] is True
    # the models and the schema agree on the field set
    aliases = {f.alias for f in WorkerPoolSpec.model_fields.values()}
    assert aliases == set(spec)


def test_render_is_yaml_of_crd() -> None:
    assert yaml.safe_load(crdgen.render()) == crdgen.crd()
