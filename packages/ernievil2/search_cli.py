"""Commands `ernievil2-index` (build, add, info) and `ernievil2-search` over an index folder
(ernievil2.search). Expected user errors end with one line (cli.run_main)."""
import argparse
import json
import logging
import os
import sys

from .cli import load_infer_config, run_main


def _index_parser():
    p = argparse.ArgumentParser(prog="ernievil2-index", description="Build, extend and describe an "
                                "image search index folder (embeddings, ids, captions, thumbnails).")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="a new index from a TSV or an image folder")
    b.add_argument("config", help="run config (YAML path or shipped name) of the model")
    b.add_argument("source", help="TSV (text \\t image_id \\t base64 image) or a folder of images")
    b.add_argument("out", help="the index folder to write (replaced once the new one is complete)")
    b.add_argument("overrides", nargs="*", metavar="key=value", help="config key overrides")
    b.add_argument("--index-type", default="flat", choices=["flat", "ivf", "hnsw"],
                   help="flat: exact inner product (default); ivf or hnsw: approximate")
    b.add_argument("--nlist", type=int, help="ivf: number of cells (default ~4 sqrt(N))")
    b.add_argument("--nprobe", type=int, help="ivf: cells searched per query (default 16)")
    b.add_argument("--hnsw-m", type=int, help="hnsw: links per node (default 32)")
    b.add_argument("--ef-search", type=int, help="hnsw: search breadth (default 64)")
    b.add_argument("--thumbnail-size", type=int, default=128, help="thumbnail long side, pixels")
    b.add_argument("--nproc", type=int, default=1, help="processes (paddle.distributed.launch; "
                   "each embeds its share of the images); logs under the config's log_dir/launch")
    a = sub.add_parser("add", help="append a source's new images (by image bytes) to an index")
    a.add_argument("index")
    a.add_argument("source")
    a.add_argument("--config", help="the model's config (default: the one the index was built with)")
    a.add_argument("--nproc", type=int, default=1, help="processes, as for build")
    i = sub.add_parser("info", help="what an index holds")
    i.add_argument("index")
    i.add_argument("--json", action="store_true", help="the manifest as JSON")
    return p


def _quiet_logging(level, rank=0):
    from .logging_utils import setup_logging
    setup_logging(None, "search.log", rank, level=level)


def _launch(nproc, argv, cfg, args):
    """`--nproc N`: this command in N processes under paddle.distributed.launch (one per CPU
    entry, gloo; one per card with GPUs), the console as run_infer.sh's (launch.ConsoleFilter):
    rank 0's output, and the first process error as one line."""
    import codecs
    import subprocess

    from .launch import ConsoleFilter, clear_errors, has_gpu, launch_log_dir, read_errors, worker_env
    if cfg is None:  # add: the config the index was built with
        from .search.store import CONFIG, read_json
        cfg = read_json(os.path.join(args.index, CONFIG))
    log_dir = launch_log_dir(cfg["log_dir"])
    os.makedirs(log_dir, exist_ok=True)
    clear_errors(log_dir)
    worker_argv, value_next = [], False  # the same command line, less --nproc N
    for a in argv:
        if not value_next and a != "--nproc" and not a.startswith("--nproc="):
            worker_argv.append(a)
        value_next = a == "--nproc"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--log_dir", log_dir]
    cmd += (["--devices", ",".join(map(str, range(nproc)))] if has_gpu()
            else ["--nproc_per_node", str(nproc)])
    cmd += [sys.executable, "-u", "-m", "ernievil2.search_cli", *worker_argv]
    with open(os.path.join(log_dir, "launcher.log"), "a", encoding="utf-8") as logfile:
        logfile.write(" ".join(cmd) + "\n")
        out = ConsoleFilter(sys.stdout, logfile, verbose=False)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=worker_env(log_dir, verbose=False))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for chunk in iter(lambda: os.read(proc.stdout.fileno(), 65536), b""):
            out.feed(decoder.decode(chunk))
        out.feed(decoder.decode(b"", final=True))
        out.close()
        rc = proc.wait()
    errors = read_errors(log_dir)
    if rc == 0 and not errors:
        return 0
    line = (errors[0]["message"] if errors else
            f"error: a process failed (exit status {rc}); see {log_dir}/workerlog.*")
    if not any(line.strip() in shown for shown in out.shown):
        print(line, file=sys.stderr)
    return 1


def index(argv=None):
    parser = _index_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "build":  # key=value overrides may also follow the options
        args.overrides += [a for a in extra if "=" in a and not a.startswith("-")]
        extra = [a for a in extra if a not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from . import search
    if args.command == "info":
        manifest = search.read_manifest(args.index)
        if args.json:
            print(json.dumps(manifest, ensure_ascii=False, indent=1))
        else:
            vec = manifest["vector_index"]
            print(f"{args.index}: {manifest['images']} images, {manifest['captions']} captions, "
                  f"embed_dim {manifest['embed_dim']}, vector index "
                  + " ".join([vec["type"]] + [f"{k}={v}" for k, v in vec.items() if k != "type"])
                  + f", model {manifest['fingerprint']['digest'][:12]}")
        return 0
    if args.nproc < 1:
        parser.error("--nproc must be >= 1")
    if args.nproc > 1:
        return _launch(args.nproc, [a for a in (sys.argv[1:] if argv is None else argv)],
                       load_infer_config(args.config, args.overrides if args.command == "build" else (),
                                         quiet=True) if args.config else None, args)
    from .distributed import init_distributed
    rank, _ = init_distributed()  # under the launcher: this process's share
    _quiet_logging(logging.INFO, rank)
    if args.command == "build":
        cfg = load_infer_config(args.config, args.overrides)
        manifest = search.build_index(cfg, args.source, args.out, index_type=args.index_type,
                                      nlist=args.nlist, nprobe=args.nprobe, m=args.hnsw_m,
                                      ef_search=args.ef_search,
                                      thumbnail_size=args.thumbnail_size, progress=True)
        where = args.out
    else:
        cfg = load_infer_config(args.config, quiet=True) if args.config else None
        manifest = search.add_to_index(args.index, args.source, config=cfg, progress=True)
        where = args.index
    if manifest is not None:  # rank 0
        print(f"{where}: {manifest['images']} images, {manifest['captions']} captions")
    return 0


def _search_parser():
    p = argparse.ArgumentParser(prog="ernievil2-search", description="Search an index folder: "
                                "text to image (default), image to image (--image), or text to "
                                "the stored captions (--captions).")
    p.add_argument("index", help="index folder (ernievil2-index build)")
    p.add_argument("query", nargs="?", help="the query text (Chinese or English)")
    p.add_argument("--image", help="image-to-image: the query image's path")
    p.add_argument("--captions", action="store_true", help="search the captions (image to text)")
    p.add_argument("-k", type=int, default=10, help="results (default 10)")
    p.add_argument("--json", action="store_true", help="JSON for scripts instead of a table")
    p.add_argument("--config", help="the model's config (default: the one the index was built with)")
    return p


def search_command(argv=None):
    from .search.searcher import MAX_IMAGE_BYTES, MAX_K
    p = _search_parser()
    args = p.parse_args(argv)
    if not 1 <= args.k <= MAX_K:
        p.error(f"-k must be in 1..{MAX_K}")
    if (args.query is None) == (args.image is None):
        p.error("give a query text or --image PATH (one of them)")
    if args.image and args.captions:
        p.error("--captions searches with a text query, not --image")
    if args.image and not os.path.isfile(args.image):
        raise FileNotFoundError(f"query image not found: {args.image}")
    from .search import Searcher
    _quiet_logging(logging.WARNING)
    searcher = Searcher.open(args.index, config=load_infer_config(args.config, quiet=True) if args.config else None)
    if args.image:
        with open(args.image, "rb") as f:
            hits = searcher.image_to_image(f.read(MAX_IMAGE_BYTES + 1), args.k)
        mode = "image_to_image"
    elif args.captions:
        hits, mode = searcher.text_to_text(args.query, args.k), "text_to_text"
    else:
        hits, mode = searcher.text_to_image(args.query, args.k), "text_to_image"
    if args.json:
        print(json.dumps({"index": str(searcher.index_dir), "mode": mode,
                          "query": args.image or args.query,
                          "hits": [{**h._asdict(), "thumbnail_path": str(searcher.index_dir / h.thumbnail)}
                                   for h in hits]}, ensure_ascii=False, indent=1))
        return 0
    from tabulate import tabulate
    print(tabulate([[h.rank, f"{h.score:.4f}", h.image_id, h.caption or "", h.thumbnail] for h in hits],
                   headers=["rank", "score", "image_id", "caption", "thumbnail"]))
    return 0


def index_main(argv=None):
    """Console script ernievil2-index."""
    sys.exit(run_main(index, argv) or 0)


def search_main(argv=None):
    """Console script ernievil2-search."""
    sys.exit(run_main(search_command, argv) or 0)


if __name__ == "__main__":  # a process of `ernievil2-index ... --nproc N`
    index_main()
