"""Shared fixtures: checkpoints, tokenizers, and servers on 127.0.0.1.

Servers: ``app`` and ``server`` run in this process (tests/in_process.py), for HTTP behaviour;
``start_server`` starts ``python api.py`` in a subprocess, for the tests where the process
matters (tests/e2e: flags, start-up, signals, examples run as a user would).

The shared fixtures beside the project (../shared/fixtures) are used when present; everything
else is built here, so the suite runs on any clone: a tokenizer trained on the spot with
SentencePiece (byte fallback, like Llama-2's) and random-weight OpenELM checkpoints, from the
same pieces as ``python api.py --demo`` (openelm_server/demo.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from openai import OpenAI

from openelm_server.testing.checkpoints import train_tokenizer, write_tiny_checkpoint
from openelm_server.testing.server import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = ROOT.parent / "shared" / "fixtures"
SHARED_MODEL = SHARED_FIXTURES / "openelm-tiny"
SHARED_TOKENIZER = SHARED_FIXTURES / "llama2-tokenizer"


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
    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("own-model") / "openelm-own", vocab_size=vocab, quiet_eos=True, max_context_length=2048
    )


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


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """Start ``python api.py`` processes with their own flags; all are stopped at the end of the module.
    Their logs go to pytest's temporary directories, which pytest prunes."""
    servers: list[ServerProcess] = []
    logs = tmp_path_factory.mktemp("server-logs")

    def start(
        model_dir: Path | None, tokenizer_dir: Path | None, *flags: str, env: dict | None = None, wait: bool = True
    ) -> ServerProcess:
        log_path = logs / f"server-{len(servers)}.log"
        server = ServerProcess.openelm(model_dir, tokenizer_dir, flags, log_path=log_path, env=env)
        servers.append(server)
        # Generous: on a loaded machine the start-up kernel timing alone can take a minute.
        return server.wait_ready(timeout=180) if wait else server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server(serving_dirs):
    """The default server on 127.0.0.1, in a thread of this process (tests/in_process.py), shared
    by the tests that need real HTTP and no special flag."""
    from in_process import ServerThread

    with ServerThread(*serving_dirs, "--max-batch-size", "8", "--max-model-len", "512") as server:
        yield server


@pytest.fixture(scope="module")
def app(serving_dirs):
    """The app in-process (tests/in_process.py) on the tiny model, one per test module."""
    from in_process import InProcessServer

    server = InProcessServer(*serving_dirs)
    yield server
    server.close()


# ---- what the HTTP tests call the served model with ------------------------------------------


@pytest.fixture(scope="session")
def model_name(serving_dirs) -> str:
    return serving_dirs[0].name


@pytest.fixture(scope="session")
def tokenizer(serving_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(serving_dirs[1]), use_fast=False)


@pytest.fixture(scope="session")
def llama_tokenizer(shared_tokenizer_dir):
    """The real Llama-2 tokenizer (byte fallback for rare CJK characters and emoji)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shared_tokenizer_dir), use_fast=False)


@pytest.fixture(scope="session")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
