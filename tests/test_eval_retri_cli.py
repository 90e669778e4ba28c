"""eval_retri.py: prints exactly the official table, both protocols, id sources, errors, sidecar,
and it never imports Paddle."""
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, need_shared
from tabulate import tabulate

from ernievil2.embeddings import write_embeddings

sys.path.insert(0, str(ROOT))
import eval_retri  # noqa: E402


def official_table(text, image):
    """The official script's output, from its definition (line i <-> line i, full matrix)."""
    score = text @ image.T

    def recalls(s):
        ranks = np.array([(s[i] > s[i, i]).sum() for i in range(len(s))])
        n = float(len(ranks))
        r = [(ranks < k).sum() / n for k in (1, 5, 10)]
        return r + [(r[0] + r[1] + r[2]) / 3.0]

    t2i, i2t = recalls(score), recalls(score.T)
    table = [["Text2Image"] + [round(j * 100, 2) for j in t2i],
             ["Image2Text"] + [round(j * 100, 2) for j in i2t],
             ["MeanRecall"] + [round((t2i[i] + i2t[i]) / 2 * 100, 2) for i in range(4)]]
    return tabulate(table, headers=["Name", "R@1", "R@5", "R@10", "meanRecall"],
                    tablefmt="github", floatfmt=".2f")


def embeddings(n, d=24, seed=0, noise=1.0):
    rng = np.random.default_rng(seed)
    text = rng.standard_normal((n, d)).astype(np.float32)
    image = (text + noise * rng.standard_normal((n, d))).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    return text, image


def run(capsys, *argv):
    code = eval_retri.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_official_protocol_prints_exactly_the_official_table(tmp_path, capsys):
    text, image = embeddings(47)  # not a multiple of 10: the official would refuse it
    out_file = tmp_path / "emb.out"
    write_embeddings(out_file, text, image, np.ones(47), sidecar=False)
    code, out, err = run(capsys, out_file)
    assert code == 0 and err == ""
    assert out == official_table(text, image) + "\n"


def test_official_golden_output(capsys):
    path = need_shared("golden", "official_set1.out")
    code, out, _ = run(capsys, path, "--no-sidecar")
    assert code == 0
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    text = np.array([[float(x) for x in r[0].split(" ")] for r in rows], np.float32)
    image = np.array([[float(x) for x in r[1].split(" ")] for r in rows], np.float32)
    assert out == official_table(text, image) + "\n"


def write_tsv(path, ids, bom=True, crlf=True):
    nl = "\r\n" if crlf else "\n"
    lines = [f"caption {i}\t{image_id}\tQUJD" for i, image_id in enumerate(ids)]
    path.write_bytes(((("\ufeff" if bom else "") + nl.join(lines) + nl)).encode("utf-8"))


def multi_caption_table(text, image, ids):
    from ernievil2.metrics.retrieval import format_table, multi_caption_recall
    return format_table(multi_caption_recall(text, image, ids)) + "\n"


def test_multi_caption_ids_from_tsv_through_line_numbers(tmp_path, capsys):
    ids = ["img%d" % (i // 3) for i in range(30)]  # 3 captions per image
    text, image = embeddings(30, seed=1)
    tsv = tmp_path / "test.tsv"
    write_tsv(tsv, ids)  # BOM + CRLF
    # the embeddings file lists TSV lines in another order (e.g. merged from several workers)
    order = np.random.default_rng(2).permutation(30)
    out_file = tmp_path / "emb.out"
    write_embeddings(out_file, text[order], image[order], order + 1, sidecar=False)
    code, out, err = run(capsys, out_file, "--protocol", "multi-caption", "--tsv", tsv,
                         "--json", tmp_path / "r.json")
    assert code == 0, err
    assert out == multi_caption_table(text[order], image[order], [ids[i] for i in order])
    assert out != official_table(text[order], image[order]) + "\n"  # the protocols differ here
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["protocol"] == "multi-caption" and result["num_images"] == 10
    assert result["table_percent"]["Text2Image"]["R@1"] == float(out.splitlines()[2].split("|")[2])


def test_multi_caption_with_official_constant_ids_and_id_list(tmp_path, capsys):
    ids = ["a", "a", "b", "c", "c", "c", "d"]
    text, image = embeddings(7, seed=3)
    tsv = tmp_path / "test.tsv"
    write_tsv(tsv, ids, bom=False, crlf=False)
    out_file = tmp_path / "official.out"
    write_embeddings(out_file, text, image, np.ones(7), sidecar=False)  # official: column 3 = 1
    want = multi_caption_table(text, image, ids)
    code, out, _ = run(capsys, out_file, "--protocol", "multi-caption", "--tsv", tsv)
    assert (code, out) == (0, want)
    id_file = tmp_path / "ids.txt"
    id_file.write_text("\n".join(ids) + "\n")
    code, out, _ = run(capsys, out_file, "--protocol", "multi-caption", "--image-ids", id_file)
    assert (code, out) == (0, want)
    # with constant ids the TSV must have exactly one line per embedding line
    write_tsv(tsv, ids + ["e"])
    code, out, err = run(capsys, out_file, "--protocol", "multi-caption", "--tsv", tsv)
    assert code == 2 and out == "" and "has 8 lines but the embeddings file has 7" in err
    # the id list follows the project's one id-list rule: trailing blanks ok, inner ones not
    id_file.write_text("\n".join(ids) + "\n\n \n")
    code, out, _ = run(capsys, out_file, "--protocol", "multi-caption", "--image-ids", id_file)
    assert (code, out) == (0, want)
    id_file.write_text("\n".join(ids[:3] + [""] + ids[3:]) + "\n")
    code, out, err = run(capsys, out_file, "--protocol", "multi-caption", "--image-ids", id_file)
    assert code == 2 and f"{id_file}:4: empty line in the middle of the file" in err
    id_file.write_text("\n".join(ids[:6]) + "\n")
    code, out, err = run(capsys, out_file, "--protocol", "multi-caption", "--image-ids", id_file)
    assert code == 2 and f"{id_file}: has 6 ids but the embeddings file has 7 lines" in err


def test_errors_go_to_stderr_with_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.out"
    bad.write_text("0.1 0.2\t0.3 0.4\t1\n0.1 0.2\t0.3\t2\n")
    code, out, err = run(capsys, bad)
    assert code == 2 and out == ""
    assert f"{bad}:2: column 2 (image embedding) has 1 floats, expected 2" in err
    tsv = tmp_path / "short.tsv"
    tsv.write_text("only one column\n")
    good = tmp_path / "good.out"
    write_embeddings(good, *embeddings(1), sidecar=False)
    code, out, err = run(capsys, good, "--protocol", "multi-caption", "--tsv", tsv)
    assert code == 2 and f"{tsv}:1: expected at least 2 tab-separated columns" in err


def test_argument_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        eval_retri.main([str(tmp_path / "x.out"), "--protocol", "multi-caption"])
    assert e.value.code == 2 and "needs --tsv" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_retri.main([str(tmp_path / "x.out"), "--tsv", "t.tsv"])
    assert "only apply to --protocol multi-caption" in capsys.readouterr().err


def test_help_explains_both_protocols(capsys):
    with pytest.raises(SystemExit):
        eval_retri.main(["--help"])
    text = capsys.readouterr().out
    assert "official" in text and "multi-caption" in text and "ANY of its captions" in text


def test_sidecar_written_then_used(tmp_path, capsys):
    text, image = embeddings(20, seed=4)
    out_file = tmp_path / "emb.out"
    write_embeddings(out_file, text, image, sidecar=False)
    code, first, _ = run(capsys, out_file, "--write-sidecar", "--json", tmp_path / "a.json")
    assert code == 0 and (tmp_path / "emb.out.npz").is_file()
    assert json.loads((tmp_path / "a.json").read_text())["loaded_from"] == "text"
    code, second, _ = run(capsys, out_file, "--json", tmp_path / "b.json")
    assert json.loads((tmp_path / "b.json").read_text())["loaded_from"] == "sidecar"
    assert first == second == official_table(text, image) + "\n"


@pytest.mark.slow
def test_cli_in_a_fresh_interpreter_never_imports_paddle(tmp_path):
    text, image = embeddings(12, seed=5)
    out_file = tmp_path / "emb.out"
    write_embeddings(out_file, text, image, sidecar=False)
    probe = ("import runpy, sys\n"
             f"sys.argv = ['eval_retri.py', {str(out_file)!r}]\n"
             "try:\n"
             f"    runpy.run_path({str(ROOT / 'eval_retri.py')!r}, run_name='__main__')\n"
             "except SystemExit as e:\n"
             "    assert not e.code, e.code\n"
             "bad = sorted(m for m in sys.modules if m == 'paddle' or m.startswith('paddle.'))\n"
             "print('PADDLE' if bad else 'NO-PADDLE')\n")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout == official_table(text, image) + "\nNO-PADDLE\n"


@pytest.mark.slow
def test_cli_as_a_script(tmp_path):
    text, image = embeddings(15, seed=6)
    out_file = tmp_path / "emb.out"
    write_embeddings(out_file, text, image)
    res = subprocess.run([sys.executable, str(ROOT / "eval_retri.py"), str(out_file)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout == official_table(text, image) + "\n" and res.stderr == ""


def test_collapsed_embeddings_print_the_official_table_and_warn_with_both_in_json(tmp_path, capsys):
    n = 20
    text = np.tile(embeddings(1, seed=6)[0], (n, 1))  # every row identical: all scores tie
    image = np.tile(embeddings(1, seed=7)[1], (n, 1))
    out_file = tmp_path / "emb.out"
    write_embeddings(out_file, text, image, np.arange(1, n + 1), sidecar=False)
    code, out, err = run(capsys, out_file, "--json", tmp_path / "r.json")
    assert code == 0
    assert out == official_table(text, image) + "\n"  # still the official (optimistic) table
    assert out.splitlines()[2].split("|")[2].strip() == "100.00"
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and err.count("\n") == 1
    assert "R@1" in warnings[0] and "pessimistic" in warnings[0]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["table_percent"]["Text2Image"]["R@1"] == 100.0  # the old keys: the printed ones
    # ties against the query: each of the n queries has n - 1 tied wrong candidates, rank n - 1
    for name in ("Text2Image", "Image2Text", "MeanRecall"):
        assert result["pessimistic"]["table_percent"][name] == {
            "R@1": 0.0, "R@5": 0.0, "R@10": 0.0, "meanRecall": 0.0}


def test_distinct_embeddings_give_no_tie_warning_and_equal_tables(tmp_path, capsys):
    text, image = embeddings(30, seed=8)
    out_file = tmp_path / "emb.out"
    write_embeddings(out_file, text, image, sidecar=False)
    code, out, err = run(capsys, out_file, "--json", tmp_path / "r.json")
    assert code == 0 and err == ""
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["pessimistic"]["recall"] == result["recall"]


def test_multi_caption_tsv_with_more_lines_than_the_embeddings_is_an_error(tmp_path, capsys):
    ids = ["img%d" % (i // 2) for i in range(12)]
    text, image = embeddings(10, seed=9)
    tsv = tmp_path / "test.tsv"
    write_tsv(tsv, ids, bom=False, crlf=False)  # 12 lines: not the TSV of these 10 embeddings
    out_file = tmp_path / "emb.out"
    write_embeddings(out_file, text, image, np.arange(1, 11), sidecar=False)
    code, out, err = run(capsys, out_file, "--protocol", "multi-caption", "--tsv", tsv)
    assert (code, out) == (2, "")
    assert err == (f"eval_retri.py: error: {tsv}:11: is a data line, but the embeddings file "
                   "(10 lines) refers to none after line 10: is this the TSV the embeddings were "
                   "made from?\n")
    # lines skipped in the middle (skip_bad_lines) are no error
    keep = [0, 1, 2, 4, 5, 6, 7, 8, 9, 11]
    write_embeddings(out_file, text, image, np.array(keep) + 1, sidecar=False)
    code, out, err = run(capsys, out_file, "--protocol", "multi-caption", "--tsv", tsv)
    assert (code, out) == (0, multi_caption_table(text, image, [ids[i] for i in keep])), err


def test_duplicate_line_numbers_are_an_error_naming_the_line(tmp_path, capsys):
    tsv = tmp_path / "test.tsv"
    write_tsv(tsv, ["a", "a", "b", "c"], bom=False, crlf=False)
    out_file = tmp_path / "emb.out"
    write_embeddings(out_file, *embeddings(4, seed=10), [1, 2, 4, 2], sidecar=False)
    code, out, err = run(capsys, out_file, "--protocol", "multi-caption", "--tsv", tsv)
    assert (code, out) == (2, "")
    assert err == (f"eval_retri.py: error: {out_file}:4: column 3 says input line 2, like line 2: "
                   "each input line is embedded once\n")
