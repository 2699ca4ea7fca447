"""The server on Ray Serve: the application builder's arguments (no Ray started), and a real
local Ray cluster with two replicas of the tiny model, run inside a network namespace that has
nothing but ``lo`` (tests/e2e/ray_serve_driver.py does the operator's part; this file judges).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from openelm_server.serving.ray_serve import BuildArgsError, build_app

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "tests" / "e2e" / "ray_serve_driver.py"
REQUIRED = {"model_path": "/models/m", "tokenizer_path": "/models/t"}


def deployment_of(app):
    deployment = app._bound_deployment
    return deployment, deployment._deployment_config, deployment.init_args[0]


def test_serve_run_arguments_become_settings_and_deployment_options():
    # `serve run ... key=value` hands every value over as a string.
    app = build_app(
        {
            **REQUIRED,
            "device": "cpu",
            "num_replicas": "2",
            "max_batch_size": "8",
            "max_queue": "16",
            "cuda_graphs": "false",
            "log_prompts": "0",
            "cors_origins": "http://a.example,http://b.example",
            "shutdown_timeout": "12.5",
            "api_key": "k",
        }
    )
    deployment, config, settings = deployment_of(app)
    assert (settings.model_path, settings.max_batch_size, settings.max_queue) == ("/models/m", 8, 16)
    assert (settings.cuda_graphs, settings.log_prompts, settings.api_key) == (False, False, "k")
    assert settings.cors_origins == ("http://a.example", "http://b.example")
    assert config.num_replicas == 2 and config.autoscaling_config is None
    # Ray hands a replica no more than its engine takes (running + waiting), and holds max_queue more.
    assert (config.max_ongoing_requests, config.max_queued_requests) == (8 + 16, 16)
    assert (config.backpressure_config.status_code, config.backpressure_config.retry_after_s) == (503, 1)
    assert config.graceful_shutdown_timeout_s == 12.5
    assert deployment.ray_actor_options["num_gpus"] == 0
    assert not ray.is_initialized()  # building the application starts nothing


def test_config_file_arguments_keep_their_yaml_types():
    app = build_app(
        {
            **REQUIRED,
            "device": "cpu",
            "num_replicas": 3,
            "compile": False,
            "prefix_caching": False,
            "cors_origins": ["http://a.example", "http://b.example"],
            "max_model_len": 512,
            "api_key": None,
        }
    )
    _, config, settings = deployment_of(app)
    assert config.num_replicas == 3 and settings.max_model_len == 512
    assert (settings.compile, settings.prefix_caching, settings.api_key) == (False, False, None)
    assert settings.cors_origins == ("http://a.example", "http://b.example")


def test_cuda_takes_one_gpu_per_replica_and_auto_means_cuda():
    for device in ("cuda", "auto"):
        deployment, _, settings = deployment_of(build_app({**REQUIRED, "device": device}))
        assert deployment.ray_actor_options["num_gpus"] == 1 and settings.device == "cuda"
    deployment, _, settings = deployment_of(build_app({**REQUIRED, "num_gpus": "0"}))
    assert deployment.ray_actor_options["num_gpus"] == 0 and settings.device == "cpu"


def test_autoscaling_on_ongoing_requests():
    _, config, _ = deployment_of(
        build_app(
            {
                **REQUIRED,
                "min_replicas": "1",
                "max_replicas": "6",
                "target_ongoing_requests": "20",
                "max_ongoing_requests": "50",
                "max_queued_requests": "7",
            }
        )
    )
    scaling = config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 6, 20)
    assert (config.max_ongoing_requests, config.max_queued_requests) == (50, 7)
    _, config, _ = deployment_of(build_app({**REQUIRED, "max_replicas": 3}))
    # The default target: a full batch per replica.
    assert config.autoscaling_config.target_ongoing_requests == 32


@pytest.mark.parametrize(
    "args, message",
    [
        ({"max_batch_sise": "8", "colour": "red"}, "unknown argument(s) colour, max_batch_sise"),
        ({"port": "8000"}, "port: on Ray Serve the HTTP proxy listens for all replicas"),
        ({"max_batch_size": "0"}, "argument --max-batch-size: must be at least 1, got 0"),
        ({"dtype": "int8"}, "--dtype must be auto, bfloat16, float16 or float32, got 'int8'"),
        ({"cuda_graphs": "maybe"}, "cuda_graphs='maybe': expected true or false"),
        ({"num_replicas": "two"}, "num_replicas='two': expected an integer"),
        ({"num_replicas": 2.5}, "num_replicas=2.5: expected an integer"),
        ({"num_replicas": "2", "max_replicas": "4"}, "num_replicas fixes the replica count"),
        ({"min_replicas": "2"}, "needs max_replicas"),
        (
            {"min_replicas": "3", "max_replicas": "1"},
            "max_replicas (1) must be greater than or equal to min_replicas (3)",
        ),
        ({"device": "cuda:1"}, "device=cuda:1: on Ray Serve each replica sees only the GPU Ray gives it"),
        ({"device": "cuda", "num_gpus": "0"}, "device=cuda needs num_gpus of at least 1"),
        ({"device": "cpu", "num_gpus": "1"}, "device=cpu with num_gpus=1 would hold GPUs"),
    ],
)
def test_bad_arguments_are_named(args, message):
    with pytest.raises(BuildArgsError) as raised:
        build_app({**REQUIRED, **args})
    assert message in str(raised.value)


def test_the_example_serve_config_is_valid():
    config = yaml.safe_load((ROOT / "deploy" / "ray" / "serve.yaml").read_text())
    [application] = ServeDeploySchema.model_validate(config).applications
    assert application.import_path == "openelm_server.serving.ray_serve:build_app"
    _, deployment_config, settings = deployment_of(build_app(application.args))
    assert deployment_config.autoscaling_config.max_replicas == 4
    assert settings.model_path == "/root/autodl-tmp/OpenELM-3B-Instruct"


def own_network_namespace_or_skip() -> None:
    """Ray must only ever see loopback: without a namespace of our own, no Ray test runs."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare (util-linux) and ip (iproute2) to give Ray a network namespace with only lo")
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a network namespace here (unshare -n needs root): {probe.stderr.strip()}")


@pytest.mark.timeout(480)
def test_two_replicas_on_a_local_ray_cluster(serving_dirs, tmp_path_factory):
    own_network_namespace_or_skip()
    model_dir, tokenizer_dir = serving_dirs
    # Short: Ray's unix socket paths live under it and must stay under 108 bytes.
    work = Path(tmp_path_factory.getbasetemp()) / "ray"
    work.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RAY_USAGE_STATS_ENABLED": "0",
        # Only loopback in a namespace of its own: no one else can reach the cluster, so no
        # token (Ray would write one to ~/.ray, shared with everyone on this machine).
        "RAY_AUTH_MODE": "disabled",
    }
    started = time.monotonic()
    done = subprocess.run(
        [
            "unshare",
            "-n",
            "sh",
            "-c",
            f"ip link set lo up && exec {sys.executable} {DRIVER} {model_dir} {tokenizer_dir} {work}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=450,
    )
    seconds = time.monotonic() - started
    facts_path = work / "facts.json"
    assert facts_path.is_file(), (
        f"the driver wrote nothing (rc {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    )
    facts = json.loads(facts_path.read_text())
    print(f"Ray test: {seconds:.0f} s in all, {facts.get('seconds_to_ready')} s until two replicas ran")
    assert "error" not in facts, facts["error"] + "\n" + replica_logs(work)

    assert facts["interfaces"] == ["lo"] and facts["node_ip"] == "127.0.0.1"
    # Nothing listens beyond loopback. Ray Serve 2.60's replicas bind their internal gRPC server to
    # [::] whatever the node's address (hard-coded); in this namespace that reaches only lo.
    assert all(
        address.rsplit(":", 1)[0] in ("127.0.0.1", "::ffff:127.0.0.1", "::1", "0.0.0.0", "::")
        for address in facts["listening"]
    ), facts["ss"]
    assert facts["serve_deploy"]["rc"] == 0, facts["serve_deploy"]
    assert "RUNNING: 2" in facts["serve_status"]["output"]

    routes = facts["routes"]
    assert {name: answer["status"] for name, answer in routes.items()} == {
        "GET /health": 200,
        "GET /metrics": 200,
        "GET /v1/models": 200,
        "POST /": 200,
        "POST / (bad input)": 400,
        "POST / (stream)": 200,
        "POST /v1/completions": 200,
        "POST /v1/chat/completions": 200,
        "POST /v1/chat/completions (stream)": 200,
        "POST /v1/completions (stream)": 200,
    }
    assert all(answer["replica_id"] for answer in routes.values())
    assert "openelm_requests_waiting" in routes["GET /metrics"]["body"]
    assert routes["POST / (stream)"]["body"] == json.loads(routes["POST /"]["body"])["response"]
    assert routes["POST /v1/completions (stream)"]["body"] == routes["POST /v1/completions"]["body"]
    assert len(facts["replica_ids_seen"]) == 2, "both replicas serve"

    # Full: every request beyond what the replicas and Ray's queue hold gets a 503 with Retry-After,
    # from Ray's queue limit (plain text) or from a replica's own queue (our JSON).
    overload = facts["overload"]
    refused = [answer for answer in overload if answer["status"] != 200]
    assert refused and all(answer["status"] == 503 and answer["retry_after"] == "1" for answer in refused), overload
    assert all("backpressure" in answer["body"] or "the server is busy" in answer["body"] for answer in refused)
    assert sum(answer["status"] == 200 for answer in overload) >= 2

    kill = facts["kill"]
    # The stream of the killed replica breaks off at once instead of hanging; the other requests
    # in flight end too, served (by the other replica) or refused.
    assert kill["seconds_until_stream_ended"] < 10, kill
    assert all(
        result.get("status") in (200, 500, 502, 503) or "error" in result for result in kill["unstreamed_in_flight"]
    )
    assert all(result["seconds"] < 90 for result in kill["unstreamed_in_flight"]), kill
    assert kill["victim"] not in kill["ids_while_replacing"][-1] and len(kill["ids_while_replacing"][-1]) == 2
    assert [answer["status"] for answer in kill["after"]] == [200] * 4

    assert facts["serve_shutdown"]["rc"] == 0
    assert facts["serve_processes_after_serve_shutdown"] == {}
    assert facts["processes_left_after_ray_shutdown"] == {}


def replica_logs(work: Path) -> str:
    logs = sorted((work / "ray").glob("session_*/logs/serve/replica_*.log"))
    return "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in logs)
