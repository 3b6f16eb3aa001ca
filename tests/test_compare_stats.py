"""The paired-seed summariser of issue 15's experiments, on synthetic metrics folders."""
import argparse
import json
import math
import os
import shlex
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from increlora_fast.training.compare_stats import (RunResult, growth_profiles,
                                                   loss_around_growth, load_runs, main,
                                                   mean_interval, paired_differences,
                                                   paired_power, pairs_for_power, t_cdf,
                                                   t_quantile, with_power)

BASE = [0.80, 0.82, 0.81, 0.79, 0.83, 0.80, 0.81, 0.82]
GAIN = [0.012, 0.008, 0.010, 0.015, 0.005, 0.011, 0.009, 0.010]


def _write_run(root, task, variant, seed, value, **extra):
    run = root / task / variant / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(dict(task=task, seed=seed, eval_accuracy=value,
                                                      eval_macro_f1=value - 0.1, **extra)))
    return run


@pytest.fixture
def runs_root(tmp_path):
    for seed, (base, gain) in enumerate(zip(BASE, GAIN)):
        _write_run(tmp_path, "rt", "default", seed, base)
        _write_run(tmp_path, "rt", "better", seed, base + gain)
        _write_run(tmp_path, "rt", "same", seed, base + (0.01 if seed % 2 else -0.01))
        _write_run(tmp_path, "trec", "default", seed, 0.9)
    for seed in (0, 1, 2, 11):  # seed 11 has no baseline: it is not paired
        _write_run(tmp_path, "rt", "three_seeds", seed, 0.5)
    return tmp_path


@pytest.mark.parametrize("df,expected", [(1, 12.7062), (2, 4.3027), (7, 2.3646), (30, 2.0423)])
def test_t_quantile_matches_the_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert t_cdf(t_quantile(0.975, df), df) == pytest.approx(0.975, abs=1e-9)


def test_interval_of_the_mean_by_hand():
    values = [1.0, 2.0, 4.0]
    mean, std, low, high = mean_interval(values)
    sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert (mean, std) == (pytest.approx(7 / 3), pytest.approx(sd))
    assert high - mean == pytest.approx(4.302653 * sd / math.sqrt(3), rel=1e-6)
    assert mean - low == pytest.approx(high - mean)
    assert mean_interval([0.5])[1:] == (None, None, None)


def test_paired_differences_per_task_and_variant(runs_root):
    rows = {(r.task, r.variant): r for r in
            paired_differences(load_runs(runs_root), baseline="default")}
    assert set(rows) == {("rt", "better"), ("rt", "same"), ("rt", "three_seeds")}
    better = rows["rt", "better"]
    mean, _, low, high = mean_interval(GAIN)
    assert better.seeds == list(range(8))
    assert better.mean_diff == pytest.approx(0.0100, abs=1e-12)
    assert (better.ci_low, better.ci_high) == (pytest.approx(low), pytest.approx(high))
    assert better.verdict == "better" and 0 < better.ci_low < 0.01 < better.ci_high
    assert better.baseline_mean == pytest.approx(sum(BASE) / 8)
    same = rows["rt", "same"]
    assert same.mean_diff == pytest.approx(0.0) and same.verdict == "tie"
    three = rows["rt", "three_seeds"]
    assert three.seeds == [0, 1, 2] and three.verdict == "worse"
    assert three.baseline_mean == pytest.approx(sum(BASE[:3]) / 3)


def test_only_filters_variants_and_metric_is_selectable(runs_root):
    rows = paired_differences(load_runs(runs_root, metric="eval_macro_f1"), "default",
                              only="b*")
    assert [r.variant for r in rows] == ["better"]
    assert rows[0].variant_mean == pytest.approx(sum(BASE) / 8 + 0.01 - 0.1)


def test_errors_name_the_problem(runs_root, tmp_path_factory):
    with pytest.raises(ValueError, match="baseline variant 'missing'.*better"):
        paired_differences(load_runs(runs_root), baseline="missing")
    with pytest.raises(ValueError, match="no 'eval_f2'"):
        load_runs(runs_root, metric="eval_f2")
    (runs_root / "copy" / "default").mkdir(parents=True)
    dup = _write_run(runs_root / "copy", "rt", "better", 0, 0.1)
    with pytest.raises(ValueError, match=str(dup / "metrics.json")):
        load_runs(runs_root)
    with pytest.raises(ValueError, match="no metrics.json"):
        load_runs(tmp_path_factory.mktemp("empty"))


def test_cli_writes_the_markdown_table_and_json(runs_root, tmp_path):
    out, js = tmp_path / "table.md", tmp_path / "rows.json"
    assert main([str(runs_root), "--baseline", "default", "--out", str(out),
                 "--json-out", str(js)]) == 0
    text = out.read_text()
    assert "### rt: eval_accuracy, paired on seeds against `default`" in text
    assert "| better | 8 | 0.8200 | 0.8100 | +0.0100 | [+0.0" in text
    assert "| three_seeds | 3 |" in text and "worse" in text
    rows = json.loads(js.read_text())
    assert {r["variant"]: r["verdict"] for r in rows} == {"better": "better", "same": "tie",
                                                          "three_seeds": "worse"}
    assert main([str(runs_root), "--baseline", "nope"]) == 2


def test_cli_plots_the_differences(runs_root, tmp_path):
    png = tmp_path / "diff.png"
    assert main([str(runs_root), "--baseline", "default", "--out", str(tmp_path / "t.md"),
                 "--diff-plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([str(runs_root), "--baseline", "default", "--exclude", "better,same,three*",
                 "--diff-plot", str(tmp_path / "none.png")]) == 2  # nothing to plot: an error
    assert not (tmp_path / "none.png").exists()


def test_cli_refuses_an_empty_table(runs_root, tmp_path, capsys):
    out = tmp_path / "t.md"
    assert main([str(runs_root), "--baseline", "default", "--exclude", "better,same,three*",
                 "--out", str(out)]) == 2  # used to write an empty table and exit 0
    assert not out.exists()
    assert "--only/--exclude" in capsys.readouterr().err


def test_loss_around_growth_averages_over_rounds(tmp_path):
    losses = [float(i) for i in range(40)]
    run = _write_run(tmp_path, "rt", "default", 0, 0.8, train_losses=losses)
    (run / "allocation_log.jsonl").write_text("".join(
        json.dumps({"step": s, "module": m, "new_rank": 2}) + "\n"
        for s, m in ((10, "a"), (10, "b"), (20, "a"), (35, "c"))))
    profile = loss_around_growth(run, before=2, after=5)
    assert sorted(profile) == list(range(-2, 6))
    assert profile[0] == pytest.approx((10 + 20 + 35) / 3)  # step 10 counted once
    assert profile[5] == pytest.approx((15 + 25) / 2)  # 35 + 5 is past the end
    no_rounds = _write_run(tmp_path, "rt", "uniform", 0, 0.8, train_losses=losses)
    assert loss_around_growth(no_rounds) == {}


def test_growth_profiles_average_seeds_per_variant(tmp_path):
    log = json.dumps({"step": 4, "module": "a", "new_rank": 2}) + "\n"
    for seed, shift in ((0, 0.0), (1, 2.0)):
        for variant in ("default", "sp_growth"):
            run = _write_run(tmp_path, "rt", variant, seed, 0.8,
                             train_losses=[shift + i for i in range(10)])
            (run / "allocation_log.jsonl").write_text(log)
    profiles = growth_profiles(load_runs(tmp_path), ["sp_growth"], before=1, after=2)
    assert profiles == {"rt": {"sp_growth": {"-1": 4.0, "0": 5.0, "1": 6.0, "2": 7.0}}}
    out, png = tmp_path / "profile.json", tmp_path / "profile.png"
    assert main([str(tmp_path), "--baseline", "default", "--growth-profile", str(out),
                 "--growth-plot", str(png)]) == 0
    assert set(json.loads(out.read_text())["rt"]) == {"default", "sp_growth"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_growth_profiles_pair_the_seeds_of_the_variants(tmp_path):
    """A seed only the baseline ran (seed 2) does not enter its line: the lines stay paired."""
    log = json.dumps({"step": 4, "module": "a", "new_rank": 2}) + "\n"
    for variant, seeds in (("default", (0, 1, 2)), ("sp_growth", (0, 1))):
        for seed in seeds:
            run = _write_run(tmp_path, "rt", variant, seed, 0.8,
                             train_losses=[10.0 * seed + i for i in range(10)])
            (run / "allocation_log.jsonl").write_text(log)
    _write_run(tmp_path, "rt", "uniform", 5, 0.8, train_losses=[0.0] * 10)  # no rounds
    profiles = growth_profiles(load_runs(tmp_path), ["default", "sp_growth", "uniform"],
                               before=0, after=0)
    assert profiles == {"rt": {"default": {"0": 9.0}, "sp_growth": {"0": 9.0}}}


def test_runner_queues_paired_seeds_with_valid_options(tmp_path):
    """Every run of scripts/compare/run_issue15.sh parses and resolves as a fine-tune run, every
    variant has seeds 0..n-1 on both tasks, and no two variants share a folder."""
    from increlora_fast.cli.finetune import add_arguments, settings_from_args
    from increlora_fast.training.settings import resolve

    script = Path(__file__).resolve().parents[1] / "scripts" / "compare" / "run_issue15.sh"
    env = dict(os.environ, DRY_RUN="1", ROOT=str(tmp_path / "runs"), SEEDS_CONTROLS="8",
               SEEDS_OPTIONS="5", SEEDS_OTHER="3")
    lines = subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True,
                           text=True).stdout.splitlines()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    seeds, methods = {}, {}
    for line in lines:
        folder, options = line.split("\t")
        task, variant, seed_dir = Path(folder).parts[-3:]
        settings = resolve(settings_from_args(parser.parse_args(shlex.split(options))), 8000)
        if task.startswith("amazon"):  # the user-data section: data sets of one's own, by file
            assert (settings.task, Path(settings.train_file).name) == (None, "train.csv")
            assert Path(settings.train_file).parent.name == task
        else:
            assert settings.task == task
        assert f"seed{settings.seed}" == seed_dir
        seeds.setdefault(variant, {}).setdefault(task, []).append(settings.seed)
        methods[variant] = settings.method
    assert len(lines) == len(set(lines))
    for variant, per_task in seeds.items():
        if variant != "lora_lr4e-3":  # a check of LoRA's lr on the snippets only
            assert sorted(set(per_task) - {"amazon", "amazon64"}) == \
                ["rotten_tomatoes", "trec6"], variant
        assert all(s == list(range(len(s))) for s in per_task.values()), variant
    for control in ("default", "uniform2", "rank1", "random", "lora", "adalora"):
        assert seeds[control]["trec6"] == list(range(8))
    assert seeds["sp_growth"]["trec6"] == list(range(5))
    assert {v for v in seeds if "amazon" in seeds[v]} == {
        "default", "default_pooler", "lora", "lora_pooler", "adalora", "adalora_pooler"}
    assert {v for v in seeds if "amazon64" in seeds[v]} == {"default", "lora", "lora_lr4e-3"}
    assert methods["h1200_adalora_lr2e-3"] == "adalora"
    assert {"norm_only", "no_reserve_penalty_lam1e-3", "schedule_authors", "rank8_increlora",
            "adalora_pooler_alpha32"} <= set(seeds)
    bad = subprocess.run(["bash", str(script), "nonsense"], env=env, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "unknown section 'nonsense'" in bad.stderr


def test_authors_recipe_runs_seed_by_seed(tmp_path):
    """`run_issue15.sh authors_recipe`: the authors' recipe (pooler trained, alpha 32) for the
    three methods, seed by seed (a runner stopped early leaves complete pairs), under names of
    their own that no other section uses."""
    from increlora_fast.cli.finetune import add_arguments, settings_from_args
    from increlora_fast.training.settings import resolve

    script = Path(__file__).resolve().parents[1] / "scripts" / "compare" / "run_issue15.sh"
    env = dict(os.environ, DRY_RUN="1", ROOT=str(tmp_path / "runs"), SEEDS_OTHER="3",
               TASKS="trec6")
    lines = subprocess.run(["bash", str(script), "authors_recipe"], env=env, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    order = []
    for line in lines:
        folder, options = line.split("\t")
        _, variant, seed_dir = Path(folder).parts[-3:]
        settings = resolve(settings_from_args(parser.parse_args(shlex.split(options))), 8000)
        assert variant == f"recipe_{settings.method}"
        assert (settings.lora_alpha, sorted(settings.modules_to_save)) == \
            (32.0, ["classifier", "pooler"])
        assert seed_dir == f"seed{settings.seed}"
        order.append((settings.seed, settings.method))
    assert order == [(s, m) for s in range(3) for m in ("increlora", "lora", "adalora")]
    every = subprocess.run(["bash", str(script)], env=dict(env, TASKS="rotten_tomatoes trec6"),
                           check=True, capture_output=True, text=True).stdout
    assert "/recipe_" not in every


def test_the_task_is_the_folder_name(tmp_path):
    """A run on a data file of one's own has task "file:train.csv" in its metrics; the table
    names it by its folder, as the runner lays it out."""
    for seed in (0, 1):
        for variant, value in (("default", 0.6), ("lora", 0.7)):
            run = _write_run(tmp_path, "amazon", variant, seed, value)
            metrics = json.loads((run / "metrics.json").read_text())
            (run / "metrics.json").write_text(json.dumps(dict(metrics, task="file:train.csv")))
    rows = paired_differences(load_runs(tmp_path), "default")
    assert [(r.task, r.variant, r.seeds) for r in rows] == [("amazon", "lora", [0, 1])]


# scipy.stats.nct: sf(c) + cdf(-c) with c = t.ppf(0.975, n - 1), ncp = 0.005 / (sd / sqrt(n))
@pytest.mark.parametrize("sd,pairs,expected", [(0.00653, 8, 0.4635283500), (0.00868, 8,
                                                0.2915931249), (0.01, 3, 0.0841070559),
                                               (0.02, 30, 0.2629625268)])
def test_paired_power_matches_the_noncentral_t(sd, pairs, expected):
    assert paired_power(sd, pairs, 0.005) == pytest.approx(expected, abs=1e-8)
    assert paired_power(sd, pairs, -0.005) == pytest.approx(expected, abs=1e-8)


def test_power_is_the_test_level_without_a_difference_and_pairs_reach_80_percent():
    assert paired_power(0.01, 5, 0.0) == pytest.approx(0.05, abs=1e-8)
    pairs = pairs_for_power(0.00653, 0.005)
    assert pairs == 16  # power 0.82 at 16 pairs, 0.79 at 15 (scipy agrees)
    assert paired_power(0.00653, pairs, 0.005) >= 0.8 > paired_power(0.00653, pairs - 1, 0.005)
    assert pairs_for_power(0.0001, 0.005) == 2
    with pytest.raises(ValueError, match="pairs >= 2"):
        paired_power(0.01, 1, 0.005)


@pytest.mark.parametrize("sd,diff", [(0.01, 0.001), (0.02, 0.0005), (0.3, 0.001)])
def test_pairs_for_power_of_a_tiny_difference_is_the_fewest_in_few_evaluations(
        sd, diff, monkeypatch):
    """A tiny difference needs thousands of pairs: the search starts from the normal
    approximation, so it takes a few power evaluations, not a doubling and a bisection from 2
    (found by an audit: 6-17 s per table row, most of it in t quantiles of new df)."""
    import increlora_fast.training.compare_stats as stats
    calls = []
    monkeypatch.setattr(stats, "paired_power",
                        lambda *a, **k: calls.append(a) or paired_power(*a, **k))
    pairs = stats.pairs_for_power(sd, diff, limit=10_000_000)
    assert paired_power(sd, pairs, diff) >= 0.8 > paired_power(sd, pairs - 1, diff)
    assert len(calls) <= 6, [c[1] for c in calls]
    calls.clear()
    assert stats.pairs_for_power(sd, diff, limit=pairs - 1) is None
    assert stats.pairs_for_power(sd, diff, limit=pairs) == pairs


def test_t_quantile_needs_few_distribution_evaluations(monkeypatch):
    import increlora_fast.training.compare_stats as stats
    calls = []
    monkeypatch.setattr(stats, "t_cdf", lambda x, df: calls.append(df) or t_cdf(x, df))
    for df, p in [(1, 0.975), (2, 0.6), (7, 0.995), (40, 0.975), (12345, 0.9)]:
        calls.clear()
        q = stats.t_quantile.__wrapped__(p, df)
        assert t_cdf(q, df) == pytest.approx(p, abs=1e-12)
        assert len(calls) <= 12, (df, p, len(calls))


def test_cli_adds_power_columns(runs_root, tmp_path):
    out, js = tmp_path / "table.md", tmp_path / "rows.json"
    assert main([str(runs_root), "--baseline", "default", "--only", "better",
                 "--power-for", "0.005", "--out", str(out), "--json-out", str(js)]) == 0
    row = json.loads(js.read_text())[0]
    std = paired_differences(load_runs(runs_root), "default", only="better")[0].std_diff
    assert row["power"] == pytest.approx(paired_power(std, 8, 0.005))
    assert row["pairs_for_80"] == pairs_for_power(std, 0.005)
    assert "| power at 0.005 | pairs for 80 % at 0.005 |" in out.read_text()
    assert "| better | 8 |" in out.read_text()
    plain = tmp_path / "plain.json"
    assert main([str(runs_root), "--baseline", "default", "--json-out", str(plain)]) == 0
    assert "power" not in json.loads(plain.read_text())[0]  # only when asked for
    single = with_power(paired_differences(load_runs(runs_root), "default"), 0.005)
    assert all(r.power_for == 0.005 for r in single)


def _write_compare_folder(root, best, seeds=3, lrs=(0.001, 0.004)):
    """A `finetune --compare` output folder: each method's sweep on seed 0, its best lr on the
    other seeds, and compare.json naming the best."""
    methods = {}
    for method, (lr_best, accs) in best.items():
        for lr in lrs:
            for seed in (range(seeds) if lr == lr_best else [0]):
                run = root / method / f"lr{lr:g}" / f"seed{seed}"
                run.mkdir(parents=True)
                value = accs[seed] if lr == lr_best else 0.5
                (run / "metrics.json").write_text(json.dumps(dict(
                    task="file:train.csv", seed=seed, eval_accuracy=value,
                    eval_macro_f1=value - 0.1, settings=dict(lr=lr, method=method))))
        methods[method] = dict(lr=lr_best, seeds=list(range(seeds)))
    (root / "compare.json").write_text(json.dumps(dict(task="file:train.csv", seeds=seeds,
                                                       methods=methods)))


def test_a_compare_output_folder_pairs_each_method_at_its_chosen_lr(tmp_path):
    _write_compare_folder(tmp_path, {"increlora": (0.004, [0.80, 0.82, 0.81]),
                                     "lora": (0.001, [0.79, 0.80, 0.81])})
    runs = load_runs(tmp_path)
    assert sorted((r.variant, r.seed) for r in runs) == [
        ("increlora", 0), ("increlora", 1), ("increlora", 2), ("lora", 0), ("lora", 1),
        ("lora", 2)]  # the sweep's seed-0 runs at the other lr are left out
    out = tmp_path / "table.md"
    assert main([str(tmp_path), "--baseline", "lora", "--out", str(out)]) == 0
    text = out.read_text()
    assert "### file:train.csv: eval_accuracy, paired on seeds against `lora`" in text
    assert "| increlora | 3 | 0.8100 | 0.8000 | +0.0100 | [" in text
    (tmp_path / "lora" / "lr0.001" / "seed2" / "metrics.json").unlink()
    with pytest.raises(ValueError, match="no metrics.json of lora at lr 0.001 seed 2"):
        load_runs(tmp_path)


def test_identical_differences_give_no_interval_and_no_verdict(tmp_path):
    # dev accuracies on 500 rows: every seed +0.004 (or +0.002 on two seeds); the spread is 0 up
    # to rounding, so the t-interval has zero width and would call each a win
    for variant, accs in {"default": [0.926, 0.930, 0.928], "tweak": [0.930, 0.934, 0.932],
                          "two": [0.928, 0.932]}.items():
        for seed, value in enumerate(accs):
            _write_run(tmp_path, "trec", variant, seed, value)
    rows = {r.variant: r for r in with_power(paired_differences(load_runs(tmp_path), "default"),
                                             0.005)}
    for variant, diff in (("tweak", 0.004), ("two", 0.002)):
        row = rows[variant]
        assert row.mean_diff == pytest.approx(diff) and row.std_diff == 0.0
        assert (row.ci_low, row.ci_high, row.power) == (None, None, None)
        assert row.verdict == "n/a (identical differences)"
    assert mean_interval([0.1, 0.1 + 1e-17, 0.1])[2:] == (None, None)
    assert mean_interval([0.0, 0.0])[1:] == (0.0, None, None)


@pytest.mark.parametrize("value", [math.nan, None, math.inf])
def test_a_metric_that_is_not_a_finite_number_is_an_error(tmp_path, capsys, value):
    # a NaN used to read as a "tie" (NaN > 0 and NaN < 0 are both false), a null crashed
    for seed in range(3):
        _write_run(tmp_path, "t", "default", seed, 0.8)
        broken = _write_run(tmp_path, "t", "broken", seed, 0.9)
    bad = broken.parent / "seed1" / "metrics.json"
    bad.write_text(json.dumps(dict(task="t", seed=1, eval_accuracy=value)))
    with pytest.raises(ValueError, match=f"{bad}: 'eval_accuracy' is"):
        load_runs(tmp_path)
    assert main([str(tmp_path), "--baseline", "default"]) == 2
    assert "not a finite number" in capsys.readouterr().err


def _with_settings(run, **settings):
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps(dict(metrics, settings=settings)))


def test_runs_on_other_dev_data_are_not_paired(tmp_path):
    """The pairs must score the same dev rows: a variant's runs on another eval file (or
    another task's dev split, or a capped one) than the baseline's runs of those seeds are an
    error naming both runs, not a difference; runs on the same data pair as before."""
    def settings(variant, **changed):
        return dict(dict(task=None, train_file="/a/train.csv", train_file_sha256="t1",
                         eval_file="/a/dev.csv", eval_file_sha256="d1", max_eval_samples=None,
                         lr=0.001 if variant == "lora" else 0.008), **changed)

    for seed in range(3):
        for variant in ("default", "lora"):
            run = _write_run(tmp_path, "amazon", variant, seed, 0.6 + 0.01 * seed)
            _with_settings(run, **settings(variant))
    assert [r.seeds for r in paired_differences(load_runs(tmp_path), "default")] == [[0, 1, 2]]

    def lora_on(**changed):
        for seed in range(3):
            _with_settings(tmp_path / "amazon" / "lora" / f"seed{seed}",
                           **settings("lora", **changed))

    for changed in (dict(eval_file_sha256="d2"), dict(max_eval_samples=100),
                    dict(task="trec6", train_file=None, train_file_sha256=None, eval_file=None,
                         eval_file_sha256=None)):
        lora_on(**changed)
        with pytest.raises(ValueError, match=f"{tmp_path / 'amazon' / 'lora' / 'seed0'}.*"
                                             f"{tmp_path / 'amazon' / 'default' / 'seed0'}"
                                             ".*other dev data"):
            paired_differences(load_runs(tmp_path), "default")
    assert main([str(tmp_path), "--baseline", "default"]) == 2
    # the train file's checksum only matters where the dev split is held out from it
    lora_on(train_file="/b/train.csv", train_file_sha256="t2")
    assert [r.seeds for r in paired_differences(load_runs(tmp_path), "default")] == [[0, 1, 2]]


def test_a_second_run_of_one_seed_in_a_compare_folder_is_an_error(tmp_path):
    """A copy of a run folder kept beside it (``seed1_old``, ``seed1.bak``) holds a run of the
    same method, lr and seed: which of the two is meant cannot be told, so it is an error
    naming both, as for the <task>/<variant>/seed<k> layout, not the copy chosen by name."""
    _write_compare_folder(tmp_path, {"increlora": (0.004, [0.80, 0.82, 0.81]),
                                     "lora": (0.001, [0.79, 0.80, 0.81])})
    run = tmp_path / "lora" / "lr0.001" / "seed1"
    copy = run.parent / "seed1_old"
    copy.mkdir()
    metrics = json.loads((run / "metrics.json").read_text())
    (copy / "metrics.json").write_text(json.dumps(dict(metrics, eval_accuracy=0.5)))
    with pytest.raises(ValueError, match=f"{copy / 'metrics.json'}.*seed 1.*{run}"):
        load_runs(tmp_path)


@pytest.mark.parametrize("damage", [b"{\"seed\": 1, \"eval_acc", b"\xff\xfe{}", b"[0.8]",
                                    b"{\"eval_accuracy\": 0.8}"])
def test_a_damaged_metrics_file_is_named(tmp_path, capsys, damage):
    """A truncated or foreign metrics.json (a run killed while copying, a disk that filled up)
    used to end in a bare 'Expecting value: line 1 ...' or a traceback, with no word of which of
    the many run files it is; the error names the file."""
    for seed in range(3):
        _write_run(tmp_path, "t", "default", seed, 0.8)
        _write_run(tmp_path, "t", "other", seed, 0.9)
    bad = tmp_path / "t" / "other" / "seed1" / "metrics.json"
    bad.write_bytes(damage)
    assert main([str(tmp_path), "--baseline", "default"]) == 2
    assert str(bad) in capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0"])
def test_power_for_needs_a_finite_difference(runs_root, capsys, value):
    # --power-for nan used to report a power of 1.00 and 2 pairs for 80 % on every row
    # (min(1.0, nan) is 1.0); an infinite difference is no planning figure either
    assert main([str(runs_root), "--baseline", "default", f"--power-for={value}"]) == 2
    assert "--power-for" in capsys.readouterr().err
    if value != "0":
        with pytest.raises(ValueError, match="finite"):
            paired_power(0.01, 8, float(value))


def test_runs_of_one_variant_with_other_settings_are_an_error(tmp_path):
    """The runner skips a run whose metrics.json exists, so a variant whose options changed
    between sessions (or more seeds added at other --max-steps) holds runs of two setups under
    one name, and its mean and paired differences mixed them without a word: an error naming
    the runs and the setting now. The seed, the data files' paths (their checksums are what
    counts) and the device may differ; settings a run predates read as their defaults."""
    common = dict(method="lora", lr=0.001, max_steps=300, train_file=None, eval_file=None,
                  task="trec6", device="auto")
    for seed in range(3):
        for variant in ("default", "lora"):
            run = _write_run(tmp_path, "trec6", variant, seed, 0.9 + 0.01 * seed)
            _with_settings(run, **dict(common, seed=seed, device="cuda" if seed else "cpu"))
    late = tmp_path / "trec6" / "lora" / "seed2"
    _with_settings(late, **dict(common, seed=2, pooling="cls"))  # the default pooling
    assert [r.seeds for r in paired_differences(load_runs(tmp_path), "default")] == [[0, 1, 2]]
    _with_settings(late, **dict(common, seed=2, max_steps=200))
    with pytest.raises(ValueError, match=f"{late}.*{tmp_path / 'trec6' / 'lora'}.*max_steps"):
        load_runs(tmp_path)


@pytest.mark.parametrize("option", ["--out", "--json-out", "--diff-plot"])
def test_an_output_that_cannot_be_written_is_refused_before_reading_runs(runs_root, tmp_path,
                                                                         capsys, option,
                                                                         monkeypatch):
    """An output under a file, or a folder given as the file, used to end in a traceback after
    every run was read and the other outputs written; now one line naming the option, before
    anything is read."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    read = []
    monkeypatch.setattr("increlora_fast.training.compare_stats.load_runs",
                        lambda *a, **k: read.append(a) or load_runs(*a, **k))
    for bad in (blocker / "t.out", runs_root):
        assert main([str(runs_root), "--baseline", "default", option, str(bad)]) == 2
        assert option in capsys.readouterr().err and not read


def test_outputs_go_into_new_folders_and_replace_their_files_whole(runs_root, tmp_path):
    out, js = tmp_path / "new" / "t.md", tmp_path / "new" / "deeper" / "rows.json"
    assert main([str(runs_root), "--baseline", "default", "--out", str(out),
                 "--json-out", str(js)]) == 0  # a missing folder used to be a traceback
    assert "| better | 8 |" in out.read_text() and json.loads(js.read_text())
    assert sorted(p.name for p in out.parent.iterdir()) == ["deeper", "t.md"]  # no temp left
    assert main([str(runs_root), "--baseline", "default", "--out", "/dev/null"]) == 0
    assert not Path("/dev/null").is_file()  # a device is written to, never replaced


def test_two_outputs_on_one_file_are_refused(runs_root, tmp_path, capsys):
    # the JSON rows used to replace the Markdown table without a word
    same = tmp_path / "t.txt"
    assert main([str(runs_root), "--baseline", "default", "--out", str(same),
                 "--json-out", str(same)]) == 2
    assert "--json-out" in capsys.readouterr().err and not same.exists()


@pytest.mark.parametrize("report", [b"{\"task\": \"x\", \"meth", b"[1]", b"{\"task\": \"x\"}",
                                    b"{\"task\": \"x\", \"methods\": {\"lora\": {\"lr\": 1}}}"])
def test_a_damaged_compare_report_is_named(tmp_path, capsys, report):
    """A truncated compare.json used to give a bare 'Expecting ...' with no file, and one
    without methods (or a method without its lr or seeds) a KeyError traceback."""
    (tmp_path / "compare.json").write_bytes(report)
    assert main([str(tmp_path), "--baseline", "lora"]) == 2
    assert str(tmp_path / "compare.json") in capsys.readouterr().err


def test_only_and_exclude_match_a_variant_name_with_glob_characters(tmp_path):
    """A variant folder named like a glob (``rank[8]``) could not be selected or left out by
    its own name: fnmatch read ``[8]`` as a character class. A name matches itself."""
    for seed in range(3):
        _write_run(tmp_path, "t", "default", seed, 0.8 + 0.01 * seed)
        _write_run(tmp_path, "t", "rank[8]", seed, 0.81 + 0.012 * seed)
        _write_run(tmp_path, "t", "rank8", seed, 0.8)
    runs = load_runs(tmp_path)
    assert [r.variant for r in paired_differences(runs, "default", only="rank[8]")] == \
        ["rank[8]"]
    assert [r.variant for r in paired_differences(runs, "default", exclude="rank[8]")] == \
        ["rank8"]
    assert [r.variant for r in paired_differences(runs, "default", only="rank?8*")] == \
        ["rank[8]"]  # globs still work


def test_a_variant_left_out_is_not_read(tmp_path, capsys):
    """--exclude (or an --only that leaves it out) is how one sets aside a variant whose runs
    cannot be compared (no such metric in older runs, a NaN, a damaged file), yet every run was
    read first and such a run stopped the whole table."""
    for seed in range(3):
        _write_run(tmp_path, "t", "default", seed, 0.8 + 0.01 * seed)
        _write_run(tmp_path, "t", "good", seed, 0.81 + 0.012 * seed)
        _write_run(tmp_path, "t", "old", seed, float("nan"))
    (tmp_path / "t" / "old" / "seed1" / "metrics.json").write_text("{\"trunc")
    out = tmp_path / "t.md"
    for select in (["--exclude", "old"], ["--only", "go*"]):
        assert main([str(tmp_path), "--baseline", "default", "--out", str(out)] + select) == 0
        assert "| good | 3 |" in out.read_text() and "old" not in out.read_text()
    assert main([str(tmp_path), "--baseline", "default", "--out", str(out)]) == 2
    assert str(tmp_path / "t" / "old") in capsys.readouterr().err
    with pytest.raises(ValueError, match="old"):
        load_runs(tmp_path)
    for seed in range(3):
        _write_run(tmp_path, "t", "old[8]", seed, 0.79)
        _write_run(tmp_path, "t", "old8", seed, 0.83)
    assert main([str(tmp_path), "--baseline", "default", "--out", str(out),
                 "--exclude", "old,old[8]"]) == 0
    assert [line.split(" | ")[0] for line in out.read_text().splitlines()[4:] if line] == \
        ["| good", "| old8"]  # old[8] alone left out, as its name says


def test_a_method_left_out_of_a_compare_folder_is_not_read(tmp_path):
    _write_compare_folder(tmp_path, {"increlora": (0.004, [0.80, 0.82, 0.81]),
                                     "lora": (0.001, [0.79, 0.80, 0.81]),
                                     "adalora": (0.004, [0.78, 0.80, 0.81])})
    (tmp_path / "adalora" / "lr0.004" / "seed1" / "metrics.json").write_text("{\"trunc")
    out = tmp_path / "table.md"
    assert main([str(tmp_path), "--baseline", "lora", "--exclude", "adalora",
                 "--out", str(out)]) == 0
    assert "| increlora | 3 |" in out.read_text() and "adalora" not in out.read_text()
    assert main([str(tmp_path), "--baseline", "lora", "--out", str(out)]) == 2


def test_options_that_give_nothing_are_refused_before_any_output(runs_root, tmp_path, capsys,
                                                                  monkeypatch):
    """--power-for 0 used to be refused only after every run was read; --diff-plot with no
    variant left only after the growth profile had been written (then left as if the command
    had made its outputs)."""
    read = []
    monkeypatch.setattr("increlora_fast.training.compare_stats.load_runs",
                        lambda *a, **k: read.append(a) or load_runs(*a, **k))
    assert main([str(runs_root), "--baseline", "default", "--power-for", "0"]) == 2
    assert "--power-for" in capsys.readouterr().err and not read
    log = json.dumps({"step": 4, "module": "a", "new_rank": 2}) + "\n"
    for seed in range(2):
        run = _write_run(tmp_path / "g", "rt", "default", seed, 0.8,
                         train_losses=[float(i) for i in range(10)])
        (run / "allocation_log.jsonl").write_text(log)
    profile = tmp_path / "profile.json"
    assert main([str(tmp_path / "g"), "--baseline", "default", "--growth-profile", str(profile),
                 "--diff-plot", str(tmp_path / "d.png")]) == 2
    assert "nothing to compare" in capsys.readouterr().err
    assert not profile.exists() and not (tmp_path / "d.png").exists()
    assert main([str(tmp_path / "g"), "--baseline", "default",
                 "--growth-profile", str(profile)]) == 0  # the baseline's profile alone
    assert json.loads(profile.read_text()) == {"rt": {"default": {
        str(k): float(4 + k) for k in range(-4, 6)}}}


@pytest.mark.parametrize("line", ["{\"step\": 4, \"mod", "{\"module\": \"a\"}", "[4]",
                                  "{\"step\": \"4\"}"])
def test_a_damaged_allocation_log_is_named(tmp_path, capsys, line):
    """A cut-off or foreign allocation_log.jsonl line gave a bare 'Expecting ...' naming no
    file, or a KeyError / TypeError traceback."""
    for seed in range(2):
        run = _write_run(tmp_path, "rt", "default", seed, 0.8,
                         train_losses=[float(i) for i in range(10)])
        (run / "allocation_log.jsonl").write_text(
            json.dumps({"step": 4, "module": "a", "new_rank": 2}) + "\n")
    bad = tmp_path / "rt" / "default" / "seed1" / "allocation_log.jsonl"
    bad.write_text(bad.read_text() + line + "\n")
    with pytest.raises(ValueError, match=f"{bad}:2"):
        loss_around_growth(bad.parent)
    assert main([str(tmp_path), "--baseline", "default", "--growth-profile",
                 str(tmp_path / "g.json")]) == 2
    assert f"{bad}:2" in capsys.readouterr().err and not (tmp_path / "g.json").exists()


@pytest.mark.parametrize("option,name", [("--json-out", "rt/default/seed0/metrics.json"),
                                         ("--out", "compare.md"),
                                         ("--diff-plot", "rt/better/seed1/rank_heatmap.png")])
def test_an_output_never_replaces_a_file_of_the_runs(runs_root, capsys, option, name):
    """An output path pointed at one of the runs' own files (a run's metrics.json, the
    compare.md of `finetune --compare` in the folder read) replaced it without a word."""
    (runs_root / "compare.md").write_text("the comparison's own table\n")
    (runs_root / "rt" / "better" / "seed1" / "rank_heatmap.png").write_bytes(b"png")
    target = runs_root / name
    before = target.read_bytes()
    assert main([str(runs_root), "--baseline", "default", option, str(target)]) == 2
    assert option in capsys.readouterr().err and target.read_bytes() == before


def test_a_growth_plot_without_rounds_leaves_no_growth_profile(runs_root, tmp_path, capsys):
    # no run grew a rank: the plot was refused only after the (empty) profile had been written
    for run in runs_root.glob("*/*/seed*"):
        data = json.loads((run / "metrics.json").read_text())
        (run / "metrics.json").write_text(json.dumps(dict(data, train_losses=[1.0] * 10)))
    profile = tmp_path / "out" / "profile.json"
    assert main([str(runs_root), "--baseline", "default", "--only", "better",
                 "--growth-profile", str(profile), "--growth-plot",
                 str(tmp_path / "out" / "g.png")]) == 2
    assert "no growth rounds" in capsys.readouterr().err and not profile.exists()


def test_what_is_left_out_of_the_pairing_is_named_on_stderr(runs_root, tmp_path, capsys):
    """A variant sharing no seed with the baseline, a task without baseline runs and the seeds
    only one side ran used to leave the table without a word (only the seed count showed the
    last): each is now one warning naming the task, the variant and the seeds; a table left
    with no row at all is an error naming why, before any output."""
    for seed in (20, 21):
        _write_run(runs_root, "rt", "lonely", seed, 0.7)
    for seed in range(2):
        _write_run(runs_root, "sst", "better", seed, 0.7)
    out = tmp_path / "t.md"
    assert main([str(runs_root), "--baseline", "default", "--out", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert "lonely" not in out.read_text()
    assert "compare_stats: warning: task 'rt': 'lonely' shares no seed with the baseline " \
        "'default' (seeds 20-21 against 0-7); left out" in err
    assert "compare_stats: warning: task 'sst' has no runs of the baseline 'default'; left " \
        "out 'better' (seeds 0-1)" in err
    assert "compare_stats: warning: task 'rt': 'three_seeds' paired on 3 seeds; left out " \
        "seeds 11 run by 'three_seeds' only, 3-7 by 'default' only" in err
    assert len(err) == 3  # better and same ran every seed of the baseline
    assert main([str(runs_root), "--baseline", "default", "--only", "lonely",
                 "--out", str(out), "--json-out", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err
    assert "nothing to compare" in err and "'lonely' shares no seed" in err
    assert "warning" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "t.json").exists()


def test_an_only_glob_that_matches_no_variant_is_an_error(runs_root, tmp_path, capsys):
    """A mistyped --only glob was ignored without a word (the table then lacked that variant,
    or held none); now it is an error naming the glob and the variants, before any output.
    An --exclude glob that matches nothing stays allowed: one list of variants to set aside
    serves several tables (run_issue15.sh's summary)."""
    out = tmp_path / "t.md"
    assert main([str(runs_root), "--baseline", "default", "--only", "better,smae",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == ("compare_stats: error: --only glob 'smae' matches no variant; variants: "
                   "['better', 'default', 'same', 'three_seeds']\n")
    assert not out.exists()
    with pytest.raises(ValueError, match="--only glob 'b\\?ter'"):
        paired_differences(load_runs(runs_root), "default", only="same,b?ter")
    assert main([str(runs_root), "--baseline", "default", "--only", "b*,default",
                 "--exclude", "h1200_*,same", "--out", str(out)]) == 0
    assert "| better | 8 |" in out.read_text() and "| same" not in out.read_text()
    _write_compare_folder(tmp_path / "cmp", {"increlora": (0.004, [0.80, 0.82, 0.81]),
                                             "lora": (0.001, [0.79, 0.80, 0.81])})
    assert main([str(tmp_path / "cmp"), "--baseline", "lora", "--only", "incre_lora"]) == 2
    assert "'incre_lora' matches no variant; variants: ['increlora', 'lora']" in \
        capsys.readouterr().err


def test_paired_differences_refuses_two_runs_of_one_seed():
    """`paired_differences` also takes runs read by other code (scripts/measure_defaults.py
    reads its own result files): a second run of one task, variant and seed (a copy kept as
    seed1_old.json) silently replaced the first in the pairing; now it is an error naming both,
    as in `load_runs`."""
    runs = [RunResult("t", v, seed, value, f"/r/{v}/seed{seed}") for v, values in
            (("base", [0.80, 0.81, 0.79]), ("tweak", [0.82, 0.83, 0.80])) for seed, value in
            enumerate(values)]
    assert paired_differences(runs, "base")[0].baseline_mean == pytest.approx(0.80)
    copy = RunResult("t", "base", 1, 0.5, "/r/base/seed1_old")
    with pytest.raises(ValueError, match="/r/base/seed1_old: task 't', variant 'base', seed 1 "
                                         "already comes from /r/base/seed1"):
        paired_differences(runs + [copy], "base")


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_paired_differences_refuses_a_value_that_is_not_finite(value):
    """A NaN from runs read by other code than `load_runs` (float() of a result file's "NaN")
    gave a NaN interval, read as a "tie" (NaN > 0 and NaN < 0 are both false); now it is an
    error naming the run, as in `load_runs`."""
    runs = [RunResult("t", v, seed, 0.8 + 0.01 * seed + (v == "tweak") * 0.02,
                      f"/r/{v}/seed{seed}") for v in ("base", "tweak") for seed in range(3)]
    runs[4] = replace(runs[4], value=value)
    with pytest.raises(ValueError, match=f"/r/tweak/seed1: 'tweak' seed 1 scored {value}, not "
                                         "a finite number"):
        paired_differences(runs, "base")


def test_a_hidden_folder_below_the_runs_is_not_read_as_a_run(runs_root):
    """A killed run leaves its final outputs in a hidden staging folder (`.final-outputs.tmp`)
    for the next run to clear; read as a run it became a variant named 'seed0' of a task named
    like the variant, with a confusing warning."""
    before = {(r.task, r.variant, r.seed) for r in load_runs(runs_root)}
    staged = runs_root / "rt" / "default" / "seed0" / ".final-outputs.tmp"
    staged.mkdir()
    (staged / "metrics.json").write_text(json.dumps(dict(task="rt", seed=0, eval_accuracy=0.1)))
    assert {(r.task, r.variant, r.seed) for r in load_runs(runs_root)} == before
