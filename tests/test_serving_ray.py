"""The Ray Serve deployment of `prefixd serve-models` for real: docker/serve_models.yaml's application, its base
model swapped for a tiny Llama holding two trained prefixes, deployed with its 2 replicas on a local Ray
(127.0.0.1), called through Serve's HTTP proxy with the `openai` client.

Run: python -m pytest -q tests/test_serving_ray.py
"""

from __future__ import annotations

import httpx
import openai
import pytest
import ray
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from orchestrator import generation
from orchestrator.local_ray import start_local_ray
from orchestrator.serving_ray import build_app
from tests.ports import free_port
from tests.test_serving import MAX_TOKENS, PROMPTS, ROOT, train_and_register

TASKS = ["t04", "t12"]  # two prefixes that answer every prompt with text (seeded: always the same)
OTHER = "t07"  # registered in the same registry, on another base model


@pytest.fixture(scope="module", autouse=True)
def quiet_mlflow():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """TASKS on one tiny Llama, OTHER on another (same weights, another folder: another base model)."""
    root = tmp_path_factory.mktemp("serving-ray")
    out = train_and_register(root / "a", TASKS)
    other = train_and_register(root / "b", [OTHER], home=root / "a" / "home")
    return {**out, "other_base": other["specs"][OTHER].base_model.base_key}


@pytest.fixture(scope="module")
def expected(registered):
    """`prefixd generate`'s greedy answers, {(task, prompt): text}."""
    out = generation.generate(registered["uri"], TASKS, PROMPTS, max_new_tokens=MAX_TOKENS)
    texts = {(r["task"], p): text for r in out for p, text in zip(PROMPTS, r["outputs"])}
    assert all(texts.values())  # answers to compare, not empty ones
    return texts


@pytest.fixture(scope="module")
def deployed(registered):
    """The first application of docker/serve_models.yaml with its own args, but this registry's base model,
    half a CPU per replica (this machine has 2) and the registry and tokens in the replicas' environment.
    Yields (base URL of the application, its status); Serve and Ray are gone afterwards."""
    config = yaml.safe_load((ROOT / "docker" / "serve_models.yaml").read_text())
    ServeDeploySchema.model_validate(config)  # the file is a valid Serve config
    application = config["applications"][0]
    env = dict(application["runtime_env"]["env_vars"])
    env.update(MLFLOW_TRACKING_URI=registered["uri"], PREFIXD_API_TOKENS="alice=tok-a")
    args = dict(application["args"])
    args["base"] = registered["specs"][TASKS[0]].base_model.base_key
    args["ray_actor_options"] = {**args["ray_actor_options"], "num_cpus": 0.5, "runtime_env": {"env_vars": env}}
    start_local_ray(num_cpus=2)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name=application["name"], route_prefix=application["route_prefix"])
        status = serve.status().applications[application["name"]]
        yield f"http://127.0.0.1:{port}{application['route_prefix']}", status
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.slow
def test_two_replicas_answer_like_prefixd_generate(deployed, expected):
    url, status = deployed
    assert [d.replica_states for d in status.deployments.values()] == [{"RUNNING": 2}]
    client = openai.OpenAI(base_url=url + "/v1", api_key="tok-a", max_retries=0)
    assert sorted(m.id for m in client.models.list()) == sorted([*TASKS, OTHER])  # the registry's listing
    for task in TASKS:
        for prompt in PROMPTS:
            got = client.completions.create(model=task, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
            assert got.choices[0].text.strip() == expected[(task, prompt)]
    many = client.completions.create(model=TASKS[1], prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0)
    assert [c.text.strip() for c in sorted(many.choices, key=lambda c: c.index)] == [
        expected[(TASKS[1], p)] for p in PROMPTS
    ]


@pytest.mark.slow
def test_a_prefix_of_another_base_model_is_refused_naming_it(deployed, registered):
    url, _ = deployed
    body = {"model": OTHER, "prompt": PROMPTS[0], "max_tokens": 2}
    got = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer tok-a"}, timeout=60)
    assert got.status_code == 400
    assert f"belongs to base model {registered['other_base']}, not served here" in got.json()["error"]["message"]
    assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 401
    assert httpx.get(url + "/healthz", timeout=60).json() == {"ok": True}


def test_bad_args_name_the_field():
    with pytest.raises(ValueError, match=r"args\.base: .* is required"):
        build_app({"num_replicas": 2})
    with pytest.raises(
        ValueError, match=r"args\.settings: unknown batch; accepted keys: alias_ttl_s, device, max_batch"
    ):
        build_app({"base": "builtin:smollm2-135m:float32", "settings": {"batch": 8}})
    with pytest.raises(ValueError, match=r"args\.settings: a mapping"):
        build_app({"base": "builtin:smollm2-135m:float32", "settings": [8]})
