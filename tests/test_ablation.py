"""benchmarks/ablation.py: per-row overrides and the table it reports (no training here)."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("ablation", ROOT / "benchmarks" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_row_sets_group_by_row(ablation):
    sets = ablation.parse_row_sets(["recipe-zh:train_file=a.tsv", "it:lr=0.1", "recipe-zh:seed=3"],
                                   ["it", "recipe-zh"])
    assert sets == {"recipe-zh": ["train_file=a.tsv", "seed=3"], "it": ["lr=0.1"]}


@pytest.mark.parametrize("items, rows, message", [
    (["recipe-zh=a.tsv"], ["it"], "expected ROW:key=value"),
    (["it:lr"], ["it"], "expected ROW:key=value"),
    (["nope:lr=1"], ["it"], "unknown row 'nope'"),
    ([], ["recipe-zh"], "row recipe-zh needs --row-set recipe-zh:train_file="),
    (["recipe-zh:seed=1"], ["recipe-zh"], "needs --row-set recipe-zh:train_file="),
])
def test_row_sets_reject_bad_input(ablation, items, rows, message):
    with pytest.raises(ValueError, match=message):
        ablation.parse_row_sets(items, rows)


def _run(row, seed, mc, official):
    table = {"MeanRecall": {"meanRecall": mc}, "Text2Image": {"R@1": mc / 2},
             "Image2Text": {"R@1": mc / 3}}
    return {"row": row, "seed": seed, "steps": 10, "seconds": 5.0 + seed,
            "validation": {"multi_caption": table, "official": {"MeanRecall": {"meanRecall": official}}}}


def test_summary_is_mean_and_sample_std_per_row(ablation):
    runs = [_run("it", 0, 40.0, 20.0), _run("it", 1, 44.0, 22.0), _run("recipe", 0, 50.0, 25.0)]
    table = ablation.summarize(runs, ["it", "recipe", "it+ii"])
    assert [e["row"] for e in table] == ["it", "recipe"]  # rows without runs are left out
    it = table[0]
    assert it["seeds"] == 2
    assert it["mc_mean"] == {"mean": 42.0, "std": 2.83}  # sample std of 40, 44
    assert it["official_mean"] == {"mean": 21.0, "std": 1.41}
    assert it["mc_t2i_r1"]["mean"] == 21.0
    assert table[1]["mc_mean"] == {"mean": 50.0, "std": 0.0}
    md = ablation.markdown(table, {"steps": 10, "config": "c.yaml", "overrides": [],
                                   "row_sets": {"recipe-zh": ["train_file=zh.tsv"]}})
    assert "| it | image-text | clip | 2 | 42.00 ± 2.83 |" in md
    assert "recipe-zh: train_file=zh.tsv" in md


def test_first_run_and_first_of_each_overridden_row_go_alone(ablation):
    jobs = list(enumerate([("it", 0), ("it", 1), ("recipe-zh", 0), ("recipe-zh", 1), ("recipe", 0)], 1))
    serial, parallel = ablation.run_order(jobs, {"recipe-zh": ["train_file=zh.tsv"]})
    assert serial == [(1, ("it", 0)), (3, ("recipe-zh", 0))]
    assert parallel == [(2, ("it", 1)), (4, ("recipe-zh", 1)), (5, ("recipe", 0))]
    # without per-row overrides only the first run goes alone; nothing is lost or repeated
    serial, parallel = ablation.run_order(jobs, {})
    assert serial == jobs[:1] and parallel == jobs[1:]
    assert ablation.run_order([], {}) == ([], [])


def _saved(tmp_path, ablation, overrides, row_sets):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: 10\n", encoding="utf-8")
    meta = {"config": str(cfg), "steps": 10, "overrides": overrides, "row_sets": row_sets,
            "rows": ["it"], "seeds": [0, 1]}
    runs = [_run("it", 0, 40.0, 20.0), _run("it", 1, 44.0, 22.0)]
    out = tmp_path / "out"
    out.mkdir()
    (out / "ablation.json").write_text(
        json.dumps({"meta": meta, "table": [], "runs": runs}), encoding="utf-8")
    return cfg, out


def test_resume_reuses_runs_made_with_the_same_settings(ablation, tmp_path):
    cfg, out = _saved(tmp_path, ablation, ["lr=0.1"], {})
    # --steps comes from the config's max_steps; both seeds are done, so nothing is trained
    assert ablation.main(["--out-dir", str(out), "--config", str(cfg), "--rows", "it",
                          "--seeds", "0,1", "--resume", "lr=0.1"]) == 0
    assert "| it | image-text | clip | 2 | 42.00 ± 2.83 |" in (out / "ablation.md").read_text(encoding="utf-8")


def test_resume_refuses_runs_made_with_other_overrides(ablation, tmp_path, capsys):
    cfg, out = _saved(tmp_path, ablation, ["lr=0.1"], {})
    with pytest.raises(SystemExit):
        ablation.main(["--out-dir", str(out), "--config", str(cfg), "--rows", "it",
                       "--seeds", "0,1", "--resume", "lr=0.2"])
    assert "made with another config or other overrides" in capsys.readouterr().err
