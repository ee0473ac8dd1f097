"""The `runner` command line: each command is a thin call into one module.

Exit codes: 0 ok, 1 the job failed, 2 invalid input, 3 this environment cannot run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from runner.plan import Plan
    from runner.runs import Run
    from runner.spec import Job
from runner.run_views import first, last, plots, reconcile, served, tournament

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_ENV = 0, 1, 2, 3

app = typer.Typer(
    name="runner", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Declarative runner for LLM question-answering agent experiments: validate, plan, run, compare, promote.",
)
registry_app = typer.Typer(no_args_is_help=True, help="Promoted artifacts: versions, aliases, lineage.")
app.add_typer(registry_app, name="registry")

SetOpt = typer.Option([], "--set", help="Override a field: --set train.steps=100 (repeatable).")
BackendOpt = typer.Option(None, "--backend", "-b", help="local | docker | slurm | kubernetes (default: the job's).")


class Exit(Exception):
    def __init__(self, code: int, message: str = ""):
        self.code = code
        self.message = message


def err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load(file: str, sets: list[str] | None = None, backend: str | None = None) -> Job:
    from runner.spec import SpecError, load_job

    try:
        job = load_job(file, sets or [], backend)
    except SpecError as e:
        raise Exit(EXIT_INVALID, str(e)) from None
    for w in job.warnings:
        err(str(w))
    return job


def _plan(job: Job, backend: str | None = None) -> Plan:
    from runner.backends import EnvironmentProblem, plan_for

    try:
        return plan_for(job, backend)
    except EnvironmentProblem as e:
        raise Exit(EXIT_ENV, f"error: {e}") from None


# --- validate / plan / schema --------------------------------------------------------------------------


@app.command()
def validate(files: list[str] = typer.Argument(..., help="Job files to check.")) -> None:
    """Check job files; one `FILE:LINE:COL: error: field: message` line per problem, exit 2 if any.

    Deprecated keys get a `warning:` line each and do not change the exit code.
    """
    from runner.spec import SpecError, load_job
    from runner.spec.problems import printable

    bad = 0
    for f in files:
        try:
            job = load_job(f)
        except SpecError as e:
            err(str(e))
            bad += 1
            continue
        for w in job.warnings:
            err(str(w))
        print(printable(f"{f}: ok ({job.kind} {job.name}, spec {job.spec_hash})"))
    if bad:
        raise Exit(EXIT_INVALID)


@app.command()
def plan(
    file: str = typer.Argument(..., help="Job file."),
    sets: list[str] = SetOpt,
    backend: str | None = BackendOpt,
) -> None:
    """Print everything that would run: image and Dockerfile, command, env (secrets redacted), mounts, files."""
    import shlex

    job = _load(file, sets, backend)
    p = _plan(job, backend)
    out = [f"# job: {job.name} ({job.kind}), spec {job.spec_hash}, backend {p.backend}"]
    if p.image is not None:
        out.append(f"# image: {p.image.tag}  (flavour {p.image.flavour}, FROM {p.image.base})")
    out.append("# command")
    out.append("  " + " ".join(shlex.quote(a) if "${RUNNER_" not in a else f'"{a}"' for a in p.argv))
    out.append(f"# working directory: {p.workdir}")
    out.append("# env")
    out += [f"  {k}={v}" for k, v in p.shown_env().items()]
    if p.mounts:
        out.append("# mounts")
        out += [f"  {m.source} -> {m.target} ({'ro' if m.read_only else 'rw'})" for m in p.mounts]
    if p.ports:
        out.append("# ports: " + ", ".join(str(x) for x in p.ports))
    if p.image is not None:
        out.append("# file: Dockerfile")
        out.append(p.image.dockerfile.rstrip())
    for name, content in p.files.items():
        if name == "Dockerfile" and p.image is not None:
            continue
        out.append(f"# file: plan/{name}")
        out.append(content.rstrip())
    text = "\n".join(out)
    for name in p.secret_env:
        val = p.env.get(name)
        if val and len(val) >= 4:
            text = text.replace(val, "***")
    print(text)


@app.command()
def schema(kind: str | None = typer.Argument(None, help="Job kind (default: all kinds).")) -> None:
    """Print the JSON Schema of job files (for editors)."""
    from runner.spec import JOB_MODELS

    if kind is not None:
        if kind not in JOB_MODELS:
            raise Exit(EXIT_INVALID, f"error: unknown kind {kind!r}; one of: {', '.join(JOB_MODELS)}")
        sch: dict[str, Any] = JOB_MODELS[kind].model_json_schema()
    else:
        defs: dict[str, Any] = {}
        one_of = []
        for m in JOB_MODELS.values():
            s = m.model_json_schema(ref_template="#/$defs/{model}")
            defs.update(s.pop("$defs", {}))
            defs[m.__name__] = s
            one_of.append({"$ref": f"#/$defs/{m.__name__}"})
        sch = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "qa-runner job",
               "oneOf": one_of, "$defs": defs}
    print(json.dumps(sch, indent=2))


# --- run -----------------------------------------------------------------------------------------------


def _check(job: Job, p: Plan, force: bool = False) -> None:
    from runner.backends import EnvironmentProblem, get_backend
    from runner.preflight.report import gate

    try:
        # Does it fit at all? A model that can never fit is refused before any engine is asked.
        gate(job, p, force=force)
        get_backend(p.backend).check(p)
    except EnvironmentProblem as e:
        raise Exit(EXIT_ENV, f"error: {e}") from None


@app.command()
def run(
    file: str = typer.Argument(..., help="Job file."),
    sets: list[str] = SetOpt,
    backend: str | None = BackendOpt,
    fresh: bool = typer.Option(False, "--fresh", help="Start a new run even if an unfinished one can be resumed."),
    detach: bool = typer.Option(False, "--detach", "-d", help="Start and return; follow with `runner logs -f`."),
    force: bool = typer.Option(False, "--force", help="Run even when preflight says it does not fit."),
) -> None:
    """Create a run, start it and stream its log; the exit code is the job's."""
    from runner.runs import RunStore

    job = _load(file, sets, backend)
    p = _plan(job, backend)
    _check(job, p, force)
    store = RunStore()
    r = None
    if job.kind == "train" and not fresh:
        r = store.find_resumable(job)  # RunError when a run of this spec is being driven right now
        if r is not None:
            print(f"runner: resuming {r.ref} (state {r.state}, {len(r.checkpoints())} checkpoint(s)); --fresh starts anew",
                  flush=True)
            with r.lock():  # one writer: a second `runner run` racing for this run stops here
                _take_over(r)
                store.refresh_plan(r, p)
                r.note("resume", checkpoints=[c.name for c in r.checkpoints()])
                if not detach:
                    raise Exit(drive_run(r, p, attach=True, locked=True))
    if r is None:
        r = store.create(job, p)
        print(f"runner: run {r.ref} ({p.backend}) -> {r.dir}", flush=True)
    if detach:
        log = open(r.dir / "driver.log", "ab")
        subprocess.Popen(
            [sys.executable, "-m", "runner", "drive", str(r.dir), "--backend", p.backend], cwd=p.workdir,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        print(f"runner: detached; follow with `runner logs -f {r.id}`, stop with `runner cancel {r.id}`")
        return
    raise Exit(drive_run(r, p, attach=True))


def drive_run(r: Run, p: Plan, attach: bool, locked: bool = False) -> int:
    """Start the plan on its backend for run `r`, wait, and record how it ended (taking the run's lock unless
    the caller holds it)."""
    import contextlib

    from runner.backends import EnvironmentProblem
    from runner.driving import drive_locked

    with contextlib.nullcontext() if locked else r.lock():
        try:
            return drive_locked(r, p, attach)
        except EnvironmentProblem as e:
            raise Exit(EXIT_ENV, f"error: {e}") from None


def _take_over(r: Run) -> None:
    from runner.backends import EnvironmentProblem
    from runner.driving import stop_orphan

    try:
        stop_orphan(r)
    except EnvironmentProblem as e:
        raise Exit(EXIT_ENV, f"error: {e}") from None


@app.command(hidden=True)
def drive(run_dir: str, backend: str | None = BackendOpt) -> None:
    """Drive an existing run (used by --detach)."""
    from runner.backends import plan_for
    from runner.runs import Run
    from runner.spec import SpecError, job_from_stored

    r = Run(Path(run_dir))
    try:
        job = job_from_stored(r.job_data(), str(r.dir / "job.yaml"))
    except SpecError as e:
        raise Exit(EXIT_INVALID, str(e)) from None
    raise Exit(drive_run(r, plan_for(job, backend), attach=False))


# --- runs ----------------------------------------------------------------------------------------------


def _store() -> Any:
    from runner.runs import RunStore

    return RunStore()


def _get(ref: str) -> Run:
    from runner.runs import RunError

    try:
        run_: Run = _store().get(ref)
        return run_
    except RunError as e:
        raise Exit(EXIT_INVALID, f"error: {e}") from None


from runner.housekeeping_cli import register  # noqa: E402  (ls, rm, gc, track)

register(app)


@app.command()
def show(ref: str = typer.Argument(..., help="Run id, job/id, or job name (its latest run).")) -> None:
    """Summary of a run: status, metrics, checkpoints, evaluation, a service's URL, a tournament's ranking; writes
    loss.png and accuracy.png."""
    r = _get(ref)
    state = reconcile(r)
    st = r.status()
    ms = r.metrics()
    print(f"run        {r.ref}")
    print(f"dir        {r.dir}")
    print(f"state      {state}" + (f" (exit {st.get('exit_code')})" if st.get("exit_code") is not None else ""))
    for k in ("kind", "backend", "spec_hash", "created_at", "started_at", "ended_at", "error"):
        if st.get(k):
            print(f"{k:<10} {st[k]}")
    if ms:
        a0, a1 = first(ms, "val", "accuracy"), last(ms, "val", "accuracy")
        if a0 is not None:
            print(f"val acc    {a0:.3f} at step {first(ms, 'val', 'step')} -> {a1:.3f} at step {last(ms, 'val', 'step')}")
        loss = last(ms, "train", "loss")
        if loss is not None:
            print(f"train loss {loss:.4f} at step {last(ms, 'train', 'step')}; "
                  f"{last(ms, 'train', 'tokens_per_s') or 0:.0f} tokens/s")
    cks = r.checkpoints()
    if cks:
        best = r.checkpoints_dir / "best"
        bname = os.path.basename(os.path.realpath(best)) if best.exists() else None
        print("checkpoints " + ", ".join(c.name + (" (best)" if c.name == bname else "") for c in cks))
    ev = r.dir / "eval.json"
    if ev.exists():
        try:
            e = json.loads(ev.read_text())
            print(f"eval       accuracy {e.get('accuracy')} on n={e.get('n')}")
        except json.JSONDecodeError:
            print("eval       eval.json is unreadable")
    for line in served(r, state) + tournament(r):
        print(line)
    if ms:
        written = plots(r, ms)
        if written:
            print("plots      " + ", ".join(str(w) for w in written))


@app.command()
def logs(
    ref: str = typer.Argument(..., help="Run id, job/id, or job name."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the run ends."),
) -> None:
    """Print a run's log."""
    from runner.runs import TERMINAL

    r = _get(ref)
    pos = 0
    while True:
        if r.log_path.exists():
            with open(r.log_path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
                pos += len(chunk)
                if chunk:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
        if not follow or r.state in TERMINAL:
            if follow and r.log_path.exists() and r.log_path.stat().st_size > pos:
                continue
            break
        time.sleep(0.5)


@app.command()
def cancel(
    ref: str = typer.Argument(..., help="Run id, job/id, or job name."),
    grace: float = typer.Option(30.0, "--grace", help="Seconds to let the job checkpoint before it is killed."),
) -> None:
    """Stop a run: SIGTERM (the trainer checkpoints), then kill after the grace period; ends `cancelled`."""
    from runner.backends import EnvironmentProblem, get_backend
    from runner.runs import TERMINAL, wait_for_state

    r = _get(ref)
    st = r.status()
    if st.get("state") in TERMINAL:
        print(f"{r.ref} already {st['state']}")
        return
    r.update(cancel_requested=True)
    r.note("cancel-requested", by="runner cancel")
    try:
        get_backend(str(st.get("backend") or "local")).cancel(r, grace_s=grace)
    except EnvironmentProblem as e:
        raise Exit(EXIT_ENV, f"error: {e}") from None
    state = wait_for_state(r, set(TERMINAL), timeout=grace + 15) if r.is_locked() else r.state
    if state not in TERMINAL:
        r.set_state("cancelled", exit_code=None)
        state = "cancelled"
    print(f"{r.ref} {state}")


# --- evaluation, preflight, registry -------------------------------------------------------------------


@app.command()
def compare(
    refs: list[str] = typer.Argument(..., help="Runs or eval runs to compare."),
    png: str | None = typer.Option(None, "--png", help="Where to write the comparison chart."),
) -> None:
    """Compare runs: accuracy, by difficulty, ECE, tokens seen; McNemar test for two evals of the same questions."""
    from runner.compare import compare_main

    raise Exit(compare_main(refs, png))


@app.command()
def preflight(
    file: str = typer.Argument(..., help="Job file."),
    sets: list[str] = SetOpt,
    backend: str | None = BackendOpt,
) -> None:
    """Hardware found, memory estimate per component, and whether the job fits."""
    from runner.preflight.report import preflight_main

    job = _load(file, sets, backend)
    raise Exit(preflight_main(job, _plan(job, backend)))


@app.command()
def promote(
    ref: str = typer.Argument(..., help="Run to promote from."),
    to: str = typer.Option(..., "--to", help="Registry name."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best | last | step-N."),
    alias: str | None = typer.Option(None, "--alias", help="Move this alias (e.g. champion) to the new version."),
    image: bool = typer.Option(False, "--image", help="Also build a serving image."),
    merge: bool = typer.Option(False, "--merge", help="Also write merged full weights."),
    force: bool = typer.Option(False, "--force", help="Skip the promotion gate (recorded in the manifest)."),
    gguf: str | None = typer.Option(
        None, "--gguf", help="Also store GGUF files of the merged weights for llama.cpp, e.g. q8_0 or q8_0,q4_k_m "
        "(implies --merge; needs `bash .ci/llamacpp-up.sh`)."),
    serve: str | None = typer.Option(
        None, "--serve", help="With --image: the serve job the image runs (its engine, e.g. jobs/serve-vllm.yaml "
        "builds FROM the vLLM image, and its agent and server settings); the builtin engine otherwise."),
) -> None:
    """Copy a checkpoint into the registry as a new immutable version; optionally move an alias, build an image."""
    from runner.registry_cli import promote_main

    raise Exit(promote_main(ref, to, checkpoint=checkpoint, alias=alias, image=image, merge=merge, force=force,
                            gguf=gguf, serve=_load(serve) if serve is not None else None))


@registry_app.command("ls")
def registry_ls(name: str | None = typer.Argument(None, help="Only this name.")) -> None:
    """List registry names, versions and aliases."""
    from runner.registry_cli import ls_main

    raise Exit(ls_main(name))


@registry_app.command("show")
def registry_show(ref: str = typer.Argument(..., help="NAME, NAME@alias or NAME:vN.")) -> None:
    """A version's manifest: files, lineage back to the run and spec, metrics, image."""
    from runner.registry_cli import show_main

    raise Exit(show_main(ref))


@registry_app.command("verify")
def registry_verify(ref: str = typer.Argument(..., help="NAME, NAME@alias or NAME:vN.")) -> None:
    """Re-hash a version's files against its manifest."""
    from runner.registry_cli import verify_main

    raise Exit(verify_main(ref))


def main(argv: list[str] | None = None) -> None:
    try:
        rc = app(args=argv, standalone_mode=False)  # a command's typer.Exit(code) comes back as its code
    except Exit as e:
        if e.message:
            err(e.message)
        sys.exit(e.code)
    except KeyboardInterrupt:
        err("interrupted")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors and user-facing errors from the modules below
        # Typer may bring its own copy of click: match its exceptions by shape, not by one module's classes.
        if type(e).__name__ == "Abort":
            sys.exit(130)
        if callable(getattr(e, "show", None)) and hasattr(e, "exit_code"):
            e.show()  # type: ignore[attr-defined]
            sys.exit(EXIT_INVALID)
        from runner.runs import RunError

        if isinstance(e, RunError):
            err(f"error: {e}")
            sys.exit(EXIT_INVALID)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)
