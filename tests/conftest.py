"""Shared fixtures: small synthetic BraTS datasets written as real NIfTI files, tiny configs."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import yaml  # noqa: E402

from lmstrain.data.synth import write_dataset  # noqa: E402


def pytest_configure(config):
    """Split the CPU into four logical CPUs before any test initialises TensorFlow: /CPU:0
    (compute) and /CPU:1 (host) for the LMS tests, and two replicas with a host each for the
    mirrored ones (/CPU:0 and /CPU:1 computing, /CPU:2 and /CPU:3 their hosts)."""
    from lmstrain.lms import split_cpu

    split_cpu(4)


@pytest.fixture(scope="session")
def brats2021_root(tmp_path_factory):
    """Eight synthetic BraTS 2021 cases of 32^3 (shared, read-only)."""
    root = tmp_path_factory.mktemp("brats2021")
    write_dataset(root, 8, (32, 32, 32), seed=1, naming="brats2021")
    return root


@pytest.fixture(scope="session")
def brats2023_root(tmp_path_factory):
    """Four synthetic BraTS 2023 cases of 32^3 (shared, read-only)."""
    root = tmp_path_factory.mktemp("brats2023")
    write_dataset(root, 4, (32, 32, 32), seed=2, naming="brats2023")
    return root


@pytest.fixture
def tiny_config(tmp_path, brats2021_root):
    """Write a config that trains a tiny Isensee U-Net for one short epoch; return its path."""

    def write(**sections):
        raw = {
            "data": {"root": str(brats2021_root), "shape": [16, 16, 16],
                     "cache_dir": str(tmp_path / "cache")},
            "model": {"base_filters": 4, "depth": 3},
            "train": {"epochs": 1, "batch_size": 2, "steps_per_epoch": 2, "learning_rate": 1e-3},
            "output": {"root": str(tmp_path / "runs"), "name": "tiny"},
        }
        for section, values in sections.items():
            raw.setdefault(section, {}).update(values)
        path = tmp_path / "tiny.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    return write
