"""End to end: a LoRA student on the vLLM engine, beside the base model, through the openai SDK.

The test trains a tiny adapter itself (peft, rank 8 on q/v, 10 AdamW steps on one chat prompt,
toward the fixed answer " Banana banana banana."), starts ``powerserve serve --engine vllm
--distilled banana=ADAPTER`` on the embedded model, and sends base and student requests at the
same time. Greedy outputs show the adapter is applied to the student's requests and only to
them; the student's self-reward is the base model's log-probability of the banana answer
(scored without the adapter), far below what the adapter itself gives it.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from powerserve.engine.factory import vllm_available
from powerserve.model_store import ensure_embedded_checkpoint
from powerserve.testing import ServerProcess

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is 7 + 5?"}]
TARGET = " Banana banana banana."
STEPS = 10


def train_adapter(out: Path) -> None:
    """Fit a rank-8 LoRA adapter on the embedded model so that it answers QUESTION with TARGET."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = str(ensure_embedded_checkpoint())
    tok = AutoTokenizer.from_pretrained(base)
    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    prompt = list(
        tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    )
    target = [*tok.encode(TARGET, add_special_tokens=False), tok.eos_token_id]
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, labels = torch.tensor([prompt + target]), torch.tensor([[-100] * len(prompt) + target])
    for _ in range(STEPS):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)  # adapter_config.json names `base` as its base model
    del model, opt
    gc.collect()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    if not vllm_available():
        pytest.fail("vLLM is not installed: run scripts/setup.sh")
    work = tmp_path_factory.mktemp("lora")
    train_adapter(work / "banana")
    args = ["--enforce-eager", "--max-model-len", "512", "--distilled", f"banana={work / 'banana'}"]
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    srv = ServerProcess(engine="vllm", extra_args=args, log_path=work / "server.log", env=env)
    try:
        srv.wait_ready(timeout_s=300)
        yield srv.base, srv.log_path
    finally:
        srv.kill(grace_s=60)


def test_lora_student_beside_the_base_on_one_vllm_engine(served: tuple[str, Path]) -> None:
    base_url, _ = served
    client = OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    ids = {m.id: m for m in client.models.list().data}
    assert f"{model}:distilled:banana" in ids
    card = next(d for d in httpx.get(f"{base_url}/v1/decoders").json()["data"] if d["name"] == "distilled")
    assert card["available"] and [(s["name"], s["kind"]) for s in card["students"]] == [("banana", "lora")]

    def ask(kind: str) -> Any:
        extra: dict[str, Any] = {}
        name = model
        if kind == "field":
            extra = {"decoder": {"name": "distilled", "student": "banana"}}
        elif kind == "alias":
            name = f"{model}:distilled:banana"
        return client.chat.completions.create(
            model=name, messages=QUESTION, max_tokens=12, temperature=0, extra_body=extra
        )

    # Base and student requests in flight together: one engine, one batch.
    kinds = ["base", "field", "base", "alias", "base", "field"]
    with ThreadPoolExecutor(len(kinds)) as pool:
        answers = list(pool.map(ask, kinds))
    for kind, resp in zip(kinds, answers, strict=True):
        text = resp.choices[0].message.content or ""
        info = resp.model_extra["powerserve"]
        if kind == "base":
            assert "anana" not in text and info["decoder"] == "standard", text
            continue
        assert text.strip().startswith("Banana banana"), f"the adapter is not applied: {text!r}"
        assert info["decoder"] == "distilled"
        reward = info["self_reward"]
        assert reward["tokens"] == resp.usage.completion_tokens
        # Scored under the base, the banana answer is unlikely; the student itself (trained to
        # loss < 0.1 on it) would give it a log-probability near 0.
        assert reward["sum_logprob"] / reward["tokens"] < -1.0, reward
        assert info["tokens_generated"] == reward["tokens"] and info["tokens_scored"] == reward["tokens"]
    metrics = httpx.get(f"{base_url}/metrics").text
    assert 'decoder="distilled:banana"' in metrics


def test_an_unknown_student_is_a_400(served: tuple[str, Path]) -> None:
    base_url, _ = served
    resp = httpx.post(
        f"{base_url}/v1/chat/completions",
        json={"model": "SmolLM2-135M-Instruct:distilled:nope", "messages": QUESTION, "max_tokens": 4},
        timeout=60,
    )
    assert resp.status_code == 400 and "'banana'" in resp.json()["error"]["message"]
