"""A tiny random-weight OpenELM and a SentencePiece tokenizer, made on the spot.

``python api.py --demo`` serves them so that the whole server can be tried in a minute, with
no 6 GB download; the test suite builds its models from the same pieces. The answers are
gibberish: the weights are random (openelm_server/testing/checkpoints.py makes both).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from openelm_server.testing.checkpoints import train_tokenizer, write_tiny_checkpoint

DEMO_MODEL_NAME = "OpenELM-demo"
DEMO_TOKENIZER_NAME = "tokenizer"


class DemoError(Exception):
    """The demo's files cannot be made; the message is one line."""


def demo_directory() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "openelm-server" / "demo"


def prepare_demo(directory: Path | None = None) -> tuple[Path, Path]:
    """The demo's model and tokenizer directories, made once (a second or two) and reused."""
    import sentencepiece

    directory = directory or demo_directory()
    model_dir, tokenizer_dir = directory / DEMO_MODEL_NAME, directory / DEMO_TOKENIZER_NAME
    if (model_dir / "config.json").is_file() and (tokenizer_dir / "tokenizer.model").is_file():
        return model_dir, tokenizer_dir
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        # Built aside and renamed into place, so that an interrupted run never leaves half a demo.
        building = Path(tempfile.mkdtemp(prefix="demo-", dir=directory.parent))
    except OSError as error:
        raise DemoError(
            f"{directory.parent}: cannot write the demo model there ({error.strerror}); "
            f"set XDG_CACHE_HOME to a writable folder"
        ) from error
    try:
        train_tokenizer(building / DEMO_TOKENIZER_NAME)
        vocab = sentencepiece.SentencePieceProcessor(
            model_file=str(building / DEMO_TOKENIZER_NAME / "tokenizer.model")
        ).vocab_size()
        write_tiny_checkpoint(building / DEMO_MODEL_NAME, vocab_size=vocab, quiet_eos=True, max_context_length=2048)
        shutil.rmtree(directory, ignore_errors=True)
        building.rename(directory)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return model_dir, tokenizer_dir
