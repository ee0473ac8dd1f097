"""The registry of promoted artifacts under $RUNNER_HOME/registry/: immutable versions, movable aliases, lineage
back to the run and its spec, a promotion gate, integrity checks, and serving images built from a version.

Layout of one name (see docs/registry.md):

    registry/NAME/.lock            flock held by whoever allocates a version or moves an alias
    registry/NAME/aliases.json     {"champion": {"version": 3, ...}} written atomically (temp, fsync, rename)
    registry/NAME/events.jsonl     append-only history of promotions and alias moves
    registry/NAME/vN/manifest.json files with sha256, source run/spec, base model, evals, gate, git, image
    registry/NAME/vN/adapter/      the PEFT adapter (+ tokenizer/config files saved beside it)
    registry/NAME/vN/tokenizer/    the checkpoint's tokenizer (when it saved one)
    registry/NAME/vN/source/       the run's resolved job.yaml and the checkpoint's trainer_state.json
    registry/NAME/vN/eval/         per-question predictions behind the recorded evals (for paired tests)
    registry/NAME/vN/base/         the base model, bundled when it only exists in this machine's cache (`tiny`)
    registry/NAME/vN/merged/       full merged weights (safetensors), with --merge

A version is assembled in `.tmp-vN` and renamed into place: a directory `vN` that exists is complete.
Nothing here imports torch: merging and base bundling run `python -m runner.workloads.artifact` in a subprocess.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.files import atomic_write
from runner.paths import runner_home
from runner.runs import now_iso

if TYPE_CHECKING:
    from runner.runs import Run

EXIT_OK, EXIT_REFUSED, EXIT_INVALID, EXIT_ENV = 0, 1, 2, 3
MANIFEST = "manifest.json"
FORMAT = 1
PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Names become directory names and Docker repository names: lowercase alphanumeric runs joined by single
# separators, so no `..`, no `/`, no leading dot or dash, nothing a shell would interpret.
NAME_RE = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*$")
VERSION_DIR_RE = re.compile(r"^v([0-9]+)$")
MAX_NAME = 63

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "config.json", "generation_config.json",
)
BEST_POINTERS = ("best", "best.json", "best.txt")


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
    if not value or len(value) > MAX_NAME or not NAME_RE.match(value):
        raise RegistryError(
            f"invalid registry {what} {value!r}: use 1-{MAX_NAME} lowercase letters and digits, optionally joined by "
            "single '.', '_' or '-' (e.g. qa-agent); no '/', '..', spaces or shell characters"
        )
    if what == "alias" and VERSION_DIR_RE.match(value):
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
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME_RE.match(p.name))

    def versions(self, name: str) -> list[int]:
        d = self.name_dir(name)
        if not d.is_dir():
            return []
        out = []
        for p in d.iterdir():
            m = VERSION_DIR_RE.match(p.name)
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
                raise RegistryError(f"{r.name} has no alias @{r.alias} (aliases: {have}); set one with "
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
    def lock(self, name: str) -> Iterator[None]:
        """Exclusive per-name lock; the kernel drops it when the holder dies (kill -9 included)."""
        d = self.name_dir(name)
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"registry: waiting for another promotion of {name} to finish", file=sys.stderr, flush=True)
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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def _tree_files(root: Path) -> list[str]:
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
    for rel in _tree_files(vdir):
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


# --- source runs, checkpoints and their evals ----------------------------------------------------------


def _step_of(checkpoint: Path) -> int | None:
    m = re.fullmatch(r"step-0*([0-9]+)", checkpoint.name)
    return int(m.group(1)) if m else None


def _best_pointer(run: Run) -> Path | None:
    for name in BEST_POINTERS:
        p = run.checkpoints_dir / name
        if p.is_symlink() or p.is_dir():
            target = Path(os.path.realpath(p))
            return target if target.is_dir() else None
        if p.is_file():
            text = p.read_text().strip()
            with contextlib.suppress(json.JSONDecodeError):
                data = json.loads(text)
                if isinstance(data, dict):
                    text = str(data.get("checkpoint") or data.get("path") or data.get("name") or "")
            target = run.checkpoints_dir / Path(text).name
            return target if target.is_dir() else None
    return None


def _val_accuracy_at(run: Run, step: int) -> float | None:
    acc = None
    for m in run.metrics():
        if m.get("split") == "val" and m.get("step") == step and isinstance(m.get("accuracy"), (int, float)):
            acc = float(m["accuracy"])
    return acc


def select_checkpoint(run: Run, which: str) -> Path:
    cks = run.checkpoints()
    if not cks:
        raise RegistryError(f"run {run.ref} has no checkpoints in {run.checkpoints_dir}", EXIT_REFUSED)
    if which == "last":
        return cks[-1]
    if which == "best":
        best = _best_pointer(run)
        if best is not None:
            return best
        scored = [(a, c) for c in cks if (s := _step_of(c)) is not None and (a := _val_accuracy_at(run, s)) is not None]
        if not scored:
            raise RegistryError(
                f"run {run.ref} marks no best checkpoint and has no validation accuracy for its checkpoints; "
                "use --checkpoint last or --checkpoint step-N", EXIT_REFUSED)
        return max(scored, key=lambda x: (x[0], _step_of(x[1]) or 0))[1]
    m = re.fullmatch(r"(?:step-)?0*([0-9]+)", which)
    if not m:
        raise RegistryError(f"invalid --checkpoint {which!r}: use best, last or step-N (e.g. step-200)")
    step = int(m.group(1))
    for c in cks:
        if _step_of(c) == step:
            return c
    raise RegistryError(f"run {run.ref} has no checkpoint at step {step} (has: {', '.join(c.name for c in cks)})",
                        EXIT_REFUSED)


def _canonical_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


def val_set_id(job_data: dict[str, Any]) -> str:
    """Identifies a train job's validation questions: the data settings that decide them."""
    data = job_data.get("data") or {}
    keys = ("val", "val_fraction", "val_limit", "seed")
    ident = {k: data.get(k) for k in keys}
    if not data.get("val"):  # split off the training sources
        ident["train"] = data.get("train")
    return "val-" + _canonical_hash(ident)


def ids_set_id(ids: list[str]) -> str:
    return "ids-" + _canonical_hash(sorted(ids))


def _predictions_of(obj: Any) -> dict[str, bool] | None:
    """{question id: correct} from an eval.json-like object: a `predictions` list of dicts with an id and either
    `correct` or `pred`/`prediction` + `answer`/`gold`."""
    preds = obj.get("predictions") if isinstance(obj, dict) else obj
    if not isinstance(preds, list) or not preds:
        return None
    out: dict[str, bool] = {}
    for i, p in enumerate(preds):
        if not isinstance(p, dict):
            return None
        qid = str(p.get("id", p.get("question_id", i)))
        if isinstance(p.get("correct"), bool):
            out[qid] = p["correct"]
            continue
        pred = p.get("pred", p.get("prediction", p.get("predicted")))
        gold = p.get("answer", p.get("gold", p.get("label")))
        if pred is None or gold is None:
            return None
        out[qid] = str(pred) == str(gold)
    return out


@dataclass
class Eval:
    """One accuracy measurement of a checkpoint on an identified set of questions."""

    kind: str  # "val" (the training run's validation) or "eval-run" (an `eval` job on this checkpoint)
    eval_set: str
    accuracy: float
    n: int | None
    source: str  # where the number comes from
    correct: dict[str, bool] | None = field(default=None, repr=False)
    predictions_file: str | None = None  # inside the version, once promoted

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "eval_set": self.eval_set, "accuracy": self.accuracy, "n": self.n,
                "source": self.source, "predictions_file": self.predictions_file}


def _load_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _val_eval(run: Run, checkpoint: Path, job_data: dict[str, Any]) -> Eval | None:
    step = _step_of(checkpoint)
    acc = _val_accuracy_at(run, step) if step is not None else None
    n: int | None = None
    for m in run.metrics():
        if m.get("split") == "val" and m.get("step") == step:
            n = m.get("n") or m.get("n_val") or m.get("count") or n
    state = _load_json(checkpoint / "trainer_state.json")
    if acc is None and isinstance(state, dict):
        for key in ("val_accuracy", "accuracy", "best_val_accuracy"):
            v = state.get(key)
            if isinstance(v, (int, float)):
                acc = float(v)
                break
        if acc is None and isinstance(state.get("val"), dict) and isinstance(state["val"].get("accuracy"), (int, float)):
            acc = float(state["val"]["accuracy"])
    if acc is None:
        return None
    correct = None
    for fn in ("val_predictions.json", "val_predictions.jsonl", "val.json"):
        p = checkpoint / fn
        if p.is_file():
            if fn.endswith(".jsonl"):
                rows = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
                correct = _predictions_of(rows)
            else:
                correct = _predictions_of(_load_json(p))
            if correct:
                break
    if correct and n is None:
        n = len(correct)
    return Eval("val", val_set_id(job_data), acc, int(n) if n is not None else None,
                f"{run.ref} metrics.jsonl split=val step={step}", correct)


def _mentions(obj: Any, needles: tuple[str, ...]) -> bool:
    if isinstance(obj, str):
        return any(n and n in obj for n in needles)
    if isinstance(obj, dict):
        return any(_mentions(v, needles) for v in obj.values())
    if isinstance(obj, list):
        return any(_mentions(v, needles) for v in obj)
    return False


def _values_of(obj: Any, key: str) -> list[Any]:
    if isinstance(obj, dict):
        return [v for k, v in obj.items() if k == key] + [x for v in obj.values() for x in _values_of(v, key)]
    if isinstance(obj, list):
        return [x for v in obj for x in _values_of(v, key)]
    return []


def _eval_targets(run: Run, checkpoint: Path, eval_run: Run) -> bool:
    """Whether `eval_run` evaluated exactly this run's checkpoint: its job or eval.json names the checkpoint's
    path, or names this run and a checkpoint selector (best, last, step-N) that resolves to it."""
    ev = _load_json(eval_run.dir / "eval.json")
    job = eval_run.job_data()
    ck_real = os.path.realpath(checkpoint)
    target = ev.get("target") if isinstance(ev, dict) else None
    if isinstance(target, dict):  # what the eval workload records it scored
        kind = target.get("type")
        if kind == "run":
            return os.path.realpath(str(target.get("checkpoint_path", ""))) == ck_real
        if kind == "registry":
            src = target.get("source") or {}
            return src.get("run_id") == run.id and src.get("checkpoint") == checkpoint.name
        if kind == "ensemble":  # an ensemble's accuracy is not this checkpoint's
            return False
    for src in (ev, job):
        if _mentions(src, (ck_real, str(checkpoint), str(checkpoint / "adapter"))):
            return True
    if not _mentions(job, (run.id,)):
        # `run: <job name>` means that job's latest run; count it only if that is still this run.
        from runner.runs import RunError, RunStore

        refs = [v for v in _values_of(job, "run") if isinstance(v, str)]
        try:
            if not any(RunStore().get(r).dir == run.dir for r in refs):
                return False
        except RunError:
            return False
    for sel in _values_of(job, "checkpoint"):
        if isinstance(sel, (str, int)):
            with contextlib.suppress(RegistryError):
                if os.path.realpath(select_checkpoint(run, str(sel))) == ck_real:
                    return True
    return False


def _eval_run_evals(run: Run, checkpoint: Path) -> list[tuple[Eval, Path]]:
    from runner.runs import RunStore

    out = []
    for r in RunStore().list():
        st = r.status()
        if st.get("kind") != "eval" or st.get("state") != "succeeded" or not (r.dir / "eval.json").is_file():
            continue
        try:
            if not _eval_targets(run, checkpoint, r):
                continue
        except Exception:  # an unreadable eval run is not ours to judge here
            continue
        ev = _load_json(r.dir / "eval.json")
        if not isinstance(ev, dict) or not isinstance(ev.get("accuracy"), (int, float)):
            continue
        correct = _predictions_of(ev)
        ident = ev.get("eval_set") or ev.get("dataset_hash")
        eval_set = str(ident) if ident else (ids_set_id(list(correct)) if correct else f"run-{r.id}")
        n = ev.get("n") or (len(correct) if correct else None)
        out.append((Eval("eval-run", eval_set, float(ev["accuracy"]), n, f"{r.ref} eval.json", correct),
                    r.dir / "eval.json"))
    return out


def collect_evals(run: Run, checkpoint: Path, job_data: dict[str, Any]) -> list[tuple[Eval, Path | None]]:
    found: list[tuple[Eval, Path | None]] = []
    v = _val_eval(run, checkpoint, job_data)
    if v is not None:
        found.append((v, None))
    found += _eval_run_evals(run, checkpoint)
    return found


def eval_command(run: Run, checkpoint: Path) -> str:
    job = next((str(p.relative_to(Path.cwd())) for p in sorted(Path.cwd().glob("jobs/eval*.yaml"))), "jobs/eval.yaml")
    return (f"`runner run {job} --set run={run.id} --set checkpoint={checkpoint.name}` "
            f"(an `eval` job with `run: {run.id}` and `checkpoint: {checkpoint.name}`)")


# --- the promotion gate --------------------------------------------------------------------------------


def mcnemar(b: int, c: int) -> float:
    """Two-sided p-value of McNemar's test on the discordant pairs (b: only A right, c: only B right).
    Exact binomial below 25 discordant pairs, chi-square with continuity correction above."""
    n = b + c
    if n == 0:
        return 1.0
    if n < 25:
        k = min(b, c)
        tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
        return min(1.0, 2 * tail)
    chi2 = (abs(b - c) - 1) ** 2 / n
    return math.erfc(math.sqrt(chi2 / 2))


def paired_test(cand: dict[str, bool], holder: dict[str, bool]) -> dict[str, Any] | None:
    common = sorted(set(cand) & set(holder))
    if not common:
        return None
    b = sum(1 for q in common if cand[q] and not holder[q])
    c = sum(1 for q in common if holder[q] and not cand[q])
    return {"test": "mcnemar", "n": len(common), "candidate_only_correct": b, "holder_only_correct": c,
            "p_value": round(mcnemar(b, c), 6),
            "candidate_accuracy": sum(cand[q] for q in common) / len(common),
            "holder_accuracy": sum(holder[q] for q in common) / len(common)}


def _holder_correct(vdir: Path, rec: dict[str, Any]) -> dict[str, bool] | None:
    pf = rec.get("predictions_file")
    if not pf:
        return None
    return _predictions_of(_load_json(vdir / pf))


def gate(cands: list[Eval], holder_vdir: Path, holder_manifest: dict[str, Any]) -> dict[str, Any]:
    """Compare the candidate with the alias holder on an eval set both were measured on.

    Returns the gate record: `passed`, the pair of accuracies, the eval set and the paired test (or why none).
    Raises RegistryError naming the command to run when they share no eval set.
    """
    held = [e for e in holder_manifest.get("evals", []) if isinstance(e, dict)]
    pairs = [(c, h) for c in cands for h in held if c.eval_set == h.get("eval_set")]
    if not pairs:
        raise RegistryError(
            "candidate and holder were never evaluated on the same questions: candidate has "
            f"[{', '.join(f'{c.eval_set} ({c.kind})' for c in cands) or 'none'}], holder has "
            f"[{', '.join(str(h.get('eval_set')) for h in held) or 'none'}]", EXIT_REFUSED)

    def rank(p: tuple[Eval, dict[str, Any]]) -> tuple[int, int]:
        c, h = p
        return (int(bool(c.correct) and bool(h.get("predictions_file"))), int(c.kind == "eval-run"))

    c, h = max(pairs, key=rank)
    test = None
    why = "no per-question predictions recorded for both; the paired test needs an `eval` run on each"
    hc = _holder_correct(holder_vdir, h)
    if c.correct and hc:
        test = paired_test(c.correct, hc)
        if test is None:
            why = "the recorded predictions share no question ids"
    h_acc = float(h["accuracy"])
    return {"eval_set": c.eval_set, "eval_kind": c.kind, "candidate_accuracy": c.accuracy, "candidate_n": c.n,
            "holder_accuracy": h_acc, "holder_n": h.get("n"), "passed": c.accuracy >= h_acc - 1e-12,
            "paired_test": test, "paired_test_unavailable": None if test else why}


def format_gate(g: dict[str, Any], holder: str, alias: str) -> list[str]:
    def acc(a: float, n: Any) -> str:
        return f"{a:.4f}" + (f" (n={n})" if n else "")

    lines = [f"gate: candidate {acc(g['candidate_accuracy'], g['candidate_n'])} vs @{alias} {holder} "
             f"{acc(g['holder_accuracy'], g['holder_n'])} on eval set {g['eval_set']} ({g['eval_kind']})"]
    t = g.get("paired_test")
    if t:
        lines.append(f"gate: McNemar on {t['n']} paired questions: candidate-only correct {t['candidate_only_correct']}, "
                     f"holder-only correct {t['holder_only_correct']}, p = {t['p_value']:.4g}"
                     + (" (not significant at 0.05)" if t["p_value"] >= 0.05 else " (significant at 0.05)"))
    else:
        lines.append(f"gate: paired test not run: {g.get('paired_test_unavailable')}")
    return lines


# --- promotion -----------------------------------------------------------------------------------------


def git_info(root: Path = PROJECT_ROOT) -> dict[str, Any] | None:
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def _copy_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _find_adapter_dir(checkpoint: Path) -> Path | None:
    if (checkpoint / "adapter_config.json").is_file():
        return checkpoint
    for p in sorted(checkpoint.rglob("adapter_config.json")):
        if len(p.relative_to(checkpoint).parts) <= 3:
            return p.parent
    return None


def _job_source(run: Run) -> str | None:
    with contextlib.suppress(OSError):
        for line in run.events_path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                e = json.loads(line)
                if e.get("event") == "created" and e.get("source"):
                    return str(e["source"])
    return None


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _finalise_files(tmp: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for rel in _tree_files(tmp):
        if rel == MANIFEST:
            continue
        p = tmp / rel
        files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    return files


def _workload(args: list[str], what: str) -> None:
    """Run `python -m runner.workloads.artifact ARGS` (torch lives there, not in this process)."""
    proc = subprocess.run([sys.executable, "-m", "runner.workloads.artifact", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise RegistryError(f"{what} failed (exit {proc.returncode}):\n  " + "\n  ".join(tail), EXIT_REFUSED)


@dataclass
class Promotion:
    name: str
    version: int
    vdir: Path
    manifest: dict[str, Any]
    messages: list[str]


def promote(ref: str, to: str, *, checkpoint: str = "best", alias: str | None = None, image: bool = False,
            merge: bool = False, force: bool = False, home: Path | None = None) -> Promotion:
    """Copy a run's checkpoint into a new immutable version of `to`; optionally gate and move `alias`."""
    from runner.runs import RunError, RunStore

    name = validate_name(to)
    if alias is not None:
        validate_name(alias, "alias")
    try:
        run = RunStore(home).get(ref)
    except RunError as e:
        raise RegistryError(str(e)) from None
    ck = select_checkpoint(run, checkpoint)
    adapter_dir = _find_adapter_dir(ck)
    if adapter_dir is None:
        raise RegistryError(f"{ck} holds no PEFT adapter (adapter_config.json); is it a LoRA training checkpoint?",
                            EXIT_REFUSED)
    job_data = run.job_data()
    base = str((job_data.get("model") or {}).get("base", ""))
    if image and not merge and Path(base).is_absolute():
        raise RegistryError(
            f"the run's base model {base} is a directory on this machine, which a serving image would not have; "
            "add --merge (the image then carries full merged weights)")
    if image:
        _docker()  # fail fast (exit 3) before copying or merging anything
    evals = collect_evals(run, ck, job_data)
    messages: list[str] = []
    if not evals and not force:
        raise RegistryError(
            f"no evaluation of {run.ref} {ck.name}: neither validation accuracy at that step in metrics.jsonl nor "
            f"an `eval` run on it. Produce one with: {eval_command(run, ck)}; or promote with --force "
            "(recorded in the manifest)", EXIT_REFUSED)
    reg = Registry(home)
    with reg.lock(name):
        gate_rec: dict[str, Any] | None = None
        if alias is not None:
            holder = reg.aliases(name).get(alias)
            if holder is None:
                gate_rec = {"alias": alias, "holder": None, "passed": True, "decision": "first holder"}
            else:
                hv = int(holder["version"])
                hdir = reg.version_dir(name, hv)
                try:
                    g = gate([e for e, _ in evals], hdir, read_manifest(hdir))
                except RegistryError as e:
                    if not force:
                        raise RegistryError(f"{e}; evaluate the candidate on the holder's set: "
                                            f"{eval_command(run, ck)}; or --force", EXIT_REFUSED) from None
                    g = {"passed": False, "error": str(e)}
                g.update(alias=alias, holder=f"{name}:v{hv}")
                if "candidate_accuracy" in g:
                    messages += format_gate(g, f"{name}:v{hv}", alias)
                if not g["passed"] and not force:
                    raise RegistryError(
                        "\n".join(messages) + f"\nrefused: candidate accuracy {g['candidate_accuracy']:.4f} < "
                        f"{g['holder_accuracy']:.4f} of @{alias} ({name}:v{hv}); nothing was written. "
                        "Use --force to promote anyway (recorded in the manifest).", EXIT_REFUSED)
                g["decision"] = "accepted" if g["passed"] else "forced"
                gate_rec = g
        version = max(reg.versions(name), default=0) + 1
        ndir = reg.name_dir(name)
        for stale in ndir.glob(".tmp-v*"):  # left by a promotion that died; we hold the lock, so it is not live
            shutil.rmtree(stale, ignore_errors=True)
        tmp = ndir / f".tmp-v{version}"
        tmp.mkdir()
        try:
            manifest = _assemble(tmp, run, ck, checkpoint, adapter_dir, job_data, evals, name, version, merge)
            manifest["forced"] = bool(force)
            manifest["promotion"] = {"alias": alias, "gate": gate_rec, "forced": bool(force)}
            manifest["image"] = None
            manifest["files"] = _finalise_files(tmp)
            for rel in manifest["files"]:
                (tmp / rel).chmod(0o444)
            atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            if image:
                # The image carries this manifest (its file list verifies the baked copy); the image id is added
                # to the registry's copy afterwards, since an image cannot contain its own id.
                manifest["image"] = build_serving_image(tmp, manifest, name, version)
                atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            (tmp / MANIFEST).chmod(0o444)
            _fsync_dir(tmp)
            final = reg.version_dir(name, version)
            os.rename(tmp, final)
            _fsync_dir(ndir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        reg.event(name, {"event": "promote", "version": version, "run": run.ref, "checkpoint": ck.name,
                         "forced": bool(force)})
        messages.append(f"promoted {run.ref} {ck.name} -> {name}:v{version} ({final})")
        if alias is not None:
            prev = reg.set_alias(name, alias, version, forced=bool(force))
            if image and manifest.get("image"):
                tag_image(manifest["image"]["id"], f"{name}:{alias}")
            was = f" (was v{prev['version']})" if prev else ""
            messages.append(f"alias {name}@{alias} -> v{version}{was}" + (" [forced]" if force else ""))
        return Promotion(name, version, final, manifest, messages)


def _lora_of(adapter: Path) -> dict[str, Any] | None:
    """The adapter's real shape, from its adapter_config.json."""
    cfg = _load_json(adapter / "adapter_config.json")
    if not isinstance(cfg, dict):
        return None
    targets = cfg.get("target_modules")
    return {"r": cfg.get("r"), "alpha": cfg.get("lora_alpha"), "dropout": cfg.get("lora_dropout"),
            "target_modules": sorted(targets) if isinstance(targets, list) else targets,
            "peft_type": cfg.get("peft_type"), "base_model_name_or_path": cfg.get("base_model_name_or_path")}


def _assemble(tmp: Path, run: Run, ck: Path, which: str, adapter_dir: Path, job_data: dict[str, Any],
              evals: list[tuple[Eval, Path | None]], name: str, version: int, merge: bool) -> dict[str, Any]:
    for fn in ADAPTER_FILES + TOKENIZER_FILES:
        for src_dir in dict.fromkeys((adapter_dir, ck)):
            if (src_dir / fn).is_file() and not (tmp / "adapter" / fn).exists():
                _copy_file(src_dir / fn, tmp / "adapter" / fn)
    tok_dir = ck / "tokenizer"  # the trainer saves the tokenizer beside the adapter
    if tok_dir.is_dir():
        for f in sorted(tok_dir.iterdir()):
            if f.is_file():
                _copy_file(f, tmp / "tokenizer" / f.name)
    _copy_file(run.dir / "job.yaml", tmp / "source" / "job.yaml")
    if (ck / "trainer_state.json").is_file():
        _copy_file(ck / "trainer_state.json", tmp / "source" / "trainer_state.json")
    records = []
    for i, (ev, path) in enumerate(evals):
        if ev.correct:
            rel = f"eval/{i:02d}-{ev.kind}.json"
            if path is not None:
                _copy_file(path, tmp / rel)
            else:
                rows = [{"id": q, "correct": c} for q, c in sorted(ev.correct.items())]
                (tmp / "eval").mkdir(exist_ok=True)
                (tmp / rel).write_text(json.dumps({"predictions": rows}) + "\n")
            ev.predictions_file = rel
        records.append(ev.record())
    model = job_data.get("model") or {}
    base = str(model.get("base", "")) if isinstance(model, dict) else ""
    bundled = None
    if base == "tiny":
        # The tiny base exists only in this machine's cache: bundle it so the version (and its image) stands alone.
        _workload(["bundle-base", str(run.dir / "job.yaml"), str(tmp / "base")], "bundling the tiny base model")
        bundled = "base"
    if merge:
        _workload(["merge", str(tmp), str(tmp / "merged")], "merging the adapter into the base weights")
    st = run.status()
    primary = max(records, key=lambda r: (r["kind"] == "eval-run", r["n"] or 0)) if records else None
    return {
        "format": FORMAT,
        "name": name,
        "version": version,
        "created_at": now_iso(),
        "source": {
            "run": run.ref, "run_id": run.id, "job": run.job_name, "run_dir": str(run.dir),
            "run_state": st.get("state"), "kind": st.get("kind") or job_data.get("kind"),
            "spec_hash": job_data.get("spec_hash") or st.get("spec_hash"),
            "job_file": _job_source(run), "resolved_spec": "source/job.yaml",
            "checkpoint": ck.name, "checkpoint_selector": which, "step": _step_of(ck),
        },
        "base_model": {
            "base": base, "revision": model.get("revision") if isinstance(model, dict) else None,
            "bundled": bundled,
        },
        "lora": _lora_of(tmp / "adapter") or job_data.get("lora"),
        "image_flavour": job_data.get("image", "cpu"),
        "eval": primary,
        "evals": records,
        "merged": "merged" if merge else None,
        "git": git_info(),
    }


# --- serving images ------------------------------------------------------------------------------------


def _docker() -> Any:
    try:
        import docker
    except ImportError:
        raise RegistryError("the `docker` Python package is missing; `pip install docker`", EXIT_ENV) from None
    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except Exception as e:
        raise RegistryError(f"no Docker engine answers ({e.__class__.__name__}); start dockerd or drop --image",
                            EXIT_ENV) from None
    return client


SERVING_ROOT = "/srv/qa-runner/artifact"
SERVING_JOB = "/srv/qa-runner/serve.yaml"
SERVING_PORT = 8000


def serve_job_data(name: str, version: int) -> dict[str, Any] | None:
    """The `serve` job baked into a serving image (loads the artifact at SERVING_ROOT), or None when this
    installation has no `serve` kind. The first shape that validates against the serve schema wins."""
    from runner.spec import JOB_MODELS

    model = JOB_MODELS.get("serve")
    if model is None:
        return None
    common = {"kind": "serve", "name": f"{name}-v{version}"}
    shapes: list[dict[str, Any]] = [
        {"registry": SERVING_ROOT},
        {"model": {"artifact": SERVING_ROOT}},
        {"model": SERVING_ROOT},
        {"artifact": SERVING_ROOT},
        {"model": {"base": SERVING_ROOT}},
    ]
    for shape in shapes:
        for extra in ({"host": "0.0.0.0", "port": SERVING_PORT}, {"server": {"host": "0.0.0.0", "port": SERVING_PORT}}, {}):
            data = {**common, **shape, **extra}
            try:
                model.model_validate(data)
            except Exception:
                continue
            return data
    return None


def render_serving_files(base_tag: str, name: str, version: int, manifest: dict[str, Any]) -> dict[str, str]:
    """Dockerfile, entrypoint and (when the serve kind exists) serve.yaml of a version's serving image."""
    import io

    from ruamel.yaml import YAML

    from runner.templating import render_template

    serve = serve_job_data(name, version)
    values = dict(
        base=base_tag, name=name, version=version, artifact=SERVING_ROOT, port=SERVING_PORT,
        serve_job=SERVING_JOB if serve else "", source_run=manifest["source"]["run"],
        spec_hash=manifest["source"]["spec_hash"] or "", base_model=manifest["base_model"]["base"],
        merged=bool(manifest.get("merged")),
    )
    files = {"Dockerfile": render_template("serving.Dockerfile.j2", **values),
             "serve-entrypoint.sh": render_template("serving-entrypoint.sh.j2", **values)}
    if serve:
        buf = io.StringIO()
        YAML().dump(serve, buf)
        files["serve.yaml"] = buf.getvalue()
    return files


def build_serving_image(vdir: Path, manifest: dict[str, Any], name: str, version: int) -> dict[str, Any]:
    """Build `<name>:v<version>` FROM the job's image flavour with the version's files at SERVING_ROOT."""
    base = manifest.get("base_model") or {}
    if not base.get("bundled") and not manifest.get("merged") and Path(str(base.get("base"))).is_absolute():
        raise RegistryError(
            f"the base model {base.get('base')} is a directory on this machine and is not in the version, so a "
            "container could not load the adapter; add --merge (the image then carries full merged weights)")
    client = _docker()
    try:
        from runner import images
    except ImportError:
        raise RegistryError("runner.images is not available in this installation; cannot build --image",
                            EXIT_ENV) from None
    flavour = str(manifest.get("image_flavour") or "cpu")
    try:
        base_ref = images.render_image(flavour)
        images.ensure_image(base_ref, client, log=lambda line: print(line, end="", file=sys.stderr, flush=True))
    except Exception as e:
        raise RegistryError(f"the {flavour} image this version's job runs on is not available: {e}", EXIT_ENV) from None
    files = render_serving_files(base_ref.tag, name, version, manifest)
    tag = f"{name}:v{version}"
    with tempfile.TemporaryDirectory(prefix="qa-runner-serving-") as ctx_s:
        ctx = Path(ctx_s)
        shutil.copytree(vdir, ctx / "artifact")
        for fn, text in files.items():
            (ctx / fn).write_text(text)
        print(f"registry: building serving image {tag} (FROM {base_ref.tag})", file=sys.stderr, flush=True)
        try:
            img, _logs = client.images.build(path=str(ctx), tag=tag, rm=True, forcerm=True, network_mode="none",
                                             labels={"qa-runner.registry": tag,
                                                     "qa-runner.source-run": manifest["source"]["run"]})
        except Exception as e:
            detail = "".join(str(x.get("stream", "")) for x in getattr(e, "build_log", []) or [])[-2000:]
            raise RegistryError(f"building the serving image {tag} failed: {e}\n{detail}", EXIT_REFUSED) from None
    return {"id": img.id, "tag": tag, "base": base_ref.tag, "flavour": flavour, "artifact_path": SERVING_ROOT,
            "serve_job": SERVING_JOB if "serve.yaml" in files else None, "dockerfile": files["Dockerfile"]}


def tag_image(image_id: str, tag: str) -> None:
    client = _docker()
    repo, t = tag.split(":", 1)
    client.images.get(image_id).tag(repo, t)


# --- CLI entry points ----------------------------------------------------------------------------------


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def promote_main(ref: str, to: str, *, checkpoint: str = "best", alias: str | None = None, image: bool = False,
                 merge: bool = False, force: bool = False) -> int:
    try:
        p = promote(ref, to, checkpoint=checkpoint, alias=alias, image=image, merge=merge, force=force)
    except RegistryError as e:
        _err(f"error: {e}" if not str(e).startswith("gate:") else str(e))
        return e.code
    for line in p.messages:
        print(line)
    ev = p.manifest.get("eval")
    if ev:
        print(f"eval: {ev['kind']} accuracy {ev['accuracy']:.4f} on {ev['eval_set']}" + (f" (n={ev['n']})" if ev["n"] else ""))
    if p.manifest.get("image"):
        print(f"image: {p.manifest['image']['tag']} {p.manifest['image']['id']}")
    return EXIT_OK


def _fmt_acc(ev: dict[str, Any] | None) -> str:
    if not ev:
        return ""
    return f"{ev['accuracy']:.3f} {ev['kind']}"


def _table(rows: list[list[str]]) -> str:
    """Plain aligned columns (never wrapped, so `registry ls | grep` works)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def ls_main(name: str | None = None) -> int:
    reg = Registry()
    try:
        names = [validate_name(name)] if name else reg.names()
        if name and not reg.versions(name):
            raise RegistryError(f"no registry name {name!r}; `runner registry ls` lists them")
    except RegistryError as e:
        _err(f"error: {e}")
        return e.code
    if not names:
        print(f"registry is empty ({reg.root}); promote a run with `runner promote RUN --to NAME`")
        return EXIT_OK
    rows = [["NAME", "VERSION", "ALIASES", "CREATED", "SOURCE RUN", "CHECKPOINT", "ACCURACY", "FORCED", "IMAGE"]]
    for n in names:
        for v in reg.versions(n):
            try:
                m = reg.manifest(n, v)
            except RegistryError as e:
                rows.append([n, f"v{v}", "", "", f"unreadable: {e}", "", "", "", ""])
                continue
            src = m.get("source", {})
            rows.append([n, f"v{v}", " ".join("@" + a for a in reg.aliases_of(n, v)),
                         str(m.get("created_at", ""))[:19].replace("T", " "), str(src.get("run", "")),
                         str(src.get("checkpoint", "")), _fmt_acc(m.get("eval")), "yes" if m.get("forced") else "",
                         str((m.get("image") or {}).get("tag", ""))])
    print(_table(rows))
    return EXIT_OK


def show_main(ref: str) -> int:
    reg = Registry()
    try:
        name, v, vdir, m = reg.open(ref)
    except RegistryError as e:
        _err(f"error: {e}")
        return e.code
    src = m.get("source", {})
    base = m.get("base_model", {})
    aliases = reg.aliases_of(name, v)
    print(f"version     {name}:v{v}" + (f"  ({' '.join('@' + a for a in aliases)})" if aliases else ""))
    print(f"path        {vdir}")
    print(f"created     {m.get('created_at')}" + ("  [forced past the gate]" if m.get("forced") else ""))
    print("lineage")
    print(f"  run         {src.get('run')}  ({src.get('run_state')}, {src.get('run_dir')})")
    print(f"  checkpoint  {src.get('checkpoint')} (selected as {src.get('checkpoint_selector')}, step {src.get('step')})")
    print(f"  job         {src.get('job')} ({src.get('kind')}), file {src.get('job_file') or 'unknown'}")
    print(f"  spec hash   {src.get('spec_hash')}  (resolved spec: {vdir / 'source' / 'job.yaml'})")
    print(f"  base model  {base.get('base')}" + (f" @ {base['revision']}" if base.get("revision") else "")
          + (f"  (bundled in {base['bundled']}/)" if base.get("bundled") else ""))
    lora = m.get("lora")
    if isinstance(lora, dict):
        print(f"  lora        r={lora.get('r')} alpha={lora.get('alpha')} targets={','.join(lora.get('target_modules') or [])}")
    git = m.get("git")
    if git:
        print(f"  git         {git.get('commit')}" + (" (uncommitted changes)" if git.get("dirty") else ""))
    print("metrics")
    for ev in m.get("evals", []) or [{}]:
        if ev:
            print(f"  {ev['kind']:<9} accuracy {ev['accuracy']:.4f}" + (f" n={ev['n']}" if ev.get("n") else "")
                  + f"  eval set {ev['eval_set']}  from {ev['source']}")
        else:
            print("  none recorded")
    promo = m.get("promotion") or {}
    g = promo.get("gate")
    if g:
        if g.get("holder") and "candidate_accuracy" in g:
            print(f"gate        @{g['alias']}: {g['decision']} — {g['candidate_accuracy']:.4f} vs {g['holder']} "
                  f"{g['holder_accuracy']:.4f} on {g['eval_set']}")
            t = g.get("paired_test")
            print("            " + (f"McNemar n={t['n']} b={t['candidate_only_correct']} c={t['holder_only_correct']} "
                                    f"p={t['p_value']:.4g}" if t else f"paired test: {g.get('paired_test_unavailable')}"))
        else:
            print(f"gate        @{g['alias']}: {g.get('decision') or g.get('error')}")
    if m.get("merged"):
        print(f"merged      {vdir / m['merged']}")
    img = m.get("image")
    if img:
        print(f"image       {img['tag']}  {img['id']}  (FROM {img['base']})")
    total = sum(int(f.get("size", 0)) for f in m["files"].values())
    print(f"files       {len(m['files'])} files, {total / 1e6:.1f} MB")
    for rel, meta in sorted(m["files"].items()):
        print(f"  {meta['sha256'][:16]}  {int(meta.get('size', 0)):>12}  {rel}")
    return EXIT_OK


def verify_main(ref: str) -> int:
    reg = Registry()
    try:
        name, v, vdir, m = reg.open(ref)
        problems = verify_dir(vdir, m)
    except RegistryError as e:
        _err(f"error: {e}")
        return e.code
    if problems:
        _err(f"{name}:v{v}: {len(problems)} problem(s) in {vdir}:")
        for p in problems:
            _err(f"  {p}")
        return EXIT_REFUSED
    print(f"{name}:v{v}: ok, {len(m['files'])} files match their sha256 ({vdir})")
    return EXIT_OK
