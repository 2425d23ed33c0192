#!/usr/bin/env python3
"""Validate KubeRay manifests (RayJob, RayCluster; apiVersion ray.io/v1) offline.

Vendored from the ntk-ray steering repository (shared/kuberay/validate.py); same logic, except
that the schemas are read gzipped and each validator is built once per process.

The schemas beside this file (*.schema.json.gz) are the openAPIV3Schema of KubeRay's v1 CRDs
(ray-operator/config/crd/bases, KubeRay commit feeaf72f, Aug 2026), with descriptions stripped.
Unlike a Kubernetes API server, which silently prunes unknown fields, this checker rejects them,
so a misspelled key is an error. CEL rules (x-kubernetes-validations) are not checked.

usage: python tests/kuberay/validate.py MANIFEST.yaml [...]   exit 0 when every document is valid
needs: pyyaml, jsonschema
"""
import functools
import gzip
import json
import pathlib
import sys

import jsonschema
import yaml

HERE = pathlib.Path(__file__).resolve().parent
SCHEMAS = {
    "RayJob": "rayjobs.v1.schema.json.gz",
    "RayCluster": "rayclusters.v1.schema.json.gz",
}


def strict(node):
    """Forbid properties that the schema does not name, as a typo check."""
    if isinstance(node, dict):
        node = {k: strict(v) for k, v in node.items()}
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [strict(v) for v in node]
    return node


def load_schema(kind):
    """The CRD's openAPIV3Schema for `kind`, as stored (not yet made strict)."""
    return json.loads(gzip.decompress((HERE / SCHEMAS[kind]).read_bytes()))


@functools.lru_cache(maxsize=None)
def validator(kind):
    schema = strict(load_schema(kind))
    # metadata is an opaque object in CRD schemas; Kubernetes checks it elsewhere
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def check_documents(docs, path="<manifest>"):
    """Error lines for the ray.io/v1 RayJob/RayCluster documents among `docs` (parsed YAML)."""
    errors = []
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        kind = doc.get("kind")
        if doc.get("apiVersion") != "ray.io/v1" or kind not in SCHEMAS:
            continue  # not a KubeRay object (ConfigMap, PVC, ...): not ours to judge
        for err in validator(kind).iter_errors(doc):
            where = "/".join(str(p) for p in err.absolute_path) or "<root>"
            errors.append(f"{path} doc {i} ({kind}) at {where}: {err.message}")
    return errors


def check(path):
    docs = yaml.safe_load_all(pathlib.Path(path).read_text())
    return check_documents(docs, path)


def main(argv):
    if not argv:
        print(__doc__.strip())
        return 2
    errors = [e for p in argv for e in check(p)]
    for e in errors:
        print(e)
    print(f"{len(argv)} file(s), {len(errors)} error(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
