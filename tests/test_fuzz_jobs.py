"""A seeded fuzz of the job-file loader and `runner validate`: malformed job files never crash either.

Cases come from the shipped jobs/*.yaml and a few small valid jobs, mutated at the byte level (flips, inserts,
deletes, truncation, invalid UTF-8, NUL, BOM, CRLF, tabs), at the YAML level (wrong types at random paths,
huge and non-finite numbers, control characters, shell metacharacters, long strings, deep nesting, anchors,
aliases, merge keys, tags, duplicate and unknown keys, `extends:` at missing, cyclic, special or odd files,
empty and multiple documents) and through `--set` (the generator is tests/job_fuzz.py). Each must load or raise
SpecError, quickly, with every line of the error in the `FILE:LINE:COL: error: ...` form; a few hundred also go
through the real CLI in batches. After it, one test per class of problem the fuzz found.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner.spec import SpecError, load_job
from tests.conftest import ROOT
from tests.job_fuzz import Case, cases, make_tree

LINE = re.compile(r"^(?P<file>.+):(?P<line>[1-9]\d*):(?P<col>[1-9]\d*): (?P<level>error|warning): (?P<rest>\S.*)$")


def _line_count(path: str) -> int:
    try:
        with open(path, "rb") as f:
            raw = f.read(2 << 20)
    except OSError:
        return 1
    t = raw.decode("utf-8", "replace")
    return 1 + sum(t.count(c) for c in "\n\r\x85\u2028\u2029")


def _check_lines(text: str, case: Case, path: Path) -> list[str]:
    """What is wrong with the lines a problem report printed (empty when each is FILE:LINE:COL: error: ...)."""
    bad = []
    if "Traceback" in text:
        bad.append("a traceback")
    for line in text.splitlines():
        m = LINE.match(line)
        if not m:
            bad.append(f"not FILE:LINE:COL: error: {line[:300]!r}")
            continue
        f = m["file"]
        if f.startswith("--set"):
            if not case.sets:
                bad.append(f"a --set mark without --set: {line[:300]!r}")
        elif f != str(path) and not Path(f).is_file():
            bad.append(f"the mark names no file: {line[:300]!r}")
        elif int(m["line"]) > _line_count(f):
            bad.append(f"line {m['line']} is past the end of {f}: {line[:300]!r}")
        if len(line) > 2000:
            bad.append(f"a line of {len(line)} characters: {line[:300]!r}...")
    return bad


def _load_in_process(case: Case, path: Path) -> tuple[bool | None, list[str]]:
    """(loaded?, what went wrong); loaded is None when it crashed."""
    t = time.perf_counter()
    try:
        job = load_job(path, case.sets)
        _ = job.spec_hash, job.stored_data()
        text = "\n".join(str(w) for w in job.warnings)
        ok: bool | None = True
    except SpecError as e:
        text, ok = str(e), False
        if not e.problems:
            return ok, ["a SpecError without problems"]
    except BaseException as e:  # noqa: BLE001 - anything else is the bug this test looks for
        if isinstance(e, KeyboardInterrupt):
            raise
        tb = traceback.format_exception(e)
        return None, [f"{type(e).__name__}: {str(e)[:300]} at {tb[-2].strip()[:300] if len(tb) > 1 else ''}"]
    bad = _check_lines(text, case, path)
    elapsed = time.perf_counter() - t
    if elapsed > 1.0:
        bad.append(f"took {elapsed:.2f}s")
    return ok, bad


def _write(tree: Path, case: Case) -> Path:
    p = tree / f"{case.name}.yaml"
    p.write_bytes(case.data)
    return p


def _report(failures: list[tuple[Case, list[str]]]) -> str:
    return "\n".join(f"{c.name} sets={c.sets!r:.300} data={c.data[:200]!r}:\n    " + "\n    ".join(w)
                     for c, w in failures[:40])


FUZZ_SEED = 20240611


def test_seeded_fuzz_of_the_loader_and_validate_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QA_FUZZ_UNSET", raising=False)
    tree = make_tree(tmp_path)
    all_cases = cases(FUZZ_SEED, n_files=1200, n_sets=400)
    failures: list[tuple[Case, list[str]]] = []
    loaded: dict[str, bool | None] = {}
    t0 = time.perf_counter()
    for case in all_cases:
        path = _write(tree, case)
        ok, bad = _load_in_process(case, path)
        loaded[case.name] = ok
        if bad:
            failures.append((case, bad))
    in_process = time.perf_counter() - t0
    assert not failures, f"{len(failures)} of {len(all_cases)} cases failed:\n{_report(failures)}"
    assert sum(1 for v in loaded.values() if v is False) > len(all_cases) // 2  # most are refused, as they should
    print(f"in process: {len(all_cases)} cases in {in_process:.1f}s")

    # The real CLI, several files per call; what it says of each file must agree with the loader.
    files = [c for c in all_cases if not c.sets][::4]
    t0 = time.perf_counter()
    for start in range(0, len(files), 75):
        batch = files[start:start + 75]
        paths = [str(tree / f"{c.name}.yaml") for c in batch]
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "runner", "validate", *paths], capture_output=True, text=True,
                           timeout=60 + len(batch), cwd=ROOT, stdin=subprocess.DEVNULL)
        wall = time.perf_counter() - t
        assert p.returncode in (0, 2), p.stderr[-3000:]
        assert wall < 5 + len(batch), wall
        expect_ok = {s for s, c in zip(paths, batch, strict=True) if loaded[c.name]}
        said_ok = {line.split(": ok (")[0] for line in p.stdout.splitlines() if ": ok (" in line}
        assert said_ok == expect_ok, (said_ok ^ expect_ok)
        assert (p.returncode == 0) == (len(expect_ok) == len(batch))
        bad = _check_lines(p.stderr, Case("cli", b"", []), Path(paths[0]))
        assert not bad, "\n".join(bad[:20])
    print(f"cli: {len(files)} files in {time.perf_counter() - t0:.1f}s")

    # `runner plan --set ...` through the CLI's own entry point, for the overrides the loader refused.
    from runner.cli import main

    refused = [c for c in all_cases if c.sets and loaded[c.name] is False][:150]
    t0 = time.perf_counter()
    for case in refused:
        argv = ["plan", str(tree / f"{case.name}.yaml"), *[a for s in case.sets for a in ("--set", s)]]
        rc, text = _run_main(main, argv)
        assert rc == 2, (case.name, rc, text[-2000:])
        bad = _check_lines(text, case, tree / f"{case.name}.yaml")
        assert not bad, (case.name, bad[:5])
    print(f"cli --set: {len(refused)} cases in {time.perf_counter() - t0:.1f}s")


def _run_main(main: Any, argv: list[str]) -> tuple[int, str]:
    """`runner ARGV` in this process: (exit code, what it wrote to stderr)."""
    import contextlib
    import io

    out, errs = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(errs):
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, errs.getvalue()


# --- one test per class of problem the fuzz found ----------------------------------------------------------

JOB = "kind: prepare\nname: small\ndata:\n  train: builtin:quickstart\n"


def _refused(path: Path, *sets: str) -> list[str]:
    """The problem lines for a job the loader must refuse, quickly, with SpecError and nothing else."""
    t = time.perf_counter()
    with pytest.raises(SpecError) as e:
        load_job(path, list(sets))
    assert time.perf_counter() - t < 1.0
    lines = str(e.value).split("\n")
    assert lines == str(e.value).splitlines() and all(LINE.match(x) for x in lines), lines
    return lines


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runner", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, stdin=subprocess.DEVNULL)


def test_devices_pipes_and_directories_are_refused_without_reading_them(tmp_path: Path) -> None:
    # /dev/zero was read to the end (all memory), a pipe waited for a writer forever.
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "to-zero.yaml").symlink_to("/dev/zero")
    (tmp_path / "dir.yaml").mkdir()
    for target, why in [("/dev/zero", "not a regular file"), ("fifo", "not a regular file"),
                        ("to-zero.yaml", "not a regular file"), ("dir.yaml", "is a directory"), ("", "is a directory")]:
        job = tmp_path / "job.yaml"
        job.write_text(f"extends: {target!r}\n" + JOB)
        (line,) = _refused(job)
        assert line.startswith(f"{job}:1:1: error: extends: file {target!r} ") and why in line, line
    p = _cli("validate", "/dev/zero", str(tmp_path / "fifo"), str(tmp_path / "dir.yaml"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert [x.split(": error: ")[1] for x in p.stderr.splitlines()] == [
        "the file is not a regular file (a device, pipe or socket); a job file is a YAML file"] * 2 + [
        "the file is a directory; name a job file (.yaml) in it"]


def test_paths_the_file_system_refuses_are_problems_at_their_line(tmp_path: Path) -> None:
    # A NUL byte, a lone surrogate, a name too long, a symlink loop: ValueError, OSError, RuntimeError before.
    (tmp_path / "loop.yaml").symlink_to("loop.yaml")
    for target, why in [("a\x00b", "has a NUL byte in its name"), ("\udfff", "surrogate"),
                        ("x" * 300, "File name too long"), ("loop.yaml", "Too many levels of symbolic links"),
                        ("loop.yaml/x.yaml", "symbolic links")]:
        job = tmp_path / "job.yaml"
        job.write_text(JOB + "extends: " + yaml.safe_dump(target).removesuffix("\n...\n").strip() + "\n", "utf-8",
                       "surrogatepass")
        (line,) = _refused(job)
        assert line.startswith(f"{job}:5:1: error: extends: ") and why in line, line
        assert len(line) < 400
    (line,) = _refused(tmp_path / "loop.yaml")
    assert "Too many levels of symbolic links" in line
    long_data = tmp_path / "data.yaml"
    long_data.write_text(JOB.replace("builtin:quickstart", "d" * 300))
    assert "File name too long" in _refused(long_data)[0]


def test_a_kind_that_is_not_text_is_an_unknown_kind(tmp_path: Path) -> None:
    for kind in ["[train]", "{a: 1}", "!!binary AAAA", "1e5", ".nan"]:
        job = tmp_path / "job.yaml"
        job.write_text(f"kind: {kind}\nname: x\n")
        (line,) = _refused(job)
        assert ":1:1: error: kind: unknown kind " in line and "one of: prepare" in line, line
    job.write_text(JOB)
    (line,) = _refused(job, "kind=[a, b]")
    assert line.startswith("--set kind:1:1: error: kind: unknown kind ['a', 'b']")


def test_values_yaml_allows_but_python_cannot_build_are_marked(tmp_path: Path) -> None:
    # int() refuses more than 4,300 digits and datetime.date refuses Feb 30: ValueError from inside the parser.
    job = tmp_path / "job.yaml"
    for value, what in [("7" * 5000, "as int (too many digits)"), ("-" + "1" * 4400, "as int"),
                        ("2001-02-30", "as timestamp (day is out of range for month)")]:
        job.write_text(JOB + f"description: {value}\n")
        (line,) = _refused(job)
        assert line.startswith(f"{job}:5:14: error: cannot read ") and what in line and len(line) < 400, line
        assert line.endswith("quote it to make it text")
        job.write_text(JOB)
        (line,) = _refused(job, f"description={value}")
        assert line.startswith("--set description:1:1: error: description: the value ") and what in line, line


def test_an_unknown_yaml_version_directive_is_a_problem_at_its_line(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("%YAML 9.9\n---\n" + JOB)  # a KeyError deep in the parser before
    assert _refused(job) == [f"{job}:1:1: error: unsupported directive %YAML '9.9'; write %YAML 1.2 or leave the "
                             "line out"]
    job.write_text("%YAML 1.2\n---\n" + JOB)
    assert load_job(job).name == "small"
    job.write_text(JOB)
    assert "unsupported directive" in _refused(job, "name=%YAML 9.9\n--- x")[0]


def test_aliases_are_counted_before_anything_is_built(tmp_path: Path) -> None:
    # A duplicate key next to an alias bomb: the parser's error message spelled out all 8**7 values (seconds,
    # and minutes one level up); a value holding itself recursed without end in --set.
    bomb = "a: &a [x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 8)}]\n" for p, c in zip("abcdefg", "bcdefgh", strict=True))
    job = tmp_path / "job.yaml"
    job.write_text(JOB + bomb + "h: 1\n")
    (line,) = _refused(job)
    assert "more than 20,000 values once YAML aliases are expanded" in line and ":9:4: error:" in line, line
    job.write_text(JOB + "tags: &t {a: *t}\n")
    (line,) = _refused(job)
    assert line.startswith(f"{job}:5:7: error: this value contains itself through an alias")
    job.write_text(JOB)
    for value in ["&a [*a]", "&a {b: [*a]}", "[" + ", ".join(["&x [x, x, x, x, x, x, x, x]"] + ["*x"] * 4000) + "]"]:
        (line,) = _refused(job, f"tags={value}")
        assert line.startswith("--set tags:1:1: error: tags: the value ") and "is not accepted" in line, line


def test_set_keys_and_values_are_held_to_a_job_files_bounds(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(JOB)
    # '²' passes str.isdigit() and then int() refuses it.
    _refused(job, "data.train.\u00b2=x")
    job.write_text(JOB.replace("train: builtin:quickstart", "train: [{path: 'builtin:quickstart'}]"))
    (line,) = _refused(job, "data.train.\u00b2.path=x")
    assert "data.train is a list: address an item by its index" in line, line
    for value, why in [("[" * 100 + "]" * 100, "nested more than 64 levels"), ("x" * 100_000, "longer than"),
                       ("a\x07b", "U+0007 is not allowed")]:
        (line,) = _refused(job, f"description={value}")
        assert line.startswith("--set description:1:1: error: description: the value ") and why in line, line
        assert len(line) < 400
    for expr in [" ", "=", " =1", "a..b=1", "x" * 3000]:
        (line,) = _refused(job, expr)
        assert line.startswith("--set:1:1: error: ") or line.startswith("--set x"), line
        assert len(line) < 400, line


def test_every_problem_is_one_printable_line(tmp_path: Path) -> None:
    # Keys and file names with newlines, line separators, bidi overrides or lone surrogates were printed raw:
    # extra lines, or a UnicodeEncodeError on the way to the terminal.
    job = tmp_path / "job.yaml"
    job.write_text(JOB + '"A\\nB": 1\n"\\u2028": 1\n"\\u202eZ": 1\n"  ": 1\nenv: {"A\\nB": x}\n')
    lines = _refused(job)
    assert len(lines) == 5 and all(x.isprintable() for x in lines), lines
    assert lines[0].startswith(f"{job}:5:1: error: A\\nB: unknown key 'A\\nB'")
    assert lines[2].startswith(f"{job}:7:1: error: \\u202eZ: unknown key '\\u202eZ'")
    assert lines[3].startswith(f"{job}:8:1: error: '  ': unknown key '  '")
    assert lines[4].startswith(f"{job}:9:7: error: env.A\\nB: 'A\\nB' is not an environment variable name")
    # Half of a surrogate pair (a YAML escape can make one) is not text: pydantic refused the whole job at 1:1.
    for extra, where in [('"\\ud800": 1\n', ":5:1: error: \\ud800: the key holds"),
                         ('tags: {a: "x\\udfffy"}\n', ":5:8: error: tags.a: the value holds")]:
        job.write_text(JOB + extra)
        assert _refused(job)[0].startswith(f"{job}{where} '\\u"), _refused(job)
    job.write_text(JOB)
    assert "surrogate" in _refused(job, 'description="\\ud83d"')[0]
    odd = tmp_path / "new\nline.yaml"
    odd.write_text(JOB)
    bad = tmp_path / "bad\nline.yaml"
    bad.write_text(JOB + "x: 1\n")
    p = _cli("validate", str(odd), str(bad))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stdout.splitlines() == [f"{str(odd)!r}"[1:-1] + f": ok (prepare small, spec {load_job(odd).spec_hash})"]
    (line,) = p.stderr.splitlines()
    assert line.startswith(str(bad).replace("\n", "\\n") + ":5:1: error: x: unknown key 'x'")


def test_messages_cut_long_values(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    for extra in ["resources: {slurm: {partition: '" + "\u4e2d" * 5000 + "'}}\n", "k" * 3000 + ": 1\n",
                  "kind: " + "t" * 5000 + "\n", "x: 1\nx: '" + "v" * 5000 + "'\n", "name: [" + "1, " * 3000 + "]\n"]:
        job.write_text(JOB + extra)
        for line in _refused(job):
            assert len(line) < 800, line[:300]


def test_characters_yaml_refuses_and_bytes_that_are_not_utf8_are_pointed_at(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_bytes(JOB.encode() + b"description: a\x00b\n")
    assert _refused(job) == [f"{job}:5:15: error: the character U+0000 is not allowed in YAML; remove it, or write "
                             "it as an escape (\\x.. or \\u....) inside double quotes"]
    job.write_bytes(JOB.encode() + b"description: caf\xe9\n")
    assert _refused(job) == [f"{job}:5:17: error: not UTF-8 text (byte 0xe9); save the file as UTF-8"]
    job.write_bytes(b"\xef\xbb\xbf" + JOB.replace("\n", "\r\n").encode())
    assert load_job(job).name == "small"


def test_size_and_entry_bounds_keep_every_answer_under_a_second(tmp_path: Path) -> None:
    # The round-trip parser spends about a millisecond per key or item on a busy machine: a file near the old
    # 1 MiB bound took 30 s. Bytes and keys-and-items are both bounded now, and what fits is read in time.
    from runner.spec.limits import MAX_ENTRIES, MAX_FILE_BYTES

    job = tmp_path / "job.yaml"
    dense = {"flow": lambda n: "[" + "1, " * n + "]", "maps": lambda n: "[" + "{a: 1}, " * (n // 3) + "]",
             "block": lambda n: "\n" + "  - x\n" * n, "keys": lambda n: "\n" + "  ? k\n" * n}
    for name, shape in dense.items():
        job.write_text(JOB + "tags: " + shape(MAX_ENTRIES - 30) + "\n")
        _refused(job)  # tags is a mapping of text: wrong, but answered in time
        job.write_text(JOB + "tags: " + shape(MAX_ENTRIES + 10) + "\n")
        (line,) = _refused(job)
        assert f"more than {MAX_ENTRIES:,} keys and items" in line, (name, line)
    job.write_text(JOB + "description: " + "x" * MAX_FILE_BYTES + "\n")
    (line,) = _refused(job)
    assert "a job file may be at most 16,384" in line
    aliases = "a: &a [" + ", ".join(["x"] * 19) + "]\n" + "b: &b [" + ", ".join(["*a"] * 31) + "]\n"
    job.write_text(JOB + aliases + "c: [" + ", ".join(["*b"] * 31) + "]\n")  # ~19,000 values: refused in time
    _refused(job)


def test_parser_warnings_do_not_leak_into_the_report(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(JOB + "a: &x 1\nb: &x 2\n")
    p = _cli("validate", str(job))
    assert p.returncode == 2 and all(LINE.match(x) for x in p.stderr.splitlines()), p.stderr
