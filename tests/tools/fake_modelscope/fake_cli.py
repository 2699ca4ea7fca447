"""Offline stand-in for the ``modelscope`` CLI, used by tests/tools/test_download.py.

It only implements ``modelscope download``. Instead of talking to the hub it
"downloads" by creating small placeholder files, chosen from the real file
lists of the two repositories download.sh uses. Which files it creates is
decided the way a real modelscope release would decide it, so the tests show
what the real CLI would fetch for the arguments download.sh passes.

Two flavours, picked with FAKE_MODELSCOPE_FLAVOR:

``current`` (default)
    The CLI of the installed modelscope (1.38+, built on ``modelscope_hub``).
    The real argument parser (``modelscope_hub.cli.download.DownloadCommand``)
    parses the arguments and the real ``DownloadCommand.execute`` runs; only
    its ``HubApi`` is swapped for one that serves the file lists below. In
    snapshot mode that fake API filters with the real
    ``modelscope_hub._download._matches_patterns``, the same call
    ``HubApi.download_repo`` makes.

``legacy``
    modelscope 1.20 - 1.37 (``modelscope/cli/download.py`` with
    ``snapshot_download``). That package cannot be installed next to the
    current one, so its behaviour is re-stated here: ``--model`` /
    ``--local_dir``; a single positional file is fetched by exact name,
    several are used as fnmatch allow patterns; ``--include`` values are
    fnmatch globs; an ``--exclude`` value matches if it matches as an fnmatch
    glob on the path OR as a regular expression (``re.search``) on the name.

Other environment variables:

FAKE_MODELSCOPE_LOG   JSON-lines file; every call appends
                      {"event": "invoke", "argv": [...]} and every file
                      written appends {"event": "fetch", "repo", "file", "local_dir"}.
FAKE_MODELSCOPE_FAIL  if set, a download call fails (exit 1) without writing.
FAKE_MODELSCOPE_DROP  comma-separated file names that are "fetched" but
                      never written (a download that silently lost a file).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import sys
from pathlib import Path

SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]

# The real listing of LLM-Research/OpenELM-3B-Instruct; shakechen/Llama-2-7b-hf (a Llama-2-7b-hf
# mirror) has the same file names, which is what makes a careless selection dangerous.
PUBLISHED_FILES = [
    ".gitattributes",
    "LICENSE.txt",
    "README.md",
    "Responsible-Use-Guide.pdf",
    "USE_POLICY.md",
    "config.json",
    "generation_config.json",
    *SHARDS,
    "model.safetensors.index.json",
    "pytorch_model-00001-of-00002.bin",
    "pytorch_model-00002-of-00002.bin",
    "pytorch_model.bin.index.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
]
# The listing of Apple's OpenELM-270M-Instruct: one safetensors file, no index.
DRAFT_FILES = [
    ".gitattributes",
    "LICENSE",
    "README.md",
    "config.json",
    "configuration_openelm.py",
    "generation_config.json",
    "model.safetensors",
    "modeling_openelm.py",
]
REPO_FILES: dict[str, list[str]] = {
    "LLM-Research/OpenELM-3B-Instruct": PUBLISHED_FILES,
    "shakechen/Llama-2-7b-hf": PUBLISHED_FILES,
    "LLM-Research/OpenELM-270M-Instruct": DRAFT_FILES,
}


class RepoFileNotFound(Exception):
    """Stands for the hub's 404 on a file the repository does not have."""


def _log(record: dict) -> None:
    log = os.environ.get("FAKE_MODELSCOPE_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def _placeholder(file_name: str) -> str:
    if file_name == "model.safetensors.index.json":
        # Shaped like the real index: tensor name -> shard file.
        weight_map = {
            "transformer.token_embeddings.weight": SHARDS[0],
            "transformer.layers.0.attn.qkv_proj.weight": SHARDS[0],
            "transformer.layers.35.ffn.proj_2.weight": SHARDS[1],
            "transformer.norm.weight": SHARDS[1],
        }
        return json.dumps({"metadata": {"total_size": 6071990272}, "weight_map": weight_map}, indent=2)
    return f"placeholder for {file_name}\n"


def _write(repo_id: str, file_name: str, local_dir: str | os.PathLike | None) -> Path:
    if file_name not in REPO_FILES.get(repo_id, []):
        raise RepoFileNotFound(f"{repo_id} has no file {file_name!r}")
    if local_dir is None:
        raise RuntimeError("the fake only supports downloads with a local dir")
    _log({"event": "fetch", "repo": repo_id, "file": file_name, "local_dir": str(local_dir)})
    target = Path(local_dir) / file_name
    if file_name in os.environ.get("FAKE_MODELSCOPE_DROP", "").split(","):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(_placeholder(file_name), encoding="utf-8")
    return target


def _fail_if_asked() -> None:
    if os.environ.get("FAKE_MODELSCOPE_FAIL"):
        raise ConnectionError("simulated network failure")


# ---------------------------------------------------------------------------
# current flavour: the installed modelscope_hub CLI with a fake HubApi
# ---------------------------------------------------------------------------
class _FakeHubApi:
    """The two HubApi methods DownloadCommand.execute uses without --continue-on-error."""

    def download_file(self, repo_id, repo_type, file_path, *, local_dir=None, **_ignored):
        _fail_if_asked()
        return _write(repo_id, file_path, local_dir)

    def download_repo(
        self, repo_id, repo_type, *, local_dir=None, allow_patterns=None, ignore_patterns=None, **_ignored
    ):
        from modelscope_hub._download import _matches_patterns

        _fail_if_asked()
        # Same filter as HubApi.download_repo (modelscope_hub/_download.py).
        for path in REPO_FILES.get(repo_id, []):
            if allow_patterns and not _matches_patterns(path, allow_patterns):
                continue
            if ignore_patterns and _matches_patterns(path, ignore_patterns):
                continue
            _write(repo_id, path, local_dir)
        return Path(local_dir)


def run_current(argv: list[str]) -> int:
    from modelscope_hub.cli.download import DownloadCommand

    parser = argparse.ArgumentParser(prog="modelscope")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    DownloadCommand.register(sub)
    args = parser.parse_args(argv)  # --help prints the real help text and exits 0

    command = args._command(args)
    command._make_api_with_endpoint = _FakeHubApi  # the only network-facing piece
    command.execute()
    return 0


# ---------------------------------------------------------------------------
# legacy flavour: modelscope 1.20 - 1.37
# ---------------------------------------------------------------------------
def _legacy_allowed(path: str, allow: list[str] | None, ignore: list[str] | None) -> bool:
    # Patterns ending in "/" mean "everything below".
    allow = [p + "*" if p.endswith("/") else p for p in allow or []]
    ignore = [p + "*" if p.endswith("/") else p for p in ignore or []]
    name = path.rsplit("/", 1)[-1]
    for pattern in ignore:
        if fnmatch.fnmatch(path, pattern):
            return False
        try:
            if re.search(pattern, name):
                return False
        except re.error:  # not a valid regex: only the glob applies
            pass
    return not allow or any(fnmatch.fnmatch(path, pattern) for pattern in allow)


def run_legacy(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="modelscope")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("download")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--model")
    group.add_argument("--dataset")
    p.add_argument("repo_id", nargs="?", default=None)
    p.add_argument("--repo-type", choices=["model", "dataset"], default="model")
    p.add_argument("--revision")
    p.add_argument("--cache_dir")
    p.add_argument("--local_dir")
    p.add_argument("files", nargs="*")
    p.add_argument("--include", nargs="*")
    p.add_argument("--exclude", nargs="*")
    args = parser.parse_args(argv)

    files = list(args.files or [])
    repo_id = args.model or args.dataset
    if repo_id:
        # With --model, a positional "repo_id" is really the first file.
        if args.repo_id is not None:
            files.insert(0, args.repo_id)
    else:
        repo_id = args.repo_id
    if not repo_id:
        raise ValueError("Model or dataset must be set.")

    _fail_if_asked()
    if len(files) == 1:  # model_file_download: that exact file
        _write(repo_id, files[0], args.local_dir)
        return 0
    if files:  # snapshot_download(allow_file_pattern=files)
        allow, ignore = files, None
    else:  # snapshot_download(allow_file_pattern=include, ignore_file_pattern=exclude)
        allow, ignore = args.include, args.exclude
    for path in REPO_FILES.get(repo_id, []):
        if _legacy_allowed(path, allow, ignore):
            _write(repo_id, path, args.local_dir)
    return 0


def main(argv: list[str]) -> int:
    _log({"event": "invoke", "argv": argv})
    flavour = os.environ.get("FAKE_MODELSCOPE_FLAVOR", "current")
    run = {"current": run_current, "legacy": run_legacy}[flavour]
    try:
        return run(argv)
    except (RepoFileNotFound, ConnectionError) as exc:  # the real CLI exits 1 on hub errors
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # ... and 2 on bad arguments
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
