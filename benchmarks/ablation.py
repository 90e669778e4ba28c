"""Ablation of the multi-view training on a real split: views and targets, several seeds each.

    python benchmarks/ablation.py --out-dir DIR [--config packages/configs/flickr8k_cn_lite0.yaml]
        [--rows it,it+ii,it+tt,it+tags,it-unicl,recipe] [--seeds 0,1,2] [--steps N] [--resume]
        [--jobs 1] [--row-set ROW:key=value ...] [key=value ...]

Each (row, seed) is one `bash run_train.sh 0 CONFIG ...` run (the user's own entry point) with
the row's `views`/`targets`, `seed`, `max_steps` and validation only at the end; every row runs
the same number of optimizer steps on the same batches (seeded sampler). The recipe-k2 and
recipe-concepts rows add hierarchical_layers=2 / visual_concepts=embed (ViCHA) to the recipe. Its final validation
(train.jsonl) is kept. Written to DIR (atomically, after every run, so a partial ablation still
has a table): ablation.json (every run: recall rows in both protocols, seconds) and ablation.md
(per row mean ± sample std over seeds of the multi-caption mean recall, its Text2Image and
Image2Text R@1, the official-protocol mean recall, and the seconds per run). --resume skips runs
already in ablation.json. Trailing key=value pairs go to every run (e.g. image_size=128);
--row-set ROW:key=value goes to one row's runs only, after them. --steps defaults to the config's
max_steps. The recipe-zh row (the config's views on another training file, e.g. Chinese captions
only) needs --row-set recipe-zh:train_file=FILE.
--jobs N runs N trainings at once after the first one and the first of each --row-set row (those
build any shared feature cache):
eager training of a small text tower keeps about one core busy, so 2 jobs use a 2-core machine.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "packages"))

from ernievil2.cli import load_train_config as load_config  # noqa: E402
from ernievil2.config import ConfigError, parse_override  # noqa: E402
IT = ["image", "text", 1.0]
# name -> (description, views, targets). Rows add one view to image-text, or switch the targets.
ROWS = {
    "it": ("image-text", [IT], "clip"),
    "it+ii": ("+ image-image", [IT, ["image", "image_aug", 0.5]], "clip"),
    "it+tt": ("+ text-text", [IT, ["text", "text_aug", 0.5]], "clip"),
    "it+tags": ("+ image-tags", [IT, ["image", "tags", 0.5]], "clip"),
    "it-unicl": ("image-text, UniCL targets", [IT], "unicl"),
    # the config's own views and targets (for the Flickr8k-CN config: all four views, UniCL)
    "recipe": ("the config's views and targets", None, None),
    "all-clip": ("all views, CLIP targets", [IT, ["image", "image_aug", 0.5],
                                             ["text", "text_aug", 0.5], ["image", "tags", 0.5]], "clip"),
    "all-unicl": ("all views, UniCL targets", [IT, ["image", "image_aug", 0.5],
                                               ["text", "text_aug", 0.5], ["image", "tags", 0.5]], "unicl"),
}
# rows that differ from the config only in data: the caller names the file (--row-set)
ROWS["recipe-zh"] = ("the config's views and targets, another training file", None, None)
# UniCL's image-label rows mixed in (train_files: [[FILE, WEIGHT, label]], with label_classes)
ROWS["recipe+labels"] = ("the config's views and targets + image-label rows", None, None)
ROWS["notags+labels"] = ("image-label rows instead of the tags view",
                         [IT, ["image", "image_aug", 0.5], ["text", "text_aug", 0.5]], "unicl")
ROW_NEEDS = {"recipe-zh": "train_file", "recipe+labels": "train_files", "notags+labels": "train_files"}
# rows that change the recipe's model or loss (ViCHA); meaningful with a text tower of >= 2 layers
ROWS["recipe-k2"] = ("the config's views, hierarchical alignment of the top 2 layers", None, None)
ROWS["recipe-concepts"] = ("the config's views, visual concepts embedded", None, None)
ROW_OVERRIDES = {"recipe-k2": ["hierarchical_layers=2"], "recipe-concepts": ["visual_concepts=embed"]}
DEFAULT_ROWS = "it,it+ii,it+tt,it+tags,it-unicl,recipe"


def parse_row_sets(items, rows):
    """['ROW:key=value', ...] -> {row: [key=value, ...]}; checks rows and the ROW_NEEDS keys."""
    sets, keys = {}, {}
    for item in items:
        row, sep, kv = item.partition(":")
        try:
            key = parse_override(kv)[0] if sep else ""
        except ConfigError:
            key = ""
        if not key:
            raise ValueError(f"--row-set {item!r}: expected ROW:key=value")
        if row not in ROWS:
            raise ValueError(f"--row-set {item!r}: unknown row {row!r}; known: {list(ROWS)}")
        sets.setdefault(row, []).append(kv)
        keys.setdefault(row, set()).add(key)
    for row in rows:
        need = ROW_NEEDS.get(row)
        if need and need not in keys.get(row, ()):
            raise ValueError(f"row {row} needs --row-set {row}:{need}=...")
    return sets


def run_order(jobs, row_sets):
    """(runs to do alone first, runs that may go in parallel) for jobs [(i, (row, seed)), ...].

    Alone first: the first run, and the first run of every row with its own overrides (another
    training file means another feature cache, which two runs at once would both build).
    """
    first_of_row = {}
    for job in jobs:
        first_of_row.setdefault(job[1][0], job)
    serial = jobs[:1] + [first_of_row[r] for r in row_sets
                         if r in first_of_row and first_of_row[r] is not jobs[0]]
    return serial, [j for j in jobs if j not in serial]


def final_validation(run_dir):
    """The last validation record of a run's train.jsonl, or None."""
    path = Path(run_dir) / "train.jsonl"
    if not path.is_file():
        return None
    last = None
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "validation" in rec:
            last = rec
    return last


def run_one(config, row, seed, steps, run_dir, extra, log_path):
    _, views, targets = ROWS[row]
    overrides = [f"views={json.dumps(views)}", f"targets={targets}"] if views else []
    overrides += ROW_OVERRIDES.get(row, []) + [f"seed={seed}",
                 f"max_steps={steps}", f"val_every={steps}", f"save_every={steps}",
                 f"output_dir={run_dir}", f"log_dir={run_dir}", "keep_last=1", *extra]
    cmd = ["bash", str(ROOT / "run_train.sh"), "0", str(config), *overrides]
    t0 = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.time() - t0
    if proc.returncode:
        raise RuntimeError(f"run {row} seed {seed} failed (exit {proc.returncode}); see {log_path}")
    val = final_validation(run_dir)
    if val is None or val["step"] != steps:
        raise RuntimeError(f"run {row} seed {seed}: no final validation in {run_dir}/train.jsonl")
    return {"row": row, "seed": seed, "steps": steps, "seconds": round(seconds, 1),
            "validation": val["validation"]}


def metrics_of(run):
    v = run["validation"]  # the trainer's validation record: recall in percent
    mc, off = v["multi_caption"], v["official"]
    return {"mc_mean": mc["MeanRecall"]["meanRecall"],
            "mc_t2i_r1": mc["Text2Image"]["R@1"],
            "mc_i2t_r1": mc["Image2Text"]["R@1"],
            "official_mean": off["MeanRecall"]["meanRecall"],
            "seconds": run["seconds"]}


def mean_std(values):
    n = len(values)
    m = sum(values) / n
    s = math.sqrt(sum((x - m) ** 2 for x in values) / (n - 1)) if n > 1 else 0.0
    return m, s


COLUMNS = [("mc_mean", "mean recall (multi-caption)"), ("mc_t2i_r1", "T2I R@1"),
           ("mc_i2t_r1", "I2T R@1"), ("official_mean", "mean recall (official)")]


def summarize(runs, rows):
    table = []
    for row in rows:
        got = [metrics_of(r) for r in runs if r["row"] == row]
        if not got:
            continue
        entry = {"row": row, "description": ROWS[row][0], "targets": ROWS[row][2] or "config",
                 "seeds": len(got)}
        for key in [k for k, _ in COLUMNS] + ["seconds"]:
            m, s = mean_std([g[key] for g in got])
            entry[key] = {"mean": round(m, 2), "std": round(s, 2)}
        table.append(entry)
    return table


def markdown(table, meta):
    head = ["row", "views", "targets", "seeds"] + [c for _, c in COLUMNS] + ["s/run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in table:
        cells = [e["row"], e["description"], e["targets"], str(e["seeds"])]
        cells += [f"{e[k]['mean']:.2f} ± {e[k]['std']:.2f}" for k, _ in COLUMNS]
        cells.append(f"{e['seconds']['mean']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    row_sets = "".join(f"; {row}: {' '.join(kvs)}" for row, kvs in meta.get("row_sets", {}).items())
    notes = (f"\nVal recall in %, mean ± sample std over seeds; {meta['steps']} steps per run; "
             f"config {meta['config']}; overrides {meta['overrides'] or 'none'}{row_sets}. "
             "R@1 columns are the multi-caption protocol.\n")
    return "\n".join(lines) + "\n" + notes


def write_atomic(path, text):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--out-dir", required=True, help="runs, logs, ablation.json and ablation.md")
    ap.add_argument("--config", default=str(ROOT / "packages" / "configs" / "flickr8k_cn_lite0.yaml"))
    ap.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated, from {list(ROWS)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=None,
                    help="optimizer steps per run (default: the config's max_steps)")
    ap.add_argument("--jobs", type=int, default=1, help="trainings at once (after the first)")
    ap.add_argument("--resume", action="store_true", help="skip runs already in ablation.json")
    ap.add_argument("--row-set", action="append", default=[], metavar="ROW:key=value",
                    help="an override for one row's runs (repeatable)")
    ap.add_argument("overrides", nargs="*", help="key=value for every run")
    args = ap.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {list(ROWS)}")
    try:
        row_sets = parse_row_sets(args.row_set, rows)
    except ValueError as e:
        ap.error(str(e))
    try:  # every row's config as run_train.sh will read it: bad keys fail here, not mid-way
        configs = {row: load_config(args.config, ROW_OVERRIDES.get(row, []) + args.overrides
                                    + row_sets.get(row, []))
                   for row in rows}
    except ConfigError as e:
        ap.error(str(e))
    if args.steps is None:
        args.steps = int(configs[rows[0]].max_steps)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "ablation.json", out / "ablation.md"
    meta = {"config": args.config, "steps": args.steps, "overrides": args.overrides,
            "row_sets": row_sets, "rows": rows, "seeds": seeds}
    runs = []
    if args.resume and json_path.is_file():
        saved = json.loads(json_path.read_text(encoding="utf-8"))
        same = ("config", "overrides", "row_sets")
        if any(saved["meta"].get(k, {} if k == "row_sets" else None) != meta[k] for k in same):
            ap.error(f"--resume: {json_path} was made with another config or other overrides "
                     f"({ {k: saved['meta'].get(k) for k in same} }); use another --out-dir")
        runs = [r for r in saved["runs"]
                if r["steps"] == args.steps]
    done = {(r["row"], r["seed"]) for r in runs}
    todo = [(row, seed) for row in rows for seed in seeds if (row, seed) not in done]
    t_start = time.time()
    lock = threading.Lock()

    def one(i, row, seed):
        run_dir = out / "runs" / f"{row}_seed{seed}"
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a fresh run, never a resumed half
        run_dir.mkdir(parents=True)
        print(f"[{i}/{len(todo)}] {row} seed {seed} ...", flush=True)
        run = run_one(args.config, row, seed, args.steps, run_dir,
                      args.overrides + row_sets.get(row, []), out / f"{row}_seed{seed}.log")
        m = metrics_of(run)
        with lock:
            runs.append(run)
            print(f"    [{i}/{len(todo)}] {row} seed {seed}: mean recall {m['mc_mean']:.2f} "
                  f"(multi-caption), {m['official_mean']:.2f} (official); {run['seconds']:.0f} s",
                  flush=True)
            table = summarize(runs, rows)
            write_atomic(json_path, json.dumps({"meta": meta, "table": table, "runs": runs},
                                               indent=1, ensure_ascii=False) + "\n")
            write_atomic(md_path, markdown(table, meta))

    jobs = list(enumerate(todo, 1))
    serial, parallel = run_order(jobs, row_sets)
    for i, (row, seed) in serial:
        one(i, row, seed)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for f in [pool.submit(one, i, row, seed) for i, (row, seed) in parallel]:
            f.result()
    table = summarize(runs, rows)
    write_atomic(json_path, json.dumps({"meta": meta, "table": table, "runs": runs},
                                       indent=1, ensure_ascii=False) + "\n")
    write_atomic(md_path, markdown(table, meta))
    print(markdown(table, meta))
    print(f"{len(todo)} runs in {time.time() - t_start:.0f} s; {json_path}, {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
