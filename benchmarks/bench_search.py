"""Benchmark vector search (faiss) and text-to-image query latency; figures, not tests.

  python benchmarks/bench_search.py [--quick] [--sections ivf,hnsw,text,build] [--out DIR]
         [--n 1000000] [--dim 768] [--clusters 2000] [--nlist 1024] [--nprobe 1,2,4,...]
         [--hnsw-n 100000] [--hnsw-m 32] [--ef-construction 80] [--ef-search 16,32,...]
         [--text-n 100000] [--text-configs demo_tiny,ernie_vil_base] [--text-queries 200]
         [--build-tsv TSV] [--build-config demo_tiny] [--build-procs 1,2]

Sections (each in its own subprocess, so its peak RSS is its own; --sections picks them):
  ivf    --n synthetic vectors (below): exact search (IndexFlatIP) gives the ground truth for
         --queries queries and the exact latency; then IVF-Flat (--nlist lists, k-means trained on
         --train-size vectors): build time (train + add), memory, and per --nprobe recall@10
         against exact, single-query latency p50/p95 (--latency-queries queries, one at a time)
         and batched latency (batches of --batch); the smallest nprobe with recall@10 >= 0.95.
  hnsw   --hnsw-n vectors: exact as above, then IndexHNSWFlat (inner product, --hnsw-m links,
         --ef-construction): build time, memory, and per --ef-search the same figures.
  text   per --text-configs config (random weights: timing needs no trained model): what
         Searcher.text_to_image runs for one query, with `execution: inference` (the towers
         exported, then run in Paddle Inference predictors): the tokenizer, the text tower and
         exact top-10 search (search.vectors, flat) over --text-n stored synthetic vectors of the
         model's width; --text-queries captions one at a time, p50/p95 of each step and the whole.
  build  images/s of `ernievil2-index build CONFIG TSV OUT --nproc N` against `bash run_infer.sh`
         with N processes (--build-procs) on the same TSV (--build-tsv), both with execution inference
         from one export made beforehand (its time counts for neither): distinct images over
         wall time, and for run_infer.sh over its embedding phase as well.

Synthetic vectors: --clusters Gaussian clusters in --dim dimensions (unit-norm centres drawn
once from --seed; cluster weights from a Dirichlet(2) draw; each cluster's noise-to-centre ratio
uniform in --spread LO,HI); every vector is normalised. Vector i is a function of (seed, i // chunk)
only, so any prefix of the base set is the same whatever --n, and the set is made chunk by chunk
(never held whole beside the index). Queries are drawn from the same clusters with another seed:
they are not in the base set. Exact search is faiss's IndexFlatIP (BLAS for batches).

Latency: faiss uses --threads OpenMP threads (default: all cores), which it spreads over the
queries of a batch (a single query mostly runs on one). Memory: the index's bytes (its content:
vectors, ids, centroids or links) and the process's resident memory gained while building it;
peak RSS is the section process's peak. The machine's load average is recorded before and after
each section: the figures are only as good as it is low.

On a shared machine run it as `nice -n 5 python benchmarks/bench_search.py ...`.
--quick: 20,000 vectors everywhere, 200 queries, a short sweep, the demo model only (< 1 min).
Results go to DIR/bench_search.json and DIR/bench_search.md (also printed).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "packages"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_infer import _status_mb, fmt, machine_info, measure  # noqa: E402

K = 10
CHUNK = 50_000
SECTIONS = ("ivf", "hnsw", "text", "build")
QUICK = dict(n=20_000, hnsw_n=20_000, text_n=20_000, nlist=128, train_size=8_192, queries=200,
             latency_queries=100, flat_latency_queries=30, nprobe="1,2,4,8,16,32",
             ef_search="16,32,64,128", text_configs="demo_tiny", text_queries=50)


# ---------------------------------------------------------------------------- synthetic vectors
class Clustered:
    """The clustered synthetic vectors described in the module docstring."""

    def __init__(self, dim, clusters, spread, seed):
        rng = np.random.default_rng([seed, 0])
        centres = rng.standard_normal((clusters, dim), dtype=np.float32)
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        self.weights = rng.dirichlet(np.full(clusters, 2.0))
        self.spread = rng.uniform(spread[0], spread[1], clusters).astype(np.float32)
        self.dim, self.seed = dim, seed

    def draw(self, n, stream):
        rng = np.random.default_rng([self.seed, 1, *stream])
        c = rng.choice(len(self.centres), size=n, p=self.weights)
        x = rng.standard_normal((n, self.dim), dtype=np.float32)  # in place from here on
        x *= (self.spread[c] / np.sqrt(self.dim))[:, None]
        x += self.centres[c]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def base(self, n):
        """The first n base vectors, as (start, array) chunks."""
        for start in range(0, n, CHUNK):
            yield start, self.draw(min(CHUNK, n - start), (2, start // CHUNK))

    def queries(self, n):
        return self.draw(n, (3,))


def make_data(args):
    return Clustered(args.dim, args.clusters, args.spread, args.seed)


def add_chunks(index, data, n):
    for _, x in data.base(n):
        index.add(x)


# ---------------------------------------------------------------------------- measuring
def rss_mb():
    return _status_mb(os.getpid()).get("VmRSS", 0.0)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak():
    """Start the process's peak resident memory (VmHWM) afresh, where Linux allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def stage_peak_mb(reset):
    """The peak RSS since reset_peak() (None where it could not be reset)."""
    return _status_mb(os.getpid()).get("VmHWM") if reset else None


def percentiles_ms(times):
    t = np.asarray(times) * 1000
    return {"p50_ms": float(np.percentile(t, 50)), "p95_ms": float(np.percentile(t, 95)),
            "mean_ms": float(t.mean()), "n": len(t)}


def latency(index, queries, single, batch):
    """Single-query latency over the first `single` queries (one warm-up first), and batched
    latency over all of them in batches of `batch`; returns figures and the batched results."""
    index.search(queries[:1], K)
    single_t, single_cpu = [], []
    for i in range(min(single, len(queries))):
        t, c = time.perf_counter(), time.process_time()
        index.search(queries[i:i + 1], K)
        single_t.append(time.perf_counter() - t)
        single_cpu.append(time.process_time() - c)
    batch_t, ids = [], []
    for i in range(0, len(queries), batch):
        t = time.perf_counter()
        ids.append(index.search(queries[i:i + batch], K)[1])
        batch_t.append(time.perf_counter() - t)
    out = {"single": percentiles_ms(single_t), "single_cpu": percentiles_ms(single_cpu), "batch": percentiles_ms(batch_t),
           "batch_size": batch, "batched_queries_per_s": len(queries) / sum(batch_t)}
    return out, np.concatenate(ids)


def recall_at_k(found, truth):
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)]))


def index_bytes(index):
    """The bytes an index holds: its serialised size (exact content), or for an IVF-Flat the
    vectors, ids and centroids counted directly (serialising 3 GB would need 3 GB more)."""
    import faiss
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return ivf.ntotal * (ivf.code_size + 8) + ivf.nlist * ivf.d * 4
    return int(faiss.serialize_index(index).size)


def exact(data, n, queries, args):
    """Exact search over n vectors: the ground truth of `queries` and its latency."""
    import faiss
    t0, rss0, reset = time.perf_counter(), rss_mb(), reset_peak()
    flat = faiss.IndexFlatIP(args.dim)
    add_chunks(flat, data, n)
    info = {"n": n, "add_s": time.perf_counter() - t0, "index_mb": index_bytes(flat) / 2 ** 20,
            "rss_gain_mb": rss_mb() - rss0, "build_peak_rss_mb": stage_peak_mb(reset)}
    lat, truth = latency(flat, queries, args.flat_latency_queries, args.batch)
    info.update(lat)
    del flat
    return info, truth


def sweep(index, set_param, values, queries, truth, args):
    rows = []
    for v in values:
        set_param(v)
        lat, found = latency(index, queries, args.latency_queries, args.batch)
        rows.append({"param": v, "recall_at_10": recall_at_k(found, truth), **lat})
        print(f"    {v}: recall@10 {rows[-1]['recall_at_10']:.4f}, single p50 "
              f"{lat['single']['p50_ms']:.2f} ms, batched {lat['batched_queries_per_s']:.0f} q/s",
              flush=True)
    first = next((r["param"] for r in rows if r["recall_at_10"] >= args.target_recall), None)
    return rows, first


# ---------------------------------------------------------------------------- section workers
def work_ivf(args):
    import faiss
    data = make_data(args)
    queries = data.queries(args.queries)
    res = {"n": args.n, "nlist": args.nlist, "train_size": args.train_size}
    print(f"  exact over {args.n} ...", flush=True)
    res["exact"], truth = exact(data, args.n, queries, args)
    rss0, t0, reset = rss_mb(), time.perf_counter(), reset_peak()
    quantizer = faiss.IndexFlatIP(args.dim)
    index = faiss.IndexIVFFlat(quantizer, args.dim, args.nlist, faiss.METRIC_INNER_PRODUCT)
    train = np.concatenate([x for _, x in data.base(min(args.train_size, args.n))])
    t_train = time.perf_counter()
    index.train(train)
    res["train_s"] = time.perf_counter() - t_train
    del train
    t_add = time.perf_counter()
    add_chunks(index, data, args.n)
    res["add_s"] = time.perf_counter() - t_add
    res["build_s"] = time.perf_counter() - t0  # drawing the training sample included
    res.update(index_mb=index_bytes(index) / 2 ** 20, rss_gain_mb=rss_mb() - rss0,
               build_peak_rss_mb=stage_peak_mb(reset))
    print(f"  IVF{args.nlist},Flat built in {res['build_s']:.1f}s; sweeping nprobe", flush=True)
    res["sweep"], res["first_at_target"] = sweep(
        index, lambda v: setattr(index, "nprobe", v), args.nprobe, queries, truth, args)
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def work_hnsw(args):
    import faiss
    n = args.hnsw_n
    data = make_data(args)
    queries = data.queries(args.queries)
    res = {"n": n, "m": args.hnsw_m, "ef_construction": args.ef_construction}
    print(f"  exact over {n} ...", flush=True)
    res["exact"], truth = exact(data, n, queries, args)
    rss0, t0, reset = rss_mb(), time.perf_counter(), reset_peak()
    index = faiss.IndexHNSWFlat(args.dim, args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = args.ef_construction
    add_chunks(index, data, n)
    res["build_s"] = time.perf_counter() - t0
    res.update(index_mb=index_bytes(index) / 2 ** 20, rss_gain_mb=rss_mb() - rss0,
               build_peak_rss_mb=stage_peak_mb(reset))
    print(f"  HNSW{args.hnsw_m},Flat built in {res['build_s']:.1f}s; sweeping efSearch", flush=True)
    res["sweep"], res["first_at_target"] = sweep(
        index, lambda v: setattr(index.hnsw, "efSearch", v), args.ef_search, queries, truth, args)
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def query_texts(config_name, n):
    """Captions to query with: the Flickr8k-CN Chinese captions for a model with the ERNIE vocab
    (../shared), the demo's captions for the demo model."""
    if config_name == "demo_tiny":
        tsv = ROOT / "demo_out" / "test.tsv"
        texts = [l.split("\t", 1)[0] for l in tsv.read_text(encoding="utf-8").splitlines() if l]
    else:
        tsv = ROOT.parent / "shared" / "data" / "flickr8k_cn" / "captions_val.tsv"
        rows = [l.split("\t") for l in tsv.read_text(encoding="utf-8").splitlines()[1:]]
        texts = [r[3] for r in rows if len(r) == 4 and r[2] == "zh"]
    return texts[:n]


def text_overrides(config_name, export_dir):
    """Random weights (init_from_params empty), execution inference from `export_dir`, and the
    vocab: the demo data's for the demo model, the ERNIE 3.0 one from ../shared otherwise."""
    vocab = (ROOT / "demo_out" / "vocab.txt" if config_name == "demo_tiny" else
             ROOT.parent / "shared" / "data" / "vocab" / "ernie-3.0-base-zh" / "vocab.txt")
    if not vocab.is_file():
        raise SystemExit(f"{vocab}: not found (demo_tiny: python tools/make_demo_data.py --out "
                         "demo_out; other models: the ERNIE vocab in ../shared)")
    return ["device=cpu", "init_from_params=", "execution=inference", f"export_dir={export_dir}",
            f"vocab_file={vocab}"]


def work_text(args, config_name):
    """Searcher.text_to_image's steps: Encoder.texts (tokenizer, text tower) and vectors.search."""
    from ernievil2.cli import load_infer_config
    from ernievil2.search import vectors
    from ernievil2.search.encoder import Encoder

    res = {"config": config_name, "weights": "random (init_from_params empty)"}
    with tempfile.TemporaryDirectory(prefix="bench_search_export_") as tmp:
        cfg = load_infer_config(config_name, text_overrides(config_name, os.path.join(tmp, "export")),
                                quiet=True)
        t = time.perf_counter()
        encoder = Encoder.from_config(cfg)  # exports the towers, then loads the predictors
        res["export_and_load_s"] = time.perf_counter() - t
        dim = encoder.embed_dim
        data = Clustered(dim, args.clusters, args.spread, args.seed)
        stored = np.concatenate([x for _, x in data.base(args.text_n)])
        index = vectors.build(stored, {"type": "flat"})
        texts = query_texts(config_name, args.text_queries)
        for q in texts[:3]:  # warm-up: predictor and oneDNN set-up
            vectors.search(index, encoder.texts([q]), K)
        steps = {"tokenize": [], "text_tower": [], "search": [], "total": [], "total_cpu": []}
        lengths = []
        for q in texts:
            c0, t0 = time.process_time(), time.perf_counter()
            ids = np.asarray(encoder.encode_ids([q]))
            t1 = time.perf_counter()
            emb = encoder.towers.encode_text(ids)
            t2 = time.perf_counter()
            vectors.search(index, emb, K)
            t3, c3 = time.perf_counter(), time.process_time()
            for name, dt in (("tokenize", t1 - t0), ("text_tower", t2 - t1), ("search", t3 - t2),
                             ("total", t3 - t0), ("total_cpu", c3 - c0)):
                steps[name].append(dt)
            lengths.append(ids.shape[1])
        res.update({name: percentiles_ms(v) for name, v in steps.items()})
        res.update(embed_dim=dim, stored=args.text_n, queries=len(texts),
                   tokens_median=float(np.median(lengths)), tokens_max=int(max(lengths)),
                   peak_rss_mb=peak_rss_mb())
    return res


def distinct_images(tsv):
    from ernievil2.data.pipeline import image_key
    from ernievil2.data.tsv import iter_records, record_image_bytes
    return len({image_key(record_image_bytes(tsv, r)) for r in iter_records(tsv)})


def bench_build(args):
    """`ernievil2-index build --nproc N` and `bash run_infer.sh` with N processes on the same
    TSV, both with execution inference from one export made beforehand (its time counts for
    neither)."""
    from argparse import Namespace

    from bench_infer import e2e_once
    tsv, config = os.path.abspath(args.build_tsv), args.build_config
    out = {"tsv": args.build_tsv, "config": config, "images": distinct_images(tsv),
           "lines": sum(1 for l in open(tsv, encoding="utf-8") if l.strip()), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench_search_build_") as tmp:
        tmp = Path(tmp)
        over = text_overrides(config, tmp / "export")
        r = subprocess.run([sys.executable, str(ROOT / "tools" / "export_model.py"), config,
                            *[o for o in over if not o.startswith(("execution=", "export_dir="))],
                            "--out", str(tmp / "export")], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"export failed:\n{r.stderr[-3000:]}")
        # the worktree's code, as run_infer.sh runs it (the console script may be another copy's)
        env = {**os.environ, "PYTHONPATH": str(ROOT / "packages")}
        ns = Namespace(config=config, overrides=over)
        for procs in args.build_procs:
            args_ = ["build", config, tsv, str(tmp / f"index_{procs}"), *over,
                     f"log_dir={tmp / f'index_log_{procs}'}", "--nproc", str(procs)]
            load0 = os.getloadavg()
            r = measure([sys.executable, "-m", "ernievil2.search_cli", *args_], env=env,
                        log_path=tmp / f"index_{procs}.log")
            if r["returncode"]:
                raise RuntimeError("ernievil2-index build failed:\n"
                                   + (tmp / f"index_{procs}.log").read_text(errors="replace")[-3000:])
            out["runs"][f"ernievil2-index build --nproc {procs}"] = {
                **r, "load_before": load0, "load_after": os.getloadavg(),
                "command": "ernievil2-index " + " ".join(args_)}
            load0 = os.getloadavg()
            r = e2e_once(ns, "inference", procs, tsv, tmp, "build")
            r["images_per_s_embedding"] = out["images"] / r["embedding_s"]
            out["runs"][f"run_infer.sh, {procs} process(es)"] = {
                **r, "load_before": load0, "load_after": os.getloadavg()}
        for name, r in out["runs"].items():
            print(f"  {name}: {out['images'] / r['wall_s']:.1f} images/s over {r['wall_s']:.1f} s "
                  f"(load average {r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f})", flush=True)
    return out


# ---------------------------------------------------------------------------- driver
def run_section(args, name, extra=()):
    """Run one section worker in a subprocess; its result, wall time, peak RSS and the load."""
    cmd = [sys.executable, __file__, "--worker", name, *extra, *args.passthrough]
    load0 = os.getloadavg()
    with tempfile.NamedTemporaryFile(prefix=f"bench_search_{name}_", suffix=".log") as log:
        r = measure(cmd, log_path=log.name)
        text = Path(log.name).read_text(errors="replace")
    for line in text.splitlines():
        if not line.startswith("RESULT "):
            print(line, flush=True)
    res = next((json.loads(l[7:]) for l in text.splitlines() if l.startswith("RESULT ")), None)
    if r["returncode"] or res is None:
        raise RuntimeError(f"section {name} failed:\n{text[-3000:]}")
    res.update(section_wall_s=r["wall_s"], section_peak_rss_mb=r["peak_rss_max_process_mb"],
               other_load_cores=r["other_load_cores"], load_before=load0, load_after=os.getloadavg(),
               command=" ".join(cmd))
    return res


def load_text(r):
    return (f"load average {r['load_before'][0]:.2f} before, {r['load_after'][0]:.2f} after; "
            f"others' CPU meanwhile {fmt(r['other_load_cores'])} cores")


def lat_cells(r):
    return [fmt(r["single"]["p50_ms"]), fmt(r["single"]["p95_ms"]), fmt(r["single_cpu"]["p50_ms"]),
            fmt(r["batch"]["p50_ms"], 1), fmt(r["batched_queries_per_s"], 0)]


LAT_HEAD = ["single p50 ms", "single p95 ms", "single CPU p50 ms", "batch p50 ms", "batched q/s"]


def tables(res):
    from tabulate import tabulate
    m = res["machine"]
    parts = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; Python {m['python']}, "
             f"faiss {res['faiss']}, {res['threads']} faiss thread(s), numpy {m['numpy']}, "
             f"Paddle {m['paddle']}. Vectors: {res['args']['dim']}-d, {res['args']['clusters']} "
             f"clusters, spread {res['args']['spread']}, seed {res['args']['seed']}; "
             f"{res['args']['queries']} queries (not in the base set); top-{K}."]
    for name, label, param in (("ivf", "IVF-Flat", "nprobe"), ("hnsw", "HNSW-Flat", "efSearch")):
        r = res.get(name)
        if not r:
            continue
        e = r["exact"]
        head = (f"IVF{r['nlist']},Flat on {r['n']:,} vectors: k-means on {r['train_size']:,}, "
                f"train {r['train_s']:.1f} s + add {r['add_s']:.1f} s = build {r['build_s']:.1f} s"
                if name == "ivf" else
                f"HNSW{r['m']},Flat (efConstruction {r['ef_construction']}) on {r['n']:,} vectors: "
                f"build {r['build_s']:.1f} s")
        rows = [["exact (flat)", "1.0000", *lat_cells(e)]] + [
            [f"{param} {s['param']}", f"{s['recall_at_10']:.4f}", *lat_cells(s)] for s in r["sweep"]]
        parts.append(
            f"{label}. {head}; index {r['index_mb']:,.0f} MB (exact: {e['index_mb']:,.0f} MB, "
            f"added in {e['add_s']:.1f} s), resident memory gained by the build "
            f"{r['rss_gain_mb']:,.0f} MB, peak RSS during the build {fmt(r['build_peak_rss_mb'], 0)} "
            f"MB (exact's: {fmt(e['build_peak_rss_mb'], 0)} MB), section peak RSS "
            f"{r['section_peak_rss_mb']:,.0f} MB. "
            f"Smallest {param} with recall@10 >= {res['args']['target_recall']}: "
            f"{fmt(r['first_at_target'])}. Batches of {e['batch_size']}; single CPU = the process's CPU "
            f"time per single query (all threads); {load_text(r)}.\n\n"
            + tabulate(rows, headers=["search", "recall@10", *LAT_HEAD], tablefmt="github"))
    if res.get("text"):
        rows = [[r["config"], r["embed_dim"], f"{r['stored']:,}", r["queries"],
                 f"{r['tokens_median']:.0f}/{r['tokens_max']}",
                 *[f"{fmt(r[s]['p50_ms'])} / {fmt(r[s]['p95_ms'])}"
                   for s in ("tokenize", "text_tower", "search", "total", "total_cpu")],
                 fmt(r["export_and_load_s"], 1), fmt(r["section_peak_rss_mb"], 0),
                 f"{r['load_before'][0]:.2f}/{r['load_after'][0]:.2f}"]
                for r in res["text"]]
        parts.append(
            "Text query to top-10, one query at a time (p50 / p95 ms): tokenizer, text tower in a "
            "Paddle Inference predictor (exported towers, random weights), exact inner-product "
            "search over synthetic stored vectors of the model's width; total CPU = the process's CPU "
            "time per query (all threads; less bent by other processes than wall time):\n\n" + tabulate(
                rows, headers=["config", "dim", "stored", "queries", "tokens med/max", "tokenize",
                               "text tower", "search", "total", "total CPU", "export+load s", "peak MB",
                               "load before/after"], tablefmt="github"))
    if res.get("build"):
        parts.append(build_table(res["build"]))
    return "\n\n".join(parts) + "\n"


def build_table(b):
    from tabulate import tabulate
    rows = [[name, b["images"], fmt(r["wall_s"], 1), fmt(b["images"] / r["wall_s"], 1),
             fmt(r["cpu_s"], 1), fmt(r.get("images_per_s_embedding"), 1),
             fmt(r["peak_rss_sum_mb"], 0), fmt(r["other_load_cores"]),
             f"{r['load_before'][0]:.2f}/{r['load_after'][0]:.2f}"] for name, r in b["runs"].items()]
    return (f"Index build against run_infer.sh on {b['tsv']} ({b['lines']} lines, {b['images']} "
            f"distinct images, config {b['config']}, random weights, execution inference); CPU s = "
            "the process tree's CPU time; embedding phase = run_infer.sh's own log line (rank 0's):"
            "\n\n" + tabulate(
                rows, headers=["command", "images", "wall s", "images/s (wall)", "CPU s",
                               "images/s (embedding phase)", "peak MB (sum)", "others' load",
                               "load before/after"], tablefmt="github"))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--quick", action="store_true", help="small sizes, finishes in under a minute")
    p.add_argument("--sections", default="ivf,hnsw,text", help=f"of {','.join(SECTIONS)}")
    p.add_argument("--out", default="bench_out", help="folder for bench_search.json/.md")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--clusters", type=int, default=2000)
    p.add_argument("--spread", default="1.0,2.0", help="LO,HI noise-to-centre ratio per cluster")
    p.add_argument("--queries", type=int, default=1000, help="queries for recall (and batched latency)")
    p.add_argument("--latency-queries", type=int, default=300, help="of them, timed one at a time")
    p.add_argument("--flat-latency-queries", type=int, default=50,
                   help="single queries timed on exact search (slow at 1M)")
    p.add_argument("--batch", type=int, default=100, help="batch size of the batched latency")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--threads", type=int, default=0, help="faiss threads (0: all cores)")
    p.add_argument("--n", type=int, default=1_000_000, help="IVF: base vectors")
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--train-size", type=int, default=65_536, help="IVF: k-means sample")
    p.add_argument("--nprobe", default="1,2,4,8,16,32,64,128")
    p.add_argument("--hnsw-n", type=int, default=100_000)
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=80)
    p.add_argument("--ef-search", default="16,32,64,128,256")
    p.add_argument("--text-n", type=int, default=100_000, help="text: stored vectors")
    p.add_argument("--text-configs", default="demo_tiny,ernie_vil_base")
    p.add_argument("--text-queries", type=int, default=200)
    p.add_argument("--build-tsv", help="build: the TSV both commands embed")
    p.add_argument("--build-config", default="demo_tiny")
    p.add_argument("--build-procs", default="1,2", help="process counts of both commands")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-arg", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
    if args.quick:
        for k, v in QUICK.items():
            if k not in given:
                setattr(args, k, v)
    # the workers get the same settings (after --quick's defaults)
    args.passthrough = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in (
        "seed", "dim", "clusters", "spread", "queries", "latency_queries", "flat_latency_queries",
        "batch", "target_recall", "threads", "n", "nlist", "train_size", "nprobe", "hnsw_n",
        "hnsw_m", "ef_construction", "ef_search", "text_n", "text_queries")]
    args.spread = tuple(float(x) for x in str(args.spread).split(","))
    args.nprobe, args.ef_search = ints(str(args.nprobe)), ints(str(args.ef_search))
    args.build_procs = ints(args.build_procs)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; known: {','.join(SECTIONS)}")
    if "build" in args.sections and not args.build_tsv:
        p.error("section build needs --build-tsv")
    return args


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import faiss
    threads = args.threads or os.cpu_count() or 1
    faiss.omp_set_num_threads(threads)
    if args.worker:
        fn = {"ivf": work_ivf, "hnsw": work_hnsw}.get(args.worker)
        res = fn(args) if fn else work_text(args, args.worker_arg)
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    from ernievil2.cli import load_infer_config
    from ernievil2.fileio import write_text
    res = {"args": {k: v for k, v in vars(args).items() if k != "passthrough"},
           "machine": machine_info(), "faiss": faiss.__version__, "threads": threads,
           "command": " ".join(["python", "benchmarks/bench_search.py", *argv])}
    configs = [c for c in args.text_configs.split(",") if c] if "text" in args.sections else []
    for c in configs + ([args.build_config] if "build" in args.sections else []):
        load_infer_config(c, text_overrides(c, "unused"), quiet=True)  # fails before any section
    for name in args.sections:
        print(f"{name} ...", flush=True)
        if name == "text":
            res["text"] = [run_section(args, "text", ["--worker-arg", c]) for c in configs]
        elif name == "build":
            res["build"] = bench_build(args)
        else:
            res[name] = run_section(args, name)
    report = tables(res)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "bench_search.json", json.dumps(res, indent=1, default=str) + "\n")
    write_text(out / "bench_search.md", report)
    print("\n" + report)
    print(f"wrote {out / 'bench_search.json'} and {out / 'bench_search.md'}")
    return 0


if __name__ == "__main__":
    from ernievil2.cli import run_main
    raise SystemExit(run_main(main))
