"""Generate the WorkerPool CustomResourceDefinition from the pydantic models.

    python -m damops.k8s.crdgen > crds/workerpools.damops.dev.yaml

The pydantic JSON schema is turned into a Kubernetes *structural* OpenAPI v3
schema: ``$ref`` inlined, ``Optional`` unwrapped, titles dropped, ``const`` →
``enum``, null defaults dropped, and the ``x-kubernetes-*`` markers the models
carry kept.  The output is deterministic so a test can compare it with the
YAML committed under ``crds/`` and ``helm/damops/crds/``.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml
from pydantic import BaseModel

from damops.k8s import GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION
from damops.k8s.models import WorkerPoolSpec, WorkerPoolStatus

CRD_NAME = f"{PLURAL}.{GROUP}"


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        target.update(extra)  # description/default given at the use site win
        return _resolve(target, defs)
    return {k: _resolve(v, defs) for k, v in node.items()}


def _structural(node: Any) -> Any:
    """Rewrite one (already $ref-free) JSON-schema node into a structural one."""
    if isinstance(node, list):
        return [_structural(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    # Optional[X] → X (the field is simply not required)
    any_of = node.get("anyOf")
    if any_of and not node.get("x-kubernetes-int-or-string"):
        non_null = [s for s in any_of if s.get("type") != "null"]
        if len(non_null) == 1 and len(non_null) < len(any_of):
            merged = dict(non_null[0])
            merged.update({k: v for k, v in node.items() if k != "anyOf"})  # the use site wins
            node = merged
    if node.get("x-kubernetes-int-or-string"):
        # int-or-string: no "type"; anyOf may only repeat the two types
        node.pop("type", None)
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "default" in node and node["default"] is None:
        del node["default"]
    if "default" in node and node["default"] in ([], {}):
        del node["default"]  # empty defaults only add noise to every stored object
    if node.get("additionalProperties") is False:
        del node["additionalProperties"]
    if node.get("additionalProperties") is True:
        del node["additionalProperties"]
        node["x-kubernetes-preserve-unknown-fields"] = True
    if node.get("x-kubernetes-preserve-unknown-fields"):
        node.setdefault("type", "object")
    out: dict[str, Any] = {}
    for key in (
        "description",
        "type",
        "format",
        "enum",
        "default",
        "minimum",
        "maximum",
        "minLength",
        "maxLength",
        "minItems",
        "maxItems",
        "pattern",
        "anyOf",
        "x-kubernetes-int-or-string",
        "x-kubernetes-preserve-unknown-fields",
        "x-kubernetes-list-type",
        "x-kubernetes-map-type",
        "required",
        "properties",
        "additionalProperties",
        "items",
        "x-kubernetes-validations",
    ):
        if key not in node:  # anything pydantic emits beyond these keys is dropped
            continue
        value = node[key]
        if key == "properties":
            value = {name: _structural(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties"):
            value = _structural(value)
        elif key == "required":
            value = sorted(value)
        out[key] = value
    if "enum" in out and "type" not in out and out["enum"]:
        first = out["enum"][0]
        out["type"] = "integer" if isinstance(first, int) else "string"
    return out


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _structural(_resolve(raw, defs))


def openapi_schema() -> dict[str, Any]:
    spec = model_schema(WorkerPoolSpec)
    status = model_schema(WorkerPoolStatus)
    spec["description"] = "Desired state of a pool of pre-heated worker pods."
    status["description"] = "Observed state, written by the operator."
    return {
        "type": "object",
        "description": "A pool of pre-heated damops worker pods claiming operations of one pool.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "damops", "app.kubernetes.io/part-of": "damops"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["damops", "all"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": [
                        {"name": "Pool", "type": "string", "jsonPath": ".status.pool", "priority": 1},
                        # the autoscaler's decision when spec.autoscaling is set, else spec.replicas
                        {"name": "Desired", "type": "integer", "jsonPath": ".status.desiredReplicas"},
                        {"name": "Max", "type": "integer", "jsonPath": ".spec.autoscaling.maxReplicas", "priority": 1},
                        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
                        {"name": "Pending", "type": "integer", "jsonPath": ".status.pendingWorkers", "priority": 1},
                        {"name": "Free", "type": "integer", "jsonPath": ".status.freeWorkers"},
                        {"name": "Active", "type": "integer", "jsonPath": ".status.activeWorkers"},
                        {"name": "Queued", "type": "integer", "jsonPath": ".status.queuedOperations"},
                        {
                            "name": "Status",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
                            "priority": 1,
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                }
            ],
        },
    }


HEADER = "# Generated by `python -m damops.k8s.crdgen` from damops/k8s/models.py. Do not edit by hand.\n"


def render() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, default_flow_style=False, width=120)


def main(argv: list[str] | None = None) -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
