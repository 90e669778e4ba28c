"""Benchmark retrieval evaluation: a naive full-matrix evaluator vs eval_retri.py.

  python benchmarks/bench_eval.py [--lines 10000] [--dim 768] [--runs 3] [--out bench.json]
                                  [--digits 9,17] [--skip-naive] [--workdir DIR]

Writes N lines of L2-normalised random embeddings twice: in the inference output format (9
significant digits at most, str(np.float32); with its .npz sidecar) and with 17 significant digits
(repr of the float64 values, what repr(float) or np.savetxt-like writers give). Then measures,
each run in its own subprocess (wall time, CPU time and peak RSS of that process from os.wait4):

  naive-F      parse the text file line by line (float() per value, one float64 array per line,
               then float32), score the full N x N matrix in 10 row blocks, count ranks by
               comparison in both directions, print the table -- what the official script does
  ours-text-F  eval_retri.py OUT --no-sidecar   (vectorised parse + blocked scoring)
  ours-npz-9   eval_retri.py OUT                (loads OUT.npz after checking its SHA-256)

"ours" is the whole command as users run it: it scores both tie rules (the official, optimistic
one it prints, and the pessimistic one behind its tie warning); each run also writes --json, which
must hold both tables (the naive computes the official rule only, like the official script).
Runs are interleaved (every case once, then again, ...) so load changes hit all alike; medians
are reported. All printed tables must be identical.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "packages"))

from ernievil2.embeddings import write_embeddings  # noqa: E402
from ernievil2.fileio import write_text  # noqa: E402

TARGETS = {"ours-text-9": 0.30, "ours-text-17": 1.00}  # wall time vs the naive parse of the file

NAIVE = r'''
import sys
import numpy as np
from tabulate import tabulate

def parse(path):
    text, image = [], []
    with open(path) as f:
        for line in f:
            t, i, _ = line.rstrip("\n").split("\t")
            text.append(np.array([float(x) for x in t.split(" ")]))
            image.append(np.array([float(x) for x in i.split(" ")]))
    return np.array(text, dtype=np.float32), np.array(image, dtype=np.float32)

def ranks(score, blocks=10):
    n = score.shape[0]
    k = n // blocks
    out = []
    for b in range(blocks):
        x = score[b * k:(b + 1) * k]
        rows = np.arange(k)
        positive = np.take(x, (rows + b * k) + rows * score.shape[1])[:, None]
        out.append((x > positive).sum(1))
    return np.concatenate(out)

def recalls(r):
    n = float(len(r))
    v = [(r < 1).sum() / n, (r < 5).sum() / n, (r < 10).sum() / n]
    return v + [(v[0] + v[1] + v[2]) / 3.0]

text, image = parse(sys.argv[1])
n = len(text)
assert n % 10 == 0
k = n // 10
score = np.concatenate([np.matmul(text[b * k:(b + 1) * k], image.T) for b in range(10)], 0)
t2i, i2t = recalls(ranks(score)), recalls(ranks(score.T))
table = [["Text2Image"] + [round(j * 100, 2) for j in t2i],
         ["Image2Text"] + [round(j * 100, 2) for j in i2t],
         ["MeanRecall"] + [round((t2i[i] + i2t[i]) / 2 * 100, 2) for i in range(4)]]
print(tabulate(table, headers=["Name", "R@1", "R@5", "R@10", "meanRecall"], tablefmt="github",
               floatfmt=".2f"))
'''


def generate(folder: Path, n: int, dim: int, digits, seed: int = 0) -> dict:
    """Normalised random pairs (image = text + noise, so recall is far from 0 and from 1), one
    file per number of digits; returns {digits: (path, seconds to write)}."""
    rng = np.random.default_rng(seed)
    text = rng.standard_normal((n, dim), dtype=np.float32)
    image = text + np.float32(6.0) * rng.standard_normal((n, dim), dtype=np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    files = {}
    for d in digits:
        path = folder / f"embeddings_{d}.out"
        t0 = time.perf_counter()
        if d == "9":
            write_embeddings(path, text, image, sidecar=True)
        else:
            with open(path, "w") as f:
                for t, i in zip(text.astype(np.float64).tolist(), image.astype(np.float64).tolist()):
                    f.write(" ".join(map(repr, t)) + "\t" + " ".join(map(repr, i)) + "\t1\n")
        files[d] = (path, time.perf_counter() - t0)
    return files


def measure(cmd, workdir: Path) -> dict:
    """Run cmd; wall time, CPU time and peak RSS of exactly that process. A command writing
    --json (ours) must have written both tie rules' tables."""
    out_path, err_path = workdir / "stdout.txt", workdir / "stderr.txt"
    json_path = Path(cmd[cmd.index("--json") + 1]) if "--json" in cmd else None
    if json_path:
        json_path.unlink(missing_ok=True)
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}): {err_path.read_text()}")
    if json_path and not {"table_percent", "pessimistic"} <= set(json.loads(json_path.read_text())):
        raise RuntimeError(f"{cmd}: its --json lacks the official or the pessimistic table "
                           "(eval_retri.py must compute both tie rules)")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024.0, "table": out_path.read_text()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lines", type=int, default=10000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", help="write the results as JSON")
    p.add_argument("--digits", default="9,17",
                   help="which files: 9 (official format), 17 (repr of float64), or both")
    p.add_argument("--skip-naive", action="store_true",
                   help="only eval_retri.py (the naive one needs ~4*N*N bytes of scores)")
    p.add_argument("--workdir", help="where to write the embeddings file (default: a temp dir)")
    p.add_argument("--generate-into", help=argparse.SUPPRESS)  # the generating subprocess
    args = p.parse_args(argv)
    if args.generate_into:
        files = generate(Path(args.generate_into), args.lines, args.dim, args.digits.split(","))
        print(json.dumps({d: [str(path), s] for d, (path, s) in files.items()}))
        return 0
    if not args.skip_naive and args.lines % 10:
        p.error("the naive evaluator (like the official) needs --lines to be a multiple of 10")

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        digits = [d for d in args.digits.split(",") if d]
        if not set(digits) <= {"9", "17"}:
            p.error("--digits takes 9, 17 or 9,17")
        # in a subprocess: a child's peak RSS starts at its parent's RSS (fork/exec keeps the
        # high-water mark), and generating the 17-digit text takes ~700 MB
        gen = subprocess.run([sys.executable, __file__, "--generate-into", str(tmp),
                              "--lines", str(args.lines), "--dim", str(args.dim),
                              "--digits", ",".join(digits)],
                             check=True, capture_output=True, text=True)
        files = {d: (Path(path), s) for d, (path, s) in json.loads(gen.stdout).items()}
        naive_py = tmp / "naive_eval.py"
        naive_py.write_text(NAIVE)
        ours = [sys.executable, str(ROOT / "eval_retri.py")]
        json_out = ["--json", str(tmp / "results.json")]
        cases = {}
        for d, (emb, _) in files.items():
            if not args.skip_naive:
                cases[f"naive-{d}"] = [sys.executable, str(naive_py), str(emb)]
            cases[f"ours-text-{d}"] = ours + [str(emb), "--no-sidecar"] + json_out
            if d == "9":
                cases["ours-npz-9"] = ours + [str(emb)] + json_out
        runs = {name: [] for name in cases}
        load_before = os.getloadavg()
        for _ in range(args.runs):
            for name, cmd in cases.items():
                runs[name].append(measure(cmd, tmp))
        load_after = os.getloadavg()
        file_mb = {d: emb.stat().st_size / 2 ** 20 for d, (emb, _) in files.items()}
        write_s = {d: w for d, (_, w) in files.items()}
        sidecar = Path(str(files["9"][0]) + ".npz") if "9" in files else None
        sidecar_mb = sidecar.stat().st_size / 2 ** 20 if sidecar else None

    tables = {name: r[0]["table"] for name, r in runs.items()}
    identical = len(set(tables.values())) == 1 and all(
        x["table"] == r[0]["table"] for r in runs.values() for x in r)
    summary = {}
    for name, r in runs.items():
        summary[name] = {
            "wall_s_median": statistics.median(x["wall_s"] for x in r),
            "cpu_s_median": statistics.median(x["cpu_s"] for x in r),
            "peak_rss_mb_median": statistics.median(x["peak_rss_mb"] for x in r),
            "peak_rss_mb_max": max(x["peak_rss_mb"] for x in r),
            "wall_s_runs": [round(x["wall_s"], 3) for x in r],
        }
    sizes = ", ".join(f"{d} digits {mb:.0f} MB (written in {write_s[d]:.1f} s)"
                      for d, mb in file_mb.items())
    print(f"{args.lines} lines x {args.dim} dims: text files {sizes}"
          + (f", sidecar {sidecar_mb:.0f} MB" if sidecar_mb else "")
          + f"; {args.runs} runs each; {os.cpu_count()} CPUs, load average "
            f"{load_before[0]:.2f} -> {load_after[0]:.2f}")
    print(f"{'case':13s} {'wall s':>8s} {'cpu s':>8s} {'peak MB':>8s}  runs (wall s)")
    for name, s in summary.items():
        print(f"{name:13s} {s['wall_s_median']:8.2f} {s['cpu_s_median']:8.2f} "
              f"{s['peak_rss_mb_median']:8.0f}  {s['wall_s_runs']}")
    ratios = {}
    for name in summary:
        base = summary.get("naive-" + name.rsplit("-", 1)[1])
        if name.startswith("naive") or base is None:
            continue
        ratios[name] = {
            "time_vs_naive": summary[name]["wall_s_median"] / base["wall_s_median"],
            "cpu_vs_naive": summary[name]["cpu_s_median"] / base["cpu_s_median"],
            "memory_vs_naive": summary[name]["peak_rss_mb_median"] / base["peak_rss_mb_median"],
        }
        target = f" (target <= {TARGETS[name]:.2f}x)" if name in TARGETS else ""
        print(f"{name}: {ratios[name]['time_vs_naive']:.2f}x naive wall time{target}, "
              f"{ratios[name]['cpu_vs_naive']:.2f}x its CPU time, "
              f"{ratios[name]['memory_vs_naive']:.2f}x its peak memory")
    print("tables identical:", identical)
    print(next(iter(tables.values())), end="")
    if args.out:
        result = {"lines": args.lines, "dim": args.dim, "runs": args.runs,
                  "file_mb": file_mb, "sidecar_mb": sidecar_mb, "write_s": write_s,
                  "cpus": os.cpu_count(), "python": platform.python_version(),
                  "numpy": np.__version__, "load_average_before": load_before,
                  "load_average_after": load_after, "summary": summary, "ratios": ratios,
                  "tables_identical": identical, "table": next(iter(tables.values())),
                  "raw": {k: [{kk: vv for kk, vv in x.items() if kk != "table"} for x in v]
                          for k, v in runs.items()}}
        write_text(args.out, json.dumps(result, indent=2) + "\n")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
