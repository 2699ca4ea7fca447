"""What paged KV, prefix caching and chunked prefill are for, measured over HTTP on a live server.

Three runs, each on its own ``python api.py`` (the server's flags are in the output):

- ``interference``: 4 streams decode while a 1,500-token prompt arrives; the longest gap between
  the streams' tokens while that prompt is read, against the prompt's time to first token.
- ``prefix``: a 1,500-token prompt, then another with the same 1,500-token prefix and a new end;
  the second's time to first token against the first's.
- ``concurrency``: with ``--kv-cache-tokens 4096``, 32 requests of 50 prompt + 40 new tokens at
  once; the most running together (``openelm_requests_running`` polled on /metrics).

    python -m bench.kv_scheduling --model-dir DIR --tokenizer TOK_DIR [--runs interference,prefix,concurrency]

Prompts are random token ids (the API takes them as ``prompt``), so lengths are exact.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import sys
import time

import httpx

from bench.common import machine_info, model_info
from openelm_server.testing.server import ServerProcess

LONG_PROMPT = 1500


def random_prompt(rng: random.Random, length: int) -> list[int]:
    return [1] + [rng.randrange(100, 30000) for _ in range(length - 1)]


async def stream_times(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> list[float]:
    """Arrival times of the streamed chunks that carry text."""
    times, _ = await stream_times_and_tokens(client, url, prompt, max_tokens)
    return times


async def stream_times_and_tokens(
    client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int
) -> tuple[list[float], int]:
    """Arrival times of the streamed chunks that carry text, and the tokens generated (from the
    usage chunk: a chunk may carry two tokens, when the first ended in half a character)."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    times, tokens = [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk["choices"]:
                    times.append(time.monotonic())
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    return times, tokens


async def interference_run(url: str, rng: random.Random) -> dict:
    """As :func:`interference`, keeping the streams' token times to find the longest gap."""
    times: list[list[float]] = [[] for _ in range(4)]

    async def stream(index: int, client: httpx.AsyncClient) -> None:
        body = {
            "prompt": random_prompt(rng, 64),
            "max_tokens": 1900,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "logprobs": 1,  # a chunk for every token, also one whose text is held back (half a character)
        }
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]" and json.loads(line[6:])["choices"]:
                    times[index].append(time.monotonic())

    async with httpx.AsyncClient(timeout=600) as client:
        tasks = [asyncio.ensure_future(stream(i, client)) for i in range(4)]
        while min(len(t) for t in times) < 10:
            await asyncio.sleep(0.05)
        started = time.monotonic()
        long_times = await stream_times(client, url, random_prompt(rng, LONG_PROMPT), 1)
        ttft = long_times[0] - started
        await asyncio.sleep(1)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    gaps = []
    for stream_times_ in times:
        for before, after in zip(stream_times_, stream_times_[1:]):
            if after > started and before < long_times[0]:
                gaps.append(after - before)
    before_gaps = [b - a for s in times for a, b in zip(s, s[1:]) if b < started]
    return {
        "long_prompt_tokens": LONG_PROMPT,
        "long_prompt_ttft_s": round(ttft, 3),
        "longest_stream_gap_during_prefill_s": round(max(gaps), 3),
        "gap_over_ttft": round(max(gaps) / ttft, 3),
        "median_stream_gap_before_s": round(sorted(before_gaps)[len(before_gaps) // 2], 3),
    }


async def prefix_run(url: str, rng: random.Random) -> dict:
    prefix = random_prompt(rng, LONG_PROMPT)
    async with httpx.AsyncClient(timeout=600) as client:
        ttfts = []
        for _ in range(2):
            suffix = [rng.randrange(100, 30000) for _ in range(12)]
            started = time.monotonic()
            times = await stream_times(client, url, prefix + suffix, 1)
            ttfts.append(times[0] - started)
        metrics = (await client.get(url + "/metrics")).text
    counters = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("openelm_prefix_cache_")
    }
    return {
        "prefix_tokens": LONG_PROMPT,
        "first_ttft_s": round(ttfts[0], 3),
        "second_ttft_s": round(ttfts[1], 3),
        "second_over_first": round(ttfts[1] / ttfts[0], 3),
        **counters,
    }


async def concurrency_run(url: str, rng: random.Random) -> dict:
    running_seen = []

    async def poll():
        async with httpx.AsyncClient(timeout=30) as client:
            while True:
                for line in (await client.get(url + "/metrics")).text.splitlines():
                    if line.startswith("openelm_requests_running "):
                        running_seen.append(float(line.split()[1]))
                await asyncio.sleep(0.05)

    poller = asyncio.ensure_future(poll())
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        results = await asyncio.gather(
            *(stream_times_and_tokens(client, url, random_prompt(rng, 50), 40) for _ in range(32))
        )
    elapsed = time.monotonic() - started
    poller.cancel()
    metrics = httpx.get(url + "/metrics").text
    preemptions = [
        float(line.split()[1]) for line in metrics.splitlines() if line.startswith("openelm_preemptions_total")
    ]
    return {
        "requests": 32,
        "completed": sum(tokens == 40 for _, tokens in results),
        "max_requests_running": max(running_seen),
        "elapsed_s": round(elapsed, 2),
        "preemptions": preemptions[0] if preemptions else None,
    }


RUNS = {
    "interference": (interference_run, []),
    "prefix": (prefix_run, []),
    "concurrency": (concurrency_run, ["--kv-cache-tokens", "4096"]),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of: {', '.join(RUNS)}")
    parser.add_argument("--server-flags", default="", help="extra flags for every server (one string)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    unknown = [name for name in args.runs.split(",") if name not in RUNS]
    if unknown:
        parser.error(f"--runs: unknown {', '.join(unknown)}; the runs are {', '.join(RUNS)}")
    report = {"machine": machine_info(), "model": model_info(args.model_dir), "runs": {}}
    for name in args.runs.split(","):
        run, flags = RUNS[name]
        flags = [*flags, *shlex.split(args.server_flags)]
        server = ServerProcess.openelm(args.model_dir, args.tokenizer, flags).wait_ready()
        try:
            result = asyncio.run(run(server.url, random.Random(args.seed)))
        finally:
            server.stop()
        report["runs"][name] = {"server_flags": flags, **result}
        print(name, json.dumps(report["runs"][name]), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
