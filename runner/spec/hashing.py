"""The spec hash: what a job computes, stable across key order, comments, free text and later schema additions.

Runs of the same spec hash resume, compare and trace as one experiment, so a field added to the schema later
must not change the hash of jobs that leave it at its default.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from runner.spec import models

# Keys added to the schema after runs were first stored, with the default that leaves the hash as it was.
# A data source's `remote` never changes what a job computes, whatever its value.
LATER_DEFAULTS: dict[str, object] = {"on_nonfinite": "stop", "prompt": None}
# The same for keys of a data source (a mapping with `path`), where the names would be too general elsewhere.
SOURCE_LATER_DEFAULTS: dict[str, object] = {"hf": None, "config": None, "split": None, "revision": None,
                                            "columns": None}


def _without_later_defaults(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_later_defaults(v) for k, v in node.items()
                if not (k == "remote" and "path" in node) and not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])
                and not ("path" in node and k in SOURCE_LATER_DEFAULTS and v == SOURCE_LATER_DEFAULTS[k])}
    if isinstance(node, list):
        return [_without_later_defaults(v) for v in node]
    return node


def spec_hash(data: dict[str, Any]) -> str:
    """Hash of what a job computes: stable across key order, comments and free-text fields."""
    d = {k: v for k, v in data.items() if k not in ("description", "tags")}
    if isinstance(d.get("logging"), dict) and "mlflow" in d["logging"]:
        # Where a run is tracked never changes what it computes: turning tracking on still resumes it.
        d["logging"] = {k: v for k, v in d["logging"].items() if k != "mlflow"}
    if isinstance(d.get("resources"), dict):
        # Hashed in the flat layout resources had before its backend sections: runs from before keep their
        # hash, so they still resume, compare and trace as the same spec.
        d["resources"] = models.flat_resources(d["resources"])
    blob = json.dumps(_without_later_defaults(d), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
