"""The real `smollm2-135m` base through the registry: a short LoRA run is promoted with its base bundled, merged,
and answers from the version alone (no runner cache, HF_HUB_OFFLINE=1), as a serving image would; and the cpu
serving image built from such a version answers without a network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.files import sha256_file
from tests.conftest import MMLU, ROOT, run_cli

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

TEST_CACHE = Path(os.environ.get("RUNNER_TEST_CACHE", str(ROOT / ".runner" / "cache")))
QUESTIONS = [
    ("Which of these is a tool?", ["hammer", "river", "cloud", "elbow"]),
    ("Which of these is worn on the feet?", ["shoe", "spoon", "lake", "wrench"]),
    ("What is the capital of France?", ["Berlin", "Paris", "Rome", "Madrid"]),
]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from runner.workloads.model.smollm2 import ensure_smollm2

    return ensure_smollm2(TEST_CACHE)


def _letter_logits(model: object, tok: object) -> object:
    import torch

    from runner.workloads.scoring.prompts import LETTERS

    rows = []
    with torch.no_grad():
        for q, choices in QUESTIONS:
            text = f"Question: {q}\n" + "".join(f"{LETTERS[i]}) {c}\n" for i, c in enumerate(choices)) + "Answer:"
            ids = torch.tensor([tok.encode(text)])  # type: ignore[attr-defined]
            rows.append(model(ids).logits[0, -1])  # type: ignore[operator]
    return torch.stack(rows)


def test_a_promoted_smollm2_version_stands_alone_and_merges_exactly(smollm2: Path, tmp_path: Path,
                                                                    runner_home: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    job = tmp_path / "train-sq.yaml"
    job.write_text(
        "kind: train\nname: train-sq\nmodel:\n  base: smollm2-135m\nlora:\n  r: 8\n  alpha: 16\n"
        "data:\n  train: builtin:categories?per_topic=10&topics=tools,clothing\n  val_fraction: 0.2\n"
        "  val_limit: 4\n"
        "train:\n  steps: 3\n  batch_size: 1\n  max_seq_len: 64\n  lr: 3.0e-3\n  warmup_steps: 0\n"
        "  eval_every: 3\n  save_every: 3\n  log_every: 1\n  threads: 2\n"
    )
    p = run_cli("run", str(job), timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (run,) = [d for d in (runner_home / "runs" / "train-sq").iterdir() if d.is_dir()]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in rows if r["split"] == "train"]
    assert len(elapsed) == 3
    print(f"smollm2-135m LoRA, batch 1, max_seq_len 64: {(elapsed[2] - elapsed[0]) / 2:.2f} s/step")

    p = run_cli("promote", "train-sq", "--to", "sq", "--checkpoint", "last")
    assert p.returncode == 0, p.stdout + p.stderr
    v1 = runner_home / "registry" / "sq" / "v1"
    m = json.loads((v1 / "manifest.json").read_text())
    assert m["base_model"] == {"base": "smollm2-135m", "revision": None, "bundled": "base"}
    assert m["files"]["base/model.safetensors"]["sha256"] == sha256_file(smollm2 / "model.safetensors")
    assert "base/tokenizer.json" in m["files"] and "base/config.json" in m["files"]
    p = run_cli("promote", "train-sq", "--to", "sq", "--checkpoint", "last", "--merge")
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads((runner_home / "registry" / "sq" / "v2" / "manifest.json").read_text())["merged"] == "merged"
    p = run_cli("registry", "verify", "sq")
    assert p.returncode == 0, p.stdout + p.stderr

    # From here on there is no runner cache: everything comes from the versions.
    empty = tmp_path / "no-cache"
    monkeypatch.setenv("RUNNER_CACHE", str(empty))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch

    from runner.spec.models import ModelSpec
    from runner.workloads.model.artifact import load_artifact
    from runner.workloads.model.loading import load_model_and_tokenizer

    torch.set_num_threads(2)
    merged, tok, _ = load_artifact("sq:v2", merged=True)
    with_adapter, tok2, _ = load_artifact("sq:v2", merged=False)
    lm, la = _letter_logits(merged, tok), _letter_logits(with_adapter, tok2)
    diff = float((lm - la).abs().max())  # type: ignore[operator]
    assert diff < 1e-4, f"merged and adapter letter logits differ by {diff:.2e}"
    del merged
    base, btok = load_model_and_tokenizer(ModelSpec(base=str(v1 / "base")))
    moved = float((_letter_logits(base, btok) - la).abs().max())  # type: ignore[operator]
    assert moved > 1e-3, f"the adapter changes the letter logits by only {moved:.2e}"  # it was trained
    print(f"merged vs adapter: {diff:.2e}; adapter vs base: {moved:.2e}")
    assert not empty.exists()

    question = json.dumps({"question": QUESTIONS[0][0], "choices": QUESTIONS[0][1]})
    for ref in ("sq:v1", "sq:v2"):
        a = subprocess.run([sys.executable, "-m", "runner.workloads.recipes.artifact", "answer", ref,
                            "--question", question], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "RUNNER_CACHE": str(empty), "HF_HUB_OFFLINE": "1"})
        assert a.returncode == 0, a.stderr[-3000:]
        out = json.loads(a.stdout.strip().splitlines()[-1])
        assert out["model"] == ref and out["answer"] in "ABCD" and abs(sum(out["probs"].values()) - 1) < 1e-3
    assert not empty.exists()


def _engine() -> str | None:
    try:
        import docker

        docker.from_env(timeout=5).ping()
        return None
    except Exception as e:
        return f"no Docker engine answers ({e.__class__.__name__}); .ci/run starts one"


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.skipif(not MMLU.is_dir(), reason=f"{MMLU} not present")
def test_the_cpu_serving_image_of_a_smollm2_version_answers(smollm2: Path, tmp_path: Path,
                                                              runner_home: Path) -> None:
    why = _engine()
    if why:
        pytest.skip(why)
    import docker
    import docker.errors

    job = tmp_path / "train-sqi.yaml"
    job.write_text(
        "kind: train\nname: train-sqi\nmodel:\n  base: smollm2-135m\nlora:\n  r: 4\n  alpha: 8\n"
        "data:\n  train: builtin:categories?per_topic=6&topics=tools,clothing\n  val_fraction: 0.2\n"
        "  val_limit: 4\n"
        "train:\n  steps: 2\n  batch_size: 1\n  max_seq_len: 64\n  lr: 3.0e-3\n  warmup_steps: 0\n"
        "  eval_every: 2\n  save_every: 2\n  log_every: 1\n  threads: 2\n"
    )
    p = run_cli("run", str(job), timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    name = f"qa-smollm2-{os.getpid()}"
    client = docker.from_env(timeout=600)
    try:
        t0 = time.monotonic()
        p = run_cli("promote", "train-sqi", "--to", name, "--checkpoint", "last", "--merge", "--image", timeout=1500)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        print(f"\npromote --merge --image of a smollm2-135m run: {time.monotonic() - t0:.0f} s")
        m = json.loads((runner_home / "registry" / name / "v1" / "manifest.json").read_text())
        assert m["merged"] == "merged" and m["base_model"]["base"] == "smollm2-135m"
        assert m["image"]["tag"] == f"{name}:v1" and client.images.get(f"{name}:v1").id == m["image"]["id"]
        csv = sorted((MMLU / "val").glob("*.csv"))[0]
        out = client.containers.run(
            f"{name}:v1", ["answer", "--mmlu", f"/data/{csv.name}", "--index", "0"], remove=True,
            network_disabled=True, volumes={str(csv.parent): {"bind": "/data", "mode": "ro"}}, stderr=True,
        ).decode()
        ans = json.loads(out.strip().splitlines()[-1])
        assert ans["model"] == f"{name}:v1" and ans["answer"] in "ABCD" and ans["gold"] in "ABCD"
        # The image holds this version: the same command on the host gives the same probabilities.
        host = subprocess.run([sys.executable, "-m", "runner.workloads.recipes.artifact", "answer", f"{name}:v1",
                               "--mmlu", str(csv), "--index", "0"], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        assert host.returncode == 0, host.stderr[-3000:]
        mine = json.loads(host.stdout.strip().splitlines()[-1])
        assert mine["answer"] == ans["answer"], (mine, ans)
        assert max(abs(mine["probs"][k] - ans["probs"][k]) for k in "ABCD") < 1e-3, (mine, ans)
        c = client.containers.run(f"{name}:v1", detach=True, network_disabled=True)
        try:
            probe = ("import json, time, urllib.request as u\n"
                     "for _ in range(240):\n"
                     "    try: u.urlopen('http://127.0.0.1:8000/healthz', timeout=2); break\n"
                     "    except Exception: time.sleep(0.5)\n"
                     "r = u.Request('http://127.0.0.1:8000/v1/answer', data=json.dumps({'question': 'What is the "
                     "capital of France?', 'choices': ['Berlin', 'Paris', 'Rome', 'Madrid']}).encode(), "
                     "headers={'Content-Type': 'application/json'})\n"
                     "print(u.urlopen(r, timeout=60).read().decode())\n")
            rc, got = c.exec_run(["python3", "-c", probe])
            assert rc == 0, got.decode()[-2000:] + c.logs().decode()[-2000:]
            served = json.loads(got.decode().strip().splitlines()[-1])
            assert served["answer"] in "ABCD" and 0.25 <= served["confidence"] <= 1.0, served
        finally:
            c.remove(force=True)
    finally:
        try:
            client.images.remove(f"{name}:v1", force=True)
        except docker.errors.ImageNotFound:
            pass
