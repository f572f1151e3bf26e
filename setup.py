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
    entry_points={
        "console_scripts": ["clars-train=clars_tf.trainers.train:console_main"],
    },
    # A CPU-only machine can satisfy `tensorflow` with the `tensorflow-cpu`
    # wheel by installing it first and this package with --no-deps
    # (scripts/install.sh does).
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.0",
        "tensorflow-datasets>=4.9",
        "absl-py>=1.0",
        "pyyaml>=6.0",
        "tensorboard>=2.16",
        # tensorflow-datasets needs it through etils but does not declare it.
        "importlib_resources",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3", "hypothesis>=6",
                 "jax[cpu]>=0.4.31", "optax>=0.2"],
        # CLARS and LARS on KERAS_BACKEND=jax (jax.lax.map's batch_size
        # arrived in 0.4.31).
        "jax": ["jax[cpu]>=0.4.31"],
        "docs": ["mkdocs>=1.6", "mkdocstrings[python]>=0.26"],
        "study": ["matplotlib>=3.5"],
    },
)
