"""The Python examples in the README and in docs/ run as written."""

import glob
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs",
                                                             "*.md")))


def _examples():
    for page in PAGES:
        with open(os.path.join(REPO, page), encoding="utf-8") as f:
            for index, code in enumerate(
                    re.findall(r"```python\n(.*?)```", f.read(), re.S)):
                yield page, index, code


EXAMPLES = list(_examples())


def test_readme_has_examples():
    assert sum(page == "README.md" for page, _, _ in EXAMPLES) >= 4


@pytest.mark.parametrize("page, index, code", EXAMPLES,
                         ids=[f"{p}-{i}" for p, i, _ in EXAMPLES])
def test_example_runs(page, index, code):
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO,
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    if (page, index) == ("README.md", 0):
        assert "[[2.985 3.98 ]]" in result.stdout
