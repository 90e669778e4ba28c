"""Benchmark inference for a config and a TSV: towers, preprocessing, run_infer.sh end to end
(1 and 2 processes), memory, and eval_retri.py time/memory against line count.

  python benchmarks/bench_infer.py CONFIG.yaml TSV [key=value ...] [--lines N]
         [--modes official,eager,to_static,inference] [--procs 1,2] [--repeats 1]
         [--eval-lines 1000,10000,50000] [--out DIR] [--skip SECTION ...]

  e.g.  python benchmarks/bench_infer.py packages/configs/ernie_vil_base.yaml ../shared/golden/set1.tsv \\
            device=cpu init_from_params= vocab_file=../shared/data/vocab/ernie-3.0-base-zh/vocab.txt \\
            --lines 220 --out bench_out

Modes (config overrides on top of CONFIG and the key=value pairs given):
  official   execution=eager text_padding=max_length num_workers=0, and MKL left at its default
             kernels (MKL_DEBUG_CPU_TYPE empty): our engine set up as the official code runs
  official_mkl  as official, with MKL's fast kernels on AMD CPUs (what the engine does by itself)
  eager      execution=eager text_padding=longest num_workers=2 (MKL's fast kernels on AMD CPUs)
  to_static  execution=to_static, otherwise as eager
  inference  execution=inference (exported towers, Paddle Inference + oneDNN), otherwise as eager

Sections (each can be skipped with --skip NAME):
  preprocess  decode + preprocess images/s: one thread, and the BatchLoader with 1 and 2 workers
  towers      images/s and texts/s of each tower per mode, on a real batch of the TSV (one
              subprocess per mode; the first call is a warm-up and not timed); peak memory
  e2e         `bash run_infer.sh 0 CONFIG ...` (and `0,1` for 2 processes) per mode: lines/s over
              the embedding phase (the engine's own "start-up Xs, embedding Ys" log line), start-up
              apart, wall time, peak RSS summed over the process tree (sampled every 0.1 s) and
              the largest single process's, and the CPU other processes took meanwhile (the
              machine's load; the figures are only as good as it is low)
  eval        eval_retri.py on the e2e output, and benchmarks/bench_eval.py for --eval-lines

--lines N repeats the TSV's lines (cyclically) into a temporary file of N lines. Results go to
DIR/bench_infer.json and DIR/bench_infer.md (the tables, also printed).
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "packages"))

MODES = {
    "official": ({"execution": "eager", "text_padding": "max_length", "num_workers": 0},
                 {"MKL_DEBUG_CPU_TYPE": ""}),
    "official_mkl": ({"execution": "eager", "text_padding": "max_length", "num_workers": 0}, {}),
    "eager": ({"execution": "eager", "text_padding": "longest", "num_workers": 2}, {}),
    "to_static": ({"execution": "to_static", "text_padding": "longest", "num_workers": 2}, {}),
    "inference": ({"execution": "inference", "text_padding": "longest", "num_workers": 2}, {}),
}
SECTIONS = ("preprocess", "towers", "e2e", "eval")
ENGINE_DONE = re.compile(r"wrote .*?: (\d+) lines \((\d+) skipped.*?start-up ([\d.]+)s, "
                         r"embedding ([\d.]+)s \(~([\d.]+) lines/s")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------ helpers
def machine_info():
    import numpy as np
    import paddle
    cpu = "?"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_gb, 1),
            "python": platform.python_version(), "paddle": paddle.__version__,
            "numpy": np.__version__, "platform": platform.platform(),
            "gpu": bool(paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count())}


def repeat_lines(tsv, n, out_path):
    lines = [l for l in open(tsv, encoding="utf-8").read().splitlines() if l.strip()]
    if not lines:
        raise SystemExit(f"{tsv}: no lines")
    with open(out_path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(lines[i % len(lines)] + "\n")
    return out_path


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _busy_ticks():
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


def _proc_tree(root):
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _status_mb(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS", "VmHWM")):
                    out[line.split(":")[0]] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


class TreeMemory(threading.Thread):
    """Samples a process tree: peak of the summed RSS, and each process's own peak (VmHWM)."""

    def __init__(self, pid, every=0.1):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak_sum_mb, self.hwm = 0.0, {}
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            total = 0.0
            for pid in _proc_tree(self.pid):
                s = _status_mb(pid)
                total += s.get("VmRSS", 0.0)
                if "VmHWM" in s:
                    self.hwm[pid] = max(self.hwm.get(pid, 0.0), s["VmHWM"])
            self.peak_sum_mb = max(self.peak_sum_mb, total)
            self.stop.wait(self.every)


def measure(cmd, env=None, cwd=None, log_path=None):
    """Run cmd; wall and CPU time of its tree (os.wait4), memory (TreeMemory), others' CPU."""
    busy0, t0 = _busy_ticks(), time.perf_counter()
    with open(log_path or os.devnull, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        mon = TreeMemory(proc.pid)
        mon.start()
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    mon.stop.set()
    mon.join()
    busy = (_busy_ticks() - busy0) / CLK_TCK
    cpu = usage.ru_utime + usage.ru_stime
    return {"returncode": os.waitstatus_to_exitcode(status), "wall_s": wall, "cpu_s": cpu,
            "peak_rss_sum_mb": mon.peak_sum_mb, "peak_rss_hwm_sum_mb": sum(mon.hwm.values()),
            "peak_rss_max_process_mb": usage.ru_maxrss / 1024,
            "other_load_cores": max(0.0, (busy - cpu) / wall) if wall > 0 else None}


def fmt(x, nd=2):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


# ------------------------------------------------------------------------------------ sections
def bench_preprocess(cfg, tsv, max_images=200):
    """Decode + preprocess throughput: one thread, then the BatchLoader with 1 and 2 workers."""
    from ernievil2.data.pipeline import BatchLoader
    from ernievil2.data.tsv import iter_records, record_image_bytes
    from ernievil2.factory import create_tokenizer, create_transforms, text_encoder
    from ernievil2.transforms import decode_image

    _, transform = create_transforms(cfg)
    encode_texts = text_encoder(cfg, create_tokenizer(cfg))
    raws = []
    for rec in iter_records(tsv, 0, 1):
        raws.append(record_image_bytes(tsv, rec))
        if len(raws) == max_images:
            break
    t = time.perf_counter()
    for raw in raws:
        transform(decode_image(raw))
    serial = len(raws) / (time.perf_counter() - t)
    out = {"images": len(raws), "one_thread_images_per_s": serial, "loader": {}}
    for workers in (1, 2):
        loader = BatchLoader(tsv, cfg.infer_batch_size, image_transform=transform,
                             text_encoder=encode_texts, decode_image=decode_image,
                             num_workers=workers, prefetch=cfg.prefetch)
        t, n = time.perf_counter(), 0
        for batch in loader:
            n += len(batch)
        rate = n / (time.perf_counter() - t)
        out["loader"][workers] = {"images_per_s": rate, "per_worker_images_per_s": rate / workers,
                                  "lines": n}
    return out


def tower_worker(mode, config, tsv, overrides, batches):
    """(subprocess) Build one mode's towers and time them on the TSV's first batch."""
    t_start = time.perf_counter()
    import numpy as np

    from ernievil2.cli import load_infer_config as load_config
    from ernievil2.data.pipeline import BatchLoader
    from ernievil2.device import select_device
    from ernievil2.embed import build_towers
    from ernievil2.export import config_fingerprint, cache_root, is_complete
    from ernievil2.transforms import decode_image

    mode_over, _ = MODES[mode]
    cfg = load_config(config, list(overrides) + [f"{k}={v}" for k, v in mode_over.items()])
    place, amp = select_device(cfg.device, cfg.amp)  # also picks MKL's fast kernels on AMD
    info = {}
    t0 = time.perf_counter()
    if cfg.execution == "inference":
        target = cfg.export_dir or os.path.join(cache_root(), config_fingerprint(cfg))
        info["export_cached"] = is_complete(target)
    towers, transform, encode_texts = build_towers(cfg, place, amp)
    info["startup_s"] = time.perf_counter() - t0
    loader = BatchLoader(tsv, cfg.infer_batch_size, image_transform=transform,
                         text_encoder=encode_texts, decode_image=decode_image, num_workers=0)
    batch = next(iter(loader))
    info["batch"], info["text_len"] = len(batch), int(batch.input_ids.shape[1])
    for name, fn, x in (("image", towers.encode_image, batch.images),
                        ("text", towers.encode_text, batch.input_ids)):
        t = time.perf_counter()
        fn(x)  # warm-up: compiles/creates kernels
        info[f"{name}_first_call_s"] = time.perf_counter() - t
        times = []
        for _ in range(batches):
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
        info[f"{name}_per_s"] = len(batch) / float(np.median(times))
        info[f"{name}_batch_s"] = [round(x, 3) for x in times]
    info["peak_rss_mb"] = _status_mb(os.getpid()).get("VmHWM")
    info["process_s"] = time.perf_counter() - t_start
    print("RESULT " + json.dumps(info), flush=True)


def bench_towers(args, modes, tmp):
    out = {}
    for mode in modes:
        cmd = [sys.executable, __file__, "--tower-worker", mode, args.config, args.tsv,
               *args.overrides, "--tower-batches", str(args.tower_batches)]
        env = {**os.environ, **MODES[mode][1]}
        log = tmp / f"towers_{mode}.log"
        r = measure(cmd, env=env, log_path=log)
        text = log.read_text(errors="replace")
        res = next((json.loads(l[7:]) for l in text.splitlines() if l.startswith("RESULT ")), None)
        if r["returncode"] or res is None:
            raise RuntimeError(f"tower benchmark {mode} failed:\n{text[-3000:]}")
        res["other_load_cores"] = r["other_load_cores"]
        out[mode] = res
        print(f"  towers {mode}: image {res['image_per_s']:.2f}/s, text {res['text_per_s']:.1f}/s "
              f"(others' load {r['other_load_cores']:.2f} cores)", flush=True)
    return out


def e2e_once(args, mode, procs, tsv, tmp, tag):
    over, env_extra = MODES[mode]
    run_dir = tmp / f"e2e_{mode}_{procs}p_{tag}"
    run_dir.mkdir(parents=True)
    devices = ",".join(str(i) for i in range(procs))
    cmd = ["bash", str(ROOT / "run_infer.sh"), devices, args.config, *args.overrides,
           *[f"{k}={v}" for k, v in over.items()], f"test_file={tsv}",
           f"output_file={run_dir / 'emb.out'}", f"log_dir={run_dir / 'log'}"]
    env = {**os.environ, **env_extra, "LAUNCH_LOG_DIR": str(run_dir / "launch")}
    r = measure(cmd, env=env, log_path=run_dir / "console.log")
    log_file = run_dir / "log" / "infer.log"
    text = log_file.read_text(errors="replace") if log_file.exists() else ""
    m = ENGINE_DONE.search(text)
    if r["returncode"] or not m:
        console = (run_dir / "console.log").read_text(errors="replace")
        raise RuntimeError(f"run_infer.sh ({mode}, {procs} processes) failed:\n{console[-3000:]}")
    lines, startup, embed, rate = int(m.group(1)), float(m.group(3)), float(m.group(4)), float(m.group(5))
    r.update(lines=lines, startup_s=startup, embedding_s=embed, lines_per_s=rate,
             outside_embedding_s=r["wall_s"] - embed,  # imports, start-up, writing the output
             output=str(run_dir / "emb.out"), command=" ".join(cmd))
    return r


def bench_e2e(args, modes, tsv, tmp):
    out = {}
    for procs in args.procs:
        for mode in modes:
            runs = [e2e_once(args, mode, procs, tsv, tmp, i) for i in range(args.repeats)]
            keys = ("lines_per_s", "startup_s", "outside_embedding_s", "embedding_s", "wall_s",
                    "cpu_s", "peak_rss_sum_mb",
                    "peak_rss_hwm_sum_mb", "peak_rss_max_process_mb", "other_load_cores")
            summary = {k: median([r[k] for r in runs]) for k in keys}
            summary.update(lines=runs[0]["lines"], runs=runs, command=runs[0]["command"])
            out[f"{mode}/{procs}"] = summary
            print(f"  e2e {mode} x{procs}: {summary['lines_per_s']:.2f} lines/s, start-up "
                  f"{summary['startup_s']:.1f}s, peak {summary['peak_rss_sum_mb']:.0f} MB "
                  f"(others' load {summary['other_load_cores']:.2f} cores)", flush=True)
    return out


def bench_eval(args, e2e, tmp):
    out = {"on_e2e_output": None, "synthetic": {}}
    output = next((v["runs"][0]["output"] for v in e2e.values()), None) if e2e else None
    if output and os.path.exists(output):
        r = measure([sys.executable, str(ROOT / "eval_retri.py"), output, "--no-sidecar"])
        out["on_e2e_output"] = {"lines": next(iter(e2e.values()))["lines"], **r}
    script = ROOT / "benchmarks" / "bench_eval.py"
    for n in args.eval_lines:
        js = tmp / f"eval_{n}.json"
        r = subprocess.run([sys.executable, str(script), "--lines", str(n), "--runs", "1",
                            "--skip-naive", "--out", str(js), "--workdir", str(tmp)],
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"bench_eval.py --lines {n} failed:\n{r.stderr[-2000:]}")
        out["synthetic"][n] = json.loads(js.read_text())["summary"]
        s = out["synthetic"][n]
        print(f"  eval {n} lines: text {s['ours-text']['wall_s_median']:.2f}s "
              f"{s['ours-text']['peak_rss_mb_median']:.0f} MB, npz "
              f"{s['ours-npz']['wall_s_median']:.2f}s {s['ours-npz']['peak_rss_mb_median']:.0f} MB",
              flush=True)
    return out


# ------------------------------------------------------------------------------------ report
def tables(res):
    from tabulate import tabulate
    m = res["machine"]
    parts = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, GPU: {m['gpu']}; "
             f"Python {m['python']}, Paddle {m['paddle']}, numpy {m['numpy']}. "
             f"Load average {res['load_before'][0]:.2f} before, {res['load_after'][0]:.2f} after. "
             f"Config {res['config']} {' '.join(res['overrides'])}; TSV {res['tsv_lines']} lines."]
    if res.get("e2e"):
        rows = [[k.split("/")[0], k.split("/")[1], fmt(v["lines_per_s"]), fmt(v["startup_s"], 1),
                 fmt(v["outside_embedding_s"], 1), fmt(v["embedding_s"], 1), fmt(v["wall_s"], 1),
                 fmt(v["cpu_s"], 0), fmt(v["peak_rss_sum_mb"], 0),
                 fmt(v["peak_rss_max_process_mb"], 0), fmt(v["other_load_cores"]), len(v["runs"])]
                for k, v in res["e2e"].items()]
        parts.append(
            "End to end, run_infer.sh: lines/s over the embedding phase; start-up = the engine's "
            "(model or predictors ready), wall - embed = everything else (imports, start-up, "
            "writing); others' load = CPU cores other processes used meanwhile; medians over runs:\n\n"
            + tabulate(rows, headers=["mode", "procs", "lines/s", "start-up s", "wall - embed s",
                                      "embed s", "wall s", "CPU s", "peak MB (sum)",
                                      "peak MB (1 proc)", "others' load", "runs"],
                       tablefmt="github"))
    if res.get("towers"):
        rows = [[k, fmt(v["image_per_s"]), fmt(v["text_per_s"], 1), v["text_len"],
                 fmt(v["startup_s"], 1), fmt(v["image_first_call_s"], 1), fmt(v["peak_rss_mb"], 0),
                 fmt(v["other_load_cores"])] for k, v in res["towers"].items()]
        parts.append("Towers (one batch of the TSV at the config's batch size; median of timed "
                     "calls):\n\n" + tabulate(
            rows, headers=["mode", "images/s", "texts/s", "text len", "start-up s",
                           "1st image call s", "peak MB", "others' load"], tablefmt="github"))
    if res.get("preprocess"):
        p = res["preprocess"]
        rows = [["1 thread (no loader)", fmt(p["one_thread_images_per_s"], 0), "-"]] + [
            [f"BatchLoader, {w} worker(s)", fmt(v["images_per_s"], 0), fmt(v["per_worker_images_per_s"], 0)]
            for w, v in p["loader"].items()]
        parts.append("Decode + preprocess:\n\n" + tabulate(
            rows, headers=["", "images/s", "images/s per worker"], tablefmt="github"))
    if res.get("eval"):
        ev = res["eval"]
        rows = []
        if ev["on_e2e_output"]:
            e = ev["on_e2e_output"]
            rows.append([e["lines"], "e2e output (text)", fmt(e["wall_s"]),
                         fmt(e["peak_rss_max_process_mb"], 0)])
        for n, s in ev["synthetic"].items():
            for case in ("ours-text", "ours-npz"):
                rows.append([n, case, fmt(s[case]["wall_s_median"]), fmt(s[case]["peak_rss_mb_median"], 0)])
        parts.append("eval_retri.py against line count:\n\n" + tabulate(
            rows, headers=["lines", "input", "wall s", "peak MB"], tablefmt="github"))
    return "\n\n".join(parts) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("tsv")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    p.add_argument("--lines", type=int, default=0, help="repeat the TSV's lines to N lines (0 = as is)")
    p.add_argument("--modes", default="official,eager,to_static,inference")
    p.add_argument("--procs", default="1,2", help="process counts for the end-to-end runs")
    p.add_argument("--repeats", type=int, default=1, help="end-to-end runs per mode (median)")
    p.add_argument("--tower-batches", type=int, default=3, help="timed calls per tower")
    p.add_argument("--eval-lines", default="1000,10000,50000")
    p.add_argument("--skip", nargs="*", default=[], choices=SECTIONS)
    p.add_argument("--out", default="bench_out", help="folder for bench_infer.json/.md")
    p.add_argument("--tower-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tower_worker:
        return tower_worker(args.tower_worker, args.config, args.tsv, args.overrides, args.tower_batches)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        p.error(f"unknown modes {unknown}; known: {sorted(MODES)}")
    args.procs = [int(x) for x in args.procs.split(",") if x]
    args.eval_lines = [int(x) for x in args.eval_lines.split(",") if x]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    from ernievil2.cli import load_infer_config as load_config
    from ernievil2.fileio import write_text
    cfg = load_config(args.config, args.overrides)
    res = {"config": args.config, "overrides": args.overrides, "machine": machine_info(),
           "load_before": os.getloadavg(), "modes": {m: MODES[m] for m in modes}}
    with tempfile.TemporaryDirectory(prefix="bench_infer_") as tmp:
        tmp = Path(tmp)
        tsv = repeat_lines(args.tsv, args.lines, tmp / "bench.tsv") if args.lines else args.tsv
        args.tsv = str(tsv)
        res["tsv"], res["tsv_lines"] = args.tsv, sum(1 for _ in open(tsv, encoding="utf-8"))
        if "preprocess" not in args.skip:
            print("preprocess ...", flush=True)
            res["preprocess"] = bench_preprocess(cfg, args.tsv)
        if "towers" not in args.skip:
            print("towers ...", flush=True)
            res["towers"] = bench_towers(args, modes, tmp)
        if "e2e" not in args.skip:
            print("end to end ...", flush=True)
            res["e2e"] = bench_e2e(args, modes, args.tsv, tmp)
        if "eval" not in args.skip:
            print("eval ...", flush=True)
            res["eval"] = bench_eval(args, res.get("e2e"), tmp)
        res["load_after"] = os.getloadavg()
        report = tables(res)
    write_text(out_dir / "bench_infer.json", json.dumps(res, indent=1, default=str) + "\n")
    write_text(out_dir / "bench_infer.md", report)
    print("\n" + report)
    print(f"wrote {out_dir / 'bench_infer.json'} and {out_dir / 'bench_infer.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
