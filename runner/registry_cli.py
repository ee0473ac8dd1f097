"""`runner promote` and `runner registry ls|show|verify`: print what the registry returns, map its errors to
exit codes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from runner.registry.promote import promote
from runner.registry.store import (
    EXIT_OK,
    EXIT_REFUSED,
    Registry,
    RegistryError,
    parse_ref,
    read_manifest,
    validate_name,
    verify_dir,
)


def _progress(text: str) -> None:
    print(text, end="", file=sys.stderr, flush=True)


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def promote_main(ref: str, to: str, *, checkpoint: str = "best", alias: str | None = None, image: bool = False,
                 merge: bool = False, force: bool = False, gguf: str | None = None, serve: Any | None = None) -> int:
    try:
        p = promote(ref, to, checkpoint=checkpoint, alias=alias, image=image, merge=merge, force=force, gguf=gguf,
                    serve=serve, log=_progress)
    except RegistryError as e:
        _err(f"error: {e}" if not str(e).startswith("gate:") else str(e))
        return e.code
    from runner.runs import Run
    from runner.tracking import mirror_promotion  # the team's MLflow view, when the run is tracked

    run_dir = Path(str((p.manifest.get("source") or {}).get("run_dir", "")))
    mirrored = mirror_promotion(Run(run_dir), p.name, p.version, p.vdir, p.manifest, alias) if run_dir.is_dir() else []
    for line in p.messages + mirrored:
        print(line)
    for line in p.warnings:
        _err(line)
    ev = p.manifest.get("eval")
    if ev:
        print(f"eval: {ev['kind']} accuracy {ev['accuracy']:.4f} on {ev['eval_set']}" + (f" (n={ev['n']})" if ev["n"] else ""))
    for t, g in sorted((p.manifest.get("gguf") or {}).items()):
        print(f"gguf: {t} {p.vdir / g['path']} ({g['size'] / 1e6:.1f} MB)")
    if p.manifest.get("image"):
        img = p.manifest["image"]
        print(f"image: {img['tag']} {img['id']} (engine {img.get('engine', 'builtin')}, FROM {img['base']})")
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
    for t, g in sorted((m.get("gguf") or {}).items()):
        made = f"quantised from {g['quantised_from']}" if g.get("quantised_from") else "converted"
        print(f"gguf        {t:<7} {vdir / g['path']}  ({made}; {g.get('converter')})")
    img = m.get("image")
    if img:
        print(f"image       {img['tag']}  {img['id']}  (FROM {img['base']})")
    total = sum(int(f.get("size", 0)) for f in m["files"].values())
    print(f"files       {len(m['files'])} files, {total / 1e6:.1f} MB")
    for rel, meta in sorted(m["files"].items()):
        print(f"  {meta['sha256'][:16]}  {int(meta.get('size', 0)):>12}  {rel}")
    return EXIT_OK


def verify_main(ref: str) -> int:
    """Re-hash one version (`NAME@alias`, `NAME:vN`) or, for a bare `NAME`, every version of it; report each."""
    reg = Registry()
    try:
        r = parse_ref(ref)
        if r.alias is None and r.version is None:
            reg.resolve(r)  # names the problem when there is no such name
            name, versions = r.name, reg.versions(r.name)
        else:
            name, v = reg.resolve(r)
            versions = [v]
    except RegistryError as e:
        _err(f"error: {e}")
        return e.code
    bad = 0
    for v in versions:
        vdir = reg.version_dir(name, v)
        label = f"{name}:v{v}"
        files = 0
        try:
            aliases = " ".join("@" + a for a in reg.aliases_of(name, v))
            label += f" ({aliases})" if aliases else ""
            m = read_manifest(vdir)
            files, problems = len(m["files"]), verify_dir(vdir, m)
        except RegistryError as e:
            problems = [str(e)]
        if problems:
            bad += 1
            _err(f"{label}: {len(problems)} problem(s) in {vdir}:")
            for p in problems:
                _err(f"  {p}")
        else:
            print(f"{label}: ok, {files} files match their sha256 ({vdir})")
    if len(versions) > 1:
        summary = f"{name}: {len(versions) - bad} of {len(versions)} versions ok"
        (_err if bad else print)(summary + ("; a damaged version was modified or corrupted: promote its checkpoint again" if bad else ""))
    return EXIT_REFUSED if bad else EXIT_OK
