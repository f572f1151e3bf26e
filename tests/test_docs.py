"""The API reference builds, and every public name documents itself."""

import ast
import doctest
import inspect
import os
import re
import subprocess
import sys
import textwrap

import pytest

import clars_tf
from clars_tf import schedules

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Keras's own optimizer and schedule methods, documented by Keras.
KERAS_OVERRIDES = {"build", "update_step", "get_config", "from_config",
                   "load_own_variables", "save_own_variables"}


def test_api_reference_builds_with_no_warning(tmp_path):
    # strict: a broken link, an unknown reference or a documented parameter
    # the signature lacks fails the build.
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d",
         str(tmp_path / "site")], cwd=REPO, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "site" / "api" / "index.html", encoding="utf-8") as f:
        page = f.read()
    for name in clars_tf.__all__:
        assert f'id="clars_tf.{name}"' in page, name


def _public_names():
    for module in (clars_tf, schedules):
        for name in module.__all__:
            obj = getattr(module, name)
            if not inspect.ismodule(obj):
                yield f"{module.__name__}.{name}", obj


def _documented_arguments(docstring):
    """Names in the Args (or, for a named tuple, Attributes) section."""
    names = set()
    for match in re.finditer(r"^(?:Args|Attributes):\n((?:[ ]+.*\n|\n)+)",
                             docstring + "\n", re.M):
        block = textwrap.dedent(match.group(1))
        names |= {name.strip() for line in block.splitlines()
                  if (head := re.match(r"^(\*{0,2}[\w, ]+):", line))
                  for name in head.group(1).split(",")}
    return names


def _parameters(function):
    if hasattr(function, "_fields"):
        return set(function._fields)
    return {("**" if p.kind is p.VAR_KEYWORD else
             "*" if p.kind is p.VAR_POSITIONAL else "") + p.name
            for p in inspect.signature(function).parameters.values()
            if p.name not in ("self", "cls")}


def _returns_a_value(function):
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    return any(isinstance(node, ast.Return) and node.value is not None
               for node in ast.walk(tree.body[0]))


@pytest.mark.parametrize("name, obj", list(_public_names()),
                         ids=lambda value: value if isinstance(value, str)
                         else "")
def test_public_name_has_args_returns_docstring(name, obj):
    docstring = inspect.getdoc(obj)
    assert docstring, f"{name} has no docstring"
    function = obj if not inspect.isclass(obj) else (
        obj if hasattr(obj, "_fields") else obj.__init__)
    undocumented = _parameters(function) - _documented_arguments(docstring)
    assert not undocumented, f"{name}: Args lacks {sorted(undocumented)}"
    if inspect.isfunction(obj) and _returns_a_value(obj):
        assert "\nReturns:\n" in docstring, f"{name} has no Returns section"
    if inspect.isclass(obj):
        for method_name, method in vars(obj).items():
            if (method_name.startswith("_") or method_name in KERAS_OVERRIDES
                    or not inspect.isfunction(method)):
                continue
            doc = inspect.getdoc(method)
            assert doc, f"{name}.{method_name} has no docstring"
            missing = _parameters(method) - _documented_arguments(doc)
            assert not missing, f"{name}.{method_name}: Args lacks {missing}"
            if _returns_a_value(method):
                assert "\nReturns:\n" in doc, (
                    f"{name}.{method_name} has no Returns section")


@pytest.mark.parametrize("module", [schedules, clars_tf.layerwise,
                                    clars_tf.clars, clars_tf.lars],
                         ids=lambda module: module.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted >= 3
