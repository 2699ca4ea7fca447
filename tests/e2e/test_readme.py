"""The README's examples work as written, against a live server (port swapped in)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(bash|python)\n(.*?)```", README, flags=re.S)
EXAMPLES = [(language, code) for language, code in BLOCKS if "127.0.0.1:6006" in code]


@pytest.fixture(scope="module")
def readme_server(start_server, serving_dirs):
    # A model folder not named OpenELM-3B-Instruct, as after MODEL_ROOT or a rename: the
    # examples, which name the model, must work as written.
    assert serving_dirs[0].name != "OpenELM-3B-Instruct"
    return start_server(*serving_dirs, "--max-batch-size", "4")


def test_readme_has_the_examples_people_copy():
    assert any(lang == "bash" and "curl" in code and '"prompt"' in code for lang, code in EXAMPLES)
    assert any(lang == "python" and "requests.post" in code for lang, code in EXAMPLES)
    assert any(lang == "python" and "from openai import OpenAI" in code for lang, code in EXAMPLES)
    assert "pip install -r requirements.txt" in README and "bash download.sh && python api.py" in README
    assert "python -m pytest -q" in README
    # The CPU install and the demo (tests/e2e/test_demo.py runs it).
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in README
    assert "python api.py --demo" in README


@pytest.mark.parametrize("language, code", EXAMPLES, ids=[f"{lang}-{i}" for i, (lang, _) in enumerate(EXAMPLES)])
def test_readme_example_runs(readme_server, language, code):
    code = code.replace("127.0.0.1:6006", f"127.0.0.1:{readme_server.port}")
    if language == "bash":
        if not shutil.which("curl"):
            pytest.skip("curl is not installed")
        # The examples are for people: keep each one short for the random-weight test model.
        code = code.replace('"max_tokens": 32', '"max_tokens": 8')
        result = subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        output = result.stdout
        if "stream" in code:
            assert output
        else:
            assert json.loads(output)["status"] == 200
    else:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout
