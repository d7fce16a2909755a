"""Offline validation of the Kubernetes and KServe manifests in deploy/k8s/.

Core kinds go through kubernetes-validate's bundled strict schemas (unknown fields are
errors), reporting every error rather than the CLI's first. KServe's CRDs are in no
bundled schema, so their resources are walked through the kserve SDK's generated model
classes (`openapi_types` and `attribute_map` say each field's name and type; the
constructors refuse a missing required field or a value outside an enum), and every
Kubernetes type inside them (V1Container, V1ObjectMeta, ...) is checked against the same
strict Kubernetes schema as the core kinds. A structural check: defaulting and admission
webhooks are not run.

kserve is installed without its dependencies (`pip install --no-deps kserve`: its model
modules need only six and urllib3, while the package pulls pandas, fastapi and the
kubernetes client, about 450 MB), and `kserve/__init__.py`, which imports the model server,
is bypassed.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import re
import sys
import types
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource

SCHEMA_ROOT = "kubernetes-json-schema"


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@cache
def _definitions(version: str) -> tuple[Registry, dict[str, Any]]:
    folder = importlib.resources.files("kubernetes_validate").joinpath(SCHEMA_ROOT, f"v{version}-local-strict")
    defs = json.loads(folder.joinpath("_definitions.json").read_text())
    return Resource.from_contents(defs) @ Registry(), defs["$defs"]


def _schema_errors(value: Any, schema: dict[str, Any], version: str, where: str) -> list[str]:
    registry, _ = _definitions(version)
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return [f"{where}{'.' if err.path else ''}{'.'.join(map(str, err.path))}: {err.message}"
            for err in sorted(validator.iter_errors(value), key=lambda e: list(map(str, e.path)))]


def core_errors(doc: dict[str, Any], version: str) -> list[str]:
    """Every error of a core-kind document against the strict schema of Kubernetes `version`."""
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", doc["apiVersion"])
    name = f"{doc['kind'].lower()}-{group_version}.json"
    folder = importlib.resources.files("kubernetes_validate").joinpath(SCHEMA_ROOT, f"v{version}-local-strict")
    schema = json.loads(folder.joinpath(name).read_text())
    return _schema_errors(doc, schema, version, f"{doc['kind']}/{doc['metadata']['name']}")


def _k8s_definition(class_name: str, version: str) -> str | None:
    """The definitions key of a kubernetes client class name: V1Container -> io.k8s.api.core.v1.Container."""
    match = re.fullmatch(r"(V\d+(?:alpha\d+|beta\d+)?)(\w+)", class_name)
    if not match:
        return None
    api, kind = match.group(1).lower(), match.group(2)
    _, defs = _definitions(version)
    for prefix in ("io.k8s.api.core.", "io.k8s.apimachinery.pkg.apis.meta.", "io.k8s.api."):
        hits = sorted(k for k in defs if k.startswith(prefix) and k.endswith(f".{api}.{kind}"))
        if hits:
            return hits[0]
    return None


@cache
def kserve_models() -> types.ModuleType:
    """kserve.models, imported without running kserve/__init__.py (the model server)."""
    if "kserve" not in sys.modules:
        spec = importlib.util.find_spec("kserve")
        if spec is None or spec.origin is None:
            raise ImportError("kserve is not installed (scripts/setup installs it with --no-deps)")
        package = types.ModuleType("kserve")
        package.__path__ = [str(Path(spec.origin).parent)]
        sys.modules["kserve"] = package
    import kserve.models

    return kserve.models


class KServeWalker:
    def __init__(self, version: str) -> None:
        self.version = version
        self.models = kserve_models()
        self.errors: list[str] = []

    def walk(self, value: Any, type_name: str, where: str) -> None:
        if value is None:
            return
        if type_name == "object":
            return
        simple = {"str": str, "bool": bool, "float": (int, float), "int": int, "datetime": str, "date": str}
        if type_name in simple:
            numeric = type_name in ("int", "float")
            if not isinstance(value, simple[type_name]) or (numeric and isinstance(value, bool)):
                self.errors.append(f"{where}: expected {type_name}, got {type(value).__name__} {value!r}")
            return
        if type_name.startswith("list["):
            if not isinstance(value, list):
                self.errors.append(f"{where}: expected a list, got {type(value).__name__}")
                return
            for i, item in enumerate(value):
                self.walk(item, type_name[5:-1], f"{where}[{i}]")
            return
        if type_name.startswith("dict("):
            inner = type_name[5:-1].split(",", 1)[1].strip()
            if not isinstance(value, dict):
                self.errors.append(f"{where}: expected a mapping, got {type(value).__name__}")
                return
            for key, item in value.items():
                self.walk(item, inner, f"{where}.{key}")
            return
        cls = getattr(self.models, type_name, None)
        if cls is None:
            definition = _k8s_definition(type_name, self.version)
            if definition is None:
                self.errors.append(f"{where}: no schema for type {type_name}")
                return
            schema = {"$ref": f"https://kubernetes.io/api/_definitions.json#/$defs/{definition}"}
            self.errors += _schema_errors(value, schema, self.version, where)
            return
        self.walk_model(value, cls, where)

    def walk_model(self, value: Any, cls: type, where: str) -> None:
        if not isinstance(value, dict):
            self.errors.append(f"{where}: expected a {cls.__name__} mapping, got {type(value).__name__}")
            return
        by_key = {key: attr for attr, key in cls.attribute_map.items()}  # type: ignore[attr-defined]
        for key in value:
            if key not in by_key:
                self.errors.append(f"{where}.{key}: unknown field of {cls.__name__}")
        present = {by_key[k]: v for k, v in value.items() if k in by_key}
        try:  # the generated constructor refuses missing required fields and values outside enums
            cls(**present)
        except (ValueError, TypeError) as exc:
            self.errors.append(f"{where}: {cls.__name__}: {exc}")
        for attr, item in present.items():
            self.walk(item, cls.openapi_types[attr], f"{where}.{cls.attribute_map[attr]}")  # type: ignore[attr-defined]


KSERVE_KINDS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}


def kserve_errors(doc: dict[str, Any], version: str) -> list[str]:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in KSERVE_KINDS:
        return [f"{key}: not a KServe kind this check knows"]
    walker = KServeWalker(version)
    walker.walk(doc, KSERVE_KINDS[key], f"{doc['kind']}/{doc.get('metadata', {}).get('name')}")  # type: ignore[index]
    return walker.errors
