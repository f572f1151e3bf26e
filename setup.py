"""clars-tf: CLARS large-batch training for TensorFlow / Keras 3.

The repository keeps models/, trainers/ and configs/ at the top; the
symlinks clars_tf/models, clars_tf/trainers and clars_tf/configs put them
in the wheel under the clars_tf namespace, so nothing is installed under a
generic top-level name.
"""

import os
import re

import setuptools

_HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(_HERE, "clars_tf", "__init__.py"), encoding="utf-8") as f:
    VERSION = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)

_STUDY = ["matplotlib>=3.5", "scipy>=1.10"]
_DOCS = ["mkdocs>=1.6", "mkdocstrings[python]>=0.26"]
_JAX = ["jax[cpu]>=0.4.31"]

setuptools.setup(
    name="clars-tf",
    version=VERSION,
    description=(
        "CLARS (Complete Layer-wise Adaptive Rate Scaling) and LARS for "
        "Keras 3, with large-batch ResNet/DenseNet/MobileNet trainers."
    ),
    long_description=open(os.path.join(_HERE, "README.md"),
                          encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["clars_tf", "clars_tf.*"]),
    package_data={"clars_tf": ["configs/*.yaml", "configs/*/*.yaml"]},
    # A script, not a console_scripts entry point: see bin/clars-train.
    scripts=["bin/clars-train"],
    # TensorFlow is not a hard requirement, as in tensorflow-datasets: the
    # `tensorflow`, `tensorflow-cpu`, GPU and TPU builds are different
    # distributions that all provide the `tensorflow` module, and pip would
    # install the full `tensorflow` wheel over any other. Pick one with an
    # extra ([tensorflow] or [cpu]) or bring your own.
    install_requires=[
        "keras>=3.0",
        "numpy>=1.26",
        "tensorflow-datasets>=4.9",
        "absl-py>=1.0",
        "pyyaml>=6.0",
        "tensorboard>=2.16",
        # tensorflow-datasets needs it through etils but does not declare it.
        "importlib_resources",
    ],
    extras_require={
        "tensorflow": ["tensorflow>=2.16"],
        "cpu": ["tensorflow-cpu>=2.16"],
        # CLARS and LARS on KERAS_BACKEND=jax (jax.lax.map's batch_size
        # arrived in 0.4.31).
        "jax": _JAX,
        # KERAS_BACKEND=torch; not in [test]: PyPI's wheel brings GBs of CUDA
        # libraries (tests/test_backends.py runs its torch tests where it is).
        "torch": ["torch>=2.1"],
        "study": _STUDY,
        "docs": _DOCS,
        # Everything tests/ imports or runs: the study and docs tools, and
        # JAX with optax (tests/test_backends.py runs the optimizers on JAX).
        "test": ["pytest>=7", "pytest-xdist>=3", "hypothesis>=6", "optax>=0.2"]
                + _JAX + _STUDY + _DOCS,
    },
)
