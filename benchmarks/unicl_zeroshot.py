"""Val retrieval and zero-shot accuracy of an ablation's runs side by side (`make flickr8k-unicl`).

    python benchmarks/unicl_zeroshot.py ABLATION_DIR

Reads ABLATION_DIR/ablation.json (benchmarks/ablation.py) and each run's
runs/ROW_seedN/zeroshot_{zh,en}.json (eval_zeroshot.py --json); prints per row the mean ± sample
std over seeds of the multi-caption and official mean recall and of the zero-shot top-1 / top-5
(in %) with Chinese and English prompts, and writes the table to ABLATION_DIR/unicl.md.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "packages"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ablation import mean_std, metrics_of  # noqa: E402
from ernievil2.fileio import write_text  # noqa: E402

LANGS = ("zh", "en")


def row_metrics(out_dir, run):
    m = metrics_of(run)
    for lang in LANGS:
        path = Path(out_dir) / "runs" / f"{run['row']}_seed{run['seed']}" / f"zeroshot_{lang}.json"
        zs = json.loads(path.read_text(encoding="utf-8"))
        m[f"zs_{lang}_top1"], m[f"zs_{lang}_top5"] = 100 * zs["top1"], 100 * zs["top5"]
    return m


COLUMNS = [("mc_mean", "multi-caption MeanRecall"), ("mc_t2i_r1", "T2I R@1"), ("mc_i2t_r1", "I2T R@1"),
           ("official_mean", "official MeanRecall"), ("zs_zh_top1", "zero-shot zh top-1"),
           ("zs_zh_top5", "zh top-5"), ("zs_en_top1", "en top-1"), ("zs_en_top5", "en top-5")]


def table(out_dir):
    saved = json.loads((Path(out_dir) / "ablation.json").read_text(encoding="utf-8"))
    lines = ["| row | seeds | " + " | ".join(c for _, c in COLUMNS) + " |",
             "|" + "---|" * (len(COLUMNS) + 2)]
    for row in saved["meta"]["rows"]:
        got = [row_metrics(out_dir, r) for r in saved["runs"] if r["row"] == row]
        if not got:
            continue
        cells = ["{:.2f} ± {:.2f}".format(*mean_std([g[k] for g in got])) for k, _ in COLUMNS]
        lines.append(f"| {row} | {len(got)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("out_dir", metavar="ABLATION_DIR")
    args = ap.parse_args(argv)
    try:
        md = table(args.out_dir)
    except (OSError, KeyError, ValueError) as e:
        print(f"unicl_zeroshot: error: {e}", file=sys.stderr)
        return 1
    write_text(Path(args.out_dir) / "unicl.md", md)
    print(md, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
