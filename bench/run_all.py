"""`just bench`: every CPU benchmark, each against its baseline in the same process, then a summary of the ratios.

Each benchmark is a script in this folder that prints `name: value` lines; this runs them one after another
(they share the machine's cores, so never in parallel) and repeats the headline lines at the end.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["train_bench.py", "eval_bench.py", "serve_bench.py"]
HEADLINE = re.compile(r"^([a-z0-9_]+(?:speedup|agreement|per_s|p50|p99)[a-z0-9_]*): (.+)$")


def main(argv: list[str]) -> int:
    only = set(argv)
    summary: list[str] = []
    failed = []
    for name in BENCHES:
        if only and name.removesuffix(".py") not in only and name not in only:
            continue
        script = HERE / name
        if not script.exists():
            print(f"== {name}: not present, skipped", flush=True)
            continue
        print(f"== {name}", flush=True)
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=HERE.parent)
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            m = HEADLINE.match(line.strip())
            if m:
                summary.append(f"{m.group(1)}: {m.group(2)}")
        code = proc.wait()
        print(f"== {name}: exit {code} in {time.perf_counter() - t:.0f} s", flush=True)
        if code != 0:
            failed.append(name)
    print("\n== summary (ratios are against a baseline run in the same process on this machine)")
    for s in summary:
        print(s)
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
