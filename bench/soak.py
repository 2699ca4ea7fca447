"""Soak test: thousands of mixed requests against one server, watching errors, latency and memory.

    # against a running server (its RSS is found from the listening port, or pass --pid)
    python -m bench.soak --url http://127.0.0.1:6006 --duration 600 --concurrency 32

    # start a server for the run (stopped with SIGTERM at the end)
    python -m bench.soak --launch ../shared/fixtures/openelm-tiny --tokenizer ../shared/fixtures/llama2-tokenizer \
        --duration 120 --concurrency 16 -- --max-batch-size 16 --max-model-len 512

The mix: the tutorial's POST / and the OpenAI completions and chat routes, streamed and not,
with random prompt and answer lengths; a share of the streams is dropped mid-way and a share of
the non-streamed requests is abandoned by a short client timeout (both must cancel the
generation on the server); a small share of invalid requests must get a 4xx. Every few seconds
the server's RSS and its /metrics gauges are sampled: a flat RSS is the goal.

It prints a table and writes everything to JSON (bench/results/soak-<time>.json by default).
It is a script, not a CI test. Exit status 0 when there were no unexpected errors, the server
drained (no request left running or waiting) and it still answers /health.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import urlparse

import httpx

from bench.common import percentile
from openelm_server.testing.server import ServerProcess

ROOT = Path(__file__).resolve().parents[1]

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven little birds sing about morning light "
    "in the old garden near the river where children play and people walk slowly home"
).split()
KINDS = ("tutorial", "tutorial-stream", "completions", "completions-stream", "chat", "chat-stream", "invalid")
DEFAULT_MIX = "tutorial=2,tutorial-stream=1,completions=2,completions-stream=2,chat=2,chat-stream=3,invalid=0.5"


# ---- the server's process --------------------------------------------------------------------


def rss_bytes(pid: int) -> int | None:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - the process is gone
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def pid_listening_on(port: int) -> int | None:
    """The pid of the local process listening on ``port`` (needs psutil; None if unknown)."""
    try:
        import psutil

        for connection in psutil.net_connections(kind="tcp"):
            if connection.laddr and connection.laddr.port == port and connection.status == psutil.CONN_LISTEN:
                return connection.pid
    except Exception:  # noqa: BLE001 - no psutil, or not allowed to look
        return None
    return None


# ---- requests --------------------------------------------------------------------------------


@dataclass
class Result:
    kind: str
    outcome: str  # "200", "400", ..., "disconnect", "client-timeout", "stream-error", "conn-error"
    expected: bool
    start: float
    latency: float
    ttft: float | None = None
    completion_tokens: int = 0
    detail: str = ""


@dataclass
class Sample:
    t: float
    rss_mb: float | None
    running: float | None
    waiting: float | None
    kv_usage: float | None
    requests_done: int


@dataclass
class Config:
    url: str
    concurrency: int
    duration: float
    mix: dict[str, float]
    prompt_words: tuple[int, int]
    max_tokens: tuple[int, int]
    disconnect_rate: float
    timeout_rate: float
    seed: int
    headers: dict[str, str] = field(default_factory=dict)


def prompt_text(rng: random.Random, words: tuple[int, int]) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))


def build(kind: str, rng: random.Random, config: Config) -> tuple[str, dict]:
    n = rng.randint(*config.max_tokens)
    text = prompt_text(rng, config.prompt_words)
    sampled = rng.random() < 0.5
    extra = {"temperature": 0.8, "top_p": 0.95, "seed": rng.randint(0, 2**31)} if sampled else {}
    if kind.startswith("tutorial"):
        body = {"prompt": text, "max_new_tokens": n, "stream": kind.endswith("stream")}
        if sampled:
            body.update(do_sample=True, **extra)
        return "/", body
    if kind.startswith("completions"):
        return "/v1/completions", {
            "prompt": text,
            "max_tokens": n,
            "stream": kind.endswith("stream"),
            "stream_options": {"include_usage": True} if kind.endswith("stream") else None,
            **extra,
        }
    if kind.startswith("chat"):
        messages = [{"role": "user", "content": text}]
        if rng.random() < 0.3:
            messages = [{"role": "system", "content": "Be brief."}, *messages]
        return "/v1/chat/completions", {
            "messages": messages,
            "max_tokens": n,
            "stream": kind.endswith("stream"),
            "stream_options": {"include_usage": True} if kind.endswith("stream") else None,
            **extra,
        }
    # invalid: each must be answered 4xx
    path = rng.choice(["/", "/v1/completions", "/v1/chat/completions"])
    body = rng.choice(
        [
            {"prompt": None},
            {"prompt": "x", "max_tokens": -1, "max_new_tokens": -1},
            {"messages": "nope"},
            {"prompt": "x", "temperature": "hot"},
            {},
        ]
    )
    return path, body


async def one_request(client: httpx.AsyncClient, kind: str, rng: random.Random, config: Config) -> Result:
    path, body = build(kind, rng, config)
    streaming = bool(body.get("stream"))
    started = time.monotonic()
    drop_after = rng.randint(1, 6) if streaming and rng.random() < config.disconnect_rate else None
    read_timeout = (
        rng.uniform(0.05, 0.4) if not streaming and kind != "invalid" and rng.random() < config.timeout_rate else None
    )

    def result(outcome: str, expected: bool, **kw) -> Result:
        return Result(kind, outcome, expected, started, time.monotonic() - started, **kw)

    try:
        if not streaming:
            timeout = httpx.Timeout(120, read=read_timeout) if read_timeout else None
            kwargs = {"timeout": timeout} if timeout else {}
            response = await client.post(config.url + path, json=body, headers=config.headers, **kwargs)
            if kind == "invalid":
                return result(str(response.status_code), 400 <= response.status_code < 500)
            tokens = 0
            if response.status_code == 200 and path != "/":
                tokens = response.json().get("usage", {}).get("completion_tokens", 0)
            return result(
                str(response.status_code),
                response.status_code == 200,
                completion_tokens=tokens,
                detail="" if response.status_code == 200 else response.text[:200],
            )
        async with client.stream("POST", config.url + path, json=body, headers=config.headers) as response:
            if response.status_code != 200:
                return result(str(response.status_code), False, detail=(await response.aread())[:200].decode())
            ttft = None
            chunks = 0
            tokens = 0
            text = []
            async for chunk in response.aiter_text():
                chunks += 1
                if ttft is None:
                    ttft = time.monotonic() - started
                text.append(chunk)
                if drop_after is not None and chunks >= drop_after:
                    return result("disconnect", True, ttft=ttft)  # leaving the block closes the connection
            whole = "".join(text)
            if path != "/":
                # Events are parsed: a random-weight model's text may well contain the word "error".
                # SSE lines end at "\n" only; str.splitlines would also cut at U+2028 and the like,
                # which a random-weight model's text contains and JSON carries unescaped.
                events = [json.loads(line[6:]) for line in whole.split("\n") if line.startswith("data: {")]
                if any("error" in event for event in events) or not whole.rstrip().endswith("data: [DONE]"):
                    return result("stream-error", False, ttft=ttft, detail=whole[-200:])
                for event in events:
                    if event.get("usage"):
                        tokens = event["usage"].get("completion_tokens", 0)
            return result("200", True, ttft=ttft, completion_tokens=tokens)
    except httpx.ReadTimeout:
        if read_timeout:
            return result("client-timeout", True)
        return result("conn-error", False, detail="ReadTimeout")
    except httpx.HTTPError as error:
        return result("conn-error", False, detail=f"{type(error).__name__}: {error}"[:200])


async def worker(index: int, client: httpx.AsyncClient, config: Config, deadline: float, results: list[Result]):
    rng = random.Random(config.seed * 1000 + index)
    kinds = list(config.mix)
    weights = [config.mix[k] for k in kinds]
    while time.monotonic() < deadline:
        results.append(await one_request(client, rng.choices(kinds, weights)[0], rng, config))


async def scrape_gauges(client: httpx.AsyncClient, config: Config) -> dict[str, float]:
    gauges = {}
    with contextlib.suppress(httpx.HTTPError):
        response = await client.get(config.url + "/metrics", headers=config.headers, timeout=10)
        for line in response.text.splitlines():
            for name in ("openelm_requests_running", "openelm_requests_waiting", "openelm_kv_cache_usage_ratio"):
                if line.startswith(name + " "):
                    gauges[name] = float(line.split()[1])
    return gauges


async def sampler(
    client: httpx.AsyncClient,
    config: Config,
    pid: int | None,
    interval: float,
    start: float,
    deadline: float,
    results: list[Result],
    samples: list[Sample],
    progress: bool,
):
    while True:
        gauges = await scrape_gauges(client, config)
        rss = rss_bytes(pid) if pid else None
        samples.append(
            Sample(
                round(time.monotonic() - start, 2),
                round(rss / 2**20, 1) if rss else None,
                gauges.get("openelm_requests_running"),
                gauges.get("openelm_requests_waiting"),
                gauges.get("openelm_kv_cache_usage_ratio"),
                len(results),
            )
        )
        if progress:
            s = samples[-1]
            print(
                f"  t={s.t:7.1f}s  requests={s.requests_done:6d}  rss={s.rss_mb} MiB  "
                f"running={s.running} waiting={s.waiting}",
                file=sys.stderr,
                flush=True,
            )
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))


async def run(config: Config, pid: int | None, sample_interval: float, progress: bool):
    results: list[Result] = []
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=config.concurrency + 8, max_keepalive_connections=config.concurrency + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300), limits=limits) as client:
        start = time.monotonic()
        deadline = start + config.duration
        tasks = [asyncio.create_task(worker(i, client, config, deadline, results)) for i in range(config.concurrency)]
        watcher = asyncio.create_task(
            sampler(client, config, pid, sample_interval, start, deadline, results, samples, progress)
        )
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - start
        await watcher
        # The server must drain: nothing left running or waiting once the clients are gone.
        drained_after = None
        drain_start = time.monotonic()
        while time.monotonic() - drain_start < 15:
            gauges = await scrape_gauges(client, config)
            if gauges.get("openelm_requests_running") == 0 and gauges.get("openelm_requests_waiting") == 0:
                drained_after = round(time.monotonic() - drain_start, 2)
                break
            await asyncio.sleep(0.1)
        final = await scrape_gauges(client, config)
        rss = rss_bytes(pid) if pid else None
        samples.append(
            Sample(
                round(time.monotonic() - start, 2),
                round(rss / 2**20, 1) if rss else None,
                final.get("openelm_requests_running"),
                final.get("openelm_requests_waiting"),
                final.get("openelm_kv_cache_usage_ratio"),
                len(results),
            )
        )
        try:
            healthy = (await client.get(config.url + "/health", timeout=10)).status_code == 200
        except httpx.HTTPError:
            healthy = False
    return results, samples, elapsed, drained_after, healthy


# ---- the report ------------------------------------------------------------------------------


def latency_summary(values: list[float]) -> dict:
    return {
        "count": len(values),
        **{f"p{q}": round(percentile(values, q) * 1000, 1) if values else None for q in (50, 90, 99)},
        "max": round(max(values) * 1000, 1) if values else None,
    }


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in points) / var


def summarize(results: list[Result], samples: list[Sample], elapsed: float, warmup: float) -> dict:
    by_outcome = Counter(r.outcome for r in results)
    by_kind_outcome: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        by_kind_outcome[r.kind][r.outcome] += 1
    unexpected = [r for r in results if not r.expected]
    complete = [r for r in results if r.outcome == "200"]
    latency = {
        kind: latency_summary([r.latency for r in complete if r.kind == kind]) for kind in KINDS if kind != "invalid"
    }
    latency["all"] = latency_summary([r.latency for r in complete])
    ttft = latency_summary([r.ttft for r in complete if r.ttft is not None])
    rss = [(s.t, s.rss_mb) for s in samples if s.rss_mb is not None]
    steady = [(t, v) for t, v in rss if t >= warmup] or rss
    memory = None
    if rss:
        memory = {
            "first_mb": rss[0][1],
            "after_warmup_mb": steady[0][1],
            "min_mb": min(v for _, v in rss),
            "max_mb": max(v for _, v in rss),
            "last_mb": rss[-1][1],
            "growth_after_warmup_mb": round(rss[-1][1] - steady[0][1], 1),
            "slope_after_warmup_mb_per_min": (round(s, 2) if (s := slope_per_minute(steady)) is not None else None),
        }
    return {
        "requests": len(results),
        "requests_per_second": round(len(results) / elapsed, 2) if elapsed else None,
        "completed_tokens_reported": sum(r.completion_tokens for r in results),
        "outcomes": dict(by_outcome.most_common()),
        "outcomes_by_kind": {k: dict(v.most_common()) for k, v in sorted(by_kind_outcome.items())},
        "unexpected": len(unexpected),
        "unexpected_examples": [asdict(r) for r in unexpected[:10]],
        "latency_ms": latency,
        "stream_ttft_ms": ttft,
        "memory": memory,
    }


def print_report(summary: dict, samples: list[Sample], drained_after, healthy, stop_info) -> None:
    print(
        f"\nrequests: {summary['requests']}  ({summary['requests_per_second']} req/s)   "
        f"unexpected: {summary['unexpected']}"
    )
    print("\noutcome                count   (expected: 200; 4xx for 'invalid'; 'disconnect'/'client-timeout' are ours)")
    for outcome, count in summary["outcomes"].items():
        print(f"  {outcome:<20} {count:6d}")
    print("\nby kind               " + " ".join(f"{o:>14}" for o in summary["outcomes"]))
    for kind, outcomes in summary["outcomes_by_kind"].items():
        print(f"  {kind:<20}" + " ".join(f"{outcomes.get(o, 0):>14}" for o in summary["outcomes"]))
    print("\nlatency of complete requests (ms)   count      p50      p90      p99      max")
    for kind, row in summary["latency_ms"].items():
        if row["count"]:
            print(
                f"  {kind:<32} {row['count']:6d} {row['p50']:8.1f} {row['p90']:8.1f} {row['p99']:8.1f} "
                f"{row['max']:8.1f}"
            )
    row = summary["stream_ttft_ms"]
    if row["count"]:
        print(
            f"  {'time to first chunk (streams)':<32} {row['count']:6d} {row['p50']:8.1f} {row['p90']:8.1f} "
            f"{row['p99']:8.1f} {row['max']:8.1f}"
        )
    memory = summary["memory"]
    if memory:
        print(
            f"\nserver RSS (MiB): first {memory['first_mb']}, after warm-up {memory['after_warmup_mb']}, "
            f"min {memory['min_mb']}, max {memory['max_mb']}, last {memory['last_mb']}; "
            f"growth after warm-up {memory['growth_after_warmup_mb']} MiB, "
            f"slope {memory['slope_after_warmup_mb_per_min']} MiB/min"
        )
        step = max(1, len(samples) // 12)
        print("  t(s)    " + " ".join(f"{s.t:7.0f}" for s in samples[::step]))
        print("  RSS     " + " ".join(f"{s.rss_mb:7.1f}" if s.rss_mb else "      -" for s in samples[::step]))
    else:
        print("\nserver RSS: unknown (pass --pid, or install psutil)")
    print(
        f"\ndrained (running = waiting = 0) {f'after {drained_after:.2f} s' if drained_after is not None else 'NO'}; "
        f"/health afterwards: {'ok' if healthy else 'FAILED'}"
    )
    if stop_info:
        print(
            f"server stopped with {stop_info['signal']}: exit status {stop_info['exit_status']} "
            f"in {stop_info['seconds']} s"
        )


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in KINDS:
            raise argparse.ArgumentTypeError(f"unknown kind {name!r}; kinds: {', '.join(KINDS)}")
        mix[name] = float(weight or 1)
    return {k: v for k, v in mix.items() if v > 0}


def parse_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    return int(low), int(high or low)


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Arguments after '--' are passed to api.py with --launch.",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server")
    target.add_argument("--launch", metavar="MODEL_DIR", help="start `python api.py` on this model for the run")
    parser.add_argument("--tokenizer", help="tokenizer directory, with --launch")
    parser.add_argument(
        "--pid", type=int, help="the server's pid, for its RSS (found from the listening port when not given)"
    )
    parser.add_argument("--api-key", default=os.environ.get("API_KEY"), help="sent as a bearer token [env API_KEY]")
    parser.add_argument("--duration", type=float, default=120, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--mix", type=parse_mix, default=DEFAULT_MIX, help="kind=weight,...")
    parser.add_argument("--prompt-words", type=parse_range, default=(4, 120), help="prompt length range, words")
    parser.add_argument("--max-tokens", type=parse_range, default=(8, 64), help="answer length range, tokens")
    parser.add_argument(
        "--disconnect-rate", type=float, default=0.15, help="share of streams dropped after a few chunks"
    )
    parser.add_argument(
        "--timeout-rate",
        type=float,
        default=0.05,
        help="share of non-streamed requests abandoned by a short client timeout",
    )
    parser.add_argument("--sample-interval", type=float, default=5, help="seconds between RSS / gauge samples")
    parser.add_argument("--warmup", type=float, default=15, help="seconds before the RSS baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON report (default bench/results/soak-<time>.json)")
    parser.add_argument("--no-progress", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    server_flags: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, server_flags = argv[:split], argv[split + 1 :]
    args = parser.parse_args(argv)
    if args.launch and not args.tokenizer:
        parser.error("--launch needs --tokenizer")
    return args, server_flags


def main(argv=None) -> int:
    args, server_flags = parse_args(argv)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"soak-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    launched = None
    if args.launch:
        flags = server_flags + (["--api-key", args.api_key] if args.api_key else [])
        launched = ServerProcess.openelm(args.launch, args.tokenizer, flags, log_path=out.with_suffix(".server.log"))
        print(f"starting {' '.join(launched.command)}", file=sys.stderr)
        launched.wait_ready()
        url, pid = launched.url, launched.process.pid
    else:
        url = args.url.rstrip("/")
        pid = args.pid or pid_listening_on(urlparse(url).port or 80)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    config = Config(
        url=url,
        concurrency=args.concurrency,
        duration=args.duration,
        mix=args.mix,
        prompt_words=args.prompt_words,
        max_tokens=args.max_tokens,
        disconnect_rate=args.disconnect_rate,
        timeout_rate=args.timeout_rate,
        seed=args.seed,
        headers=headers,
    )
    print(f"soak: {url} (pid {pid}), {args.concurrency} in flight for {args.duration:g} s", file=sys.stderr)
    stop_info = None
    try:
        results, samples, elapsed, drained_after, healthy = asyncio.run(
            run(config, pid, args.sample_interval, not args.no_progress)
        )
    finally:
        if launched:
            stopping = time.monotonic()
            stop_info = {
                "signal": "SIGTERM",
                "exit_status": launched.stop(timeout=60),
                "seconds": round(time.monotonic() - stopping, 3),
            }
    summary = summarize(results, samples, elapsed, args.warmup)
    print_report(summary, samples, drained_after, healthy, stop_info)
    report = {
        "when": stamp,
        "url": url,
        "pid": pid,
        "command": launched.command if launched else None,
        "settings": {k: v for k, v in vars(args).items() if k not in ("api_key",)},
        "server_flags": server_flags,
        "elapsed_s": round(elapsed, 2),
        "python": platform.python_version(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "drained_after_s": drained_after,
        "healthy_after": healthy,
        "server_stop": stop_info,
        "summary": summary,
        "samples": [asdict(s) for s in samples],
    }
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {out}")
    ok = summary["unexpected"] == 0 and drained_after is not None and healthy
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
