"""Shared fixtures: checkpoints, tokenizers, and live servers on 127.0.0.1.

The shared fixtures beside the project (../shared/fixtures) are used when present; everything
else is built here, so the suite runs on any clone: a tokenizer trained on the spot with
SentencePiece (byte fallback, like Llama-2's) and random-weight OpenELM checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = ROOT.parent / "shared" / "fixtures"
SHARED_MODEL = SHARED_FIXTURES / "openelm-tiny"
SHARED_TOKENIZER = SHARED_FIXTURES / "llama2-tokenizer"

sys.path.insert(0, str(ROOT))

from openelm_server.openelm import random_state_dict, write_checkpoint, OpenELMConfig  # noqa: E402

TRAINING_TEXT = [
    "Once upon a time there was a little fox who lived in the forest.",
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "你好，请介绍一下你自己。我是一个语言模型。",
    "Hello world! How are you today? I am fine, thank you.",
]

TOKENIZER_CONFIG = {
    "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
    "unk_token": "<unk>", "pad_token": None, "clean_up_tokenization_spaces": False, "legacy": False,
    "model_max_length": 2048, "tokenizer_class": "LlamaTokenizer", "sp_model_kwargs": {},
}


def tiny_config(vocab_size: int, **overrides) -> dict:
    """A small OpenELM config as the published config code would write it: layers with
    different head counts and GQA."""
    config = dict(
        model_type="openelm", vocab_size=vocab_size, model_dim=128, head_dim=16, num_transformer_layers=3,
        num_gqa_groups=2, qkv_multipliers=[0.5, 1.0], ffn_multipliers=[0.5, 2.0], ffn_dim_divisor=64,
        ffn_with_glu=True, normalize_qk_projections=True, share_input_output_layers=True,
        rope_freq_constant=10000, max_context_length=256, bos_token_id=1, eos_token_id=2,
        activation_fn_name="swish", normalization_layer_name="rms_norm",
    )
    config.update(overrides)
    return config


def train_tokenizer(directory: Path, vocab_size: int = 400) -> Path:
    import sentencepiece

    directory.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT * 40), model_prefix=str(directory / "tokenizer"),
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    (directory / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    (directory / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return directory


def make_checkpoint(directory: Path, vocab_size: int, seed: int = 0, max_shard_bytes: int | None = None,
                    quiet_eos: bool = False, **overrides) -> Path:
    """With ``quiet_eos`` the EOS embedding row is zero, so its tied logit is always 0 while the
    best of the other random logits is above 0: greedy answers run to their full length, as
    the tests of long generations need."""
    raw = tiny_config(vocab_size, **overrides)
    tensors = random_state_dict(OpenELMConfig.from_dict(raw), seed=seed, std=0.08)
    if quiet_eos:
        tensors["transformer.token_embeddings.weight"][raw["eos_token_id"]] = 0
    write_checkpoint(directory, raw, tensors, max_shard_bytes=max_shard_bytes)
    return directory


@pytest.fixture(scope="session")
def own_tokenizer_dir(tmp_path_factory) -> Path:
    """A real SentencePiece tokenizer made here; never needs ../shared."""
    return train_tokenizer(tmp_path_factory.mktemp("own-tokenizer"))


@pytest.fixture(scope="session")
def own_model_dir(tmp_path_factory, own_tokenizer_dir) -> Path:
    """A random OpenELM checkpoint whose vocabulary matches ``own_tokenizer_dir``."""
    import sentencepiece

    vocab = sentencepiece.SentencePieceProcessor(model_file=str(own_tokenizer_dir / "tokenizer.model")).vocab_size()
    # The published context (2048) and no early EOS, so that every server test runs on it as
    # on the shared fixture.
    return make_checkpoint(tmp_path_factory.mktemp("own-model") / "openelm-own", vocab_size=vocab,
                           quiet_eos=True, max_context_length=2048)


@pytest.fixture(scope="session")
def shared_model_dir() -> Path:
    if not (SHARED_MODEL / "reference.json").is_file():
        pytest.skip("../shared/fixtures/openelm-tiny is not here (a clone without the shared fixtures)")
    return SHARED_MODEL


@pytest.fixture(scope="session")
def shared_tokenizer_dir() -> Path:
    if not (SHARED_TOKENIZER / "tokenizer.model").is_file():
        pytest.skip("../shared/fixtures/llama2-tokenizer is not here (a clone without the shared fixtures)")
    return SHARED_TOKENIZER


@pytest.fixture(scope="session")
def serving_dirs(own_model_dir, own_tokenizer_dir) -> tuple[Path, Path]:
    """What the live-server tests run on: the shared fixture with the real Llama-2 tokenizer
    when present, else the self-made pair."""
    if (SHARED_MODEL / "config.json").is_file() and (SHARED_TOKENIZER / "tokenizer.model").is_file():
        return SHARED_MODEL, SHARED_TOKENIZER
    return own_model_dir, own_tokenizer_dir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """``python api.py`` in a subprocess on 127.0.0.1, as a user would start it."""

    def __init__(self, model_dir: Path, tokenizer_dir: Path, *flags: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"openelm-server-{self.port}.log"
        command = [sys.executable, str(ROOT / "api.py"), "--model-path", str(model_dir),
                   "--tokenizer-path", str(tokenizer_dir), "--host", "127.0.0.1", "--port", str(self.port), *flags]
        self.log_file = open(self.log_path, "w+")
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=self.log_file, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 90.0) -> "LiveServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            time.sleep(0.2)
        raise RuntimeError(f"server did not become ready:\n{self.log()}")

    def log(self) -> str:
        self.log_file.flush()
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()
        return self.process.returncode


@pytest.fixture(scope="session")
def start_server():
    """Start extra servers with their own flags; all are stopped at the end of the session."""
    servers: list[LiveServer] = []

    def start(model_dir: Path, tokenizer_dir: Path, *flags: str, env: dict | None = None,
              wait: bool = True) -> LiveServer:
        server = LiveServer(model_dir, tokenizer_dir, *flags, env=env)
        servers.append(server)
        return server.wait_ready() if wait else server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server, serving_dirs) -> LiveServer:
    """The default live server, shared by the tests that do not need special flags."""
    model_dir, tokenizer_dir = serving_dirs
    return start_server(model_dir, tokenizer_dir, "--max-batch-size", "8", "--max-model-len", "512")
