"""The registry's store under $RUNNER_HOME/registry/: names and references, immutable versions, movable aliases,
manifests and integrity checks. Light on imports: the in-container workloads load artifacts through it.

Layout of one name (see docs/registry.md):

    registry/NAME/.lock            flock held by whoever allocates a version or moves an alias
    registry/NAME/aliases.json     {"champion": {"version": 3, ...}} written atomically (temp, fsync, rename)
    registry/NAME/events.jsonl     append-only history of promotions and alias moves
    registry/NAME/vN/manifest.json files with sha256, source run/spec, base model, evals, gate, git, image
    registry/NAME/vN/adapter/      the PEFT adapter (+ tokenizer/config files saved beside it)
    registry/NAME/vN/tokenizer/    the checkpoint's tokenizer (when it saved one)
    registry/NAME/vN/source/       the run's resolved job.yaml and the checkpoint's trainer_state.json
    registry/NAME/vN/eval/         per-question predictions behind the recorded evals (for paired tests)
    registry/NAME/vN/base/         the base model, bundled when it only exists in this machine's cache
                                   (the offline bases: `tiny`, `smollm2-135m`)
    registry/NAME/vN/merged/       full merged weights (safetensors), with --merge

A version is assembled in `.tmp-vN` and renamed into place: a directory `vN` that exists is complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.files import atomic_write, sha256_file
from runner.paths import runner_home
from runner.runs import now_iso

EXIT_OK, EXIT_REFUSED, EXIT_INVALID, EXIT_ENV = 0, 1, 2, 3
MANIFEST = "manifest.json"
FORMAT = 1

# Names become directory names and Docker repository names: lowercase alphanumeric runs joined by single
# separators, so no `..`, no `/`, no leading dot or dash, nothing a shell would interpret.
NAME_RE = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*$")
VERSION_DIR_RE = re.compile(r"^v([0-9]+)$")
MAX_NAME = 63


class RegistryError(Exception):
    """A problem the user must act on; `code` is the CLI exit code."""

    def __init__(self, message: str, code: int = EXIT_INVALID):
        super().__init__(message)
        self.code = code


class IntegrityError(RegistryError):
    """A version's files do not match its manifest."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message, EXIT_REFUSED)
        self.problems = problems or []


# --- names and references ------------------------------------------------------------------------------


def validate_name(value: str, what: str = "name") -> str:
    if what == "name" and isinstance(value, str) and ("@" in value or ":" in value):
        bare = re.split("[@:]", value.removeprefix("registry:"), maxsplit=1)[0]
        raise RegistryError(f"invalid registry name {value!r}: NAME@alias and NAME:vN are references to a version; "
                            f"here only the name is taken, e.g. {bare or 'qa-agent'}")
    if not value or len(value) > MAX_NAME or not NAME_RE.fullmatch(value):
        raise RegistryError(
            f"invalid registry {what} {value!r}: use 1-{MAX_NAME} lowercase letters and digits, optionally joined by "
            "single '.', '_' or '-' (e.g. qa-agent); no '/', '..', spaces or shell characters"
        )
    if what == "alias" and VERSION_DIR_RE.fullmatch(value):
        raise RegistryError(f"invalid alias {value!r}: it looks like a version number; pick a word such as champion")
    return value


@dataclass(frozen=True)
class Ref:
    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.alias:
            return f"{self.name}@{self.alias}"
        if self.version is not None:
            return f"{self.name}:v{self.version}"
        return self.name


def parse_ref(ref: str) -> Ref:
    """`NAME` (latest version), `NAME@alias`, `NAME:vN` or `NAME:N`; a `registry:` prefix is accepted."""
    s = ref.strip()
    if s.startswith("registry:"):
        s = s[len("registry:"):]
    if "@" in s:
        name, alias = s.split("@", 1)
        m = re.fullmatch(r"[vV]([0-9]+)", alias)
        if m:  # `@` names an alias, and aliases never look like versions: this is a version meant as NAME:vN
            raise RegistryError(f"invalid reference {ref!r}: `@` names an alias; for version {int(m.group(1))} write "
                                f"{name}:v{int(m.group(1))}")
        return Ref(validate_name(name), alias=validate_name(alias, "alias"))
    if ":" in s:
        name, ver = s.split(":", 1)
        m = re.fullmatch(r"v?([0-9]+)", ver)
        if not m or int(m.group(1)) < 1:
            raise RegistryError(f"invalid version {ver!r} in {ref!r}: use NAME:vN, e.g. {name}:v1")
        return Ref(validate_name(name), version=int(m.group(1)))
    return Ref(validate_name(s))


# --- the store -----------------------------------------------------------------------------------------


def registry_dir(home: Path | None = None) -> Path:
    return (home or runner_home()) / "registry"


class Registry:
    def __init__(self, home: Path | None = None):
        self.root = registry_dir(home)

    def name_dir(self, name: str) -> Path:
        return self.root / validate_name(name)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME_RE.fullmatch(p.name))

    def versions(self, name: str) -> list[int]:
        d = self.name_dir(name)
        if not d.is_dir():
            return []
        out = []
        for p in d.iterdir():
            m = VERSION_DIR_RE.fullmatch(p.name)
            if m and p.is_dir():
                out.append(int(m.group(1)))
        return sorted(out)

    def version_dir(self, name: str, version: int) -> Path:
        return self.name_dir(name) / f"v{version}"

    def aliases(self, name: str) -> dict[str, dict[str, Any]]:
        p = self.name_dir(name) / "aliases.json"
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError as e:
            raise RegistryError(f"{p} is unreadable ({e}); fix or remove it", EXIT_REFUSED) from None
        return {str(k): dict(v) for k, v in data.items()}

    def manifest(self, name: str, version: int) -> dict[str, Any]:
        return read_manifest(self.version_dir(name, version))

    def open(self, ref: str | Ref) -> tuple[str, int, Path, dict[str, Any]]:
        """(name, version, its directory, its manifest) for a reference; RegistryError when it does not resolve."""
        name, version = self.resolve(ref)
        vdir = self.version_dir(name, version)
        return name, version, vdir, read_manifest(vdir)

    def resolve(self, ref: str | Ref) -> tuple[str, int]:
        r = parse_ref(ref) if isinstance(ref, str) else ref
        versions = self.versions(r.name)
        if not versions:
            known = ", ".join(self.names()) or "none yet"
            raise RegistryError(f"no registry name {r.name!r} (names: {known}); create one with "
                                f"`runner promote RUN --to {r.name}`")
        if r.alias is not None:
            entry = self.aliases(r.name).get(r.alias)
            if entry is None:
                have = ", ".join(f"@{a}" for a in self.aliases(r.name)) or "none"
                hint = (f"; for version {int(r.alias)} write {r.name}:v{int(r.alias)}"
                        if r.alias.isdigit() and int(r.alias) in versions else "")
                raise RegistryError(f"{r.name} has no alias @{r.alias} (aliases: {have}){hint}; set one with "
                                    f"`runner promote RUN --to {r.name} --alias {r.alias}`")
            v = int(entry["version"])
            if v not in versions:
                raise RegistryError(f"{r} points at v{v}, which does not exist", EXIT_REFUSED)
            return r.name, v
        if r.version is not None:
            if r.version not in versions:
                raise RegistryError(f"{r.name} has no version v{r.version} (versions: "
                                    f"{', '.join(f'v{x}' for x in versions)})")
            return r.name, r.version
        return r.name, versions[-1]

    def aliases_of(self, name: str, version: int) -> list[str]:
        return sorted(a for a, e in self.aliases(name).items() if int(e.get("version", -1)) == version)

    @contextlib.contextmanager
    def lock(self, name: str, log: Callable[[str], None] | None = None) -> Iterator[None]:
        """Exclusive per-name lock; the kernel drops it when the holder dies (kill -9 included). `log` hears
        that the lock is busy, since the wait can be long."""
        d = self.name_dir(name)
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if log is not None:
                    log(f"registry: waiting for another promotion of {name} to finish\n")
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def event(self, name: str, event: dict[str, Any]) -> None:
        line = json.dumps({"time": now_iso(), **event}, sort_keys=True) + "\n"
        with open(self.name_dir(name) / "events.jsonl", "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def set_alias(self, name: str, alias: str, version: int, **fields: Any) -> dict[str, Any] | None:
        """Point `alias` at `version` (caller holds the lock); returns the previous entry."""
        aliases = self.aliases(name)
        previous = aliases.get(alias)
        aliases[alias] = {"version": version, "moved_at": now_iso(), **fields}
        atomic_write(self.name_dir(name) / "aliases.json", json.dumps(aliases, indent=2, sort_keys=True) + "\n")
        self.event(name, {"event": "alias", "alias": alias, "version": version,
                          "previous": previous.get("version") if previous else None, **fields})
        return previous


# --- hashing and integrity -----------------------------------------------------------------------------




def read_manifest(vdir: Path) -> dict[str, Any]:
    p = vdir / MANIFEST
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise RegistryError(f"{vdir} has no {MANIFEST}: not a registry version", EXIT_REFUSED) from None
    except json.JSONDecodeError as e:
        raise IntegrityError(f"{p} is corrupt ({e}); the version cannot be trusted", [f"{MANIFEST}: {e}"]) from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise IntegrityError(f"{p} has no file list; the version cannot be trusted", [f"{MANIFEST}: no files"])
    return data


def tree_files(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, fn), root)
            out.append(rel.replace(os.sep, "/"))
    return out


def verify_dir(vdir: Path, manifest: dict[str, Any] | None = None) -> list[str]:
    """Problems found re-hashing `vdir` against its manifest: one line per file, empty when it matches."""
    m = manifest if manifest is not None else read_manifest(vdir)
    files: dict[str, dict[str, Any]] = m["files"]
    problems = []
    for rel, meta in sorted(files.items()):
        p = vdir / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            problems.append(f"{rel}: path escapes the version directory")
            continue
        if not p.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = p.stat().st_size
        if "size" in meta and size != meta["size"]:
            problems.append(f"{rel}: size {size} != {meta['size']} in the manifest")
            continue
        digest = sha256_file(p)
        if digest != meta.get("sha256"):
            problems.append(f"{rel}: sha256 {digest[:12]}... != {str(meta.get('sha256'))[:12]}... in the manifest")
    for rel in tree_files(vdir):
        if rel != MANIFEST and rel not in files:
            problems.append(f"{rel}: not in the manifest")
    return problems


def resolve_artifact(ref: str | os.PathLike[str], *, verify: bool = True, home: Path | None = None) -> Path:
    """The directory of a registry version (`NAME`, `NAME@alias`, `NAME:vN`, or a version directory such as the
    copy baked into a serving image), after re-hashing its files against the manifest.

    Raises RegistryError (unknown name/alias/version) or IntegrityError (files do not match: the message names them).
    Importable without torch; workloads then load `<dir>/adapter` (+ `<dir>/base` or the manifest's base model).
    """
    s = os.fspath(ref)
    if isinstance(ref, Path) or s.startswith(("/", "./", "../")) or (Path(s) / MANIFEST).is_file():
        vdir = Path(s).resolve()
        if not (vdir / MANIFEST).is_file():
            raise RegistryError(f"{vdir} is not a registry version (no {MANIFEST})")
        label = str(vdir)
    else:
        reg = Registry(home)
        name, version = reg.resolve(s)
        vdir = reg.version_dir(name, version)
        label = f"{name}:v{version}"
    if verify:
        problems = verify_dir(vdir)
        if problems:
            raise IntegrityError(
                f"refusing to load {label}: {len(problems)} file(s) do not match its manifest ({vdir}): "
                + "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "")
                + ". The artifact was modified or corrupted; promote the checkpoint again.",
                problems,
            )
    return vdir
