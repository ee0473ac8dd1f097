"""CPU benchmark: `runner run` of a prepare job on N canonical JSONL records of MMLU-like lengths.

Writes N records (default 50,000) over 57 topics, with MMLU's shape: questions of ~40 words (lognormal, a long
tail to a few hundred), four choices of ~6 words, about 1% exact and 1% case/space-only duplicates. Then times
the whole command a user types (process start, import, dedupe, split, writing train/val and the manifest) and
prints `prepare_seconds: X.X` with the record counts from the manifest.

    python bench/prepare_bench.py [--records 50000] [--keep DIR] [--profile]

`--profile` runs the recipe in this process under cProfile instead and prints the top functions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the of a an and to in is that for it as with was on be by at this which from or had not are but have "
         "what all were when we there can been one do would will if more no their has so about each other many then "
         "them these some her him into time two like could see make than first way been call who its now find long "
         "down day did get come made may part over new sound take only little work know place year live me back give "
         "most very after thing our just name good sentence man think say great where help through much before line "
         "right too mean old any same tell boy follow came want show also around form three small set put end does "
         "another well large must big even such because turn here why ask went men read need land different home us "
         "move try kind hand picture again change off play spell air away animal house point page letter mother "
         "answer found study still learn should america world enzyme theorem voltage tariff amendment mitochondria "
         "integral covalent sovereignty hypothesis equilibrium").split()


def _text(rng: random.Random, mean_words: float, sigma: float, cap: int) -> str:
    n = max(1, min(cap, round(rng.lognormvariate(0, sigma) * mean_words)))
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize()


def write_records(path: Path, n: int, seed: int = 0) -> None:
    """n canonical records; ~2% of them duplicates of earlier ones (half differing only in case and spacing)."""
    rng = random.Random(seed)
    topics = [f"topic_{i:02d}" for i in range(57)]
    made: list[dict[str, object]] = []
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            roll = rng.random()
            if made and roll < 0.02:
                d = dict(rng.choice(made), id=f"bench/{i}")
                if roll < 0.01:
                    d["question"] = "  " + str(d["question"]).upper()
            else:
                d = {"id": f"bench/{i}", "question": _text(rng, 40, 0.7, 400) + "?",
                     "choices": [_text(rng, 6, 0.6, 60) for _ in range(4)], "answer": "ABCD"[rng.randrange(4)],
                     "topic": rng.choice(topics), "source": "bench"}
                if len(made) < 5000:
                    made.append(d)
            f.write(json.dumps(d) + "\n")


JOB = """\
kind: prepare
name: prepare-bench
data:
  train: [{{path: {path}}}]
  val_fraction: 0.1
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--keep", type=Path, help="write the data, job and runs here (default: a temporary directory)")
    ap.add_argument("--profile", action="store_true", help="profile the recipe in this process instead")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = work / "records.jsonl"
        t = time.perf_counter()
        write_records(data, args.records)
        print(f"wrote {args.records} records ({data.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t:.1f}s")
        job = work / "prepare-bench.yaml"
        job.write_text(JOB.format(path=json.dumps(str(data))))
        if args.profile:
            return _profile(job, work)
        env = {**os.environ, "RUNNER_HOME": str(work / "home")}
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "runner", "run", "--fresh", str(job)], cwd=ROOT, env=env,
                           capture_output=True, text=True)
        elapsed = time.perf_counter() - t
        if p.returncode != 0:
            print(p.stdout + p.stderr, file=sys.stderr)
            return 1
        manifest = json.loads(next((work / "home" / "runs").rglob("manifest.json")).read_text())
        print(f"train {manifest['train']['total']}, val {manifest['val']['total']}, "
              f"duplicates removed {manifest['duplicates_removed']}")
        print(f"prepare_seconds: {elapsed:.1f}")
    return 0


def _profile(job: Path, work: Path) -> int:
    import cProfile
    import pstats

    from runner.spec import load_job
    from runner.workloads.recipes import prepare

    loaded = load_job(job)
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    rc = prepare.run(loaded, work / "profile-run")
    prof.disable()
    print(f"recipe: {time.perf_counter() - t:.1f}s (exit {rc})")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    return rc


if __name__ == "__main__":
    sys.exit(main())
