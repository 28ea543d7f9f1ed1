"""`prefixd serve-models` for real: 16 prefixes trained together on a tiny Llama, registered in a sqlite
MLflow store, served on 127.0.0.1 and called with the `openai` client and plain HTTP.

Run: python -m pytest -q tests/test_serving.py
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from mlflow import MlflowClient

from jobs.spec import parse_spec
from orchestrator import generation, registry
from orchestrator.api_server import start_api
from orchestrator.config import OrchestratorConfig, default_tracking_uri
from orchestrator.plan import base_model_ref, task_config
from orchestrator.serving import start_serving
from orchestrator.serving_models import ModelCatalog, ServingSettings
from orchestrator.store import JobStore
from orchestrator.tenants import merge_callers, parse_entries
from tests.tiny import save_tiny_base, write_task
from workers.generate import encode_prompt
from workers.models import load_base_model
from workers.trainer import MultiTaskTrainer

ROOT = Path(__file__).resolve().parents[1]
TASKS = [f"t{i:02d}" for i in range(16)]
KINDS = ("reverse", "double", "next")
PROMPTS = ["rev abcd=", "dbl 123=", "next abc:", "rev hg="]
CALLERS = merge_callers(parse_entries(["alice=tok-a", "bob=tok-b"]), parse_entries(["ops=tok-o"], admin=True))
MAX_TOKENS = 8
SHOWN = ("t04", "t12")  # two prefixes that answer every prompt with text (seeded: always the same)


@pytest.fixture(autouse=True)
def quiet_mlflow(monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def spec_of(root, name: str, i: int):
    raw = {
        "name": name,
        "base_model": {"path": str(root / "base")},
        "data": {"train": f"{name}.jsonl", "input_column": "input", "target_column": "target", "max_length": 40},
        "prefix": {"num_virtual_tokens": 3 + i % 4},  # mixed prefix lengths in one batch
        "training": {"steps": 2, "examples_per_step": 4, "learning_rate": 1e-3, "checkpoint_every": 100, "seed": i},
    }
    return parse_spec(raw, base_dir=root)


def train_and_register(root: Path, tasks: list[str], owners: dict[str, str] | None = None, home: Path | None = None):
    """`tasks` (named tNN: kind KINDS[NN % 3], seed NN) trained together for 2 steps on one tiny Llama saved in
    root/base and registered in the sqlite MLflow store under `home` (default root/home), each by its tenant in
    `owners` (default: the local tenant, the CLI's: shared with every tenant). Returns {root, uri, specs, store}."""
    save_tiny_base(root / "base")
    specs = {}
    for name in tasks:
        i = int(name[1:])
        write_task(root / f"{name}.jsonl", KINDS[i % 3], n=24, seed=i)
        specs[name] = spec_of(root, name, i)
    model, tokenizer = load_base_model(base_model_ref(specs[tasks[0]]))
    trainer = MultiTaskTrainer(model, tokenizer, micro_batch_size=16)
    for name, spec in specs.items():
        trainer.add_task(task_config(spec, f"train-{name}", root / "out" / name))
    while trainer.active:
        trainer.step()
    uri = default_tracking_uri(home or root / "home")
    store = JobStore(f"sqlite:///{root / 'jobs.db'}")
    for name, spec in specs.items():
        tenant = (owners or {}).get(name)
        job_id = store.submit(spec.to_dict(), task=name, base_key=spec.base_model.base_key, tenant=tenant)
        store.claim("test")
        store.finish(job_id, "succeeded", result_dir=str(root / "out" / name))
    assert len(registry.register_pending(store, uri)) == len(tasks)
    return {"root": root, "uri": uri, "specs": specs, "store": store}


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """16 tasks trained together on one tiny Llama and registered: t15 by tenant alice, the others by the
    local tenant."""
    return train_and_register(tmp_path_factory.mktemp("serving"), TASKS, {"t15": "alice"})


@pytest.fixture(scope="module")
def expected(registered):
    """`prefixd generate`'s greedy answers, {(task, prompt): text}, all 16 tasks in its one mixed batch."""
    out = generation.generate(registered["uri"], TASKS, PROMPTS, max_new_tokens=MAX_TOKENS)
    texts = {(r["task"], p): text for r in out for p, text in zip(PROMPTS, r["outputs"])}
    assert all(texts[(t, p)] for t in SHOWN for p in PROMPTS)  # answers to compare, not empty ones
    return texts


@pytest.fixture(scope="module")
def server(registered):
    handle = start_serving(
        ModelCatalog(ServingSettings(tracking_uri=registered["uri"], alias_ttl_s=0.5)), CALLERS, port=0
    )
    yield handle
    handle.stop()


def complete(url: str, token: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=120)


# ------------------------------------------------------------------------------------------------------------


def test_openai_client_completes_and_streams_equal_to_prefixd_generate(server, expected):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="tok-a", max_retries=0)
    assert set(TASKS) == {m.id for m in client.models.list()}
    for task in SHOWN:
        for model in (task, f"{task}@champion", f"{task}:1"):
            for prompt in PROMPTS:
                got = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
                assert got.choices[0].text.strip() == expected[(task, prompt)]
                assert got.choices[0].finish_reason in ("stop", "length")
                tokenizer = server.catalog.get(task, None).engine.tokenizer
                assert got.usage.prompt_tokens == len(encode_prompt(tokenizer, prompt, seq2seq=False))
        chunks = list(client.completions.create(model=task, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))  # fmt: skip
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text.strip() == expected[(task, PROMPTS[0])]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
        assert chunks[-1].usage.completion_tokens >= len(text.strip()) > 0  # the char tokenizer: a token per char
    # several prompts and n choices in one request; seeded sampling repeats itself
    many = client.completions.create(model="t04", prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0, n=2)
    assert [c.text.strip() for c in sorted(many.choices, key=lambda c: c.index)] == [
        expected[("t04", p)] for p in PROMPTS for _ in range(2)
    ]
    draws = [client.completions.create(model="t00", prompt="rev ab=", max_tokens=6, temperature=1.3, top_p=0.9,
                                       seed=5, n=2).choices for _ in range(2)]  # fmt: skip
    assert [c.text for c in draws[0]] == [c.text for c in draws[1]]


def test_stop_strings_cut_the_text(server, expected):
    full = expected[("t12", PROMPTS[0])]
    stop = full[2:4]
    body = {"model": "t12", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "stop": [stop]}
    got = complete(server.url, "tok-a", **body).json()["choices"][0]
    assert got["text"].strip() == full[: full.index(stop)].strip() and got["finish_reason"] == "stop"
    streamed = complete(server.url, "tok-a", stream=True, **body).text
    events = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert streamed.rstrip().endswith("data: [DONE]")
    assert "".join(e["choices"][0]["text"] for e in events).strip() == got["text"].strip()


def test_64_concurrent_requests_over_16_prefixes_equal_each_prefix_alone(server, expected):
    jobs = [(task, PROMPTS[k]) for task in TASKS for k in range(4)]
    alone = {}
    for task, prompt in jobs:  # one at a time: each request is the only row in the batch
        body = {"model": task, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
        alone[(task, prompt)] = complete(server.url, "tok-a", **body).json()["choices"][0]["text"]
    assert {k: v.strip() for k, v in alone.items()} == {k: expected[k] for k in alone}

    def one(job):
        task, prompt = job
        return complete(server.url, "tok-a", model=task, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(one, jobs))
    assert [r.status_code for r in answers] == [200] * 64
    assert {job: r.json()["choices"][0]["text"] for job, r in zip(jobs, answers)} == alone
    metrics = httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer tok-o"}).text
    batch = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if "batch_size_" in line}
    assert batch['prefixd_serving_batch_size_bucket{le="8"}'] < batch["prefixd_serving_batch_size_count"]  # batched
    assert 'prefixd_serving_requests_total{model="t05",code="200"}' in metrics
    assert httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer tok-a"}).status_code == 403


def test_small_queue_answers_429_and_loses_nothing(registered, expected):
    settings = ServingSettings(tracking_uri=registered["uri"], max_batch=4, max_queue=3)
    handle = start_serving(ModelCatalog(settings), CALLERS, port=0)
    try:
        jobs = [(task, PROMPTS[k]) for task in TASKS for k in range(4)]
        for task in TASKS:  # load every prefix first: the burst then measures the queue alone
            assert complete(handle.url, "tok-a", model=task, prompt="x", max_tokens=1).status_code == 200

        def one(job):
            return complete(handle.url, "tok-a", model=job[0], prompt=job[1], max_tokens=MAX_TOKENS, temperature=0)

        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            answers = list(pool.map(one, jobs))
        codes = [r.status_code for r in answers]
        assert set(codes) <= {200, 429} and codes.count(429) > 0 and codes.count(200) >= 4
        assert codes.count(429) == handle.catalog.metrics.rejected_count("queue_full")
        for job, r in zip(jobs, answers):
            if r.status_code == 200:
                assert r.json()["choices"][0]["text"].strip() == expected[job]
            else:
                assert r.json()["error"]["type"] == "rate_limit_error" and "queue" in r.json()["error"]["message"]
    finally:
        handle.stop()


def test_bad_input_names_the_field(server):
    def error(token="tok-a", path="/v1/completions", **body):
        r = httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        return r.status_code, r.json()["error"]["param"], r.json()["error"]["message"]

    ok = {"model": "t00", "prompt": "rev ab="}
    code, param, message = error(**ok | {"model": "nope"})
    assert (code, param) == (404, "model") and "t00" in message and "t15" in message
    code, param, message = error("tok-b", **ok | {"model": "t15"})  # alice's own model: not bob's to use or see
    listed = message.split("the models you can use:")[1]
    assert (code, param) == (404, "model") and "t14" in listed and "t15" not in listed
    assert error(**ok | {"model": "t00@canary"})[:2] == (404, "model")
    assert error(**ok | {"model": "t00:9"})[:2] == (404, "model")
    assert error(**ok | {"model": "t00@@x"})[:2] == (400, "model")
    assert error(**ok | {"temperature": -1})[:2] == (400, "temperature")
    assert error(**ok | {"temperature": "hot"})[:2] == (400, "temperature")
    assert error(**ok | {"top_p": 0})[:2] == (400, "top_p")
    assert error(**ok | {"n": 0})[:2] == (400, "n")
    assert error(**ok | {"max_tokens": 0})[:2] == (400, "max_tokens")
    assert error(**ok | {"max_tokens": 5000})[:2] == (400, "max_tokens")  # over the server's limit
    assert error(**ok | {"max_tokens": 120})[:2] == (400, "max_tokens")  # over the context left
    assert error(**ok | {"stop": ["a", "b", "c", "d", "e"]})[:2] == (400, "stop")
    assert error(**ok | {"prompt": 3})[:2] == (400, "prompt")
    assert error(**ok | {"prompt": "rev " + "a" * 200})[:2] == (400, "prompt")  # the context is 128 tokens
    assert error(**ok | {"logprobs": 2})[:2] == (400, "logprobs")
    assert error(model="t00")[:2] == (400, "prompt")
    code, param, message = error(path="/v1/chat/completions", model="t00", messages=[{"role": "user", "content": "hi"}])
    assert (code, param) == (400, "messages") and "chat template" in message
    assert error(path="/v1/chat/completions", model="t00", messages="hi")[:2] == (400, "messages")
    assert httpx.post(server.url + "/v1/completions", json=ok).status_code == 401
    assert httpx.post(server.url + "/v1/completions", json=ok, headers={"Authorization": "Bearer x"}).status_code == 403
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="tok-a", max_retries=0).completions.create(
            model="nope", prompt="x"
        )


def test_alias_moves_are_served_and_the_lru_is_bounded(registered, expected):
    uri = registered["uri"]
    settings = ServingSettings(tracking_uri=uri, alias_ttl_s=0.2, max_prefixes=2)
    handle = start_serving(ModelCatalog(settings), CALLERS, port=0)
    client = MlflowClient(uri, uri)
    try:
        body = {"prompt": PROMPTS[1], "max_tokens": MAX_TOKENS, "temperature": 0}
        client.set_registered_model_alias("prefixd-t03", "canary", "1")
        assert (
            complete(handle.url, "tok-a", model="t03@canary", **body).json()["choices"][0]["text"].strip()
            == (expected[("t03", PROMPTS[1])])
        )
        # a second version of t03 (t04's prefix), and canary moves to it
        store, spec = registered["store"], registered["specs"]["t03"]
        job_id = store.submit(spec.to_dict(), task="t03", base_key=spec.base_model.base_key)
        store.claim("test")
        store.finish(job_id, "succeeded", result_dir=str(registered["root"] / "out" / "t04"))
        registry.register_pending(store, uri)
        client.set_registered_model_alias("prefixd-t03", "canary", "2")
        deadline, answers = time.monotonic() + 20, []
        while not answers or (answers[-1] != expected[("t04", PROMPTS[1])] and time.monotonic() < deadline):
            time.sleep(0.1)  # resolutions older than alias_ttl_s are refreshed in the background
            answers.append(
                complete(handle.url, "tok-a", model="t03@canary", **body).json()["choices"][0]["text"].strip()
            )
        assert set(answers) <= {expected[("t03", PROMPTS[1])], expected[("t04", PROMPTS[1])]}
        assert answers[-1] == expected[("t04", PROMPTS[1])] != expected[("t03", PROMPTS[1])]
        for task in ("t05", "t06", "t07"):
            complete(handle.url, "tok-a", model=task, **body)
        assert handle.catalog.loaded() == [("prefixd-t06", "1"), ("prefixd-t07", "1")]
        metrics = handle.catalog.metrics.render()
        assert "prefixd_serving_prefix_evictions_total 3" in metrics and "prefixd_serving_prefixes_loaded 2" in metrics
    finally:
        client.delete_registered_model_alias("prefixd-t03", "canary")
        handle.stop()


def test_mounted_in_the_job_api(registered, tmp_path, expected):
    config = OrchestratorConfig(
        home=tmp_path, store_url=f"sqlite:///{tmp_path / 'jobs.db'}", mlflow_uri=registered["uri"]
    )
    catalog = ModelCatalog(ServingSettings(tracking_uri=registered["uri"]))
    api = start_api(config, port=0, tokens=["alice=tok-a"], serving=catalog)
    try:
        client = openai.OpenAI(base_url=api.url + "/openai/v1", api_key="tok-a", max_retries=0)
        got = client.completions.create(model="t00", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
        assert got.choices[0].text.strip() == expected[("t00", PROMPTS[0])]
        assert httpx.get(api.url + "/v1/jobs", headers={"Authorization": "Bearer tok-a"}).status_code == 200
    finally:
        api.stop()
        catalog.close()


def test_chat_uses_the_chat_template_when_the_base_has_one(server, expected):
    tokenizer = server.catalog.get("t04", None).engine.tokenizer
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the prompt, as is
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="tok-a", max_retries=0)
        messages = [{"role": "user", "content": PROMPTS[0]}]
        got = client.chat.completions.create(model="t04", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        assert got.choices[0].message.content.strip() == expected[("t04", PROMPTS[0])]
        assert got.choices[0].message.role == "assistant" and got.usage.prompt_tokens == len(PROMPTS[0])
        chunks = client.chat.completions.create(
            model="t04", messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks).strip() == expected[("t04", PROMPTS[0])]
    finally:
        tokenizer.chat_template = None


def test_requests_past_the_timeout_answer_504(registered):
    handle = start_serving(
        ModelCatalog(ServingSettings(tracking_uri=registered["uri"], timeout_s=0.001)), CALLERS, port=0
    )
    try:
        r = complete(handle.url, "tok-a", model="t04", prompt=PROMPTS[0], max_tokens=100, temperature=0)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        streamed = complete(  # greedy, as above: a sampled first token may end the answer before the deadline
            handle.url, "tok-a", model="t04", prompt=PROMPTS[0], max_tokens=100, temperature=0, stream=True
        ).text
        assert '"type": "timeout"' in streamed and streamed.rstrip().endswith("data: [DONE]")
    finally:
        handle.stop()


def test_the_cli_verb_serves(registered, tmp_path):
    """`prefixd serve-models` in its own process, tokens from the environment, SIGTERM stops it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFIXD_", "MLFLOW_TRACKING"))}
    env |= {"PYTHONPATH": str(ROOT), "PREFIXD_API_TOKENS": "alice=tok-a"}
    command = [sys.executable, "-m", "orchestrator.cli", "--home", str(tmp_path), "serve-models", "--port", "0",
               "--mlflow-uri", registered["uri"], "--max-batch", "8"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        line = process.stdout.readline()
        url = line.split(" on ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1"), line
        listed = httpx.get(url + "/models", headers={"Authorization": "Bearer tok-a"}, timeout=60).json()
        assert {m["id"] for m in listed["data"]} == set(TASKS)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
