"""GGUF in the registry and the `llamacpp` engine, for real: a LoRA adapter trained here on the real `smollm2-135m`
is promoted with `--gguf q8_0,q4_k_m` (llama.cpp's own converter and quantiser), the GGUFs are hashed like every
file, llama.cpp's letters agree with the builtin scorer on real MMLU questions, and a serve job with
`engine: llamacpp` answers over HTTP.

Needs llama-cpp-python and llama.cpp's converter (`bash .ci/llamacpp-up.sh`) and the real model (`just real-model`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from runner.registry.store import RegistryError
from tests.conftest import run_cli
from tests.test_real_model_jobs import (  # noqa: F401 - fixtures
    _short_questions,
    mmlu_val,
    smollm2,
    train_short_smollm2,
)

pytestmark = [pytest.mark.gguf]
NAME = "qa-gguf"
N_QUESTIONS = 48


def _fails_cleanly(p: Any, code: int, *needles: str) -> None:
    out = p.stdout + p.stderr
    assert p.returncode == code, out
    assert "Traceback" not in out, out
    for n in needles:
        assert n in out, out


# --- refusals, before anything is written ------------------------------------------------------------------


def test_an_unknown_type_or_a_missing_converter_is_refused_before_anything_is_written(runner_home: Path,
                                                                                    tmp_path: Path) -> None:
    p = run_cli("promote", "some-run", "--to", NAME, "--gguf", "q8_0,q3_k_xl")
    _fails_cleanly(p, 2, "'q3_k_xl' is not a GGUF type", "q4_k_m", "--gguf q8_0,q4_k_m")
    p = run_cli("promote", "some-run", "--to", NAME, "--gguf", " , ")
    _fails_cleanly(p, 2, "names no type")
    p = run_cli("promote", "some-run", "--to", NAME, "--gguf", "q8_0",
                env={"QA_LLAMA_CPP_DIR": str(tmp_path / "no-llama.cpp")})
    _fails_cleanly(p, 3, "convert_hf_to_gguf.py", str(tmp_path / "no-llama.cpp"), "bash .ci/llamacpp-up.sh")
    assert not (runner_home / "registry").exists()


def test_gguf_file_names_the_types_a_version_has(tmp_path: Path) -> None:
    from runner.registry.gguf import gguf_file

    vdir = tmp_path / "v3"
    (vdir / "gguf").mkdir(parents=True)
    (vdir / "gguf" / "q8_0.gguf").write_bytes(b"GGUF" + bytes(8))
    m: dict[str, Any] = {"name": NAME, "version": 3, "source": {"run": "train-x/r1", "checkpoint": "step-00000004"},
                         "files": {"gguf/q8_0.gguf": {"sha256": "0", "size": 12}},
                         "gguf": {"q8_0": {"path": "gguf/q8_0.gguf"}}}
    assert gguf_file(vdir, m, "q8_0") == vdir / "gguf" / "q8_0.gguf"
    with pytest.raises(RegistryError) as e:
        gguf_file(vdir, m, "q4_k_m")
    msg = str(e.value)
    assert f"{NAME}:v3 has no q4_k_m GGUF (it has q8_0)" in msg
    assert f"runner promote train-x/r1 --to {NAME} --checkpoint step-00000004 --gguf q4_k_m" in msg
    with pytest.raises(RegistryError, match="promoted without --gguf"):
        gguf_file(vdir, {**m, "gguf": None}, "q8_0")
    with pytest.raises(RegistryError, match="not a file of the version"):
        gguf_file(vdir, {**m, "gguf": {"q8_0": {"path": "../../elsewhere.gguf"}}}, "q8_0")


def test_the_engine_refuses_what_is_not_a_gguf(tmp_path: Path) -> None:
    from runner.spec.engines import LlamaCppSpec
    from runner.workloads.serving.engines import EngineError
    from runner.workloads.serving.engines.llamacpp import LlamaCppModel

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(EngineError, match="not a GGUF file"):
        LlamaCppModel.start(LlamaCppSpec(gguf=str(fake)), str(fake), None, log=lambda m: None)
    with pytest.raises(EngineError, match="does not exist"):
        LlamaCppModel.start(LlamaCppSpec(gguf=str(tmp_path / "none.gguf")), str(tmp_path / "none.gguf"), None)


# --- a real adapter, promoted with GGUFs ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def promoted(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # noqa: F811
    root = tmp_path_factory.mktemp("gguf")
    env = train_short_smollm2(root, "train-gguf")
    t0 = time.monotonic()
    p = run_cli("promote", "train-gguf", "--to", NAME, "--checkpoint", "last", "--gguf", "q8_0,q4_k_m", env=env,
                timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    promote_s = time.monotonic() - t0
    vdir = root / "home" / "registry" / NAME / "v1"
    print(f"\npromote --gguf q8_0,q4_k_m of a smollm2-135m run: {promote_s:.0f} s")
    return {"env": env, "home": root / "home", "vdir": vdir, "stdout": p.stdout,
            "manifest": json.loads((vdir / "manifest.json").read_text())}


@pytest.mark.real_model
@pytest.mark.slow
def test_promote_stores_each_gguf_in_the_manifest_hashed(promoted: dict[str, Any]) -> None:
    from runner.files import sha256_file

    vdir, m = promoted["vdir"], promoted["manifest"]
    assert sorted(m["gguf"]) == ["q4_k_m", "q8_0"]
    assert m["merged"] == "merged"  # --gguf implies --merge: the GGUFs' source weights are in the version
    weights = m["files"]["merged/model.safetensors"]["sha256"]
    for t, g in m["gguf"].items():
        assert g["path"] == f"gguf/{t}.gguf" and (vdir / g["path"]).read_bytes()[:4] == b"GGUF"
        assert m["files"][g["path"]]["sha256"] == sha256_file(vdir / g["path"]) == g["sha256"]
        assert "llama-cpp-python 0.3.36, llama.cpp " in g["converter"], g
        assert g["source_weights"] == {"dir": "merged", "sha256": {"merged/model.safetensors": weights}}
    assert m["gguf"]["q8_0"]["quantised_from"] is None and m["gguf"]["q8_0"]["quantiser"] is None
    assert m["gguf"]["q4_k_m"]["quantised_from"] == "f16"
    assert "llama_model_quantize" in m["gguf"]["q4_k_m"]["quantiser"]
    assert m["gguf"]["q4_k_m"]["size"] < m["gguf"]["q8_0"]["size"]
    assert not any(".scratch" in rel or rel.endswith("f16.gguf") for rel in m["files"]), sorted(m["files"])
    assert f"gguf: q8_0 {vdir / 'gguf' / 'q8_0.gguf'}" in promoted["stdout"]
    show = run_cli("registry", "show", f"{NAME}:v1", env=promoted["env"], check=True).stdout
    assert "gguf        q4_k_m  " in show and "quantised from f16" in show, show
    p = run_cli("registry", "verify", f"{NAME}:v1", env=promoted["env"])
    assert p.returncode == 0 and "ok," in p.stdout, p.stdout + p.stderr


@pytest.mark.real_model
@pytest.mark.slow
def test_llamacpp_letters_agree_with_the_builtin_scorer(promoted: dict[str, Any],
                                                        mmlu_val: dict[str, Any]) -> None:  # noqa: F811
    from runner.registry.gguf import gguf_file
    from runner.spec.engines import LlamaCppSpec
    from runner.workloads.agents.answer import AnswerItem
    from runner.workloads.model.artifact import load_artifact
    from runner.workloads.scoring.prompts import resolve_prompt
    from runner.workloads.scoring.scorer import encode_prompts, letter_token_ids, score_mcq
    from runner.workloads.serving.engines import EngineError
    from runner.workloads.serving.engines.llamacpp import LlamaCppModel

    torch.set_num_threads(2)
    vdir, m = promoted["vdir"], promoted["manifest"]
    model, tok, _ = load_artifact(vdir, merged=True)
    style = resolve_prompt(None, model)  # the style the adapter was trained with, as the service uses it
    items = [AnswerItem(r.question, list(r.choices)) for r in _short_questions(mmlu_val, N_QUESTIONS)]
    t0 = time.monotonic()
    ref = score_mcq(model, tok, items, prompt=style)[:, :4]
    builtin_qps = len(items) / (time.monotonic() - t0)
    prompts = encode_prompts(tok, items, style)
    letters = letter_token_ids(tok, 4, style)
    hf_first = int(model(torch.tensor([prompts[0]])).logits[0, -1].argmax())
    del model

    rates: dict[str, float] = {}
    for t in ("q8_0", "q4_k_m"):
        path = gguf_file(vdir, m, t)
        eng = LlamaCppModel.start(LlamaCppSpec(gguf=t, n_ctx=1024, n_threads=2), str(path), tok, log=lambda s: None)
        try:
            t0 = time.monotonic()
            lp = eng.letter_logprobs(prompts, letters, timeout_s=600)
            qps = len(items) / (time.monotonic() - t0)
            assert lp.shape == (len(items), 4) and lp.dtype == torch.float32
            probs = lp.exp()
            assert torch.allclose(probs.sum(-1), torch.ones(len(items)), atol=1e-4)
            same = (probs.argmax(-1) == ref.argmax(-1)).float().mean().item()
            diff = (probs - ref).abs()
            rates[t] = same
            print(f"\nllama.cpp {t} vs builtin (merged fp32), {len(items)} MMLU val questions: {same:.1%} same letters, "
                  f"probability difference mean {diff.mean():.4f} max {diff.max():.4f}; {qps:.1f} q/s vs builtin "
                  f"{builtin_qps:.1f} q/s (this machine, 2 threads)")
            # the same prompt twice in a row gives the same numbers as in the first pass (no order effects)
            again = eng.letter_logprobs([prompts[3], prompts[3]], letters)
            assert torch.equal(again[0], lp[3]) and torch.equal(again[1], lp[3]), (again, lp[3])
            if t == "q8_0":
                assert diff.mean() < 0.02, diff.mean()
                new = eng.generate_ids(prompts[0], max_new_tokens=6)
                assert 0 < len(new) <= 6 and new[0] == hf_first, (new, hf_first)
                sampled = [eng.generate_ids(prompts[1], max_new_tokens=8, temperature=0.7, top_p=0.9, seed=5)
                           for _ in range(2)]
                assert sampled[0] == sampled[1] and sampled[0], sampled  # a seed makes a sample repeatable
                with pytest.raises(EngineError, match="does not fit the context"):
                    eng.letter_logprobs([prompts[0] * 40], letters)
        finally:
            eng.close()
    assert rates["q8_0"] >= 0.95, rates
    assert rates["q4_k_m"] >= 0.75, rates  # 4-bit (most tensors fall back to q5_0/q6_k at width 576)

    class Shifted:  # a tokenizer whose ids are not the GGUF's
        eos_token_id = tok.eos_token_id

        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [i + 1 for i in tok.encode(text, add_special_tokens=add_special_tokens)]

        def __len__(self) -> int:
            return len(tok)

    with pytest.raises(EngineError, match="does not use this tokenizer's token ids"):
        LlamaCppModel.start(LlamaCppSpec(), str(gguf_file(vdir, m, "q8_0")), Shifted(), log=lambda s: None)


def _wait_for_service(run_dir: Path, timeout: float = 600) -> str:
    t0 = time.monotonic()
    while not (run_dir / "serve.json").exists():
        status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").exists() else {}
        if status.get("state") not in (None, "pending", "running") or time.monotonic() - t0 > timeout:
            log = (run_dir / "run.log").read_text()[-4000:] if (run_dir / "run.log").exists() else ""
            raise AssertionError(f"the service did not come up ({status.get('state')}):\n{log}")
        time.sleep(0.5)
    url: str = json.loads((run_dir / "serve.json").read_text())["url"]
    return url


@pytest.mark.real_model
@pytest.mark.slow
def test_a_serve_job_with_engine_llamacpp_answers_and_writes_questions(promoted: dict[str, Any],
                                                                      mmlu_val: dict[str, Any],  # noqa: F811
                                                                      tmp_path: Path) -> None:
    from runner.runs import RunStore
    from runner.workloads.agents.format_filter import check_answer, check_question, token_counter

    job = tmp_path / "serve-gguf.yaml"
    job.write_text(
        f"kind: serve\nname: serve-gguf\nregistry: {NAME}:v1\nengine: llamacpp\n"
        "llamacpp: {gguf: q8_0, n_ctx: 1024, n_threads: 2}\ndevice: cpu\nthreads: 2\n"
        "server: {host: 127.0.0.1, port: 0, max_seconds: 600}\n"
        "answer: {permutations: 0, deadline_s: 60, reasoning: model}\n"
        "question: {sources: {model: 3.0, procedural: 1.0}, time_limit_s: 40, seed: 3}\n"
    )
    p = run_cli("run", str(job), "--detach", env=promoted["env"])
    assert p.returncode == 0, p.stdout + p.stderr
    store = RunStore(promoted["home"])
    run = store.get("serve-gguf")
    try:
        url = _wait_for_service(run.dir)
        health = httpx.get(f"{url}/healthz", timeout=30).json()
        assert "[llamacpp]" in health["model"], health
        answers = []
        for r in _short_questions(mmlu_val, 4):
            resp = httpx.post(f"{url}/v1/answer", json={"question": r.question, "choices": r.choices}, timeout=120)
            assert resp.status_code == 200, resp.text
            answers.append(resp.json())
        resp = httpx.post(f"{url}/v1/question", json={"topic": "blood_relations"}, timeout=120)
        assert resp.status_code == 200, resp.text
        made = resp.json()["questions"]
        bad = httpx.post(f"{url}/v1/answer", json={"question": "x", "choices": "not a list"}, timeout=30)
        assert bad.status_code == 422, bad.text  # the gate in front of the engine is the same
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
    finally:
        run_cli("cancel", "serve-gguf", env=promoted["env"])
    from transformers import AutoTokenizer

    count = token_counter(AutoTokenizer.from_pretrained(str(promoted["vdir"] / "merged")))
    for a in answers:
        assert a["answer"] in "ABCD" and check_answer(a, 4, count) == [], a
    assert made and all(check_question(q, count) == [] for q in made), made
    answered = [ln for ln in metrics.splitlines() if ln.startswith("qa_answered_total")]
    assert answered and sum(float(ln.split()[-1]) for ln in answered) >= 4, metrics[-2000:]


@pytest.mark.real_model
@pytest.mark.slow
def test_a_tampered_gguf_is_refused(promoted: dict[str, Any]) -> None:
    from runner.registry import IntegrityError, resolve_artifact

    target = promoted["vdir"] / "gguf" / "q4_k_m.gguf"
    size = target.stat().st_size
    target.chmod(0o644)
    with open(target, "r+b") as f:
        f.seek(size - 4096)
        original = f.read(1)
        f.seek(size - 4096)
        f.write(bytes([original[0] ^ 0xFF]))
    try:
        p = run_cli("registry", "verify", f"{NAME}:v1", env=promoted["env"])
        _fails_cleanly(p, 1, "gguf/q4_k_m.gguf: sha256")
        with pytest.raises(IntegrityError, match="gguf/q4_k_m.gguf"):
            resolve_artifact(promoted["vdir"])  # what the agents' loader calls before starting the engine
    finally:
        with open(target, "r+b") as f:
            f.seek(size - 4096)
            f.write(original)
        target.chmod(0o444)
    assert run_cli("registry", "verify", f"{NAME}:v1", env=promoted["env"]).returncode == 0
