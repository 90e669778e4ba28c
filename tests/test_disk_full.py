"""A full disk: no partial file left anywhere (temporaries, part files, the sidecar, folders, --json
results), an error naming the path, and an embeddings text file and its sidecar that never
disagree. On a small tmpfs when the test can mount one (root), and with a simulated ENOSPC."""
import builtins
import errno
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import yaml

from conftest import ROOT
from ernievil2 import fileio
from ernievil2.cli import load_infer_config, user_error_line
from ernievil2.embeddings import read_embeddings, write_embeddings
from ernievil2.embeddings.sidecar import load_fresh_sidecar, sidecar_path
from ernievil2.engine.infer import run
from ernievil2.fileio import TMP_MARK, atomic_dir, atomic_write, write_text
from helpers import tiny_config

sys.path.insert(0, str(ROOT))
import eval_retri  # noqa: E402

ENOSPC_TEXT = os.strerror(errno.ENOSPC)
FILLER = "filler"


# ------------------------------------------------------------------------------ a small tmpfs
@pytest.fixture
def small_disk(tmp_path):
    """A 200 kB tmpfs, or a skip when this machine does not let the test mount one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(disk)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(r.stderr or r.stdout).strip()}); "
                    "the simulated ENOSPC tests below cover the same paths")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk, leave):
    """Take all the free space of `disk` but `leave` bytes (a multiple of the page size)."""
    (disk / FILLER).unlink(missing_ok=True)
    st = os.statvfs(disk)
    (disk / FILLER).write_bytes(bytes(st.f_bavail * st.f_frsize - leave))


def files_on(disk):
    return sorted(p.name for p in disk.iterdir() if p.name != FILLER)


def embeddings(n, d, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=2, keepdims=True)


def check_consistent(out, candidates):
    """The text file, when present, is one of `candidates` complete; a sidecar is never stale."""
    names = files_on(out.parent)
    assert not [n for n in names if TMP_MARK in n], names
    if not out.exists():
        assert sidecar_path(out) not in [str(out.parent / n) for n in names]
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stale or unreadable sidecar warns
        emb = read_embeddings(out, use_sidecar=False)
        which = [k for k, (t, i) in candidates.items()
                 if emb.text.shape == t.shape and np.array_equal(emb.text, t)
                 and np.array_equal(emb.image, i)]
        assert len(which) == 1
        if os.path.exists(sidecar_path(out)):
            fresh = load_fresh_sidecar(str(out))
            assert fresh is not None and np.array_equal(fresh.text, emb.text)
    return which[0], os.path.exists(sidecar_path(out))


def test_embeddings_and_sidecar_on_a_filling_disk(small_disk):
    old, new = embeddings(5, 32, 0), embeddings(100, 32, 1)  # new: ~70 kB of text, ~26 kB sidecar
    out = small_disk / "emb.out"
    outcomes = set()
    for leave in range(0, 120 << 10, 8 << 10):
        for p in small_disk.iterdir():
            p.unlink()
        write_embeddings(out, *old)  # a previous result and its sidecar
        fill(small_disk, leave)
        try:
            write_embeddings(out, *new)
        except OSError as e:
            assert e.errno == errno.ENOSPC
            assert e.filename in (str(out), sidecar_path(out)), e
            assert f"{ENOSPC_TEXT}: '{e.filename}'" in user_error_line(e)  # cli's one line
            outcome = ("failed",) + check_consistent(out, {"old": old, "new": new})
        else:
            outcome = ("written",) + check_consistent(out, {"old": old, "new": new})
        outcomes.add(outcome)
    # the text failed (the old text kept, its sidecar removed first), then only the sidecar
    # (the new text kept, no sidecar), then both were written
    assert outcomes == {("failed", "old", False), ("failed", "new", False),
                        ("written", "new", True)}, outcomes


def test_eval_json_on_a_full_disk(small_disk, tmp_path, capsys):
    emb_file = tmp_path / "emb.out"
    write_embeddings(emb_file, *embeddings(20, 16, 2), sidecar=False)
    fill(small_disk, 0)
    result = small_disk / "results.json"
    code = eval_retri.main([str(emb_file), "--json", str(result)])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"eval_retri.py: error: [Errno {errno.ENOSPC}] {ENOSPC_TEXT}: '{result}'\n"
    assert files_on(small_disk) == []


def test_atomic_dir_on_a_full_disk(small_disk):
    target = small_disk / "checkpoint"
    fill(small_disk, 64 << 10)
    with pytest.raises(OSError) as e:
        with atomic_dir(target) as tmp:
            for k in range(100):
                with open(os.path.join(tmp, f"shard{k}.bin"), "wb") as f:
                    f.write(bytes(16 << 10))
    assert e.value.errno == errno.ENOSPC
    # the target (write(2) names no file) or a file in it: never the removed temporary folder
    assert str(target) in (e.value.filename, os.path.dirname(e.value.filename))
    assert files_on(small_disk) == []


def write_cfg(tmp_path, **over):
    cfg = tiny_config(tmp_path, **over)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return str(path), cfg


def test_run_infer_on_a_filling_disk(small_disk, tmp_path):
    path, cfg = write_cfg(tmp_path, output_file=str(small_disk / "emb.out"))
    out = small_disk / "emb.out"
    outcomes = set()
    for leave in range(0, 32 << 10, 4 << 10):
        for p in small_disk.iterdir():
            p.unlink()
        fill(small_disk, leave)
        try:
            run(load_infer_config(path, quiet=True))
        except OSError as e:
            assert e.errno == errno.ENOSPC and e.filename.startswith(str(small_disk)), e
            # no lock file, no part file, no temporary: at most a complete text without sidecar
            assert files_on(small_disk) in ([], ["emb.out"]), files_on(small_disk)
            outcomes.add(("failed", os.path.exists(out)))
        else:
            assert files_on(small_disk) == ["emb.out", "emb.out.npz"]
            assert read_embeddings(out).source == "sidecar"
            assert read_embeddings(out).line_numbers.tolist() == list(range(1, 9))
            outcomes.add(("written", True))
    assert ("failed", False) in outcomes and ("written", True) in outcomes, outcomes


def test_run_infer_sh_on_a_full_disk_is_one_line(small_disk, tmp_path):
    path, _ = write_cfg(tmp_path, output_file=str(small_disk / "emb.out"))
    fill(small_disk, 0)
    r = subprocess.run(["bash", str(ROOT / "run_infer.sh"), "0", path], capture_output=True,
                       text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert r.returncode != 0
    assert "Traceback" not in r.stderr + r.stdout
    errors = [line for line in r.stderr.splitlines() if ENOSPC_TEXT in line]
    assert errors and f"{ENOSPC_TEXT}: '{small_disk}/" in errors[0], r.stderr[-2000:]
    assert files_on(small_disk) == []


# ---------------------------------------------------------------------------- simulated ENOSPC
class FullDisk:
    """open() for writing whose file takes `room` bytes in all, then fails with ENOSPC (no
    filename: like write(2))."""

    def __init__(self, room=0):
        self.room = room

    def __call__(self, file, mode="r", *args, **kwargs):
        f = builtins.open(file, mode, *args, **kwargs)
        if not any(c in mode for c in "wax+"):
            return f
        disk, write = self, f.write

        def limited(data):
            n = len(data)
            if n > disk.room:
                write(data[:disk.room])
                disk.room = 0
                raise OSError(errno.ENOSPC, ENOSPC_TEXT)
            disk.room -= n
            return write(data)
        f.write = limited
        return f


@pytest.fixture
def full_disk(monkeypatch):
    """Every fileio write (atomic_write, write_text) runs out of space; np.savez too."""
    disk = FullDisk()
    monkeypatch.setattr(fileio, "open", disk, raising=False)

    real_savez = np.savez

    def savez(file, *args, **kwargs):
        if hasattr(file, "write"):
            return real_savez(file, *args, **kwargs)
        with builtins.open(file, "wb") as f:  # a path (atomic_path): half a file, then full
            f.write(b"PK\x03\x04 half an archive")
        raise OSError(errno.ENOSPC, ENOSPC_TEXT)
    monkeypatch.setattr(np, "savez", savez)
    return disk


def test_simulated_atomic_write_leaves_the_old_file_and_names_the_target(tmp_path, full_disk):
    out = tmp_path / "a.txt"
    out.write_text("old")
    full_disk.room = 5
    with pytest.raises(OSError) as e:
        write_text(out, "new and much longer")
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(out))
    assert out.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_simulated_errors_about_other_files_keep_their_name(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        with atomic_write(tmp_path / "b.txt") as f:
            f.write("x")
            open(tmp_path / "missing.txt")
    assert e.value.filename == str(tmp_path / "missing.txt")
    assert os.listdir(tmp_path) == []


def test_simulated_sidecar_failure_keeps_the_text_and_no_sidecar(tmp_path, full_disk,
                                                                 monkeypatch):
    out = tmp_path / "emb.out"
    old, new = embeddings(5, 8, 3), embeddings(12, 8, 4)
    full_disk.room = 1 << 30
    write_embeddings(out, *old)  # the text through fileio's open; the sidecar through savez(f)

    def failing_sidecar(file, *args, **kwargs):
        file.write(b"PK partial")
        raise OSError(errno.ENOSPC, ENOSPC_TEXT)
    monkeypatch.setattr(np, "savez", failing_sidecar)
    with pytest.raises(OSError) as e:
        write_embeddings(out, *new)
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, sidecar_path(out))
    assert sorted(os.listdir(tmp_path)) == ["emb.out"]  # the old sidecar was removed first
    assert np.array_equal(read_embeddings(out).text, new[0])


def test_simulated_text_failure_keeps_the_old_text_without_its_sidecar(tmp_path, full_disk):
    out = tmp_path / "emb.out"
    old = embeddings(5, 8, 5)
    full_disk.room = 1 << 30
    write_embeddings(out, *old)
    assert sorted(os.listdir(tmp_path)) == ["emb.out", "emb.out.npz"]
    full_disk.room = 100
    with pytest.raises(OSError) as e:
        write_embeddings(out, *embeddings(50, 8, 6))
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(out))
    assert sorted(os.listdir(tmp_path)) == ["emb.out"]
    assert np.array_equal(read_embeddings(out).text, old[0])


def test_simulated_eval_json(tmp_path, capsys, full_disk):
    emb_file = tmp_path / "emb.out"
    full_disk.room = 1 << 30
    write_embeddings(emb_file, *embeddings(20, 16, 7), sidecar=False)
    full_disk.room = 10
    result = tmp_path / "r.json"
    assert eval_retri.main([str(emb_file), "--json", str(result)]) == 2
    err = capsys.readouterr().err
    assert err == f"eval_retri.py: error: [Errno {errno.ENOSPC}] {ENOSPC_TEXT}: '{result}'\n"
    assert sorted(os.listdir(tmp_path)) == ["emb.out"]


def test_simulated_output_failure_of_a_run_leaves_nothing(tmp_path, full_disk):
    path, cfg = write_cfg(tmp_path)
    with pytest.raises(OSError) as e:
        run(load_infer_config(path, quiet=True))
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, cfg["output_file"])
    assert f"{ENOSPC_TEXT}: '{cfg['output_file']}'" in user_error_line(e.value)
    assert os.listdir(tmp_path / "out") == []


def test_simulated_atomic_dir(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(OSError) as e:
        with atomic_dir(target) as tmp:
            with open(os.path.join(tmp, "a.bin"), "wb"):
                raise OSError(errno.ENOSPC, ENOSPC_TEXT, os.path.join(tmp, "a.bin"))
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(target / "a.bin"))
    assert os.listdir(tmp_path) == []
