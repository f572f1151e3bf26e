"""The README's Python examples run as written."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(REPO, "README.md"), encoding="utf-8") as _f:
    EXAMPLES = re.findall(r"```python\n(.*?)```", _f.read(), re.S)


def test_readme_has_examples():
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_example_runs(index):
    result = subprocess.run(
        [sys.executable, "-c", EXAMPLES[index]], cwd=REPO,
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    if index == 0:
        assert "[[2.985 3.98 ]]" in result.stdout
