"""lm-evaluation-harness (``lm_eval.simple_evaluate``) against the running e2e server on the
embedded model, offline, on small tasks written here (task YAML + local JSONL):

- a log-likelihood multiple-choice task through ``local-completions`` with
  ``tokenizer_backend=remote`` (the harness tokenizes with /tokenize and scores with echo):
  every choice's log-likelihood equals a transformers forward within the engine's tolerance
  (1e-4 per token on torch, 1e-3 on vLLM as in tests/engine/test_vllm_engine.py), the chosen
  answers are the transformers argmax, and ``acc`` is recomputed from them;
- a generate-until task through ``local-completions`` and ``local-chat-completions``, the
  decoder chosen by the model alias ``<model>:temperature``: each response equals the
  response the test gets by sending the same seeded request itself, ``exact_match`` is
  recomputed from those, and the server's metrics show the decoder served them.

Plus the echo check of issue 16 on this engine: echoed prompt log-probabilities against
transformers. Run time on the 2-core build machine: about a minute beside the server.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from powerserve.model_store import ensure_embedded_checkpoint
from powerserve.testing import ServerProcess

pytestmark = pytest.mark.slow

MC_DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "a banana", "blue"], "label": 0},
    {"question": "Two plus two equals", "choices": ["seven", "four", "green"], "label": 1},
    {"question": "The sun rises in the", "choices": ["west", "kitchen", "east"], "label": 2},
    {"question": "Water freezes at zero degrees", "choices": ["Celsius", "Fahrenheit"], "label": 0},
]
GEN_DOCS = [
    {"question": "What is 2 + 2?", "answer": "4"},
    {"question": "What is the capital of France?", "answer": "Paris"},
    {"question": "What colour is the sky on a clear day?", "answer": "Blue"},
]
MAX_GEN_TOKS = 8
SEED = 1234  # lm-eval's default request seed


@pytest.fixture(scope="module", autouse=True)
def offline(server: ServerProcess) -> Iterator[None]:
    """No hub, no network: the harness must work from the local files alone."""
    assert server.api_key is not None
    with pytest.MonkeyPatch.context() as env:
        for key, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": server.api_key}.items():
            env.setenv(key, value)
        yield


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, docs in (("mc", MC_DOCS), ("gen", GEN_DOCS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))

    def task(name: str, **fields: Any) -> dict[str, Any]:
        data = {"data_files": {"test": str(root / f"{name}.jsonl")}}
        return {"task": f"ps_{name}", "dataset_path": "json", "test_split": "test", "dataset_kwargs": data, **fields}

    mc = task(
        "mc",
        output_type="multiple_choice",
        doc_to_text="{{question}}",
        doc_to_choice="{{choices}}",
        doc_to_target="{{label}}",
        metric_list=[{"metric": "acc"}],
    )
    gen = task(
        "gen",
        output_type="generate_until",
        doc_to_text="Question: {{question}}\nAnswer:",
        doc_to_target="{{answer}}",
        generation_kwargs={"until": ["\n"], "max_gen_toks": MAX_GEN_TOKS, "do_sample": False},
        metric_list=[{"metric": "exact_match", "regexes_to_ignore": [r"\s", r"\."], "ignore_case": True}],
    )
    (root / "ps_mc.yaml").write_text(yaml.safe_dump(mc))
    (root / "ps_gen.yaml").write_text(yaml.safe_dump(gen))
    return root


@pytest.fixture(scope="module")
def reference() -> tuple[Any, Any]:
    """The embedded checkpoint in transformers (float32) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_embedded_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def tolerance(server: ServerProcess) -> float:
    return 1e-4 if server.engine == "torch" else 1e-3


def evaluate(task_dir: Path, task: str, model_type: str, model_args: dict[str, Any], **kw: Any) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    args = {"max_retries": 1, "num_concurrent": 1, "timeout": 300, **model_args}
    out = lm_eval.simple_evaluate(
        model=model_type, model_args=args, tasks=[task], task_manager=manager, log_samples=True, **kw
    )
    assert out is not None
    return dict(out)


def ref_logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1 from one plain forward: [T-1]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], dim=-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def requests_served(server: ServerProcess, decoder: str) -> float:
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server.base}/metrics", timeout=60).text)}
    return sum(
        s.value
        for s in fams["powerserve_requests"].samples
        if s.name.endswith("_total") and s.labels.get("decoder") == decoder and s.labels.get("outcome") == "success"
    )


def test_echo_matches_transformers(server: ServerProcess, model: str, reference: tuple[Any, Any]) -> None:
    hf, tok = reference
    ids = tok.encode("The history of the printing press begins in Germany", add_special_tokens=False)
    body = {"model": model, "prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 0}
    resp = httpx.post(f"{server.base}/v1/completions", json=body, headers=server.headers, timeout=120)
    assert resp.status_code == 200, resp.text
    got = resp.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert got[0] is None and len(got) == len(ids)
    diff = max(abs(a - b) for a, b in zip(got[1:], ref_logprobs(hf, ids).tolist(), strict=True))
    print(f"echo on {server.engine}: max |diff| vs transformers = {diff:.2e} over {len(ids) - 1} tokens")
    assert diff < tolerance(server)


def test_loglikelihood_multiple_choice(
    server: ServerProcess, model: str, task_dir: Path, reference: tuple[Any, Any]
) -> None:
    hf, tok = reference
    args = {"model": model, "base_url": f"{server.base}/v1/completions", "tokenizer_backend": "remote"}
    out = evaluate(task_dir, "ps_mc", "local-completions", {**args, "auth_token": server.api_key})
    samples = sorted(out["samples"]["ps_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(MC_DOCS)
    hits = []
    for doc, sample in zip(MC_DOCS, samples, strict=True):
        context = doc["question"]
        ctx = tok.encode(context, add_special_tokens=False)
        want = []
        for choice in doc["choices"]:  # lm-eval's split: tokens of context + " " + choice after the context's
            whole = tok.encode(f"{context} {choice}", add_special_tokens=False)
            want.append(math.fsum(ref_logprobs(hf, whole)[len(ctx) - 1 :].tolist()))
        got = [float(r[0][0]) for r in sample["resps"]]
        tol = tolerance(server) * 8
        assert got == pytest.approx(want, abs=tol), (doc, got, want)
        ranked = sorted(want, reverse=True)
        assert ranked[0] - ranked[1] > 2 * tol, "the task's choices must not tie"
        chosen = max(range(len(got)), key=got.__getitem__)
        assert chosen == max(range(len(want)), key=want.__getitem__)
        hits.append(float(chosen == doc["label"]))
    acc = out["results"]["ps_mc"]["acc,none"]
    print(f"lm-eval ps_mc acc = {acc} (recomputed {sum(hits) / len(hits)})")
    assert acc == pytest.approx(sum(hits) / len(hits))


def _exact(pred: str, target: str) -> float:
    def norm(s: str) -> str:
        return re.sub(r"[\s.]", "", s).lower()

    return float(norm(pred) == norm(target))


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_generate_until_with_decoder_alias(
    server: ServerProcess, model: str, task_dir: Path, reference: tuple[Any, Any], endpoint: str
) -> None:
    _, tok = reference
    alias = f"{model}:temperature"
    before = requests_served(server, "temperature")
    url = f"{server.base}/v1/{'completions' if endpoint == 'completions' else 'chat/completions'}"
    if endpoint == "completions":
        args = {"base_url": url, "tokenizer_backend": "remote", "auth_token": server.api_key}
        out = evaluate(task_dir, "ps_gen", "local-completions", {"model": alias, **args})
    else:
        out = evaluate(
            task_dir, "ps_gen", "local-chat-completions", {"model": alias, "base_url": url}, apply_chat_template=True
        )
    samples = sorted(out["samples"]["ps_gen"], key=lambda s: s["doc_id"])
    assert len(samples) == len(GEN_DOCS)
    assert requests_served(server, "temperature") - before == len(GEN_DOCS)

    scores = []
    for doc, sample in zip(GEN_DOCS, samples, strict=True):
        # The same request the harness sent, by hand: its answer must be the harness's.
        text = f"Question: {doc['question']}\nAnswer:"
        body: dict[str, Any] = {"model": alias, "max_tokens": MAX_GEN_TOKS, "temperature": 0, "seed": SEED}
        if endpoint == "completions":
            body |= {"prompt": [tok.encode(text, add_special_tokens=False)], "stop": ["\n", tok.eos_token]}
        else:
            body |= {"messages": [{"role": "user", "content": text}], "stop": ["\n"]}
        resp = httpx.post(url, json=body, headers=server.headers, timeout=120).json()
        choice = resp["choices"][0]
        mine = choice["text"] if endpoint == "completions" else choice["message"]["content"]
        assert resp["powerserve"]["decoder"] == "temperature"
        assert sample["resps"][0][0] == mine
        scores.append(_exact(mine, doc["answer"]))
    em = out["results"]["ps_gen"]["exact_match,none"]
    print(f"lm-eval ps_gen via {endpoint} with {alias}: exact_match = {em}, responses {[s['resps'] for s in samples]}")
    assert em == pytest.approx(sum(scores) / len(scores))
