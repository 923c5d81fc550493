"""Keras tests: TensorFlow quiet, the TensorFlow backend, ``floatx`` float64 for exactness tests.

Without TensorFlow installed (the ``keras`` extra, part of ``dev``) this folder is not collected.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow's first import
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

if importlib.util.find_spec("tensorflow") is None:  # pip install -e ".[keras]"
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture
def keras_dtypes() -> Iterator[None]:
    """Restores Keras's floatx and global dtype policy after the test (both are process-wide)."""
    import keras

    floatx, policy = keras.config.floatx(), keras.config.dtype_policy().name
    yield
    keras.config.set_floatx(floatx)
    keras.config.set_dtype_policy(policy)


@pytest.fixture
def float64(keras_dtypes: None) -> None:
    """Keras in float64 (weights, activations, losses) with seed 0."""
    import keras

    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    keras.utils.set_random_seed(0)
