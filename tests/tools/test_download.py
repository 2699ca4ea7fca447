"""Tests for download.sh, run offline against a stand-in ``modelscope``.

The stand-in (tests/tools/fake_modelscope/fake_cli.py) is put first on PATH. It
logs every call and "downloads" placeholder files, choosing them from the
real file lists of the two repositories with the selection rules of the real
CLI (see its docstring), so these tests show what modelscope itself would
fetch for the arguments download.sh passes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "download.sh"
FAKE_DIR = Path(__file__).resolve().parent / "fake_modelscope"

_write_bytecode = sys.dont_write_bytecode
sys.dont_write_bytecode = True  # keep tests/tools/fake_modelscope free of __pycache__
from fake_modelscope import fake_cli  # noqa: E402

sys.dont_write_bytecode = _write_bytecode

BASH = shutil.which("bash")
# Everything download.sh runs besides modelscope. The scripts run with a PATH
# holding only links to these (plus, usually, the stand-in), so the real
# modelscope installed on this machine can never be reached by accident.
TOOLS = ["mkdir", "grep", "sort", "rm", "timeout"]

OPENELM = "LLM-Research/OpenELM-3B-Instruct"
LLAMA = "shakechen/Llama-2-7b-hf"
SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
OPENELM_NEEDED = {"config.json", "generation_config.json", "model.safetensors.index.json", *SHARDS}
TOKENIZER_NEEDED = {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"}

HAVE_MODELSCOPE_HUB = importlib.util.find_spec("modelscope_hub") is not None
needs_hub = pytest.mark.skipif(not HAVE_MODELSCOPE_HUB, reason="modelscope (modelscope_hub) is not installed")
FLAVOURS = [pytest.param("current", marks=needs_hub), "legacy"]


@pytest.fixture(autouse=True)
def reachable_hub(monkeypatch):
    """download.sh probes the hub before calling modelscope; here the hub is a socket on loopback."""
    with socket.socket() as hub:
        hub.bind(("127.0.0.1", 0))
        hub.listen(64)
        monkeypatch.setattr(Harness, "endpoint", f"http://127.0.0.1:{hub.getsockname()[1]}")
        yield


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Harness:
    """A MODEL_ROOT, a PATH with the stand-in modelscope, and its call log."""

    endpoint = ""  # MODELSCOPE_ENDPOINT, set by the reachable_hub fixture

    def __init__(self, tmp_path: Path, flavour: str = "current"):
        self.root = tmp_path / "models"
        self.log = tmp_path / "modelscope-calls.jsonl"
        self.flavour = flavour

        self.tools = tmp_path / "tools"
        self.tools.mkdir()
        for tool in TOOLS:
            (self.tools / tool).symlink_to(shutil.which(tool))

        self.fakebin = tmp_path / "fakebin"
        self.fakebin.mkdir()
        fake = self.fakebin / "modelscope"
        fake.write_text(f'#!/bin/sh\nexec {sys.executable} -B {FAKE_DIR / "fake_cli.py"} "$@"\n')
        fake.chmod(0o755)

    @property
    def openelm_dir(self) -> Path:
        return self.root / "OpenELM-3B-Instruct"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "Llama-2-7b-hf"

    def run(self, *, with_modelscope: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
        path = [str(self.fakebin)] if with_modelscope else []
        env = {
            "PATH": os.pathsep.join([*path, str(self.tools)]),
            "HOME": str(self.root.parent),
            "LC_ALL": "C",
            "MODEL_ROOT": str(self.root),
            "MODELSCOPE_ENDPOINT": self.endpoint,
            "FAKE_MODELSCOPE_LOG": str(self.log),
            "FAKE_MODELSCOPE_FLAVOR": self.flavour,
            **extra_env,
        }
        return subprocess.run([BASH, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)

    def records(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def invocations(self) -> list[list[str]]:
        return [r["argv"] for r in self.records() if r["event"] == "invoke"]

    def download_calls(self) -> list[list[str]]:
        return [argv for argv in self.invocations() if "--help" not in argv]

    def fetched(self, repo: str) -> list[str]:
        return [r["file"] for r in self.records() if r["event"] == "fetch" and r["repo"] == repo]

    def reset_log(self) -> None:
        self.log.unlink(missing_ok=True)


def files_in(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_fresh_run_fetches_exactly_the_serving_files(tmp_path, flavour):
    h = Harness(tmp_path, flavour)
    result = h.run()
    assert_ok(result)

    # Each needed file is asked for once; nothing else is selected.
    assert sorted(h.fetched(OPENELM)) == sorted(OPENELM_NEEDED)
    assert sorted(h.fetched(LLAMA)) == sorted(TOKENIZER_NEEDED)
    # ... and that is exactly what lands under MODEL_ROOT.
    assert files_in(h.openelm_dir) == OPENELM_NEEDED
    assert files_in(h.tokenizer_dir) == TOKENIZER_NEEDED
    assert files_in(h.root) == {f"OpenELM-3B-Instruct/{f}" for f in OPENELM_NEEDED} | {
        f"Llama-2-7b-hf/{f}" for f in TOKENIZER_NEEDED
    }
    assert not [p for p in h.root.rglob("*") if ".bin" in p.name]

    # The spelling of the CLI the installed version documents was used.
    calls = h.download_calls()
    assert calls
    if flavour == "current":
        assert all("--local-dir" in argv and "--model" not in argv for argv in calls)
    else:
        assert all("--local_dir" in argv and "--model" in argv for argv in calls)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_second_run_does_not_call_modelscope(tmp_path, flavour):
    h = Harness(tmp_path, flavour)
    assert_ok(h.run())
    before = files_in(h.root)
    h.reset_log()

    result = h.run()
    assert_ok(result)
    assert h.invocations() == []  # not even the --help probe
    assert "already present" in result.stdout
    assert files_in(h.root) == before


def test_complete_directories_need_no_modelscope_at_all(tmp_path):
    h = Harness(tmp_path)
    assert_ok(h.run())
    assert_ok(h.run(with_modelscope=False))


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("damage", ["deleted", "emptied"])
def test_partial_download_is_completed(tmp_path, flavour, damage):
    h = Harness(tmp_path, flavour)
    assert_ok(h.run())
    shard = h.openelm_dir / SHARDS[1]
    if damage == "deleted":
        shard.unlink()
    else:
        shard.write_bytes(b"")  # what an interrupted download can leave behind
    h.reset_log()

    result = h.run()
    assert_ok(result)
    assert h.fetched(OPENELM) == [SHARDS[1]]  # only the missing shard
    assert h.fetched(LLAMA) == []
    assert shard.stat().st_size > 0
    assert files_in(h.openelm_dir) == OPENELM_NEEDED


def test_missing_tokenizer_file_is_fetched_alone(tmp_path):
    h = Harness(tmp_path)
    assert_ok(h.run())
    (h.tokenizer_dir / "tokenizer.model").unlink()
    h.reset_log()

    assert_ok(h.run())
    assert h.fetched(OPENELM) == []
    assert h.fetched(LLAMA) == ["tokenizer.model"]


def test_modelscope_not_on_path(tmp_path):
    h = Harness(tmp_path)
    # Make sure the machine's own modelscope is not reachable through the tools.
    assert not (h.tools / "modelscope").exists()

    result = h.run(with_modelscope=False)
    assert result.returncode != 0
    assert "modelscope" in result.stderr
    assert "pip install modelscope" in result.stderr
    assert "pip install -r requirements.txt" in result.stderr
    assert "Done" not in result.stdout


def test_modelscope_failure_stops_with_a_message(tmp_path):
    h = Harness(tmp_path)
    result = h.run(FAKE_MODELSCOPE_FAIL="1")
    assert result.returncode != 0
    assert "modelscope failed" in result.stderr
    assert OPENELM in result.stderr
    assert "Done" not in result.stdout
    assert len(h.download_calls()) == 1  # stopped at the first failure


def test_failed_download_leaves_no_empty_folder(tmp_path):
    h = Harness(tmp_path)
    h.root = tmp_path / "new" / "models"
    result = h.run(FAKE_MODELSCOPE_FAIL="1")
    assert result.returncode != 0 and "modelscope failed" in result.stderr
    assert not (tmp_path / "new").exists()


def test_failed_download_keeps_folders_that_were_there(tmp_path):
    h = Harness(tmp_path)
    h.root.mkdir()
    result = h.run(FAKE_MODELSCOPE_FAIL="1")
    assert result.returncode != 0
    assert h.root.is_dir() and not h.openelm_dir.exists()


def test_unreachable_hub_is_one_message_before_modelscope_runs(tmp_path):
    h = Harness(tmp_path)
    port = closed_port()
    result = h.run(MODELSCOPE_ENDPOINT=f"https://127.0.0.1:{port}")
    assert result.returncode != 0
    assert f"cannot reach the ModelScope hub at 127.0.0.1:{port}" in result.stderr
    assert h.invocations() == []  # no banner, no retries: modelscope never started
    assert not h.root.exists()
    assert "Done" not in result.stdout


def test_file_missing_after_download_stops_with_a_message(tmp_path):
    h = Harness(tmp_path)
    result = h.run(FAKE_MODELSCOPE_DROP=SHARDS[1])
    assert result.returncode != 0
    assert "still missing" in result.stderr
    assert SHARDS[1] in result.stderr
    assert "Done" not in result.stdout


def test_index_without_shards_stops_with_a_message(tmp_path):
    h = Harness(tmp_path)
    h.openelm_dir.mkdir(parents=True)
    for name in ("config.json", "generation_config.json"):
        (h.openelm_dir / name).write_text("{}")
    (h.openelm_dir / "model.safetensors.index.json").write_text('{"weight_map": {}}')

    result = h.run()
    assert result.returncode != 0
    assert "model.safetensors.index.json" in result.stderr
    assert "no .safetensors shards" in result.stderr


def test_final_output_names_directories_and_serve_command(tmp_path):
    h = Harness(tmp_path)
    result = h.run()
    assert_ok(result)
    out = result.stdout
    assert str(h.openelm_dir) in out
    assert str(h.tokenizer_dir) in out
    assert f"python api.py --model-path {h.openelm_dir} --tokenizer-path {h.tokenizer_dir}" in out
    # Not api.py's default location, so no claim that plain `python api.py` works.
    assert "plain `python api.py`" not in out


def test_serve_command_is_quoted_for_paths_with_spaces(tmp_path):
    h = Harness(tmp_path)
    h.root = tmp_path / "my models"
    result = h.run()
    assert_ok(result)
    assert "--model-path " + str(h.openelm_dir).replace(" ", "\\ ") in result.stdout
    assert files_in(h.openelm_dir) == OPENELM_NEEDED


@needs_hub
def test_old_tutorial_exclude_dot_bin_no_longer_excludes_anything(tmp_path, monkeypatch):
    """Why download.sh names files instead of using the tutorial's `--exclude ".bin"`.

    Old modelscope also tried an --exclude value as a regex on the file name,
    so ".bin" matched the .bin weights. The current CLI matches fnmatch globs
    only, and the glob ".bin" matches no file at all.
    """
    from modelscope_hub._download import _matches_patterns

    assert not _matches_patterns("pytorch_model-00001-of-00002.bin", [".bin"])
    assert _matches_patterns("pytorch_model-00001-of-00002.bin", ["*.bin"])

    all_files = fake_cli.REPO_FILES[OPENELM]
    monkeypatch.delenv("FAKE_MODELSCOPE_LOG", raising=False)

    current_dir = tmp_path / "current"
    monkeypatch.setenv("FAKE_MODELSCOPE_FLAVOR", "current")
    argv = ["download", OPENELM, "--exclude", ".bin", "--local-dir", str(current_dir)]
    assert fake_cli.main(argv) == 0
    assert files_in(current_dir) == set(all_files)  # .bin weights included: ~13.5 GB extra

    legacy_dir = tmp_path / "legacy"
    monkeypatch.setenv("FAKE_MODELSCOPE_FLAVOR", "legacy")
    argv = ["download", "--model", OPENELM, "--exclude", ".bin", "--local_dir", str(legacy_dir)]
    assert fake_cli.main(argv) == 0
    assert not [f for f in files_in(legacy_dir) if ".bin" in f]


@needs_hub
def test_stand_in_help_is_the_real_cli_help(tmp_path):
    """download.sh picks --local-dir vs --local_dir from this help text."""
    h = Harness(tmp_path)
    result = subprocess.run(
        [str(h.fakebin / "modelscope"), "download", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "--local-dir" in result.stdout
    assert "files" in result.stdout


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean():
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


DRAFT = "LLM-Research/OpenELM-270M-Instruct"
DRAFT_NEEDED = {"config.json", "generation_config.json", "model.safetensors"}


def test_draft_model_only_with_draft_1(tmp_path):
    h = Harness(tmp_path, "legacy")
    plain = h.run()
    assert_ok(plain)
    assert h.fetched(DRAFT) == [] and not (h.root / "OpenELM-270M-Instruct").exists()
    assert "270M" not in plain.stdout
    h.reset_log()

    result = h.run(DRAFT="1")
    assert_ok(result)
    assert sorted(h.fetched(DRAFT)) == sorted(DRAFT_NEEDED)  # and nothing of the 3B again
    assert h.fetched(OPENELM) == [] and h.fetched(LLAMA) == []
    assert files_in(h.root / "OpenELM-270M-Instruct") == DRAFT_NEEDED
    assert f"--draft-model-path {h.root}/OpenELM-270M-Instruct" in result.stdout
