"""Robustness table: every bad input ends with one clear line, an exit status, no traceback,
and no file changed.

Each row of ``CASES`` is ``Case(id, setup, argv, code, message, creates=())``:

- ``setup(tmp)`` builds the input under the test's own folder ``tmp`` (a ``pathlib.Path``,
  also the current directory while the command runs). ``base`` writes a small valid config
  ``tmp/exp.yaml`` (data in ``tmp/data``, cache in ``tmp/cache``, runs in ``tmp/runs``);
  ``dataset`` also writes three real synthetic BraTS 2021 cases there; ``damaged(...)``
  additionally damages case ``BraTS2021_00001``.
- ``argv``: the ``lmstrain`` arguments; ``{tmp}`` in any of them is replaced by ``tmp``.
- ``code``: the expected exit status (2: the user must change something; 1: a run failed).
- ``message``: text the output's one ``Error:`` line must contain (``{tmp}`` replaced), naming
  the key, case or path.
- ``creates``: ``fnmatch`` patterns, relative to ``tmp``, of files and folders the command may
  create or change (e.g. ``"cache*"``); everything else under ``tmp`` must stay byte-identical,
  and nothing else may appear (so no run directory).

Rows run in-process through click's ``CliRunner``. To add a row, append a ``Case`` (write a
setup function if none fits); rows that need training or a fresh process go in a separate
list under ``@pytest.mark.slow`` or their own test.
"""

import fnmatch
import hashlib
import os
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from nifti import save

from lmstrain.cli import main
from lmstrain.data.synth import brats_affine, write_dataset

SHAPE = (24, 24, 24)
CASE = "BraTS2021_00001"


class Case(NamedTuple):
    id: str
    setup: Callable[[Path], object]
    argv: list
    code: int
    message: str
    creates: tuple = ()


# --- setup functions ---------------------------------------------------------------------------

def base(tmp):
    """A small valid config: tiny network, 16^3 input, everything inside ``tmp``."""
    (tmp / "data").mkdir(exist_ok=True)
    (tmp / "exp.yaml").write_text(yaml.safe_dump({
        "data": {"root": "data", "shape": [16, 16, 16], "cache_dir": "cache"},
        "model": {"base_filters": 4, "depth": 3},
        "train": {"epochs": 1, "batch_size": 2, "steps_per_epoch": 1},
        "output": {"root": "runs"},
    }))


def config_text(text):
    """``tmp/exp.yaml`` holding ``text`` (bytes are written as they are)."""
    def setup(tmp):
        path = tmp / "exp.yaml"
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return setup


def dataset(tmp):
    """``base`` with three good cases: a fit that gets past its checks would train."""
    base(tmp)
    write_dataset(tmp / "data", 3, SHAPE, seed=0)


def symlink_loop(tmp):
    dataset(tmp)
    (tmp / "loop").symlink_to(tmp / "loop")


def output_root_is_a_file(tmp):
    dataset(tmp)
    (tmp / "runs").write_text("not a folder\n")


def damaged(damage):
    """The dataset with ``damage(folder of case BraTS2021_00001)`` applied."""
    def setup(tmp):
        dataset(tmp)
        damage(tmp / "data" / CASE)
    return setup


def truncate(folder):
    t1 = folder / f"{CASE}_t1.nii.gz"
    t1.write_bytes(t1.read_bytes()[:1000])


def empty(folder):
    (folder / f"{CASE}_t1.nii.gz").write_bytes(b"")


def missing(folder):
    (folder / f"{CASE}_t1ce.nii.gz").unlink()


def other_shape(folder):
    save(np.ones((24, 24, 20), np.int16), folder / f"{CASE}_flair.nii.gz", brats_affine(SHAPE))


def bad_labels(folder):
    save(np.full(SHAPE, 3, np.uint8), folder / f"{CASE}_seg.nii.gz", brats_affine(SHAPE))


def nan_image(folder):
    save(np.full(SHAPE, np.nan, np.float32), folder / f"{CASE}_t2.nii.gz", brats_affine(SHAPE))


def misaligned(folder):
    shifted = brats_affine(SHAPE)
    shifted[0, 3] += 5
    save(np.ones(SHAPE, np.int16), folder / f"{CASE}_flair.nii.gz", shifted)


# --- the table ---------------------------------------------------------------------------------

FIT = ["fit", "{tmp}/exp.yaml"]
SHOW = ["config", "show", "{tmp}/exp.yaml"]
NOT_A_NAME = "output.name: must be a single folder name"
BAD_SHAPE = ("data.shape: [16, 18, 16] does not fit isensee2017 with model.depth 3: every edge "
             "must be a multiple of 4; 18 is not")

CASES = [
    # the config file
    Case("malformed-yaml", config_text("data: [unclosed\n"), FIT, 2,
         "{tmp}/exp.yaml is not valid YAML: line 2, column 1: expected ',' or ']'"),
    Case("yaml-python-tag", config_text("data: !!python/object/apply:os.system ['touch pwned']\n"),
         FIT, 2, "is not valid YAML: line 1, column 7: could not determine a constructor for the "
                 "tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
    Case("not-utf8", config_text("output: {name: caf\u00e9}\n".encode("latin-1")), SHOW, 2,
         "{tmp}/exp.yaml is not UTF-8 text (byte 0xe9 at offset 18)"),
    Case("missing-config", base, ["fit", "{tmp}/nope.yaml"], 2,
         "config file {tmp}/nope.yaml does not exist"),
    Case("unknown-key", dataset, FIT + ["--set", "train.epoch=3"], 2,
         "unknown key 'train.epoch': did you mean 'train.epochs'?"),
    # values
    Case("nan-learning-rate", dataset, FIT + ["--set", "train.learning_rate=.nan"], 2,
         "train.learning_rate: must be a finite number, got nan"),
    Case("nan-val-fraction", base, SHOW + ["--set", "data.val_fraction=.nan"], 2,
         "data.val_fraction: must be a finite number, got nan"),
    Case("inf-device-memory", dataset, FIT + ["--set", "lms.device_memory=.inf"], 2,
         "lms.device_memory: must be a finite number, got inf"),
    Case("zero-budget-autotune", dataset,
         FIT + ["--set", "lms.autotune=true", "--set", "lms.device_memory=0"], 2,
         "lms.device_memory: must be greater than 0, got 0"),
    Case("swapin-ahead-0", dataset, FIT + ["--set", "lms.swapin_ahead=0"], 2,
         "lms.swapin_ahead: must be at least 1, got 0"),
    # data.shape against model.depth, in every command that takes a CONFIG
    *[Case(f"shape-not-divisible-{argv[0]}", dataset, argv + ["--set", "data.shape=[16,18,16]"], 2,
           BAD_SHAPE)
      for argv in (FIT, SHOW, ["data", "check", "{tmp}/exp.yaml"], ["plan", "{tmp}/exp.yaml"],
                   ["maxres", "{tmp}/exp.yaml", "--mode", "simulate"])],
    # paths
    Case("data-root-symlink-loop-show", symlink_loop, SHOW + ["--set", "data.root=loop"], 2,
         "data.root: cannot resolve {tmp}/loop: a symbolic link loop"),
    Case("cache-dir-symlink-loop-fit", symlink_loop, FIT + ["--set", "data.cache_dir=loop"], 2,
         "data.cache_dir: cannot resolve {tmp}/loop: a symbolic link loop"),
    Case("output-root-is-a-file", output_root_is_a_file, FIT, 2,
         "output.root {tmp}/runs is a file, not a folder"),
    *[Case(f"output-name-{name or 'empty'}", dataset, FIT + ["--set", f"output.name='{name}'"], 2,
           f"{NOT_A_NAME} (no '/', not empty, '.' or '..'), got {name!r}")
      for name in ("../x", "a/b", "/tmp/elsewhere", "", ".", "..")],
    # the data: fit stops at the damaged case, before any run directory
    Case("truncated-nifti", damaged(truncate), FIT, 2,
         f"case {CASE}: cannot read {CASE}_t1.nii.gz", creates=("cache*",)),
    Case("empty-nifti", damaged(empty), FIT, 2,
         f"case {CASE}: cannot read {CASE}_t1.nii.gz", creates=("cache*",)),
    Case("missing-modality", damaged(missing), FIT, 2,
         f"case {CASE}: missing t1ce image", creates=("cache*",)),
    Case("modality-shape-mismatch", damaged(other_shape), FIT, 2,
         f"{CASE}_flair.nii.gz has shape (24, 24, 20) but {CASE}_t1.nii.gz has (24, 24, 24)",
         creates=("cache*",)),
    Case("bad-label-values", damaged(bad_labels), FIT, 2,
         f"{CASE}_seg.nii.gz has label values 3; brats2021 uses [0, 1, 2, 4]",
         creates=("cache*",)),
    Case("nan-image", damaged(nan_image), FIT, 2,
         f"{CASE}_t2.nii.gz contains NaN or infinite values", creates=("cache*",)),
    Case("misaligned-affines", damaged(misaligned), FIT, 2,
         f"{CASE}_flair.nii.gz is not aligned with {CASE}_t1.nii.gz", creates=("cache*",)),
]


# --- the check ---------------------------------------------------------------------------------

def snapshot(root):
    """``{path relative to root: sha256 (a folder: "dir"; a link: its target)}``."""
    state = {}
    for path in root.rglob("*"):
        key = str(path.relative_to(root))
        if path.is_symlink():
            state[key] = "-> " + os.readlink(path)
        elif path.is_dir():
            state[key] = "dir"
        else:
            state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gives_one_line_and_changes_nothing(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    case.setup(tmp_path)
    before = snapshot(tmp_path)
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in case.argv]
    result = CliRunner().invoke(main, argv)

    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == case.code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert case.message.replace("{tmp}", str(tmp_path)) in errors[0]
    after = snapshot(tmp_path)
    changed = sorted(key for key in before.keys() | after.keys()
                     if before.get(key) != after.get(key)
                     and not any(fnmatch.fnmatch(key, pattern) for pattern in case.creates))
    assert not changed, f"changed or created: {changed}"
