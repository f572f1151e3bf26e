"""The suite sees what a fresh machine has: every module the project imports
is installed by scripts/install.sh from what setup.py declares, inside the
virtual environment, never borrowed from the machine's other site-packages.
"""

import ast
import importlib.metadata
import importlib.util
import os
import re
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_FOLDERS = ("clars_tf", "models", "trainers", "experiments",
                  "benchmarks", "scripts", "tests", "configs", "bin")
# Run as `python -m NAME` by the tests; pip and venv come with Python.
RUN_AS_MODULES = re.compile(r'"-m", "(\w+)"')
# Declared in an extra that scripts/install.sh leaves out, imported only
# where that backend runs: PyPI's torch wheel brings GBs of CUDA libraries.
NOT_INSTALLED_FOR_THE_SUITE = {"torch"}


def _python_files():
    for folder in SOURCE_FOLDERS:
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            for name in files:
                path = os.path.join(root, name)
                if name.endswith(".py") or root.endswith("bin"):
                    yield path


def _imported_top_level_names():
    """Every absolute import in the project's Python files, by top-level
    name, with one file that imports it."""
    names = {}
    for path in _python_files():
        with open(path, encoding="utf-8") as f:
            source = f.read()
        for node in ast.walk(ast.parse(source, path)):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found = [node.module]
            else:
                continue
            for name in found:
                names.setdefault(name.split(".")[0], path)
        if os.sep + "tests" + os.sep in path:
            for name in RUN_AS_MODULES.findall(source):
                names.setdefault(name, path)
    return names


def _third_party(names):
    """The names neither in the standard library nor in this checkout."""
    found = {}
    for name, importer in sorted(names.items()):
        if name in sys.stdlib_module_names or name in ("pip", "venv"):
            continue
        local = os.path.join(REPO, name)
        if os.path.isdir(local) or os.path.isfile(local + ".py") or \
                os.path.isfile(os.path.join(REPO, "tests", name + ".py")):
            continue
        found[name] = importer
    return found


def _location(name):
    spec = importlib.util.find_spec(name)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return os.path.abspath(list(spec.submodule_search_locations)[0])
    return os.path.abspath(spec.origin)


def _declared_distributions():
    """Normalised names of every requirement of clars-tf, extras included."""
    names = set()
    for requirement in importlib.metadata.requires("clars-tf") or []:
        match = re.match(r"[A-Za-z0-9._-]+", requirement)
        names.add(re.sub(r"[-_.]+", "-", match.group(0)).lower())
    return names


def test_the_scan_finds_the_projects_own_dependencies():
    third_party = _third_party(_imported_top_level_names())
    for name in ("tensorflow", "keras", "numpy", "absl", "yaml",
                 "tensorflow_datasets", "pytest", "hypothesis", "scipy",
                 "matplotlib", "mkdocs"):
        assert name in third_party, sorted(third_party)
    for local in ("clars_tf", "trainers", "random_models", "os"):
        assert local not in third_party


@pytest.mark.skipif(sys.prefix == sys.base_prefix,
                    reason="not in a virtual environment (scripts/test.sh "
                           "runs the suite in one)")
def test_the_environment_does_not_see_the_systems_site_packages():
    with open(os.path.join(sys.prefix, "pyvenv.cfg"), encoding="utf-8") as f:
        config = {key.strip(): value.strip() for key, value in (
            line.split("=", 1) for line in f if "=" in line)}
    assert config["include-system-site-packages"] == "false"
    outside = [path for path in sys.path
               if os.path.basename(path) in ("site-packages", "dist-packages")
               and not os.path.abspath(path).startswith(sys.prefix + os.sep)]
    assert outside == []


@pytest.mark.skipif(sys.prefix == sys.base_prefix,
                    reason="not in a virtual environment (scripts/test.sh "
                           "runs the suite in one)")
def test_every_import_resolves_inside_the_environment():
    misplaced = {}
    for name, importer in _third_party(_imported_top_level_names()).items():
        if name in NOT_INSTALLED_FOR_THE_SUITE:
            continue
        location = _location(name)
        if location is None or not location.startswith(sys.prefix + os.sep):
            misplaced[name] = (location, os.path.relpath(importer, REPO))
    assert misplaced == {}, (
        "modules the project imports but scripts/install.sh did not install "
        f"into {sys.prefix} (name: (found at, imported by)): {misplaced}")


def test_every_import_comes_from_a_distribution_setup_py_declares():
    declared = _declared_distributions()
    providers = importlib.metadata.packages_distributions()
    undeclared = {}
    for name, importer in _third_party(_imported_top_level_names()).items():
        distributions = {re.sub(r"[-_.]+", "-", d).lower()
                         for d in providers.get(name, [name])}
        if not distributions & declared:
            undeclared[name] = (sorted(distributions),
                                os.path.relpath(importer, REPO))
    assert undeclared == {}, (
        "imports whose distribution is in no install_requires or extra of "
        f"setup.py (name: (distributions, imported by)): {undeclared}")
