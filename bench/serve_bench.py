"""Serving benchmark over HTTP, in the manner of vLLM's benchmark_serving.

Streams ``POST /v1/completions`` (OpenAI SSE, ``stream_options.include_usage``) from an async
httpx client and measures, per run: TTFT, TPOT (time per output token after the first), ITL
(every gap between streamed chunks), end-to-end latency (mean/p50/p90/p99), requests/s,
output tokens/s and total tokens/s. Token counts come from the server's usage chunk.

Against a running server:

    python -m bench.serve_bench --url http://127.0.0.1:6006 --tokenizer /path/to/llama2-tokenizer \\
        --concurrency 1,4,16,64 --num-requests 8,16,32,64 --out results.json

Or one command that starts ``python api.py`` on a free port and stops it at the end:

    python -m bench.serve_bench --launch MODEL_DIR --tokenizer TOK_DIR \\
        --server-flags "--max-batch-size 64 --max-model-len 1024" --concurrency 1,4,16,64

The prompt set is deterministic (seeded): input and output lengths uniform in
``--input-len``/``--output-len``, prompts made of single-token words so that with the Llama-2
tokenizer a prompt has exactly its input length. Requests are greedy (temperature 0) with
``max_tokens`` = the output length; a random-weight model may still emit EOS early, which the
usage chunk counts (``stopped_early`` in the results).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shlex
import sys
import time
from pathlib import Path

import httpx

from bench.common import (
    BenchRequest,
    RequestResult,
    aggregate,
    build_prompts,
    cpu_seconds,
    git_revision,
    load_tokenizer,
    machine_info,
    model_info,
    now_iso,
    parse_list,
    parse_range,
    versions,
    write_json,
)
from openelm_server.testing.server import ServerProcess

ROOT = Path(__file__).resolve().parents[1]

ENDPOINT = "/v1/completions"


# ---------------------------------------------------------------------------- one request


async def sse_lines(response: httpx.Response):
    """Lines of an event stream, split only at CR/LF as the SSE spec says. (httpx's
    aiter_lines also splits at U+2028, U+0085 and other Unicode line breaks, which a server may
    send raw inside JSON strings, so it would cut an event in two.)"""
    buffer = b""
    async for chunk in response.aiter_bytes():
        buffer += chunk
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                break
            line, buffer = buffer[:end], buffer[end + 1 :]
            yield line.rstrip(b"\r").decode("utf-8", errors="replace")
    if buffer:
        yield buffer.rstrip(b"\r").decode("utf-8", errors="replace")


async def send_request(
    client: httpx.AsyncClient, url: str, request: BenchRequest, model: str | None = None, endpoint: str = ENDPOINT
) -> RequestResult:
    """Stream one completion; time the first text chunk, every later chunk, and the end."""
    payload = {
        "prompt": request.prompt,
        "max_tokens": request.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model:
        payload["model"] = model
    result = RequestResult(prompt_tokens=request.input_len)
    chunks = 0
    last = None
    start = result.start = time.perf_counter()
    try:
        async with client.stream("POST", url + endpoint, json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:200]}"
                return result
            async for line in sse_lines(response):
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                message = json.loads(data)
                if "error" in message:
                    result.error = f"stream error: {message['error'].get('message', message['error'])}"[:200]
                    return result
                for choice in message.get("choices") or ():
                    if choice.get("text"):
                        if last is None:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        last = now
                        chunks += 1
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
                usage = message.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens", result.prompt_tokens)
                    result.output_tokens = usage.get("completion_tokens", 0)
        result.end = time.perf_counter()
        result.latency = result.end - start
        if not result.output_tokens:  # a server without usage: count text chunks
            result.output_tokens = chunks
        if last is None:  # no text at all (e.g. EOS at once): the first token is the end
            result.ttft = result.latency
        result.ok = True
    except (httpx.HTTPError, ValueError, KeyError) as error:
        result.error = f"{type(error).__name__}: {error}"[:200]
    finally:
        if not result.end:
            result.end = time.perf_counter()
    return result


# ---------------------------------------------------------------------------- one run


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(
        total=total, desc=desc, unit="req", file=sys.stderr, disable=not enabled, leave=True, dynamic_ncols=True
    )


def _client(concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=max(concurrency, 1) + 4, max_keepalive_connections=max(concurrency, 1) + 4)
    return httpx.AsyncClient(timeout=httpx.Timeout(3600.0, connect=30.0), limits=limits)


async def run_requests(
    url: str,
    requests: list[BenchRequest],
    concurrency: int | None = None,
    request_rate: float = math.inf,
    seed: int = 0,
    model: str | None = None,
    progress: bool = True,
    desc: str = "",
    endpoint: str = ENDPOINT,
) -> list[RequestResult]:
    """Send ``requests``: with ``concurrency`` clients each sending its next request as soon as
    its last one ends, or at Poisson arrivals of ``request_rate`` per second (inf = all at
    once), capped at ``concurrency`` in flight when both are given."""
    limit = concurrency or len(requests)
    semaphore = asyncio.Semaphore(limit)
    bar = _progress(len(requests), desc, progress)
    rng = random.Random(f"arrivals:{seed}")

    async with _client(limit) as client:

        async def one(request: BenchRequest) -> RequestResult:
            async with semaphore:
                result = await send_request(client, url, request, model, endpoint)
            if bar is not None:
                bar.update(1)
            return result

        tasks = []
        for request in requests:
            tasks.append(asyncio.create_task(one(request)))
            if request_rate != math.inf:
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
    if bar is not None:
        bar.close()
    return list(results)


def _load_average() -> list[float] | None:
    import os

    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_one(
    url: str,
    requests: list[BenchRequest],
    concurrency: int | None = None,
    request_rate: float = math.inf,
    seed: int = 0,
    model: str | None = None,
    progress: bool = True,
    server: ServerProcess | None = None,
    label: str = "",
    endpoint: str = ENDPOINT,
    keep_results: bool = False,
) -> dict:
    """One measured run; returns its metrics and the conditions it ran under (and, with
    ``keep_results``, the per-request results under ``"_results"``, to pool runs later)."""
    if concurrency is not None and request_rate == math.inf:
        desc = f"{label} c={concurrency}".strip()
    else:
        desc = f"{label} rate={request_rate:g}/s".strip()
    load_before = _load_average()
    cpu_before = cpu_seconds(server) if server else None
    start = time.perf_counter()
    results = asyncio.run(run_requests(url, requests, concurrency, request_rate, seed, model, progress, desc, endpoint))
    duration = time.perf_counter() - start
    cpu_after = cpu_seconds(server) if server else None
    cpu = cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None
    metrics = aggregate(results, duration)
    run = {
        "label": label,
        "mode": "concurrency" if request_rate == math.inf else "request_rate",
        "concurrency": concurrency,
        "request_rate": None if request_rate == math.inf else request_rate,
        "num_requests": len(requests),
        **metrics,
        "load_average_before": load_before,
        "load_average_after": _load_average(),
        # how many of the machine's cores the server kept busy, and its CPU time per token:
        # both tell a run slowed by other processes (low utilization) from a slow server
        "server_cpu_utilization": cpu / duration if cpu is not None and duration else None,
        "server_cpu_ms_per_output_token": 1000 * cpu / metrics["total_output_tokens"]
        if cpu is not None and metrics["total_output_tokens"]
        else None,
        "date": now_iso(),
    }
    if keep_results:
        run["_results"] = results
    return run


def warm_up(url: str, model: str | None = None, count: int = 1, endpoint: str = ENDPOINT) -> None:
    """Unmeasured requests first, so that one-time costs (allocations, lazy imports) are paid."""
    request = BenchRequest(" ".join(["hello"] * 15), 16, 8)
    for _ in range(count):
        asyncio.run(run_requests(url, [request], 1, model=model, progress=False, endpoint=endpoint))


def server_max_model_len(url: str) -> int | None:
    try:
        data = httpx.get(url + "/v1/models", timeout=10).json()
        return data["data"][0].get("max_model_len")
    except Exception:
        return None


def format_run(run: dict) -> str:
    """One line per run for the terminal."""
    where = f"c={run['concurrency']}" if run["mode"] == "concurrency" else f"rate={run['request_rate']:g}/s"

    def ms(metric: str, key: str) -> str:
        value = run[metric][key]
        return "-" if value is None else f"{value:.0f}"

    return (
        f"{run['label'] or 'run'} {where}: {run['completed']}/{run['num_requests']} ok in {run['duration_s']:.1f} s | "
        f"{run['request_throughput']:.2f} req/s, {run['output_throughput']:.1f} out tok/s, "
        f"{run['total_token_throughput']:.1f} total tok/s | TTFT p50 {ms('ttft_ms', 'p50')} p99 "
        f"{ms('ttft_ms', 'p99')} ms | TPOT p50 {ms('tpot_ms', 'p50')} p99 {ms('tpot_ms', 'p99')} ms | "
        f"ITL p50 {ms('itl_ms', 'p50')} p99 {ms('itl_ms', 'p99')} ms | E2E p50 {ms('e2el_ms', 'p50')} "
        f"p99 {ms('e2el_ms', 'p99')} ms" + (f" | errors: {run['errors']}" if run["errors"] else "")
    )


# ---------------------------------------------------------------------------- the sweep


def sweep(
    url: str,
    prompts: list[BenchRequest],
    concurrencies: list[int] | None,
    rates: list[float] | None,
    num_requests: list[int],
    seed: int = 0,
    max_concurrency: int | None = None,
    model: str | None = None,
    progress: bool = True,
    server: ServerProcess | None = None,
    label: str = "",
    endpoint: str = ENDPOINT,
    log=print,
) -> list[dict]:
    """One run per concurrency (or rate); run i uses the first num_requests[i] prompts."""
    points = [(c, math.inf) for c in concurrencies] if concurrencies else [(max_concurrency, r) for r in rates]
    runs = []
    for (concurrency, rate), count in zip(points, num_requests):
        run = run_one(url, prompts[:count], concurrency, rate, seed, model, progress, server, label, endpoint)
        runs.append(run)
        log(format_run(run))
    return runs


def dataset_info(args: argparse.Namespace, prompts: list[BenchRequest], tokenizer_used: bool) -> dict:
    return {
        "kind": "random-words",
        "seed": args.seed,
        "input_len_range": list(parse_range(args.input_len)),
        "output_len_range": list(parse_range(args.output_len)),
        "num_prompts": len(prompts),
        "exact_input_lengths": tokenizer_used,
        "temperature": 0.0,
        "input_lens": [p.input_len for p in prompts],
        "output_lens": [p.output_len for p in prompts],
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    target = parser.add_argument_group("server")
    target.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:6006")
    target.add_argument("--launch", metavar="MODEL_DIR", help="start `python api.py` on this model instead of --url")
    target.add_argument(
        "--tokenizer",
        metavar="TOK_DIR",
        help="Llama-2 tokenizer dir: the server's with --launch, and exact prompt lengths",
    )
    target.add_argument("--server-flags", default="", help="extra flags for api.py with --launch (one string)")
    target.add_argument("--server-log", default=None, help="file for the launched server's output")
    target.add_argument("--model-dir", default=None, help="checkpoint dir, only to record the model's shape")
    target.add_argument("--model", default=None, help="the `model` field to send (default: none, the server's)")
    target.add_argument("--endpoint", default=ENDPOINT)
    load = parser.add_argument_group("load")
    load.add_argument("--concurrency", default=None, help="comma list of client counts, one run each (e.g. 1,4,16,64)")
    load.add_argument(
        "--request-rate",
        default=None,
        help="comma list of Poisson request rates per second, one run each ('inf' = all at once)",
    )
    load.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight with --request-rate")
    load.add_argument(
        "--num-requests",
        default="64",
        help="requests per run: one number, or a comma list with one per concurrency/rate",
    )
    load.add_argument("--input-len", default="16:512", help="prompt tokens (BOS included), LOW:HIGH, uniform")
    load.add_argument("--output-len", default="16:256", help="max_tokens per request, LOW:HIGH, uniform")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--warmup", type=int, default=1, help="unmeasured requests before the runs")
    report = parser.add_argument_group("report")
    report.add_argument("--out", default="serve_bench_results.json", help="JSON results")
    report.add_argument("--plot", default=None, help="PNG plot (default: --out with .png)")
    report.add_argument("--no-plot", action="store_true")
    report.add_argument("--label", default="openelm_server", help="name of this series in results and plot")
    report.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = parser.parse_args(argv)
    if bool(args.url) == bool(args.launch):
        parser.error("give exactly one of --url and --launch")
    if args.launch and not args.tokenizer:
        parser.error("--launch needs --tokenizer")
    if args.concurrency and args.request_rate:
        parser.error("give --concurrency or --request-rate, not both")
    if not args.concurrency and not args.request_rate:
        args.concurrency = "1"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    concurrencies = parse_list(args.concurrency) if args.concurrency else None
    rates = parse_list(args.request_rate, float) if args.request_rate else None
    points = len(concurrencies or rates)
    counts = parse_list(args.num_requests)
    if len(counts) == 1:
        counts = counts * points
    if len(counts) != points:
        print(f"error: --num-requests has {len(counts)} numbers for {points} runs", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(args.tokenizer)
    prompts = build_prompts(
        max(counts), parse_range(args.input_len), parse_range(args.output_len), args.seed, tokenizer
    )
    server = None
    url = args.url.rstrip("/") if args.url else None
    model_dir = args.model_dir or args.launch
    try:
        if args.launch:
            print(f"starting python api.py on {args.launch} ...", file=sys.stderr, flush=True)
            server = ServerProcess.openelm(
                args.launch, args.tokenizer, shlex.split(args.server_flags), log_path=args.server_log
            )
            server.wait_ready()
            url = server.url
        limit = server_max_model_len(url)
        longest = max(p.input_len + p.output_len for p in prompts)
        if limit is not None and longest > limit:
            print(
                f"warning: the longest request needs {longest} tokens but the server's max_model_len is {limit}; "
                "such requests will fail (raise --max-model-len or lower --input-len/--output-len)",
                file=sys.stderr,
            )
        warm_up(url, args.model, args.warmup, args.endpoint)
        runs = sweep(
            url,
            prompts,
            concurrencies,
            rates,
            counts,
            args.seed,
            args.max_concurrency,
            args.model,
            not args.no_progress,
            server,
            args.label,
            args.endpoint,
        )
    finally:
        if server is not None:
            server.stop()
    results = {
        "benchmark": "serve_bench",
        "command": [sys.executable, *sys.argv] if argv is None else ["serve_bench.py", *argv],
        "date": now_iso(),
        "git": git_revision(),
        "versions": versions(),
        "machine": machine_info(),
        "server": {
            "url": url,
            "launched": bool(args.launch),
            "command": server.command if server else None,
            "max_model_len": limit,
        },
        "model": model_info(model_dir),
        "dataset": dataset_info(args, prompts, tokenizer is not None),
        "series": {args.label: runs},
    }
    path = write_json(args.out, results)
    print(f"wrote {path}")
    if not args.no_plot:
        plot_path = Path(args.plot) if args.plot else path.with_suffix(".png")
        try:
            from bench.plot import plot_results

            plot_results(results, plot_path)
            print(f"wrote {plot_path}")
        except ImportError as error:
            print(f"no plot ({error}); pip install -r requirements-bench.txt", file=sys.stderr)
    failed = sum(run["failed"] for run in runs)
    if failed:
        print(f"warning: {failed} requests failed; see 'errors' in {path}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
