"""glm-api as a Ray Serve application (glm_api/ray_serve.py) on a local Ray cluster.

One cluster for the module, pinned to 127.0.0.1 (node address and Serve's HTTP proxy), with 2
replicas of the packaged defaults on CPU, each with room for one running sequence and none
waiting: a held slot shows as a 429 on the next request. Skipped when Ray is not installed
(``pip install -r requirements-ray.txt``); CI installs it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import REPO, free_port, timed_sse_events

if importlib.util.find_spec("ray") is None:
    pytest.skip("Ray is not installed (pip install -r requirements-ray.txt)", allow_module_level=True)

# Ray turns 127.0.0.1 into the machine's address and opens its ports on every interface unless
# it runs as a single-machine cluster: this switch, read when ray is first imported (so before
# any test here imports it) and inherited by the cluster's processes, keeps the node, its gRPC
# ports and its agents on 127.0.0.1. Only Ray reads these.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

pytestmark = [
    pytest.mark.e2e,
    # Ray's own pydantic models use pydantic-1 idioms: not ours to fix, and not to hide ours.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray"),
]

QUESTION = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
LONG = {"stream": True, "messages": QUESTION, "max_tokens": 2000, "temperature": 0.9, "repetition_penalty": 1.0}


@pytest.fixture(scope="module")
def ray_serve_app(smollm2_cache_dir):
    """(url, replica log folder) of glm-api served by Ray Serve with 2 replicas; the cluster
    (~0.75 GB, and ~1.2 GB a replica) is stopped as soon as this module is done with it."""
    import ray
    from ray import serve

    from glm_api.ray_serve import build

    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", num_cpus=2,
             log_to_driver=False, configure_logging=False)
    try:
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build({
            "num_replicas": 2, "ray_actor_options": {"num_cpus": 1}, "torch_threads": 1,
            "cache_dir": str(smollm2_cache_dir), "max_running": 1, "max_waiting": 0, "kv_cache_tokens": 8192,
        })
        serve.run(app, name="glm-api", route_prefix="/")
        logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
        yield f"http://127.0.0.1:{port}", logs
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def test_a_streamed_chat_arrives_event_by_event_through_the_proxy(ray_serve_app):
    url, _ = ray_serve_app

    async def scenario():
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"stream": True, "messages": QUESTION, "max_tokens": 48, "temperature": 0}
            async with client.stream("POST", f"{url}/chat", json=body) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                return await timed_sse_events(response)

    events = asyncio.run(scenario())
    content_times = [t for t, e in events if e != "[DONE]" and e["choices"][0]["delta"].get("content")]
    assert len(content_times) > 10
    assert content_times[0] < 0.5 * content_times[-1], "buffered by the proxy, not streamed"
    assert events[-1][1] == "[DONE]"


def test_a_full_replica_answers_429_and_a_disconnect_frees_its_slot(ray_serve_app):
    url, _ = ray_serve_app

    async def scenario():
        async with httpx.AsyncClient(timeout=60) as client:
            # One long stream per replica (the proxy sends the second to the idle one).
            streams = [client.stream("POST", f"{url}/chat", json=LONG) for _ in range(2)]
            responses = [await s.__aenter__() for s in streams]
            # One line iterator per stream, kept open: closing it would close the connection.
            lines = [r.aiter_lines() for r in responses]
            try:
                assert [r.status_code for r in responses] == [200, 200]
                for stream_lines in lines:
                    seen = 0
                    while seen < 3:
                        seen += (await anext(stream_lines)).startswith("data:")
                refused = await client.post(f"{url}/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 4})
            finally:
                for s in streams:  # leave mid-stream
                    await s.__aexit__(None, None, None)
            started = time.monotonic()
            while True:  # the proxy cancels the replica's request; its engine drops the row
                answers = await asyncio.gather(*[
                    client.post(f"{url}/chat", json={"messages": QUESTION, "max_tokens": 4, "temperature": 0})
                    for _ in range(2)
                ])
                if all(a.status_code == 200 for a in answers) or time.monotonic() - started > 20:
                    return refused, answers, time.monotonic() - started
                await asyncio.sleep(0.5)

    refused, answers, waited = asyncio.run(scenario())
    assert refused.status_code == 429, refused.text
    assert refused.headers.get("retry-after")
    error = refused.json()["error"]
    assert error["type"] and error["message"] and set(error) == {"message", "type", "param", "code"}
    # 2000 tokens would hold the slots for minutes on this CPU; freed, both answer in seconds.
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert waited < 20, waited


def test_requests_reach_both_replicas_and_their_ids_are_in_the_replica_logs(ray_serve_app):
    url, logs = ray_serve_app
    ids = [f"ray-e2e-{i}-{os.getpid()}" for i in range(16)]

    async def scenario():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*[
                client.post(f"{url}/embedding", json={"prompt": ["hello"]}, headers={"x-request-id": rid}) for rid in ids
            ])

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * len(ids)
    # The client's id comes back once (the proxy's copy; the replica's is dropped).
    assert [r.headers.get_list("x-request-id") for r in responses] == [[rid] for rid in ids]
    deadline = time.monotonic() + 10
    while True:  # one log file per replica (a replica Serve replaced leaves its own)
        logged = [f.read_text(errors="replace") for f in logs.glob("replica_glm-api_GlmApi_*.log")]
        served = [s for s in ({rid for rid in ids if f" {rid} POST /embedding 200" in text} for text in logged) if s]
        if (len(served) >= 2 and set().union(*served) == set(ids)) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(served) >= 2, f"one replica got every request: {[len(s) for s in served]}"
    assert set().union(*served) == set(ids)


def test_routes_answer_as_the_single_process_server_does(ray_serve_app, client):
    """The same requests to Ray Serve and to the same app in this process (``client``)."""
    url, _ = ray_serve_app
    requests = [
        ("POST", "/embedding", {"prompt": ["hello world", "a second, longer sentence to embed"]}),
        ("POST", "/v1/embeddings", {"input": ["hello world"], "model": "all-MiniLM-L6-v2", "encoding_format": "float"}),
        ("POST", "/tokenize", {"prompt": "Hello there, how are you?"}),
        ("POST", "/chat", {"messages": QUESTION, "max_tokens": 12, "temperature": 0}),
        ("POST", "/v1/chat/completions", {"model": "no-such-model", "messages": QUESTION}),
        ("POST", "/chat", {"messages": []}),
        ("POST", "/v1/embeddings", {"input": "x", "model": "all-MiniLM-L6-v2", "dimensions": "many"}),
        ("GET", "/models", None),
        ("GET", "/v1/models", None),
        ("GET", "/ready", None),
        ("GET", "/health", None),
        ("GET", "/no/such/route", None),
        ("GET", "/", None),  # the playground's page where it is on
    ]
    with httpx.Client(base_url=url, timeout=60) as remote:
        for method, path, body in requests:
            ours, theirs = remote.request(method, path, json=body), client.request(method, path, json=body)
            assert ours.status_code == theirs.status_code, (path, ours.text, theirs.text)
            assert ours.headers["content-type"] == theirs.headers["content-type"], path
            if ours.headers["content-type"].startswith("application/json"):
                assert _same(ours.json(), theirs.json()), (path, ours.text[:500], theirs.text[:500])
            else:
                assert ours.content == theirs.content, path
        metrics = remote.get("/metrics")
        assert metrics.status_code == 200 and "glm_api_" in metrics.text


def _same(a, b) -> bool:
    """Equal but for what differs between any two calls (ids, creation times) and float noise
    (the replicas run torch on 1 thread, this process on more)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) - {"id", "created"}
        return keys == set(b) - {"id", "created"} and all(_same(a[k], b[k]) for k in keys)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-5
    return a == b


def test_the_builder_refuses_bad_settings_with_a_clear_message():
    from glm_api.ray_serve import build

    cases = [
        ({"max_runing": 8}, "unknown argument 'max_runing'; did you mean 'max_running'?"),
        ({"max_running": 0}, "max_running: Input should be greater than or equal to 1"),
        ({"dtype": "float64"}, "dtype: Input should be 'auto', 'float32', 'float16' or 'bfloat16'"),
        ({"port": 9000}, "http_options.port in the Serve config"),
        ({"device": "cuda"}, "set ray_actor_options: {num_gpus: 1}"),
        ({"device": "cuda:0,cuda:1", "ray_actor_options": {"num_gpus": 1}}, "names 2 GPUs but each replica reserves"),
        ({"num_replicas": 2, "autoscaling_config": {"max_replicas": 4}}, "not both"),
        ({"torch_threads": 0}, "torch_threads must be a whole number of at least 1"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError) as caught:
            build(args)
        assert message in str(caught.value), (args, str(caught.value))
    # Serve passes `key=value` words from the command line as strings; dashes work as in flags.
    app = build({"max-running": "8", "embedding_models": "a=/x,b=/y", "num_replicas": 2})
    deployment = app._bound_deployment
    assert deployment.name == "GlmApi" and deployment.num_replicas == 2
    assert deployment.max_ongoing_requests == 8 + 256 + 4096  # what the engines hold: they answer 429 past it
    settings_args, threads = deployment.init_args
    assert settings_args == {"max_running": "8", "embedding_models": "a=/x,b=/y"} and threads == 1


def test_nothing_but_the_ray_module_imports_ray():
    code = (
        "import sys, glm_api.app, glm_api.cli, glm_api.registry\n"
        "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'\n"
        "import glm_api.ray_serve\n"
        "assert 'ray.serve' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_replica_without_its_model_folder_fails_with_the_path_in_serve_status(ray_serve_app):
    from ray import serve

    from glm_api.ray_serve import build

    app = build({"chat_model": "/no/such/model", "max_constructor_retry_count": 1,
                 "ray_actor_options": {"num_cpus": 0}})  # the 2 running replicas hold the cluster's CPUs
    with pytest.raises(RuntimeError):
        serve.run(app, name="glm-api-broken", route_prefix="/broken")
    try:
        status = serve.status().applications["glm-api-broken"]
        assert status.status == "DEPLOY_FAILED"
        assert "chat model path '/no/such/model' does not exist" in status.deployments["GlmApi"].message
    finally:
        serve.delete("glm-api-broken")


@pytest.mark.parametrize("config", ["serve.yaml", "serve-gpu.yaml"])
def test_the_shipped_serve_configs_are_valid_and_build(config):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from glm_api.ray_serve import build

    schema = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "deploy" / "ray" / config).read_text()))
    (application,) = schema.applications
    assert application.import_path == "glm_api.ray_serve:build"
    deployment = build(application.args)._bound_deployment
    assert deployment.name == "GlmApi"
