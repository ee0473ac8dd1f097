"""The seeded generator of malformed job files behind tests/test_fuzz_jobs.py.

`cases(seed, n_files, n_sets)` mutates the shipped jobs/*.yaml and a few small valid jobs: byte-level (flips,
inserts, deletes, truncation, invalid UTF-8, NUL, BOM, CRLF, tabs), YAML-level (wrong types at random paths,
huge and non-finite numbers, control characters, shell metacharacters, long strings, deep nesting, anchors,
aliases, merge keys, tags, duplicate and unknown keys, empty and multiple documents), `extends:` at odd files
(`make_tree` lays them out) and `--set` expressions. The same seed gives the same cases.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SMALL = [
    "kind: prepare\nname: small\ndata:\n  train: builtin:quickstart\n",
    "kind: train\nname: demo\nmodel:\n  base: tiny\ndata:\n  train: builtin:quickstart\ntrain:\n  steps: 20\n",
    "kind: eval\nname: e\nmodel: {base: tiny}\ndata: [{path: 'builtin:mcq'}]\n",
    "kind: serve\nname: s\nmodel: {base: tiny}\nserver: {port: 0}\n",
    "kind: tournament\nname: t\nteams:\n  - name: a\n    answer: {url: 'http://x'}\n"
    "  - name: b\n    answer: {url: 'http://y'}\n",
    "kind: prepare\nname: flat\ndata: {train: builtin:mcq}\nresources:\n  partition: gpu\n  cpus: 2\n",
]
SHELL = ["$(id)", "`id`", "; rm -rf /", "a|b", "a&&b", "${HOME}", "'\"", "a\nb", "\\", "*?[]", "> /tmp/x"]
CONTROL = ["\x00", "\x01", "\x07", "\x1b[31m", "\x7f", "\x85", "\u2028", "\u2029", "\ufeff", "\r", "\t", "\x0b", "\x0c"]
RAW_VALUES = [  # written into the YAML text as they stand
    "!!python/object:os.system [id]", "!!python/object/apply:os.system [id]", "!!python/name:os.system",
    "*nope", "&a [*a]", "&b {x: *b}", "!!binary AAAA", "!!binary '!!!'", "2001-02-30", "2001-02-29 25:61:61",
    "!!timestamp nope", "!!int abc", "!!float x", "!!bool maybe", "!!null x", "!!str", "!!map [a]", "!!seq {a: 1}",
    "1" * 5000, "-" + "9" * 4400, "0x" + "f" * 5000, "1" * 4000 + ".5", "1e99999", "-.inf", ".nan", ".NaN",
    "0o99", "0b102", "0x_ff", "1_000", "+12", "!!set {a, b}", "!!omap [a: 1, b: 2]", "!!pairs [a: 1]",
    "!custom x", "!<tag:x> y", "? [a, b]", '"\\x00"', '"\\u2028"', '"\\ud800"', "|\n  multi\n  line",
    ">-\n  folded", "'${env:QA_FUZZ_UNSET}'", "${env:", "${env:QA_FUZZ_UNSET:-d}", "{<<: *nope}",
    "{a: 1, a: 2}", "[" * 70 + "]" * 70, "{" * 30 + "}" * 30, "[[[[[[", "{a: [b, {c: d}]", "@x", "`x`",
    "%x", "- a\n- b", "~", "null", "''", '""', "[]", "{}", "yes", "on", "0.0.0", "1:20", "12:30:45",
]
FRAGMENTS = {  # frag/NAME: what an `extends:` may point at
    "self.yaml": b"extends: self.yaml\n",
    "cycle-a.yaml": b"extends: cycle-b.yaml\n",
    "cycle-b.yaml": b"extends: [ok.yaml, cycle-a.yaml]\n",
    "list.yaml": b"- a\n- b\n",
    "bad-utf8.yaml": b"train:\n  steps: \xff\xfe\n",
    "ok.yaml": b"train:\n  steps: 3\n",
    "bom-crlf.yaml": b"\xef\xbb\xbftrain:\r\n  steps: 4\r\n",
    "flat.yaml": b"resources:\n  partition: gpu\n",
    "empty.yaml": b"",
    "nul.yaml": b"train: {steps: 1}\n\x00\n",
    "invalid.yaml": b"train: [steps\n",
    "kind.yaml": b"kind: [train]\n",
    "huge.yaml": b"tags:\n" + b"".join(b"  k%d: v\n" % i for i in range(3000)),
    "deep.yaml": b"tags: " + b"[" * 100 + b"]" * 100 + b"\n",
    "bomb.yaml": ("a: &a [x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 8)}]\n" for p, c in zip("abcdef", "bcdefg", strict=True))).encode(),
    "big-int.yaml": b"train: {steps: " + b"7" * 5000 + b"}\n",
    "bad-date.yaml": b"description: 2001-02-30\n",
    "extends-missing.yaml": b"extends: nowhere.yaml\n",
    "extends-dir.yaml": b"extends: dir\n",
    "yaml-99.yaml": b"%YAML 9.9\n---\ntrain: {}\n",
}
SPECIAL_FILES = ["/dev/zero", "/dev/null", "/dev/urandom", "/dev/stdin", "/", ".", "", "/proc/self/mem",
                 "frag/", "frag/dir", "frag/fifo", "frag/loop", "frag/to-zero", "frag/to-ok.yaml",
                 "frag/missing.yaml", "x" * 5000, "a/" * 2000, "a\x00b", "\udfff", "../" * 40,
                 "frag/" + "d/" * 300 + "x.yaml", "~/x.yaml", "~nosuchuser/x.yaml", "${env:HOME}/x.yaml",
                 "frag/noperm.yaml", "quickstart.yaml", "base/tiny-cpu.yaml", "base/mi300x.yaml",
                 *(f"frag/{name}" for name in FRAGMENTS)]


def _hostile_value(rng: random.Random, depth: int = 0) -> Any:
    """A Python value that yaml.safe_dump can write, of a type or size a job field does not expect."""
    pick = rng.randrange(16)
    if pick == 0:
        return [rng.randrange(-5, 5) for _ in range(rng.randrange(4))]
    if pick == 1:
        return {rng.choice(["a", "kind", "path", "x y", "1"]): rng.randrange(3)} if depth < 3 else {}
    if pick == 2:
        return rng.choice([10**30, 2**63, -(2**63) - 1, 10**4000, -1, 0, 2**31])
    if pick == 3:
        return rng.choice([0.5, 1e308, -1e-308, 3.0, float("inf"), float("-inf"), float("nan")])
    if pick == 4:
        return "".join(rng.choice(CONTROL + ["a", "b", " "]) for _ in range(rng.randrange(1, 8)))
    if pick == 5:
        return rng.choice(SHELL) + rng.choice(["", "x", " "])
    if pick == 6:
        return rng.choice("ab\u00e9\u4e2d") * rng.choice([300, 5_000, 20_000])
    if pick == 7:
        v: Any = rng.choice(["x", 1, {}])
        for _ in range(rng.choice([10, 63, 65, 200])):
            v = [v] if rng.random() < 0.5 else {"k": v}
        return v
    if pick == 8:
        return rng.choice([None, True, False, "", "null", "true", "1", "0x10", "1e3"])
    if pick == 9:
        return [_hostile_value(rng, depth + 1) for _ in range(2)] if depth < 3 else []
    if pick == 10:
        return rng.choice(["train", "eval", "serve", "prepare", "tournament", "trian", "KIND", "Train"])
    if pick == 11:
        return rng.choice(["${env:QA_FUZZ_UNSET}", "${env:QA_FUZZ_UNSET:-x}", "${env:HOME}", "${env:1}", "${env:"])
    if pick == 12:
        return rng.choice(["builtin:nope", "../../../../etc/passwd", "/dev/zero", "http://x", "s3://b/k", "-"])
    if pick == 13:
        return rng.choice(["\ud800", "\udfff", "a\ud83d"])  # lone surrogates
    if pick == 14:
        return rng.choice(["qa-agent@champion", "x@", "@y", "a:v0", "a:v-1", "a" * 300])
    return rng.random() * 10**rng.randrange(-3, 12)


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*path, i))
    return out


def _set_at(data: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    node = data
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return data


def _dump(data: Any, rng: random.Random) -> str:
    try:
        return yaml.safe_dump(data, default_flow_style=rng.choice([False, None, True]), allow_unicode=rng.random() < 0.5,
                              sort_keys=False, width=rng.choice([80, 10**6]))
    except (yaml.YAMLError, ValueError, RecursionError):
        return repr(data)[:5000]  # not YAML-writable: garbage of its own


def _byte_mutation(rng: random.Random, text: str) -> bytes:
    b = bytearray(text.encode())
    for _ in range(rng.randrange(1, 6)):
        op = rng.randrange(12)
        at = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(at, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[at:at] = bytes([rng.randrange(256)])
        elif op == 2 and b:
            del b[at:at + rng.randrange(1, 20)]
        elif op == 3:
            del b[at:]
        elif op == 4:
            b[at:at] = rng.choice([b"\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf"])
        elif op == 5:
            b[at:at] = b"\x00"
        elif op == 6:
            b[0:0] = rng.choice([b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff", b"\xef\xbb\xbf\xef\xbb\xbf"])
        elif op == 7:
            b = bytearray(bytes(b).replace(b"\n", rng.choice([b"\r\n", b"\r", b"\n\r", b"\x85"])))
        elif op == 8:
            b = bytearray(bytes(b).replace(b"  ", rng.choice([b"\t", b" \t", b"\t\t"]), rng.randrange(1, 4)))
        elif op == 9:
            b[at:at] = rng.choice(CONTROL).encode("utf-8", "surrogatepass")
        elif op == 10:
            b[at:at] = rng.choice([b":", b"- ", b"{", b"[", b"]", b"}", b"&a ", b"*a", b"!", b"|", b">", b"#", b"'",
                                   b'"', b"%", b"@", b"? ", b"---\n", b"...\n", b"\n  ", b",", b"<<: "])
        else:
            seg = bytes(b[at:at + rng.randrange(1, 40)])
            b[at:at] = seg * rng.randrange(1, 4)
    return bytes(b)


def _yaml_mutation(rng: random.Random, text: str) -> str:
    data = yaml.safe_load(text)
    paths = _paths(data)
    for _ in range(rng.randrange(1, 4)):
        path = rng.choice(paths)
        op = rng.randrange(6)
        try:
            if op <= 2:
                data = _set_at(data, path, _hostile_value(rng))
            elif op == 3 and path and isinstance(path[-1], str):  # rename a key: typo, unknown, odd
                parent = data
                for p in path[:-1]:
                    parent = parent[p]
                new = rng.choice([path[-1][:-1], path[-1] + "s", "unknown_key", "x y", "", "a\x07b", "a\nb",
                                  "\u2028", 7, None, True, 1.5, "<<", "extends", "k" * 2000])
                parent[new] = parent.pop(path[-1])
            elif op == 4 and path:
                parent = data
                for p in path[:-1]:
                    parent = parent[p]
                del parent[path[-1]]
            else:
                data = _set_at(data, path, _hostile_value(rng))
        except (KeyError, IndexError, TypeError):
            pass
        paths = _paths(data)
    out = _dump(data, rng)
    if rng.random() < 0.5:  # and something only YAML text can say
        lines = out.splitlines()
        at = rng.randrange(len(lines) + 1)
        snippet = rng.choice([
            lambda: f"{rng.choice(['kind', 'name', 'x', 'tags', 'data'])}: {rng.choice(RAW_VALUES)}",
            lambda: "base: &base {steps: 1, lr: 0.1}\ntrain:\n  <<: *base\n  steps: 2",
            lambda: "train:\n  <<: [*nope, {a: 1}]",
            lambda: "train: {<<: 5}",
            lambda: "<<: {kind: serve, name: merged}",
            lambda: "kind: train\nkind: eval",
            lambda: "name: a\nname: b",
            lambda: "---\nkind: train\n",
            lambda: "...\n---\n- a",
            lambda: "%YAML 1.1\n---",
            lambda: "%YAML 9.9",
            lambda: "%TAG ! tag:x,2000:\n---",
            lambda: f"extends: {rng.choice(SPECIAL_FILES)!r}",
            lambda: f"extends: [{rng.choice(SPECIAL_FILES)!r}, {rng.choice(SPECIAL_FILES)!r}]",
            lambda: "extends: {a: 1}",
            lambda: "extends: [1, null]",
            lambda: "? [complex, key]\n: value",
            lambda: "? {a: 1}\n: b",
            lambda: "!!python/object:os.system\nx: 1",
            lambda: "- " * rng.choice([30, 70, 500, 3000]) + "x",
            lambda: "a: &a [x, x, x, x, x, x, x, x]\n" + "".join(
                f"{c}: &{c} [{', '.join(['*' + p] * 8)}]\n" for p, c in zip("abcdef", "bcdefg", strict=True)),
        ])()
        lines[at:at] = snippet.splitlines()
        out = "\n".join(lines) + rng.choice(["\n", "", "\n\n"])
    return out


def _extends_mutation(rng: random.Random, text: str) -> str:
    """`text` extending odd files: missing, itself, a cycle, a directory, a device, a pipe, hostile YAML."""
    targets = [rng.choice(SPECIAL_FILES) for _ in range(rng.choice([1, 1, 2, 3]))]
    value = rng.choice([
        lambda: yaml.safe_dump(targets[0], allow_unicode=True).removesuffix("\n...\n").strip(),
        lambda: yaml.safe_dump(targets, default_flow_style=True, allow_unicode=True).strip(),
        lambda: "\n" + "".join(f"  - {yaml.safe_dump(t, allow_unicode=True).removesuffix(chr(10) + '...' + chr(10)).strip()}\n"
                               for t in targets).rstrip(),
        lambda: rng.choice(["", "~", "[]", "{}", "7", "[1, 2]", "[[a]]", "{a: b}", "*nope", "&x base/mi300x.yaml",
                            "!!binary AAAA", "!!python/object:os.system [id]", "'" + "a" * 20_000 + "'"]),
    ])()
    lines = [ln for ln in text.splitlines() if not ln.startswith("extends")]
    lines.insert(rng.randrange(len(lines) + 1), f"extends: {value}")
    return "\n".join(lines) + "\n"


@dataclass
class Case:
    name: str
    data: bytes
    sets: list[str] = field(default_factory=list)


def _set_mutation(rng: random.Random, text: str) -> list[str]:
    paths = [p for p in _paths(yaml.safe_load(text)) if p]
    out = []
    for _ in range(rng.randrange(1, 4)):
        if rng.random() < 0.5 and paths:
            key = ".".join(str(p) for p in rng.choice(paths))
        else:
            key = rng.choice(["", ".", "a..b", ".a", "a.", "data.train.\u00b2", "data.train.\u0663.path", "kind",
                              "data.train.99999999999999999999999", "data.train.-1", "train.steps.x", "0", "0.0",
                              "resources.partition", "resources.slurm.partition", "a\nb", "a\x00b", "env.X Y",
                              "tags.\u2028", "name", "x" * 3000, "train", "model.base", "extends", " ", "a = b"])
        value = rng.choice([
            lambda: "", lambda: "1", lambda: "9" * 5000, lambda: "-" + "1" * 4400, lambda: "1e99999", lambda: ".inf",
            lambda: ".nan", lambda: "[" * 2000, lambda: "[" * 200 + "]" * 200, lambda: "{" * 70 + "}" * 70,
            lambda: "&a [*a]", lambda: "*a", lambda: "!!python/object:os.system [id]", lambda: "!!binary AAAA",
            lambda: "!!binary '!'", lambda: "2001-02-30", lambda: "!!set {a}", lambda: "{a: 1, a: 2}",
            lambda: "[a, b", lambda: "{oops", lambda: "'unclosed", lambda: '"\\x00"', lambda: "a\nb", lambda: "~",
            lambda: "${env:QA_FUZZ_UNSET}", lambda: "$(id)", lambda: "x" * 100_000, lambda: "- a\n- b",
            lambda: "a: [b", lambda: "\udc80", lambda: "true", lambda: "{<<: 1}", lambda: "---\na\n---\nb",
            lambda: "%YAML 9.9\n--- x", lambda: "a: &x [*x, *x]", lambda: "? [a]\n: b",
        ])()
        out.append(rng.choice([f"{key}={value}", key, f"{key}={value}={value}"]) if rng.random() < 0.95
                   else rng.choice(["=", "==", "=1", ""]))
    return out


def cases(seed: int, n_files: int, n_sets: int) -> list[Case]:
    rng = random.Random(seed)
    seeds = [p.read_text() for p in sorted((ROOT / "jobs").glob("*.yaml"))] + SMALL
    out = []
    for i in range(n_files):
        text = rng.choice(seeds)
        kind = rng.randrange(11)
        if kind < 4:
            out.append(Case(f"bytes-{i}", _byte_mutation(rng, text)))
        elif kind < 9:
            data = _yaml_mutation(rng, text).encode("utf-8", "surrogatepass")
            out.append(Case(f"yaml-{i}", _byte_mutation(rng, data.decode("utf-8", "replace")) if kind == 8 else data))
        elif kind == 9:
            out.append(Case(f"extends-{i}", _extends_mutation(rng, text).encode("utf-8", "surrogatepass")))
        else:
            out.append(Case(f"doc-{i}", rng.choice([
                b"", b"\n", b"---\n", b"...\n", b"~\n", b"# only a comment\n", b"---\n---\n", b"- a\n", b"a\n",
                b"1\n", b"!!map {}\n", b"''\n", b"[kind, name]\n", b"\xef\xbb\xbf", b"\x00", b"\t", b"kind: train\n",
                b"kind: [train]\nname: x\n", b"kind: {a: 1}\nname: x\n", b"kind: !!binary AAAA\nname: x\n",
                b"kind: 1e5\nname: 7\n", b"kind: .nan\n", b"kind: &k train\nname: *k\n",
                text.encode() + b"---\n" + text.encode(), text.encode() + b"\n...\n",
            ])))
    for i in range(n_sets):
        text = rng.choice(seeds)
        out.append(Case(f"set-{i}", text.encode(), _set_mutation(rng, text)))
    return out


def make_tree(tmp: Path) -> Path:
    """A directory that looks like jobs/: base/ for the shipped jobs, frag/ for odd `extends:` targets."""
    shutil.copytree(ROOT / "jobs" / "base", tmp / "base")
    for job in (ROOT / "jobs").glob("*.yaml"):  # jobs extend other jobs too
        shutil.copy(job, tmp / job.name)
    frag = tmp / "frag"
    (frag / "dir").mkdir(parents=True)
    for name, data in FRAGMENTS.items():
        (frag / name).write_bytes(data)
    (frag / "noperm.yaml").write_text("train: {}\n")
    (frag / "noperm.yaml").chmod(0)
    os.mkfifo(frag / "fifo")
    (frag / "loop").symlink_to("loop")
    (frag / "to-zero").symlink_to("/dev/zero")
    (frag / "to-ok.yaml").symlink_to("ok.yaml")
    return tmp
