"""The tutorial's way, as the baseline: transformers ``model.generate``, one request at a time.

The model is a ``LlamaForCausalLM`` with random weights and the dimensions of an OpenELM shape
(read from an OpenELM checkpoint's config.json, or ``--size``): hidden size = model_dim, the
same layers, head_dim, vocabulary and tied embeddings; since Llama layers are all alike, the
query/KV heads are OpenELM's average over layers (``--heads average``, rounded, GQA ratio kept)
or its widest layer (``--heads widest``), and the FFN width is chosen so that the total
parameter count matches OpenELM's (to a multiple of 64). ``describe`` prints both counts.

Three ways to run it:

    # a server like the tutorial's api.py: POST / (its JSON) and a streaming /v1/completions in
    # OpenAI's SSE format, so that bench/serve_bench.py measures it exactly as it measures ours
    python -m bench.baseline_hf serve --model-dir MODEL_DIR --tokenizer TOK_DIR --port 6007

    # in process, no HTTP, over the same prompt set (TTFT and every token timed by a streamer)
    python -m bench.baseline_hf run --model-dir MODEL_DIR --tokenizer TOK_DIR --num-requests 8

    python -m bench.baseline_hf describe --size 3B

Requests are greedy (``do_sample=False``) with ``min_new_tokens = max_new_tokens`` so that the
answer has exactly the asked length. One at a time, as the tutorial: its handler called the
blocking ``generate`` inside ``async def``, so the server did nothing else meanwhile. Here
``generate`` runs in a worker thread behind a lock (still one generation at a time) so that the
event loop can stream tokens as the streamer hands them over.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import torch
from fastapi import FastAPI, Request  # module level: the routes' annotations are strings)
from fastapi.responses import JSONResponse, StreamingResponse

from bench.common import (
    RequestResult,
    aggregate,
    build_prompts,
    load_tokenizer,
    machine_info,
    now_iso,
    parse_range,
    versions,
    write_json,
)
from openelm_server.model.config import OpenELMConfig
from openelm_server.model.loader import expected_tensor_shapes
from openelm_server.testing.checkpoints import published_config

ROOT = Path(__file__).resolve().parents[1]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ---------------------------------------------------------------------------- the model


def openelm_raw_config(model_dir: str | Path | None = None, size: str | None = None, vocab_size: int = 32000) -> dict:
    if model_dir:
        return json.loads((Path(model_dir) / "config.json").read_text())
    return published_config(size or "270M", vocab_size=vocab_size)


def openelm_parameters(raw: dict) -> int:
    return sum(math.prod(s) for s in expected_tensor_shapes(OpenELMConfig.from_dict(raw)).values())


def _llama_parameters(
    vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, intermediate: int
) -> int:
    attention = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
    mlp = 3 * hidden * intermediate
    return vocab * hidden + layers * (attention + mlp + 2 * hidden) + hidden  # tied embeddings


def llama_config_for(raw: dict, heads: str = "average", multiple: int = 64):
    """A LlamaConfig with the OpenELM shape's dimensions and its parameter count; returns
    (config, description)."""
    from transformers import LlamaConfig

    config = OpenELMConfig.from_dict(raw)
    layers, hidden, head_dim = config.num_layers, config.model_dim, config.head_dim
    groups = max(q // kv for q, kv in zip(config.num_query_heads, config.num_kv_heads))
    wanted = max(config.num_kv_heads) if heads == "widest" else sum(config.num_kv_heads) / layers
    # transformers insists that hidden_size be a multiple of the head count (even with an
    # explicit head_dim): take the valid KV head count nearest to the wanted one.
    valid = [kv for kv in range(1, 4 * max(config.num_kv_heads) + 1) if hidden % (kv * groups) == 0]
    kv_heads = min(valid, key=lambda kv: (abs(kv - wanted), kv))
    query_heads = kv_heads * groups
    target = openelm_parameters(raw)
    fixed = _llama_parameters(config.vocab_size, hidden, layers, query_heads, kv_heads, head_dim, 0)
    exact = (target - fixed) / (3 * hidden * layers)
    intermediate = max(multiple, int(round(exact / multiple)) * multiple)
    llama = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=query_heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=config.max_context_length,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_freq_constant},
        tie_word_embeddings=config.share_input_output_layers,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.eos_token_id,
        hidden_act="silu",
    )
    parameters = _llama_parameters(config.vocab_size, hidden, layers, query_heads, kv_heads, head_dim, intermediate)
    description = {
        "class": "transformers.LlamaForCausalLM",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "head_dim": head_dim,
        "num_attention_heads": query_heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate,
        "heads_rule": heads,
        "tie_word_embeddings": config.share_input_output_layers,
        "vocab_size": config.vocab_size,
        "parameters": parameters,
        "openelm_parameters": target,
        "parameter_ratio": parameters / target,
        "openelm_heads": {"query": list(config.num_query_heads), "kv": list(config.num_kv_heads)},
        "openelm_ffn_dims": list(config.ffn_dims),
        "openelm_mean_ffn_dim": sum(config.ffn_dims) / layers,
    }
    return llama, description


def build_model(
    raw: dict, heads: str = "average", dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0
):
    from transformers import GenerationConfig, LlamaForCausalLM

    config, description = llama_config_for(raw, heads)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.eos_token_id,
        do_sample=False,
    )
    counted = sum(p.numel() for p in model.parameters())
    assert counted == description["parameters"], (counted, description["parameters"])
    description.update(
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        attn_implementation=getattr(model.config, "_attn_implementation", None),
    )
    return model, description


class TokenStreamer:
    """A transformers streamer that timestamps every new token and hands it on.

    ``generate`` calls ``put`` first with the prompt, then once per new token as soon as it is
    chosen, and ``end`` when done: the first ``put`` after the prompt is the first token's
    time, i.e. after the prefill, as a client of a streaming server would see it.
    """

    def __init__(self, on_token=None):
        self.on_token = on_token
        self.prompt_seen = False
        self.times: list[float] = []
        self.tokens: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        now = time.perf_counter()
        for token in value.reshape(-1).tolist():
            self.times.append(now)
            self.tokens.append(int(token))
            if self.on_token is not None:
                self.on_token(int(token))

    def end(self) -> None:
        if self.on_token is not None:
            self.on_token(None)


def generate(model, input_ids: list[int], max_new_tokens: int, streamer: TokenStreamer | None = None) -> list[int]:
    """The tutorial's call, greedy, with the answer forced to ``max_new_tokens`` tokens."""
    device = model.device
    ids = torch.tensor([input_ids], device=device)
    with torch.inference_mode():
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            streamer=streamer,
        )
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the tutorial's torch_gc() after every request
    return output[0, len(input_ids) :].tolist()


# ---------------------------------------------------------------------------- in process


def run_in_process(model, tokenizer, prompts, progress: bool = True) -> list[RequestResult]:
    """Each prompt in turn; the clock starts before tokenizing, as a server's would."""
    results = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc="baseline in-process", unit="req", file=sys.stderr)
    for prompt in prompts:
        result = RequestResult()
        start = result.start = time.perf_counter()
        input_ids = tokenizer(prompt.prompt).input_ids
        streamer = TokenStreamer()
        generate(model, input_ids, prompt.output_len, streamer)
        tokenizer.decode(streamer.tokens, skip_special_tokens=True)
        result.end = time.perf_counter()
        result.latency = result.end - start
        result.prompt_tokens = len(input_ids)
        result.output_tokens = len(streamer.tokens)
        result.ttft = streamer.times[0] - start
        result.itl = [b - a for a, b in zip(streamer.times, streamer.times[1:])]
        result.finish_reason = "length"
        result.ok = True
        results.append(result)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return results


# ---------------------------------------------------------------------------- the server


def create_app(model, tokenizer, worker: ThreadPoolExecutor, model_name: str = "llama-baseline"):
    """The tutorial's api.py (POST /) plus a streaming /v1/completions for the benchmark.
    ``worker`` (one thread) runs every ``generate``: the thread that built the model (see main)."""
    app = FastAPI(title="tutorial baseline (transformers generate)")
    lock = threading.Lock()  # one generation at a time, as the tutorial's blocking handler

    def locked(input_ids: list[int], max_new_tokens: int, streamer=None) -> list[int]:
        with lock:
            return generate(model, input_ids, max_new_tokens, streamer)

    async def run_locked(input_ids: list[int], max_new_tokens: int, streamer=None) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(worker, locked, input_ids, max_new_tokens, streamer)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "max_model_len": model.config.max_position_embeddings}],
        }

    @app.post("/")
    async def tutorial(request: Request):
        body = await request.json()
        prompt = body.get("prompt", "")
        input_ids = tokenizer(prompt).input_ids
        max_new = body.get("max_new_tokens") or max(1, body.get("max_length", 384) - len(input_ids))
        output = await run_locked(input_ids, max_new)
        response = tokenizer.decode(input_ids + output, skip_special_tokens=True)
        return {"response": response, "status": 200, "time": datetime.now().strftime("%Y-%m-%d %H:%M:%S")}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return JSONResponse(
                {"error": {"message": "prompt must be a string", "type": "invalid_request_error"}}, status_code=400
            )
        input_ids = tokenizer(prompt).input_ids
        max_new = int(body.get("max_tokens") or 16)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        created = int(time.time())
        completion_id = f"cmpl-baseline-{created}"

        def chunk(text: str, finish_reason) -> str:
            return (
                "data: "
                + json.dumps(
                    {
                        "id": completion_id,
                        "object": "text_completion",
                        "created": created,
                        "model": model_name,
                        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
                    }
                )
                + "\n\n"
            )

        def usage(n: int) -> dict:
            return {"prompt_tokens": len(input_ids), "completion_tokens": n, "total_tokens": len(input_ids) + n}

        if not body.get("stream"):
            output = await run_locked(input_ids, max_new)
            return {
                "id": completion_id,
                "object": "text_completion",
                "created": created,
                "model": model_name,
                "choices": [
                    {
                        "index": 0,
                        "text": tokenizer.decode(output, skip_special_tokens=True),
                        "logprobs": None,
                        "finish_reason": "length",
                    }
                ],
                "usage": usage(len(output)),
            }

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        streamer = TokenStreamer(lambda token: loop.call_soon_threadsafe(queue.put_nowait, token))

        async def events():
            task = asyncio.ensure_future(run_locked(input_ids, max_new, streamer))
            tokens: list[int] = []
            sent = ""
            while True:
                token = await queue.get()
                if token is None:
                    break
                tokens.append(token)
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                if len(text) > len(sent) and not text.endswith("\ufffd"):
                    yield chunk(text[len(sent) :], None)
                    sent = text
            await task
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            yield chunk(text[len(sent) :], "length")
            if include_usage:
                yield (
                    "data: "
                    + json.dumps(
                        {
                            "id": completion_id,
                            "object": "text_completion",
                            "created": created,
                            "model": model_name,
                            "choices": [],
                            "usage": usage(len(tokens)),
                        }
                    )
                    + "\n\n"
                )
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


# ---------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("serve", "run", "describe"):
        p = sub.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--model-dir", help="OpenELM checkpoint whose config.json gives the shape")
        p.add_argument("--size", default="270M", help="published OpenELM shape when --model-dir is not given")
        p.add_argument("--heads", choices=("average", "widest"), default="average")
        if name == "describe":
            continue
        p.add_argument("--tokenizer", required=True, help="Llama-2 tokenizer directory")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument(
            "--dtype",
            choices=sorted(DTYPES),
            default=None,
            help="default: bfloat16 on CUDA, float32 on CPU (as our server's auto)",
        )
        p.add_argument("--seed", type=int, default=0)
        if name == "serve":
            p.add_argument("--host", default="127.0.0.1")
            p.add_argument("--port", type=int, default=6007)
        else:
            p.add_argument("--num-requests", type=int, default=8)
            p.add_argument("--input-len", default="16:64")
            p.add_argument("--output-len", default="32:64")
            p.add_argument("--prompt-seed", type=int, default=0, help="the prompt set's seed (serve_bench --seed)")
            p.add_argument("--out", default=None, help="JSON results")
            p.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    raw = openelm_raw_config(args.model_dir, args.size)
    if args.command == "describe":
        _, description = llama_config_for(raw, args.heads)
        print(json.dumps(description, indent=2))
        return 0
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    tokenizer = load_tokenizer(args.tokenizer)
    # The model is built on the thread that will run it, as our server builds its engine: OpenMP
    # gives each thread that uses it a pool of its own, and with two pools on the machine libgomp
    # puts idle workers to sleep after every kernel, 30-50% slower on 2 cores.
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate") if args.command == "serve" else None
    build = (raw, args.heads, dtype, args.device, args.seed)
    model, description = worker.submit(build_model, *build).result() if worker else build_model(*build)
    print(
        f"baseline LlamaForCausalLM: {description['parameters']:,} parameters "
        f"(OpenELM shape: {description['openelm_parameters']:,}), {description['num_attention_heads']} heads / "
        f"{description['num_key_value_heads']} KV heads, intermediate {description['intermediate_size']}, "
        f"{description['dtype']} on {description['device']}",
        flush=True,
    )
    if args.command == "serve":
        import uvicorn

        uvicorn.run(create_app(model, tokenizer, worker), host=args.host, port=args.port, log_level="warning")
        return 0
    prompts = build_prompts(
        args.num_requests, parse_range(args.input_len), parse_range(args.output_len), args.prompt_seed, tokenizer
    )
    run_in_process(model, tokenizer, prompts[:1], progress=False)  # warm-up
    start = time.perf_counter()
    results = run_in_process(model, tokenizer, prompts, progress=not args.no_progress)
    summary = {
        "label": "baseline_hf_in_process",
        "mode": "concurrency",
        "concurrency": 1,
        "request_rate": None,
        "num_requests": len(prompts),
        **aggregate(results, time.perf_counter() - start),
        "date": now_iso(),
    }
    print(json.dumps({k: summary[k] for k in ("output_throughput", "ttft_ms", "tpot_ms")}, indent=1))
    if args.out:
        write_json(
            args.out,
            {
                "benchmark": "baseline_hf run",
                "command": [sys.executable, *sys.argv],
                "date": now_iso(),
                "versions": versions(),
                "machine": machine_info(),
                "baseline_model": description,
                "series": {"baseline_hf_in_process": [summary]},
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
