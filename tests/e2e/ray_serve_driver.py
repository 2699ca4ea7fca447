"""Runs the server on a local Ray cluster, as an operator would, and writes what it saw as JSON.

Only ever run by tests/e2e/test_ray_serve.py inside a network namespace of its own that has
nothing but ``lo``: Ray binds the machine's network interface unless it sees only loopback.
The test asserts on the JSON; this script only acts and records.

    python tests/e2e/ray_serve_driver.py MODEL_DIR TOKENIZER_DIR WORK_DIR
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import openai
import requests
import yaml

URL = "http://127.0.0.1:8000"
DASHBOARD = "http://127.0.0.1:8265"
# Two CPU replicas of the tiny model; an engine takes 2 running + 1 waiting requests, and Ray
# holds 1 more while both replicas are full: of 9 long requests at once, 2 must get Ray's 503.
APP_ARGS = {
    "device": "cpu",
    "num_replicas": "2",
    "max_batch_size": "2",
    "max_queue": "1",
    "max_model_len": "512",
    "max_queued_requests": "1",
    "log_prompts": "false",
    "shutdown_timeout": "5",
}
# What the two replicas take at once (2 x (2 + 1)); one more request would wait in Ray's queue.
CAPACITY = 6
# Long enough to be still running when the test acts on it (a replica killed, others turned away).
LONG = {"prompt": "Once upon a time", "max_new_tokens": 400}
MEDIUM = {"prompt": "Once upon a time", "max_new_tokens": 150}
REPLICA_SERVE_TIMEOUT = 120


def main(model_dir: str, tokenizer_dir: str, work_dir: str) -> int:
    work = Path(work_dir)
    facts: dict = {"interfaces": sorted(name for _, name in socket.if_nameindex())}
    started = time.monotonic()
    try:
        run(model_dir, tokenizer_dir, work, facts, started)
    except Exception:
        facts["error"] = traceback.format_exc()
    finally:
        facts["seconds_total"] = round(time.monotonic() - started, 1)
        (work / "facts.json").write_text(json.dumps(facts, indent=1))
    return 0


def run(model_dir: str, tokenizer_dir: str, work: Path, facts: dict, started: float) -> None:
    import ray

    ray.init(
        num_cpus=4,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _temp_dir=str(work / "ray"),
        log_to_driver=False,
        namespace="serve",
    )
    facts["node_ip"] = ray.util.get_node_ip_address()
    config = {
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "applications": [
            {
                "name": "openelm",
                "route_prefix": "/",
                "import_path": "openelm_server.serving.ray_serve:build_app",
                "args": {"model_path": model_dir, "tokenizer_path": tokenizer_dir, **APP_ARGS},
            }
        ],
    }
    config_path = work / "serve.yaml"
    config_path.write_text(yaml.safe_dump(config))
    facts["serve_deploy"] = cli(["serve", "deploy", "--address", DASHBOARD, str(config_path)])
    wait_until(lambda: running_replicas() == 2 and health_ok(), REPLICA_SERVE_TIMEOUT, "two replicas to run")
    facts["seconds_to_ready"] = round(time.monotonic() - started, 1)
    facts["serve_status"] = cli(["serve", "status", "--address", DASHBOARD])

    facts["routes"] = every_route()
    facts["replica_ids_seen"] = sorted(replica_ids_of_concurrent_requests(CAPACITY))
    facts["overload"] = overload(CAPACITY + 3)
    facts["listening"] = listening_sockets()
    facts["ss"] = cli(["ss", "-ltnp"])["output"]

    facts["kill"] = kill_a_replica_mid_request()
    facts["seconds_at_shutdown"] = round(time.monotonic() - started, 1)

    facts["serve_shutdown"] = cli(["serve", "shutdown", "--yes", "--address", DASHBOARD])
    wait_until(lambda: not serve_processes(), 60, "Serve's actors to exit")
    facts["serve_processes_after_serve_shutdown"] = serve_processes()
    ray.shutdown()
    wait_until(lambda: not other_processes_in_this_namespace(), 60, "Ray's processes to exit")
    facts["processes_left_after_ray_shutdown"] = other_processes_in_this_namespace()


def cli(command: list[str]) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    return {"command": " ".join(command), "rc": done.returncode, "output": (done.stdout + done.stderr)[-3000:]}


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:g} s for {what}")
        time.sleep(0.5)


def running_replicas() -> int:
    from ray import serve

    application = serve.status().applications.get("openelm")
    if application is None or "OpenELM" not in application.deployments:
        return 0
    return application.deployments["OpenELM"].replica_states.get("RUNNING", 0)


def health_ok() -> bool:
    try:
        return requests.get(URL + "/health", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def answer(response: requests.Response, body: str | None = None) -> dict:
    return {
        "status": response.status_code,
        "replica_id": response.headers.get("x-replica-id"),
        "content_type": response.headers.get("content-type"),
        "body": response.text if body is None else body,
    }


def every_route() -> dict:
    routes = {
        "GET /health": answer(requests.get(URL + "/health", timeout=30)),
        "GET /metrics": answer(requests.get(URL + "/metrics", timeout=30)),
        "GET /v1/models": answer(requests.get(URL + "/v1/models", timeout=30)),
        "POST /": answer(requests.post(URL + "/", json={"prompt": "Hello", "max_new_tokens": 8}, timeout=60)),
        "POST / (bad input)": answer(requests.post(URL + "/", json={"prompt": 5}, timeout=30)),
    }
    with requests.post(
        URL + "/", json={"prompt": "Hello", "max_new_tokens": 8, "stream": True}, stream=True, timeout=60
    ) as stream:
        routes["POST / (stream)"] = answer(stream, "".join(stream.iter_content(decode_unicode=True)))
    client = openai.OpenAI(base_url=URL + "/v1", api_key="none", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    completion = client.completions.with_raw_response.create(model=model, prompt="Hi", max_tokens=5, temperature=0)
    routes["POST /v1/completions"] = {
        "status": completion.status_code,
        "replica_id": completion.headers.get("x-replica-id"),
        "body": completion.parse().choices[0].text,
    }
    chat = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=5
    )
    routes["POST /v1/chat/completions"] = {
        "status": chat.status_code,
        "replica_id": chat.headers.get("x-replica-id"),
        "body": chat.parse().choices[0].message.content,
    }
    with client.chat.completions.with_streaming_response.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, stream=True
    ) as streamed:
        pieces = [chunk.choices[0].delta.content or "" for chunk in streamed.parse() if chunk.choices]
        routes["POST /v1/chat/completions (stream)"] = {
            "status": streamed.status_code,
            "replica_id": streamed.headers.get("x-replica-id"),
            "body": "".join(pieces),
        }
    with client.completions.with_streaming_response.create(
        model=model, prompt="Hi", max_tokens=5, temperature=0, stream=True
    ) as streamed:
        pieces = [chunk.choices[0].text for chunk in streamed.parse()]
        routes["POST /v1/completions (stream)"] = {
            "status": streamed.status_code,
            "replica_id": streamed.headers.get("x-replica-id"),
            "body": "".join(pieces),
        }
    return routes


def replica_ids_of_concurrent_requests(count: int) -> set[str]:
    def one(_):
        response = requests.post(URL + "/", json={"prompt": "Hi", "max_new_tokens": 16}, timeout=60)
        return response.headers.get("x-replica-id") if response.status_code == 200 else None

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return set(pool.map(one, range(count))) - {None}


def overload(count: int) -> list[dict]:
    """More long requests at once than the replicas and Ray's queue hold."""

    def one(_):
        response = requests.post(URL + "/", json=MEDIUM, timeout=120)
        return {
            "status": response.status_code,
            "retry_after": response.headers.get("retry-after"),
            "body": response.text[:200],
        }

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def kill_a_replica_mid_request() -> dict:
    """SIGKILL, as the OOM killer or a lost machine would: no chance to clean up."""
    facts: dict = {}
    pool = concurrent.futures.ThreadPoolExecutor(2)
    with requests.post(URL + "/", json={**LONG, "stream": True}, stream=True, timeout=30) as stream:
        victim = stream.headers["x-replica-id"]
        facts["victim"] = victim
        pieces = stream.iter_content(chunk_size=None, decode_unicode=True)
        first = next(pieces)
        # Two more in flight, unstreamed: whichever replica Ray gave them to, they must end.
        unstreamed = [pool.submit(timed_post, MEDIUM) for _ in range(2)]
        time.sleep(1)
        pid = int(victim.rsplit("-", 2)[1])
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        try:
            rest = "".join(pieces)
            facts["stream_end"] = f"ended after {len(first) + len(rest)} characters"
        except requests.RequestException as error:
            facts["stream_end"] = f"{type(error).__name__}: {error}"[:300]
        facts["seconds_until_stream_ended"] = round(time.monotonic() - killed, 1)
    facts["unstreamed_in_flight"] = [future.result() for future in unstreamed]
    pool.shutdown()

    def replacement_serves() -> bool:
        ids = replica_ids_of_concurrent_requests(CAPACITY)
        facts.setdefault("ids_while_replacing", []).append(sorted(ids))
        return len(ids) == 2 and victim not in ids

    wait_until(
        lambda: running_replicas() == 2 and replacement_serves(),
        REPLICA_SERVE_TIMEOUT,
        "a replacement replica to serve",
    )
    facts["seconds_until_replaced"] = round(time.monotonic() - killed, 1)
    facts["after"] = [
        answer(requests.post(URL + "/", json={"prompt": "Hi", "max_new_tokens": 4}, timeout=60)) for _ in range(4)
    ]
    return facts


def timed_post(body: dict) -> dict:
    started = time.monotonic()
    try:
        response = requests.post(URL + "/", json=body, timeout=120)
        result = {
            "status": response.status_code,
            "replica_id": response.headers.get("x-replica-id"),
            "body": response.text[:200],
        }
    except requests.RequestException as error:
        result = {"error": f"{type(error).__name__}: {error}"[:300]}
    return {**result, "seconds": round(time.monotonic() - started, 1)}


def listening_sockets() -> list[str]:
    """Every listening TCP socket in this network namespace, as address:port."""
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state != "0A":  # LISTEN
                continue
            address, port = local.split(":")
            raw = bytes.fromhex(address)
            if width == 8:
                text = socket.inet_ntop(socket.AF_INET, raw[::-1])
            else:  # four little-endian 32-bit words
                text = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
            found.append(f"{text}:{int(port, 16)}")
    return sorted(set(found))


def processes_in_this_namespace() -> dict[int, str]:
    mine = os.readlink("/proc/self/ns/net")
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns" / "net") == mine:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
        except OSError:  # exited meanwhile
            continue
    return found


def other_processes_in_this_namespace() -> dict[int, str]:
    """What is left besides this driver and the shell that started it."""
    return {pid: cmd for pid, cmd in processes_in_this_namespace().items() if pid not in (os.getpid(), os.getppid())}


def serve_processes() -> dict[int, str]:
    return {
        pid: cmd
        for pid, cmd in processes_in_this_namespace().items()
        if any(name in cmd for name in ("ServeController", "ProxyActor", "ServeReplica"))
    }


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
