"""The built-in dataset and ImageFolder loading: deterministic, atomic, strict about bad trees."""
from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ssf_deploy.data import (BUILTIN_CLASSES, ShardSampler, builtin_dataset, inspect_data_dir,
                             is_builtin_dir, make_loaders)
from ssf_deploy.errors import SSFDeployError

SMALL = dict(size=16, train_per_class=3, val_per_class=2)


def _digest(root: str) -> str:
    h = hashlib.sha256()
    for dirpath, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(dirpath, f)
            h.update(os.path.relpath(p, root).encode())
            with open(p, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def _image(path, color=(200, 10, 10)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (12, 12), color).save(path)


def _tree(root, train=("a", "b"), val=("a", "b")):
    for split, names in (("train", train), ("val", val)):
        for i, n in enumerate(names):
            for k in range(3):
                _image(os.path.join(root, split, n, f"{k}.png"), (40 * i, 10 * k, 90))
    return str(root)


def test_builtin_is_deterministic_and_complete(tmp_path):
    a = builtin_dataset(str(tmp_path / "a"), **SMALL)
    b = builtin_dataset(str(tmp_path / "b"), **SMALL)
    assert _digest(a) == _digest(b)
    assert inspect_data_dir(a) == sorted(BUILTIN_CLASSES)
    for cls in BUILTIN_CLASSES:
        assert len(os.listdir(os.path.join(a, "train", cls))) == 3
        assert len(os.listdir(os.path.join(a, "val", cls))) == 2
    assert is_builtin_dir(a)
    # written via a temp folder + rename: nothing else is left next to it
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_builtin_images_vary_within_a_class(tmp_path):
    root = builtin_dataset(str(tmp_path / "d"), **SMALL)
    folder = os.path.join(root, "train", "circle")
    arrays = [torch.from_numpy(np.asarray(Image.open(os.path.join(folder, f)), dtype=np.float32))
              for f in sorted(os.listdir(folder))]
    assert all(a.shape == (16, 16, 3) for a in arrays)
    assert (arrays[0] - arrays[1]).abs().mean() > 5   # colour/position/noise jitter


def test_builtin_is_reused_and_regenerated_on_new_settings(tmp_path):
    root = builtin_dataset(str(tmp_path / "d"), **SMALL)
    stamp = os.path.join(root, "builtin.json")
    mtime = os.stat(stamp).st_mtime_ns
    assert builtin_dataset(root, **SMALL) == root
    assert os.stat(stamp).st_mtime_ns == mtime            # reused, not rewritten
    builtin_dataset(root, size=16, train_per_class=4, val_per_class=2)
    assert len(os.listdir(os.path.join(root, "train", "circle"))) == 4
    assert sorted(os.listdir(tmp_path)) == ["d"]          # the old tree is gone too


def test_builtin_refuses_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SSFDeployError, match="not a built-in dataset"):
        builtin_dataset(str(tmp_path / "mine"), **SMALL)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_builtin_default_location_follows_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SSF_DEPLOY_CACHE", str(tmp_path / "cache"))
    root = builtin_dataset(**SMALL)
    assert root == str(tmp_path / "cache" / "builtin")


@pytest.mark.parametrize("case, message", [
    ("missing", "data folder not found"),
    ("no_val", "has no val/ folder"),
    ("no_classes", "has no class folders"),
    ("no_images", "without images"),
    ("mismatch", "classes differ"),
])
def test_malformed_trees_are_one_line_errors(tmp_path, case, message):
    root = tmp_path / "data"
    if case == "no_val":
        _tree(root)
        shutil.rmtree(root / "val")
    elif case == "no_classes":
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
        _image(str(root / "train" / "loose.png"))
    elif case == "no_images":
        _tree(root)
        (root / "train" / "c").mkdir()
        (root / "val" / "c").mkdir()
        (root / "train" / "c" / "readme.txt").write_text("no image")
    elif case == "mismatch":
        _tree(root, train=("a", "b"), val=("a", "z"))
    with pytest.raises(SSFDeployError, match=message) as e:
        inspect_data_dir(str(root))
    assert "\n" not in str(e.value)


def test_loaders_shapes_and_order_follow_seed_and_epoch(tmp_path):
    root = _tree(tmp_path / "data", train=("a", "b", "c"), val=("a", "b", "c"))
    loaders = make_loaders(root, image_size=24, batch_size=4, seed=3)
    assert loaders.classes == ["a", "b", "c"] and loaders.num_classes == 3
    x, y = next(iter(loaders.val))
    assert x.shape == (4, 3, 24, 24) and y.dtype == torch.int64
    assert len(loaders.train) == 2   # 9 images, batches of 4, last incomplete one dropped

    def order(seed, epoch):
        s = make_loaders(root, image_size=24, batch_size=4, seed=seed).train_sampler
        s.set_epoch(epoch)
        return list(s)
    assert order(3, 0) == order(3, 0)
    assert order(3, 0) != order(3, 1) or order(3, 0) != order(4, 0)


def test_val_shards_cover_everything_once():
    shards = [list(ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))
