import os

import numpy as np
import pytest

from ernievil2.fileio import atomic_dir, atomic_path, atomic_write, write_text


def test_atomic_write_replaces_only_on_success(tmp_path):
    out = tmp_path / "a.txt"
    write_text(out, "old")
    with pytest.raises(RuntimeError):
        with atomic_write(out) as f:
            f.write("half")
            raise RuntimeError("boom")
    assert out.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]  # no temporary left
    with atomic_write(out) as f:
        f.write("new")
    assert out.read_text() == "new"


def test_atomic_path_keeps_extension_for_numpy(tmp_path):
    out = tmp_path / "parts.npz"
    with atomic_path(out) as tmp:
        assert tmp.endswith(".npz")
        np.savez(tmp, x=np.arange(3))
    assert np.load(out)["x"].tolist() == [0, 1, 2]
    assert sorted(os.listdir(tmp_path)) == ["parts.npz"]


def test_atomic_dir(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old").write_text("x")
    with pytest.raises(ValueError):
        with atomic_dir(out) as tmp:
            (open(os.path.join(tmp, "new"), "w")).close()
            raise ValueError
    assert os.listdir(out) == ["old"] and os.listdir(tmp_path) == ["ckpt"]
    with atomic_dir(out) as tmp:
        open(os.path.join(tmp, "new"), "w").close()
    assert os.listdir(out) == ["new"] and os.listdir(tmp_path) == ["ckpt"]
