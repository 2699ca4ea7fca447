"""lm-eval against the live server, end to end, as people measure a model through a server:
``local-completions`` with the Llama-2 tokenizer (so prompts travel as token ids) on three tiny
local tasks (tests/e2e/lm_eval_tasks: loglikelihood, multiple choice, generate_until; no download).

The scores of a random-weight model mean nothing; what is checked is that lm-eval runs every
kind of request through the server and that what it recorded is what the server computes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import requests
from conftest import ROOT

TASKS_DIR = ROOT / "tests" / "e2e" / "lm_eval_tasks"
TASKS = ["tiny_loglikelihood", "tiny_multiple_choice", "tiny_generate"]
MAX_LENGTH = 512


@pytest.fixture(scope="module")
def lm_eval_run(start_server, shared_model_dir, shared_tokenizer_dir, tmp_path_factory):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (requirements-test.txt)")
    pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api]")
    server = start_server(
        shared_model_dir, shared_tokenizer_dir, "--max-model-len", str(MAX_LENGTH), "--max-batch-size", "8"
    )
    output = tmp_path_factory.mktemp("lm-eval")
    model_args = ",".join(
        [
            f"base_url={server.url}/v1/completions",
            f"model={shared_model_dir.name}",
            f"tokenizer={shared_tokenizer_dir}",
            "tokenizer_backend=huggingface",
            # OpenELM was trained with BOS first; lm-eval leaves it out unless told.
            "add_bos_token=True",
            f"max_length={MAX_LENGTH}",
            "num_concurrent=2",
            "max_retries=1",
        ]
    )
    offline = {
        "HF_HOME": str(output / "hf"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    # The task files name their data file relatively: run from their folder.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "run",
            "--model",
            "local-completions",
            "--model_args",
            model_args,
            "--tasks",
            ",".join(TASKS),
            "--include_path",
            ".",
            "--output_path",
            str(output),
            "--log_samples",
        ],
        cwd=TASKS_DIR,
        env={**os.environ, **offline},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    (results_file,) = output.rglob("results_*.json")
    samples = {
        task: [json.loads(line) for line in next(output.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
        for task in TASKS
    }
    return server, json.loads(results_file.read_text()), samples


@pytest.fixture(scope="module")
def lm_eval_tokenizer(shared_tokenizer_dir):
    """The tokenizer as lm-eval loads it (transformers' fast one), with BOS."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shared_tokenizer_dir))


def server_loglikelihood(server, model: str, context_ids: list[int], continuation_ids: list[int]) -> float:
    body = {
        "model": model,
        "prompt": context_ids + continuation_ids,
        "echo": True,
        "max_tokens": 0,
        "logprobs": 1,
        "temperature": 0,
    }
    logprobs = requests.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    return sum(logprobs["token_logprobs"][len(context_ids) :])


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: encode the whole, then cut at the context's length."""
    whole = tokenizer(context + continuation).input_ids
    context_ids = tokenizer(context).input_ids
    return context_ids, whole[len(context_ids) :]


def test_every_task_ran_with_its_metrics(lm_eval_run):
    _, results, samples = lm_eval_run
    metrics = results["results"]
    assert {"acc,none", "perplexity,none"} <= set(metrics["tiny_loglikelihood"])
    assert {"acc,none", "acc_norm,none"} <= set(metrics["tiny_multiple_choice"])
    assert "exact_match,none" in metrics["tiny_generate"]
    assert all(len(samples[task]) == 5 for task in TASKS)


def test_loglikelihoods_are_the_servers_prompt_logprobs(lm_eval_run, lm_eval_tokenizer, shared_model_dir):
    server, _, samples = lm_eval_run
    for task in ("tiny_loglikelihood", "tiny_multiple_choice"):
        for sample in samples[task]:
            for arguments, response in zip(sample["arguments"].values(), sample["resps"]):
                loglikelihood, is_greedy = response[0]
                context_ids, continuation_ids = encode_pair(lm_eval_tokenizer, arguments["arg_0"], arguments["arg_1"])
                expected = server_loglikelihood(server, shared_model_dir.name, context_ids, continuation_ids)
                assert float(loglikelihood) == pytest.approx(expected, abs=1e-3), (task, arguments)
                assert is_greedy in ("True", "False")


def test_generations_are_the_servers_greedy_answers(lm_eval_run, lm_eval_tokenizer, shared_model_dir):
    server, _, samples = lm_eval_run
    for sample in samples["tiny_generate"]:
        arguments = sample["arguments"]["gen_args_0"]
        body = {
            "model": shared_model_dir.name,
            "prompt": lm_eval_tokenizer(arguments["arg_0"]).input_ids,
            "max_tokens": arguments["arg_1"]["max_gen_toks"],
            "temperature": 0,
            "stop": arguments["arg_1"]["until"],
        }
        answer = requests.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        assert sample["resps"][0][0] == answer
