"""run_infer end to end on tiny random towers: output format, order, sharding, skip policy, one
run per output file and complete merges."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from conftest import ROOT
from ernievil2.cli import load_infer_config as load_config
from ernievil2.data.tsv import DataError
from ernievil2.engine.infer import run
from ernievil2.engine.output import OutputBusyError, OutputLock, Part, merge_parts
from ernievil2.embeddings import read_embeddings
from helpers import make_image, tiny_config, tsv_line, write_tsv


def write_cfg(tmp_path, **over):
    cfg = tiny_config(tmp_path, **over)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return str(path), cfg


def run_in_process(tmp_path, **over):
    path, cfg = write_cfg(tmp_path, **over)
    run(load_config(path))
    return cfg


def test_output_has_one_line_per_input_in_order_with_line_numbers(tmp_path):
    cfg = run_in_process(tmp_path)
    out = cfg["output_file"]
    lines = open(out, encoding="utf-8").read().splitlines()
    assert len(lines) == 8
    cols = [l.split("\t") for l in lines]
    assert all(len(c) == 3 for c in cols)
    assert [int(c[2]) for c in cols] == list(range(1, 9))
    emb = read_embeddings(out)
    assert emb.text.shape == (8, 64) and emb.image.shape == (8, 64)
    np.testing.assert_allclose(np.linalg.norm(emb.text, axis=1), 1, atol=1e-5)
    assert not list((tmp_path / "out").glob("*.part*"))  # parts merged and removed


def test_padding_to_longest_gives_the_official_max_length_output(tmp_path):
    a = read_embeddings(run_in_process(tmp_path / "a", text_padding="longest")["output_file"])
    b = read_embeddings(run_in_process(tmp_path / "b", text_padding="max_length")["output_file"])
    np.testing.assert_allclose(a.text, b.text, atol=1e-5)
    np.testing.assert_array_equal(a.image, b.image)


def test_worker_threads_give_the_same_output(tmp_path):
    a = read_embeddings(run_in_process(tmp_path / "a", num_workers=0)["output_file"])
    b = read_embeddings(run_in_process(tmp_path / "b", num_workers=2)["output_file"])
    np.testing.assert_array_equal(a.text, b.text)
    np.testing.assert_array_equal(a.image, b.image)


def _add_bad_line(cfg_path, cfg):
    lines = open(cfg["test_file"], encoding="utf-8").read().splitlines()
    lines.insert(3, "a broken line\tid\tnot*base64")  # becomes line 4
    open(cfg["test_file"], "w", encoding="utf-8").write("\n".join(lines) + "\n")


def test_bad_line_stops_with_file_and_line_and_leaves_no_output(tmp_path):
    path, cfg = write_cfg(tmp_path)
    _add_bad_line(path, cfg)
    with pytest.raises(ValueError, match=r"test\.tsv:4: "):
        run(load_config(path))
    assert not (tmp_path / "out" / "emb.out").exists()


def test_skip_bad_lines_keeps_alignment_by_line_number(tmp_path):
    path, cfg = write_cfg(tmp_path, skip_bad_lines=True)
    _add_bad_line(path, cfg)
    run(load_config(path))
    emb = read_embeddings(cfg["output_file"])
    assert emb.line_numbers.tolist() == [1, 2, 3, 5, 6, 7, 8, 9]


def test_unknown_config_key_is_an_error_naming_it(tmp_path):
    path, _ = write_cfg(tmp_path)
    with pytest.raises(ValueError, match="infer_batchsize"):
        load_config(path, ["infer_batchsize=4"])


def test_run_infer_sh_single_process_cli(tmp_path):
    path, cfg = write_cfg(tmp_path)
    r = subprocess.run(["bash", str(ROOT / "run_infer.sh"), "0", path, "infer_batch_size=5"],
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin",
                                                            "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(read_embeddings(cfg["output_file"]).text) == 8
    assert "infer_batch_size': 5" in open(tmp_path / "log" / "infer.log", encoding="utf-8").read()


@pytest.mark.slow
def test_two_processes_on_a_multi_caption_file_with_bad_lines_equal_one(tmp_path):
    # 5 captions a photo (sharded by image), a line that does not parse and one whose image is
    # corrupt: the same output as one process, each bad line reported once
    lines = [tsv_line(f"照片{k}的第{n}句", f"p{k}", make_image(k)) for k in range(4) for n in range(5)]
    lines[6] = "a line without tabs"  # line 7
    lines[12] = "corrupt image\tp2\tnot*base64"  # line 13
    outputs, logs = [], []
    for name, devices in (("one", "0"), ("two", "0,1")):
        path, cfg = write_cfg(tmp_path / name, skip_bad_lines=True, infer_batch_size=4)
        open(cfg["test_file"], "w", encoding="utf-8").write("\n".join(lines) + "\n")
        r = subprocess.run(["bash", str(ROOT / "run_infer.sh"), devices, path],
                           capture_output=True, text=True, cwd=tmp_path,
                           env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
                                "LAUNCH_LOG_DIR": str(tmp_path / name / "launch")})
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        outputs.append(read_embeddings(cfg["output_file"]))
        logs.append(open(tmp_path / name / "log" / "infer.log", encoding="utf-8").read())
    a, b = outputs
    assert a.line_numbers.tolist() == [n for n in range(1, 21) if n not in (7, 13)]
    np.testing.assert_array_equal(a.line_numbers, b.line_numbers)
    np.testing.assert_allclose(a.text, b.text, atol=1e-6)
    np.testing.assert_allclose(a.image, b.image, atol=1e-6)
    for log in logs:
        assert "skipped 2 bad line(s): lines 7, 13;" in log


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    path1, cfg1 = write_cfg(tmp_path / "one")
    run(load_config(path1))
    path2, cfg2 = write_cfg(tmp_path / "two")
    r = subprocess.run(["bash", str(ROOT / "run_infer.sh"), "0,1", path2],
                       capture_output=True, text=True, cwd=tmp_path,
                       env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
                            "LAUNCH_LOG_DIR": str(tmp_path / "launch")})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    a, b = read_embeddings(cfg1["output_file"]), read_embeddings(cfg2["output_file"])
    np.testing.assert_array_equal(a.line_numbers, b.line_numbers)
    np.testing.assert_allclose(a.text, b.text, atol=1e-6)
    np.testing.assert_allclose(a.image, b.image, atol=1e-6)


def test_a_second_run_on_a_locked_output_fails_at_once_naming_the_holder(tmp_path):
    path, cfg = write_cfg(tmp_path)
    os.makedirs(tmp_path / "out")
    holder = OutputLock(cfg["output_file"])  # what the first run's rank 0 holds
    holder.acquire()
    try:
        with pytest.raises(OutputBusyError, match=rf"emb\.out is being written by another run "
                                                  rf"\(pid {os.getpid()}\); wait or choose"):
            run(load_config(path))
        assert not os.path.exists(cfg["output_file"])
    finally:
        holder.release()
    run(load_config(path))  # released: the output is free again, and so is its lock file
    assert len(read_embeddings(cfg["output_file"]).text) == 8
    assert not os.path.exists(cfg["output_file"] + ".lock")


def test_leftovers_of_a_killed_run_are_removed_and_nothing_else(tmp_path):
    path, cfg = write_cfg(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    leftovers = [".emb.tmp-99-abcd1234.out", ".emb.out.tmp-99-abcd1234.npz"]
    kept = ["emb.out.partial", ".emb2.tmp-99-abcd1234.out", ".other.tmp-99-abcd1234.out"]
    for name in leftovers + kept:
        (out / name).write_bytes(b"x")
    run(load_config(path))
    assert sorted(p.name for p in out.iterdir()) == sorted(kept + ["emb.out", "emb.out.npz"])
    assert read_embeddings(cfg["output_file"]).line_numbers.tolist() == list(range(1, 9))


def _fake_part(rank, lines, skipped=()):
    rows = np.full((len(lines), 4), float(rank), np.float32)
    return Part(rows, rows, np.asarray(lines, np.int64), [(n, "bad") for n in skipped])


def test_merge_accepts_exactly_the_lines_of_the_file_not_skipped(tmp_path):
    tsv = tmp_path / "t.tsv"
    tsv.write_text("".join(f"line {i}\n" for i in range(1, 6)) + "\n\n")  # 5 lines, blank tail
    out = str(tmp_path / "emb.out")
    text, _, lines, skipped = merge_parts([_fake_part(0, [1, 3, 5]), _fake_part(1, [4], skipped=[2])],
                                          out, str(tsv))
    assert lines.tolist() == [1, 3, 4, 5] and skipped.line_numbers == [2]
    assert skipped.details() == [f"{tsv}:2: bad"]
    assert text[:, 0].tolist() == [0, 0, 1, 0]  # rows follow their line numbers
    for parts, problem in (([[1, 3, 5], [4]], r"hold 4 line\(s\) .* expected 5; missing lines 2"),
                           ([[1, 3, 5], [2, 4, 6]], r"lines not in the file 6"),
                           ([[1, 3, 5], [2, 4, 5]], r"1 line\(s\) embedded twice")):
        with pytest.raises(RuntimeError, match=rf"emb\.out not written: the 2 part\(s\) .*{problem}"):
            merge_parts([_fake_part(r, lines) for r, lines in enumerate(parts)], out, str(tsv))


def _pause_while_holding(run_cmd, lock, attempts=5):
    """Start run_cmd() and stop (SIGSTOP) the process holding `lock` while it holds it: its pid is
    in the file, and the file is removed before the lock is let go, so a stopped owner whose pid
    is still in the file holds the lock. Retries when the run ends before it is caught."""
    for _ in range(attempts):
        proc = run_cmd()
        while proc.poll() is None:
            try:
                pid = int(open(lock).read().strip() or 0)
            except (FileNotFoundError, ValueError):
                pid = 0
            if pid:
                os.kill(pid, signal.SIGSTOP)
                try:
                    if int(open(lock).read().strip() or 0) == pid:
                        return proc, pid
                except FileNotFoundError:
                    pass
                os.kill(pid, signal.SIGCONT)
            time.sleep(0.01)
        proc.communicate()
    pytest.fail(f"the run never held {lock} long enough to be paused")


@pytest.mark.slow
def test_two_concurrent_runs_on_one_output(tmp_path):
    """Run A (2 processes) holds the output; its rank 0 is paused while run B (2 processes) starts
    on the same output_file: B fails at once naming A's pid, then A finishes intact."""
    rows = [(f"text {k}", f"img{k}", k) for k in range(120)]
    path_a, cfg = write_cfg(tmp_path / "a", test_file=write_tsv(tmp_path / "many.tsv", rows))
    path_b = tmp_path / "b.yaml"
    path_b.write_text(yaml.safe_dump(dict(cfg, log_dir=str(tmp_path / "b" / "log")),
                                     allow_unicode=True), encoding="utf-8")
    lock = cfg["output_file"] + ".lock"

    def launch(cfg_path, name):
        return subprocess.Popen(["bash", str(ROOT / "run_infer.sh"), "0,1", str(cfg_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
                                                   "LAUNCH_LOG_DIR": str(tmp_path / name)})

    a, holder = _pause_while_holding(lambda: launch(path_a, "launch_a"), lock)
    try:
        b = launch(path_b, "launch_b")
        b_out = b.communicate(timeout=300)[0]
    finally:
        os.kill(holder, signal.SIGCONT)
    a_out = a.communicate(timeout=300)[0]
    b_logs = b_out + "".join(p.read_text(errors="replace") for p in (tmp_path / "launch_b").glob("*"))
    assert b.returncode != 0, b_logs[-3000:]
    assert (f"emb.out is being written by another run (pid {holder}); wait or choose another "
            "output_file") in b_logs
    assert a.returncode == 0, a_out[-3000:]
    single = read_embeddings(run_in_process(tmp_path / "single", test_file=cfg["test_file"])["output_file"])
    both = read_embeddings(cfg["output_file"])
    assert both.line_numbers.tolist() == list(range(1, 121))
    np.testing.assert_allclose(both.text, single.text, atol=1e-6)
    np.testing.assert_allclose(both.image, single.image, atol=1e-6)
    assert not os.path.exists(lock) and not list((tmp_path / "a" / "out").glob("*part*"))


def _add_long_image_line(cfg):
    """Line 4: a legal 1 x 100,000 PNG (100,000 pixels; resized, it would be 32 x 3.2 M)."""
    import cv2

    ok, png = cv2.imencode(".png", np.full((1, 100_000, 3), 90, np.uint8))
    assert ok
    lines = open(cfg["test_file"], encoding="utf-8").read().splitlines()
    lines.insert(3, tsv_line("a very long image", "long", png.tobytes()))
    open(cfg["test_file"], "w", encoding="utf-8").write("\n".join(lines) + "\n")


@pytest.fixture
def restore_pixel_limit(monkeypatch):
    from ernievil2 import transforms

    monkeypatch.setattr(transforms, "_max_image_pixels", transforms.get_max_image_pixels())


def test_an_image_over_max_image_pixels_is_a_bad_line_skipped_by_run_infer_sh(tmp_path):
    path, cfg = write_cfg(tmp_path)
    _add_long_image_line(cfg)
    r = subprocess.run(["bash", str(ROOT / "run_infer.sh"), "0", path, "max_image_pixels=50000",
                        "skip_bad_lines=true"],
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin",
                                                            "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_embeddings(cfg["output_file"]).line_numbers.tolist() == [1, 2, 3, 5, 6, 7, 8, 9]
    log = open(tmp_path / "log" / "infer.log", encoding="utf-8").read()
    assert (f"{cfg['test_file']}:4: undecodable image: image of 100000x1 = 100,000 pixels is over "
            "the limit of 50,000 pixels (max_image_pixels)") in log


def test_max_image_pixels_stops_a_strict_run_and_null_lifts_it(tmp_path, restore_pixel_limit):
    path, cfg = write_cfg(tmp_path, max_image_pixels=99_999)
    _add_long_image_line(cfg)
    with pytest.raises(DataError, match=r"test\.tsv:4: .* over the limit of 99,999 pixels"):
        run(load_config(path))
    assert not os.path.exists(cfg["output_file"])
    run(load_config(path, ["max_image_pixels=null"]))  # the long image itself is harmless
    assert read_embeddings(cfg["output_file"]).line_numbers.tolist() == list(range(1, 10))


def test_max_image_pixels_default_is_the_decoders(tmp_path):
    from ernievil2.transforms import DEFAULT_MAX_IMAGE_PIXELS

    path, _ = write_cfg(tmp_path)
    assert load_config(path).max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match="max_image_pixels"):
        load_config(path, ["max_image_pixels=0"])


def test_skip_bad_lines_logs_every_skipped_line_with_its_reason(tmp_path, capsys):
    path, cfg = write_cfg(tmp_path, skip_bad_lines=True)
    lines = open(cfg["test_file"], encoding="utf-8").read().splitlines()
    bad = {2: "x\tid\tnot*base64", 4: "x\tid", 5: "\tid\tQUJD", 6: "x\tid\tQUJD",
           8: "x\tid\t" + "A" * 5, 9: "x\tid\tnot*base64", 10: "x\tid\tQUJD"}
    for n in sorted(bad):
        lines.insert(n - 1, bad[n])
    open(cfg["test_file"], "w", encoding="utf-8").write("\n".join(lines) + "\n")
    run(load_config(path))
    assert read_embeddings(cfg["output_file"]).line_numbers.tolist() == [1, 3, 7, 11, 12, 13, 14, 15]
    log = open(tmp_path / "log" / "infer.log", encoding="utf-8").read()
    listed = [line.split("skipped ", 1)[1] for line in log.splitlines() if " skipped /" in line]
    assert [int(x.split(":")[1]) for x in listed] == sorted(bad)  # every line, in line order
    assert all(x.startswith(f"{cfg['test_file']}:") and len(x.split(": ", 1)[1]) > 5 for x in listed)
    assert f"{cfg['test_file']}:4: expected 3 to 5 tab-separated columns" in log
    console = capsys.readouterr().err
    assert "skipped 7 bad line(s): lines 2, 4, 5, 6, 8 (+2 more)" in console
    assert "infer.log" in console and f"{cfg['test_file']}:10:" not in console


@pytest.mark.parametrize("content", ["", "\n\n", "\ufeff\n"])
def test_an_empty_tsv_is_an_error_not_an_empty_output(tmp_path, content):
    from ernievil2.cli import user_error_line

    path, cfg = write_cfg(tmp_path)
    open(cfg["test_file"], "w", encoding="utf-8").write(content)
    with pytest.raises(DataError) as e:
        run(load_config(path))
    assert user_error_line(e.value) == (f"error: {cfg['test_file']}: no data lines (the file is "
                                        "empty): nothing to embed")
    assert not os.path.exists(cfg["output_file"])
