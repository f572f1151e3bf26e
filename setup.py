"""clars-tf: CLARS large-batch training for TensorFlow / Keras 3."""

import setuptools

setuptools.setup(
    name="clars-tf",
    version="0.1.0",
    description=(
        "CLARS (Complete Layer-wise Adaptive Rate Scaling) and LARS for "
        "Keras 3, with large-batch ResNet/DenseNet/MobileNet trainers."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["clars_tf", "clars_tf.*"]),
    # A CPU-only machine can satisfy `tensorflow` with the `tensorflow-cpu`
    # wheel by installing it first and this package with --no-deps
    # (scripts/test.sh does).
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
        "test": ["pytest>=7"],
        "study": ["matplotlib>=3.5"],
    },
)
