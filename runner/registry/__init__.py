"""The model registry; this package root re-exports what loading an artifact needs (the in-container code)."""

from runner.registry.evidence import ids_set_id, select_checkpoint
from runner.registry.store import (
    IntegrityError,
    Registry,
    RegistryError,
    parse_ref,
    read_manifest,
    resolve_artifact,
    verify_dir,
)

__all__ = [
    "IntegrityError",
    "Registry",
    "RegistryError",
    "ids_set_id",
    "parse_ref",
    "read_manifest",
    "resolve_artifact",
    "select_checkpoint",
    "verify_dir",
]
