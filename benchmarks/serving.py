"""Serving many prefixes at once: throughput and latency of `prefixd serve-models` under concurrent load.

    python benchmarks/serving.py                  # 4-layer Llama, 64 prefixes, 128 requests x 16 tokens, 3 rounds
    python benchmarks/serving.py --quick          # 16 prefixes, 32 requests, 1 round
    python benchmarks/serving.py --tiny --quick   # 2-layer model: the smoke test

Setup: a random-weight Llama with a character tokenizer saved as a base folder; N random prefixes
(P=8) registered as N tasks in a throwaway sqlite MLflow store, as training would register them. Every
variant sends the same kind of requests over HTTP from `--concurrency` client threads (greedy, max_tokens
fixed, prompts cycled), after one untimed request per prefix (prefixes loaded), interleaved round by round:
  served-1     serve-models, every request for one prefix
  served-8     serve-models, requests spread over 8 prefixes
  served-N     serve-models, requests spread over all N prefixes
  one-at-a-time  serve-models with --max-batch 1 (each request decoded alone), N prefixes
  pyfunc-8     the MLflow pyfunc model (one base model per prefix), 8 prefixes, called from the same number
               of threads in this process (no HTTP: its cost is a lower bound)
Throughput is completion tokens per second (the `usage` counts; the pyfunc model must answer each
request with the served text, and its tokens are counted as served); latency is per request, p50 and p95 over every round. Targets: served-N
within 10% of served-1 (ratio >= 0.90); served-N >= 3x one-at-a-time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Target, format_table, set_threads  # noqa: E402

PROMPTS = ["rev abcd=", "dbl 123=", "next abc:", "rev hgfe=", "the quick brown fox", "a=1, b=2, c="]
PREFIX_LEN = 8


def save_base(folder: Path, tiny: bool) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.tiny import char_tokenizer, save_tiny_base

    if tiny:
        return save_tiny_base(folder)
    config = LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def register_prefixes(root: Path, n: int, tiny: bool) -> str:
    """N random prefixes registered as tasks b00.. in a sqlite MLflow store under root; returns its URI."""
    import torch
    from transformers import AutoConfig

    from jobs.spec import parse_spec
    from orchestrator import registry
    from orchestrator.config import default_tracking_uri
    from orchestrator.store import JobStore
    from workers.formats import save_peft_adapter, save_prefix
    from workers.prefix import PrefixEncoder, PrefixTuningConfig, configure_for_model

    base = save_base(root / "base", tiny)
    (root / "data.jsonl").write_text(json.dumps({"input": "a", "target": "b"}) + "\n")
    model_config = AutoConfig.from_pretrained(base)
    uri = default_tracking_uri(root / "home")
    store = JobStore(f"sqlite:///{root / 'jobs.db'}")
    for i in range(n):
        name = f"b{i:02d}"
        config = configure_for_model(PrefixTuningConfig(num_virtual_tokens=PREFIX_LEN), model_config)
        torch.manual_seed(1000 + i)
        encoder = PrefixEncoder(config)
        out = root / "out" / name
        save_peft_adapter(out / "adapter", encoder, config)
        save_prefix(out / "prefix", encoder, config)
        (out / "metrics.json").write_text("{}")
        (out / "history.jsonl").write_text("")
        spec = parse_spec(
            {"name": name, "base_model": {"path": str(base)}, "prefix": {"num_virtual_tokens": PREFIX_LEN},
             "data": {"train": "data.jsonl", "input_column": "input", "target_column": "target", "max_length": 40},
             "training": {"steps": 1, "examples_per_step": 1}},
            base_dir=root,
        )  # fmt: skip
        job_id = store.submit(spec.to_dict(), task=name, base_key=spec.base_model.base_key)
        store.claim("benchmark")
        store.finish(job_id, "succeeded", result_dir=str(out))
    registry.register_pending(store, uri)
    return uri


def load(send, jobs: list[tuple[str, str]], concurrency: int) -> dict:
    """Run `send(model, prompt) -> completion tokens` for every job from `concurrency` threads."""
    latencies: list[float] = []

    def one(job):
        start = time.perf_counter()
        tokens = send(*job)
        latencies.append(time.perf_counter() - start)
        return tokens

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, jobs))
    wall = time.perf_counter() - start
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "latencies": latencies}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="16 prefixes, 32 requests, 1 round")
    p.add_argument("--tiny", action="store_true", help="the 2-layer test model (smoke test)")
    p.add_argument("--concurrency", type=int, default=16, help="client threads (default 16)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    set_threads(args.threads)
    n, requests, rounds = (16, 32, 1) if args.quick else (64, 128, 3)

    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import httpx

    from orchestrator import generation
    from orchestrator.serving import start_serving
    from orchestrator.serving_models import ModelCatalog, ServingSettings
    from orchestrator.tenants import parse_entries

    with tempfile.TemporaryDirectory(prefix="prefixd-bench-serving-") as tmp:
        t0 = time.perf_counter()
        uri = register_prefixes(Path(tmp), n, args.tiny)
        print(f"registered {n} prefixes in {time.perf_counter() - t0:.1f} s", flush=True)
        callers = parse_entries(["bench=tok"])
        servers = {
            "batched": start_serving(ModelCatalog(ServingSettings(tracking_uri=uri, max_queue=4096)), callers, port=0),
            "alone": start_serving(
                ModelCatalog(ServingSettings(tracking_uri=uri, max_queue=4096, max_batch=1)), callers, port=0
            ),
        }
        names = [f"b{i:02d}" for i in range(n)]
        http = httpx.Client(
            headers={"Authorization": "Bearer tok"}, timeout=600, limits=httpx.Limits(max_connections=256)
        )

        def sender(server: str):
            url = servers[server].url + "/v1/completions"

            def send(model: str, prompt: str) -> int:
                body = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0}
                r = http.post(url, json=body)
                if r.status_code != 200:
                    raise SystemExit(f"{model} {prompt!r}: HTTP {r.status_code}: {r.text[:2000]}")
                answers[(model, prompt)] = (r.json()["choices"][0]["text"], r.json()["usage"]["completion_tokens"])
                return answers[(model, prompt)][1]

            return send

        pyfuncs = {name: generation.load_pyfunc(uri, name) for name in names[:8]}

        answers: dict[tuple[str, str], tuple[str, int]] = {}  # the served text and token count of each job

        def pyfunc_send(model: str, prompt: str) -> int:
            """The pyfunc's answer, which must be the served one; its tokens are the served count."""
            [text] = pyfuncs[model].predict([prompt], params={"max_new_tokens": args.max_tokens})
            served, tokens = answers[(model, prompt)]
            if text != served.strip():
                raise SystemExit(f"pyfunc and serve-models answer {model} {prompt!r} differently: {text!r}, {served!r}")
            return tokens

        def jobs_over(k: int) -> list[tuple[str, str]]:
            return [(names[i % k], PROMPTS[i % len(PROMPTS)]) for i in range(requests)]

        for server in servers:  # untimed: every prefix loaded, every code path warm
            load(sender(server), [(m, PROMPTS[0]) for m in names], args.concurrency)
        load(sender("batched"), list(set(jobs_over(8))), args.concurrency)
        load(pyfunc_send, [(m, PROMPTS[0]) for m in names[:8]], args.concurrency)
        variants = {
            "served-1": (sender("batched"), jobs_over(1)),
            "served-8": (sender("batched"), jobs_over(8)),
            f"served-{n}": (sender("batched"), jobs_over(n)),
            "one-at-a-time": (sender("alone"), jobs_over(n)),
            "pyfunc-8": (pyfunc_send, jobs_over(8)),
        }
        results: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(rounds):
            order = list(variants)[r % len(variants) :] + list(variants)[: r % len(variants)]
            for v in order:
                send, jobs = variants[v]
                results[v].append(load(send, jobs, args.concurrency))
                print(f"round {r + 1}/{rounds} {v}: {results[v][-1]['tokens_per_s']:.1f} tokens/s", flush=True)
        http.close()
        for handle in servers.values():
            handle.stop()

    rows, summary = [], {}
    for v, runs in results.items():
        lat = sorted(x for run in runs for x in run["latencies"])
        tps = statistics.median(run["tokens_per_s"] for run in runs)
        p50, p95 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(0.95 * len(lat)))]
        summary[v] = {"tokens_per_s": tps, "p50_s": p50, "p95_s": p95, "runs": [r["tokens_per_s"] for r in runs]}
        rows.append([v, f"{tps:.1f}", f"{p50 * 1000:.1f}", f"{p95 * 1000:.1f}", str(runs[0]["tokens"])])
    print(f"\n{'tiny' if args.tiny else '4-layer'} Llama, {n} prefixes (P={PREFIX_LEN}), {requests} requests x "
          f"{args.max_tokens} tokens, concurrency {args.concurrency}, {rounds} round(s), {args.threads} torch threads")  # fmt: skip
    print(format_table(["variant", "tokens/s", "p50 ms", "p95 ms", "tokens"], rows))
    ratio = lambda a, b: summary[a]["tokens_per_s"] / summary[b]["tokens_per_s"]  # noqa: E731
    targets = [
        Target(f"served-{n} / served-1 throughput", ratio(f"served-{n}", "served-1"), ">=", 0.90),
        Target(f"served-{n} / one-at-a-time throughput", ratio(f"served-{n}", "one-at-a-time"), ">=", 3.0),
        Target("served-8 / pyfunc-8 throughput", ratio("served-8", "pyfunc-8"), ">=", 1.0),
    ]
    print()
    print(format_table(["comparison", "ratio", "target", "result"],
                       [[t.name, f"{t.value:.2f}", f"{t.op} {t.bound:.2f}", t.as_dict()["result"]] for t in targets]))  # fmt: skip
    if args.json:
        Path(args.json).write_text(
            json.dumps({"variants": summary, "comparisons": [t.as_dict() for t in targets]}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
