"""Several machines, proven on one: two launcher invocations on 127.0.0.1 are two nodes of one
process each (NNODES=2 MASTER=127.0.0.1:PORT NODE_RANK=0/1), each in its own working folder, so
the nodes share no output folder. Training gives the weights of 2 processes on one node, every
node keeps checkpoints it can resume from, and inference writes the same output file on node 0."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import ROOT
from ernievil2 import launch
from ernievil2.checkpoint import read_state_dict
from helpers import tiny_config
from test_train_resume import losses, train_config

pytestmark = pytest.mark.slow
ENV = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}


def free_port():
    """A port nothing listens on now: bound by the OS's choice, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_node(tmp_path, script, config, *over):
    """`bash SCRIPT 0,1 CONFIG`: 2 processes on one machine, in tmp_path/one."""
    cwd = tmp_path / "one"
    cwd.mkdir(exist_ok=True)
    r = subprocess.run(["bash", str(ROOT / script), "0,1", config, *over], capture_output=True,
                       text=True, cwd=cwd, env={**ENV, "LAUNCH_LOG_DIR": str(cwd / "launch")},
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return cwd


def two_nodes(tmp_path, script, config, *over, check=True):
    """`NNODES=2 MASTER=127.0.0.1:PORT NODE_RANK=k bash SCRIPT 0 CONFIG` twice at once, node k
    in tmp_path/nodeK; returns the two working folders and node 0's console (check=False: the
    two (exit status, stderr))."""
    master = f"127.0.0.1:{free_port()}"
    procs, cwds = [], []
    for rank in range(2):
        cwd = tmp_path / f"node{rank}"
        cwd.mkdir(exist_ok=True)
        env = {**ENV, "NNODES": "2", "MASTER": master, "NODE_RANK": str(rank),
               "LAUNCH_LOG_DIR": str(cwd / "launch")}
        procs.append(subprocess.Popen(["bash", str(ROOT / script), "0", config, *over], cwd=cwd,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
        cwds.append(cwd)
    outs = [p.communicate(timeout=900) for p in procs]
    if not check:
        return [(p.returncode, err) for p, (_, err) in zip(procs, outs)]
    for rank, (p, (out, err)) in enumerate(zip(procs, outs)):
        logs = "".join(f.read_text(errors="replace")[-2000:]
                       for f in (cwds[rank] / "launch").glob("workerlog.*"))
        assert p.returncode == 0, f"node {rank}: {out[-2000:]}{err[-2000:]}\n{logs}"
    return cwds, outs[0][0] + outs[0][1]


def test_the_launch_command_of_a_node():
    cmd = launch.launch_command("train", ["0"], "/c.yaml", [], "L", gpu=False, nnodes="2",
                                master="10.0.0.1:8090", node_rank="1", python="py")
    assert cmd[3:12] == ["--log_dir", "L", "--nnodes", "2", "--master", "10.0.0.1:8090", "--rank", "1",
                         "--nproc_per_node"]
    zs = launch.launch_command("zeroshot", ["0", "1"], "/c.yaml", ["a=1"], "L", gpu=False, python="py",
                               options=["--classes", "c.txt", "--images", "i.tsv"])
    assert zs[-8:] == ["-m", "ernievil2.zeroshot_cli", "/c.yaml", "a=1", "--classes", "c.txt", "--images",
                       "i.tsv"]
    for nnodes, rank, problem in (("2", "2", "NODE_RANK must be 0 .. NNODES-1 = 1"),
                                  ("two", None, "NNODES must be the number of machines"),
                                  (None, "1", "NODE_RANK is set without NNODES")):
        with pytest.raises(launch.LaunchError, match=problem):
            launch.launch_command("train", ["0"], "/c.yaml", [], "L", gpu=False, nnodes=nnodes,
                                  master="h:1", node_rank=rank)


def test_rows_travel_in_rounds_and_each_folder_gets_one_writer(tmp_path):
    r = subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
                        "--log_dir", str(tmp_path / "log"), str(ROOT / "tests" / "_dist_multinode_worker.py"),
                        str(tmp_path)], capture_output=True, text=True, timeout=300)
    logs = "".join(p.read_text()[-2000:] for p in (tmp_path / "log").glob("workerlog.*"))
    assert r.returncode == 0, logs
    got = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in range(2)]
    # rank 0 received every rank's rows in order, whole, from 3 rounds of 2 rows
    assert got[0]["gathered"]["ragged"] == [[[0, i, -i] for i in range(5)], []]
    assert got[0]["gathered"]["empty0"] == [[], [[1, i, -i] for i in range(3)]]
    # one folder both see: rank 0 writes it; a folder of each rank's own: each writes its own
    assert [g["writers"] for g in got] == [{"shared": True, "own": True}, {"shared": False, "own": True}]
    assert got[0]["left"] == [] and got[1]["left"] == []  # no marker is left behind
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_inference_on_two_nodes_writes_the_file_of_two_processes_on_one(tmp_path):
    cfg = tiny_config(tmp_path / "data", output_file="out/emb.out", log_dir="log")
    config = tmp_path / "infer.yaml"
    config.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    one = one_node(tmp_path, "run_infer.sh", str(config))
    (node0, node1), console = two_nodes(tmp_path, "run_infer.sh", str(config))
    for name in ("emb.out", "emb.out.npz"):
        assert (node0 / "out" / name).read_bytes() == (one / "out" / name).read_bytes(), name
    assert not (node1 / "out").exists()  # node 1 sent its rows to rank 0; it wrote no file
    assert "HTTP Request" not in console and "LAUNCH" not in console  # the rendezvous is quiet


def test_an_error_on_one_node_is_its_one_line_and_the_other_node_points_there(tmp_path):
    cfg = tiny_config(tmp_path / "data", output_file="out/emb.out", log_dir="log")
    lines = open(cfg["test_file"], encoding="utf-8").read().splitlines()
    lines[1] = "a line without its columns"  # line 2: rank 1's, on node 1
    open(cfg["test_file"], "w", encoding="utf-8").write("\n".join(lines) + "\n")
    config = tmp_path / "infer.yaml"
    config.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    (rc0, err0), (rc1, err1) = two_nodes(tmp_path, "run_infer.sh", str(config), check=False)
    assert rc1 == 1 and err1.strip().splitlines() == [
        f"error: {cfg['test_file']}:2: expected 3 to 5 tab-separated columns (text, image_id, "
        f"base64 image[, tags[, label]]), found 1 (rank 1; log: {tmp_path / 'node1' / 'launch' / 'workerlog.0'})"]
    assert rc0 == 1 and "Traceback" not in err0
    assert err0.strip().splitlines()[-1].endswith("the cause may be on another machine: see its console)")
    assert not (tmp_path / "node0" / "out" / "emb.out").exists()


def _weights(path):
    return read_state_dict(str(path))


def _same_weights(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_training_on_two_nodes_gives_the_weights_of_two_processes_on_one(tmp_path):
    config, _ = train_config(tmp_path / "data", output_dir="out", log_dir="out", max_steps=4,
                             save_every=2, keep_last=5)
    one = one_node(tmp_path, "run_train.sh", config)
    (node0, node1), _ = two_nodes(tmp_path, "run_train.sh", config)
    reference = _weights(one / "out" / "final" / "model.pdparams")
    _same_weights(_weights(node0 / "out" / "final" / "model.pdparams"), reference)
    assert losses(node0 / "out") == losses(one / "out")
    # node 1 kept the checkpoints (every rank's state) and the final model on its own disk
    for step in ("step_00000002", "step_00000004"):
        folder = node1 / "out" / "checkpoints" / step
        assert {"COMPLETE", "model.pdparams", "optimizer.pdopt", "state.pkl", "rng_rank0.pkl",
                "rng_rank1.pkl"} <= set(os.listdir(folder))
    _same_weights(_weights(node1 / "out" / "final" / "model.pdparams"), reference)
    assert not (node1 / "out" / "train.jsonl").exists()  # the log is rank 0's

    # each node resumes from its own disk, from the newest step both have: node 1 lost step 4
    shutil.rmtree(node1 / "out" / "checkpoints" / "step_00000004")
    for node in (node0, node1):
        shutil.rmtree(node / "out" / "final")
    two_nodes(tmp_path, "run_train.sh", config, "resume=auto")
    assert "resumed from out/checkpoints/step_00000002 at step 2" in \
        (node0 / "out" / "train.log").read_text(encoding="utf-8")
    _same_weights(_weights(node0 / "out" / "final" / "model.pdparams"), reference)
    _same_weights(_weights(node1 / "out" / "final" / "model.pdparams"), reference)


def test_the_image_feature_cache_needs_no_shared_folder(tmp_path):
    """image_feature_cache_dir on each machine's own disk: each machine keeps the file, and the
    cache is loaded only when every machine has it (building is collective)."""
    config, _ = train_config(tmp_path / "data", output_dir="out", log_dir="out", max_steps=2,
                             save_every=2, freeze_image_tower=True, image_feature_cache=2,
                             image_feature_cache_dir="cache")

    def cache_files(node):
        return list((node / "cache").glob("image_features_*.npy"))

    (node0, node1), _ = two_nodes(tmp_path, "run_train.sh", config)
    assert len(cache_files(node0)) == 1 and len(cache_files(node1)) == 1
    cache_files(node1)[0].unlink()  # node 1 lost it: both build again, node 1 keeps it again
    two_nodes(tmp_path, "run_train.sh", config, "output_dir=out2", "log_dir=out2")
    assert len(cache_files(node1)) == 1
    assert "frozen image features from" not in (node0 / "out2" / "train.log").read_text(encoding="utf-8")
    two_nodes(tmp_path, "run_train.sh", config, "output_dir=out3", "log_dir=out3")
    assert "frozen image features from" in (node0 / "out3" / "train.log").read_text(encoding="utf-8")
