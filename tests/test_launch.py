"""The launcher (ernievil2.launch, behind run_infer.sh / run_train.sh / ernievil2-infer): devices,
the paddle.distributed.launch command, the quiet console, and errors of any rank on the console."""
import io
import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from ernievil2 import cli, launch
from ernievil2.embeddings import read_embeddings
from helpers import tiny_config

ENV = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}


def sh(script, *args, cwd=None, **env):
    return subprocess.run(["bash", str(ROOT / script), *args], capture_output=True, text=True,
                          cwd=cwd, env={**ENV, **env}, timeout=600)


def write_cfg(folder, bad_line=None, **over):
    cfg = tiny_config(folder, **over)
    if bad_line:
        lines = open(cfg["test_file"], encoding="utf-8").read().splitlines()
        lines[bad_line - 1] = "a line without its columns"
        open(cfg["test_file"], "w", encoding="utf-8").write("\n".join(lines) + "\n")
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return str(path), cfg


@pytest.mark.parametrize("script", ["run_infer.sh", "run_train.sh"])
def test_help_exits_0_and_a_missing_argument_exits_2(script):
    r = sh(script, "--help")
    assert r.returncode == 0 and f"usage: bash {script} DEVICES CONFIG" in r.stdout
    assert "NNODES" in r.stdout and "-v" in r.stdout
    r = sh(script, "0")
    assert r.returncode == 2 and "DEVICES and CONFIG are required" in r.stderr


def test_devices_as_the_official_script():
    assert launch.parse_devices("2") == ["2"]
    assert launch.parse_devices("0,1,3") == ["0", "1", "3"]
    for bad in ("", "a", "0,", "0;1", "gpu"):
        with pytest.raises(launch.LaunchError, match="DEVICES"):
            launch.parse_devices(bad)


def test_the_paddle_launch_command():
    cpu = launch.launch_command("infer", ["0", "1"], "/c.yaml", ["a=1"], "L", gpu=False, python="py")
    assert cpu == ["py", "-m", "paddle.distributed.launch", "--log_dir", "L", "--nproc_per_node", "2",
                   "py", "-u", "-m", "ernievil2.cli", "infer", "/c.yaml", "a=1"]
    gpu = launch.launch_command("train", ["2", "3"], "/c.yaml", [], "L", gpu=True, nnodes="2",
                                master="10.0.0.1:8090", python="py")
    assert gpu[3:10] == ["--log_dir", "L", "--nnodes", "2", "--master", "10.0.0.1:8090", "--devices"]
    assert gpu[10] == "2,3" and gpu[-3:] == ["ernievil2.cli", "train", "/c.yaml"]
    with pytest.raises(launch.LaunchError, match="MASTER"):
        launch.launch_command("train", ["0"], "/c.yaml", [], "L", gpu=False, nnodes="2")


def test_worker_environment(tmp_path):
    env = launch.worker_env(tmp_path, verbose=False, base={"PYTHONPATH": "/x"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT / "packages"), "/x"]  # this checkout's code
    assert env["GLOG_minloglevel"] == "2" and env[cli.ERROR_DIR_ENV] == str(tmp_path)
    assert "GLOG_minloglevel" not in launch.worker_env(tmp_path, verbose=True, base={})


STREAM = """LAUNCH INFO 2026-12-03 09:35:21,653 -----------  Configuration  ----------------------
LAUNCH INFO 2026-12-03 09:35:21,653 nproc_per_node: 2
I1203 09:35:22.100000 1234 init.cc:88] glog line
======================= Modified FLAGS detected =======================
FLAGS(name='FLAGS_enable_pir_in_executor', current_value=True, default_value=False)
=======================================================================
2026-12-03 09:35:26,518 WARNING ernievil2.factory: random weights
embed:  50%|#####     | 2/4\rembed: 100%|##########| 4/4
Traceback (most recent call last):
  File "x.py", line 1, in <module>
    barrier()
RuntimeError: [pair.cc:584] TIMEOUT self_rank = 0 pair_rank = 1

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "y.py", line 2
KeyError: 'k'
wrote out.txt
LAUNCH ERROR 2026-12-03 09:35:27,000 Container failed !!!
Container rank 1 status failed cmd [...] code 1 log log/workerlog.1
error: test.tsv:2: bad line
"""


def feed(verbose):
    console, logfile = io.StringIO(), io.StringIO()
    f = launch.ConsoleFilter(console, logfile, verbose)
    for k in range(0, len(STREAM), 7):  # in pieces, as a pipe delivers them
        f.feed(STREAM[k:k + 7])
    f.close()
    return console.getvalue(), logfile.getvalue(), f


def test_quiet_console_keeps_progress_results_and_warnings_only():
    console, log, f = feed(verbose=False)
    assert log == STREAM
    assert console == ("2026-12-03 09:35:26,518 WARNING ernievil2.factory: random weights\n"
                       "embed:  50%|#####     | 2/4\rembed: 100%|##########| 4/4\n\n"
                       "wrote out.txt\n")
    assert f.failed and f.shown == set()  # the error lines were all hidden


def test_verbose_console_shows_everything():
    console, log, _ = feed(verbose=True)
    assert console == log == STREAM


def test_a_failing_process_leaves_its_one_line_for_the_launcher(tmp_path, monkeypatch):
    monkeypatch.setenv(cli.ERROR_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("PADDLE_TRAINER_ID", "1")

    def user_error(_):
        raise cli.ConfigError("run.yaml: key 'x' is invalid")
    with pytest.raises(SystemExit) as e:
        cli.run_main(user_error)
    assert e.value.code == 1
    rec = json.loads((tmp_path / "error.rank1.json").read_text())
    assert rec["message"] == "error: run.yaml: key 'x' is invalid" and rec["user_error"]

    monkeypatch.setenv("PADDLE_TRAINER_ID", "0")

    def bug(_):
        raise RuntimeError("TIMEOUT self_rank = 0\nmore detail")
    with pytest.raises(RuntimeError):  # a bug keeps its traceback (in the process's log)
        cli.run_main(bug)
    later = json.loads((tmp_path / "error.rank0.json").read_text())
    assert later["message"] == "RuntimeError: TIMEOUT self_rank = 0" and not later["user_error"]
    # the cause first: the user error, although the peer's timeout may be written at any time
    assert [r["rank"] for r in launch.read_errors(str(tmp_path))] == [1, 0]
    launch.clear_errors(str(tmp_path))
    assert launch.read_errors(str(tmp_path)) == []


def test_a_bad_config_fails_before_any_process_starts(tmp_path):
    path, _ = write_cfg(tmp_path)
    r = sh("run_infer.sh", "0,1", path, "infer_batch_sise=3", LAUNCH_LOG_DIR=str(tmp_path / "launch"))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"error: {path}: unknown key(s) 'infer_batch_sise' (did you mean 'infer_batch_size'?); "
        "every key is listed in the README's configuration section"]
    assert not (tmp_path / "launch").exists()


def test_one_process_user_error_is_one_line(tmp_path):
    path, cfg = write_cfg(tmp_path, bad_line=2)
    r = sh("run_infer.sh", "0", path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    # (the line may follow an unfinished progress bar on the same console line)
    assert r.stderr.count("error: ") == 1
    assert (f"error: {cfg['test_file']}:2: expected 3 to 5 tab-separated columns (text, "
            "image_id, base64 image[, tags[, label]]), found 1\n") in r.stderr


def test_a_shipped_config_runs_by_name_from_another_folder(tmp_path):
    _, cfg = write_cfg(tmp_path / "data")
    r = sh("run_infer.sh", "0", "demo_tiny", f"vocab_file={cfg['vocab_file']}",
           f"test_file={cfg['test_file']}", "output_file=out/emb.out", "log_dir=log", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    emb = read_embeddings(str(tmp_path / "out" / "emb.out"))  # relative to the working directory
    assert emb.text.shape == (8, 128) and (tmp_path / "log" / "infer.log").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 0])
def test_an_error_on_any_rank_reaches_the_console_once(tmp_path, rank):
    """Line i goes to rank (i-1) % 2: only `rank` reads the bad line; the other process then fails
    in the collective (a gloo timeout), which must not hide the cause."""
    bad_line = rank + 1
    path, cfg = write_cfg(tmp_path, bad_line=bad_line)
    logs = tmp_path / "launch"
    r = sh("run_infer.sh", "0,1", path, cwd=tmp_path, LAUNCH_LOG_DIR=str(logs))
    console = r.stdout + r.stderr
    assert r.returncode == 1
    cause = f"error: {cfg['test_file']}:{bad_line}: expected 3 to 5 tab-separated columns"
    assert console.count(cause) == 1, console[-3000:]
    if rank == 1:  # rank 0's console lines are its own; another rank's error comes with its log
        line = next(ln for ln in console.splitlines() if cause in ln)
        assert line.endswith(f"(rank 1; log: {logs / 'workerlog.1'})")
    for noise in ("Traceback", "LAUNCH", "TIMEOUT", "Modified FLAGS"):
        assert noise not in console, noise
    assert cause in (logs / f"workerlog.{rank}").read_text(encoding="utf-8")
    assert "LAUNCH INFO" in (logs / "launcher.log").read_text(encoding="utf-8")


def test_a_closed_pipe_ends_a_command_quietly(tmp_path):
    """`ernievil2-search ... --json | head`: the reader leaves early; no traceback, no noise."""
    script = ("import sys; sys.path.insert(0, %r)\n"
              "from ernievil2.cli import run_main\n"
              "def main(argv):\n"
              "    for i in range(200000):\n"
              "        print('line', i)\n"
              "run_main(main)\n") % str(ROOT / "packages")
    r = subprocess.run(f"{sys.executable} -c \"$SCRIPT\" | head -n 2", shell=True, text=True,
                       capture_output=True, env={**ENV, "SCRIPT": script}, timeout=120)
    assert r.stdout == "line 0\nline 1\n"
    assert r.stderr == ""
