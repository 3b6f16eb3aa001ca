"""Replaying a run's allocation log into ranks over time, averaged per module type and layer."""
import json

import pytest

from plot_helpers import break_savefig
from increlora_fast.training.allocation_stats import (allocation_by_group, module_layer,
                                                      module_type, plot_allocation,
                                                      ranks_over_time)
from increlora_fast.training.compare_stats import main

MODULES = ["enc.layer.0.attn.q", "enc.layer.0.ffn.up", "enc.layer.1.attn.q", "enc.layer.1.ffn.up"]


def _final_ranks(events, init_r):
    """The ranks the log ``events`` leave (the run's rank_pattern)."""
    ranks = {m: init_r for m in MODULES}
    for _, module, rank in sorted(events, key=lambda e: e[0]):
        if module in ranks:
            ranks[module] = rank
    return ranks


def _run(root, name, events, init_r=1, steps=100, task="rt"):
    run = root / task / name
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({
        "task": task, "seed": int(name[-1]), "eval_accuracy": 0.8, "steps": steps,
        "rank_pattern": _final_ranks(events, init_r), "method_settings": {"init_r": init_r}}))
    (run / "allocation_log.jsonl").write_text("".join(
        json.dumps({"step": s, "module": m, "new_rank": r}) + "\n" for s, m, r in events))
    return run


def test_names_split_into_type_and_layer():
    assert module_type("bert.encoder.layer.3.attention.self.query") == "attention.self.query"
    assert module_layer("bert.encoder.layer.3.attention.self.query") == "3"
    assert module_type("classifier") == module_layer("classifier") == "classifier"


def test_a_layers_experts_are_one_module_type_as_in_the_rank_table():
    """The allocation plots kept an expert's number in its module type: a mixture-of-experts
    model with 32 experts x 3 weights drew 96 curves (and legend entries) per panel, where the
    rank table and heatmap show one column per weight (`visualize.expert_kind`)."""
    from increlora_fast.training.allocation_stats import type_group

    names = [f"model.layers.{i}.{kind}" for i in range(2) for kind in
             ["self_attn.q_proj"] + [f"mlp.experts.{e}.{w}" for e in range(32)
                                     for w in ("gate_proj", "up_proj", "down_proj")]]
    group = type_group(names)
    assert list(dict.fromkeys(group(n) for n in names)) == \
        ["self_attn.q_proj"] + [f"mlp.experts.*.{w}" for w in ("gate_proj", "up_proj",
                                                                 "down_proj")]
    assert module_type("model.layers.3.block_sparse_moe.experts.7.w2") == \
        "block_sparse_moe.experts.*.w2"
    assert module_type("encoder.block.1.layer.1.mlp.experts.expert_3.wi") == \
        "layer.1.mlp.experts.*.wi"


def test_ranks_replay_the_log_from_the_initial_rank(tmp_path):
    run = _run(tmp_path, "seed0", [(30, MODULES[1], 2), (10, MODULES[0], 2), (30, MODULES[1], 3)])
    ranks = ranks_over_time(run)
    assert sorted(ranks) == [0, 10, 30, 100]  # out-of-order lines are sorted; the end is kept
    assert ranks[0] == {m: 1 for m in MODULES}
    assert ranks[10][MODULES[0]] == 2 and ranks[10][MODULES[1]] == 1
    assert ranks[30][MODULES[1]] == 3 and ranks[100] == ranks[30]


def test_groups_average_modules_then_runs(tmp_path):
    a = _run(tmp_path, "seed0", [(10, MODULES[1], 3)])  # layer 0's ffn.up: 1 -> 3
    b = _run(tmp_path, "seed1", [(10, MODULES[3], 2)])  # layer 1's ffn.up: 1 -> 2
    by_type = allocation_by_group([a, b], module_type)
    assert by_type["attn.q"] == {0: 1.0, 10: 1.0, 100: 1.0}
    assert by_type["ffn.up"][10] == pytest.approx(((3 + 1) / 2 + (1 + 2) / 2) / 2)
    by_layer = allocation_by_group([a, b], module_layer)
    assert by_layer["0"][10] == pytest.approx(((1 + 3) / 2 + 1.0) / 2)


def test_errors_name_the_file(tmp_path):
    run = _run(tmp_path, "seed0", [(10, "no.such.module", 2)])
    with pytest.raises(ValueError, match="no.such.module"):
        ranks_over_time(run)
    (run / "metrics.json").write_text(json.dumps({"task": "rt", "seed": 0}))
    with pytest.raises(ValueError, match="metrics.json: no rank_pattern"):
        ranks_over_time(run)
    with pytest.raises(ValueError, match="no runs"):
        plot_allocation({}, tmp_path / "x.png")


def test_cli_plots_the_baselines_allocation(tmp_path):
    root = tmp_path / "runs"
    (root / "rt" / "default").mkdir(parents=True)
    for seed in (0, 1):
        _run(root, f"default/seed{seed}", [(10, MODULES[seed], 2)])
    png = tmp_path / "allocation.png"
    assert main([str(root), "--baseline", "default", "--out", str(tmp_path / "t.md"),
                 "--allocation-plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_with_rounds_at_other_steps_average_over_every_run(tmp_path):
    """Runs of one variant need not grow at the same steps (a module at r_max takes no rank,
    so a seed can need one round more, as rank4/rank8_increlora on TREC-6 did): at a step where
    only one run has a round, the mean is over every run, the others at the ranks they hold
    then, not over that one run alone."""
    a = _run(tmp_path, "seed0", [(10, MODULES[1], 3)])  # layer 0: budget reached at step 10
    b = _run(tmp_path, "seed1", [(10, MODULES[3], 2), (20, MODULES[3], 3)])  # layer 1, later
    by_layer = allocation_by_group([a, b], module_layer)
    assert sorted(by_layer["0"]) == [0, 10, 20, 100]
    assert by_layer["0"][10] == pytest.approx(((1 + 3) / 2 + 1.0) / 2)
    assert by_layer["0"][20] == pytest.approx(((1 + 3) / 2 + 1.0) / 2)  # a still holds rank 3
    assert by_layer["1"][20] == pytest.approx((1.0 + (1 + 3) / 2) / 2)
    assert by_layer["0"][20] == by_layer["0"][100] and by_layer["1"][20] == by_layer["1"][100]


def test_the_plot_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """plot_allocation wrote straight into its file: a save that failed half-way left a cut
    PNG where the earlier one was."""
    run = _run(tmp_path, "seed0", [(10, MODULES[0], 2)])
    png = tmp_path / "allocation.png"
    png.write_bytes(b"earlier figure")
    break_savefig(monkeypatch)
    with pytest.raises(OSError, match="No space"):
        plot_allocation({"rt": [run]}, png, overwrite=True)
    assert png.read_bytes() == b"earlier figure"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_existing_file_is_replaced_only_when_asked(tmp_path):
    """plot_allocation replaced whatever was at its path; like the other savers
    (`visualize.save_rank_heatmap`), it refuses unless ``overwrite`` says so."""
    run = _run(tmp_path, "seed0", [(10, MODULES[0], 2)])
    png = tmp_path / "out" / "allocation.png"
    png.parent.mkdir()
    png.write_bytes(b"someone's figure")
    with pytest.raises(FileExistsError, match="overwrite"):
        plot_allocation({"rt": [run]}, png)
    assert png.read_bytes() == b"someone's figure"
    plot_allocation({"rt": [run]}, png, overwrite=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fresh = tmp_path / "new" / "folder" / "a.png"  # its folders are made
    plot_allocation({"rt": [run]}, fresh)
    assert fresh.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_cli_replaces_its_own_output_like_its_other_outputs(tmp_path):
    root = tmp_path / "runs"
    _run(root, "default/seed0", [(10, MODULES[0], 2)])
    png = tmp_path / "allocation.png"
    png.write_bytes(b"last time's plot")
    assert main([str(root), "--baseline", "default", "--out", str(tmp_path / "t.md"),
                 "--allocation-plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("line", ['{"step": 40, "mod', '{"step": 40, "module": "enc.layer.0.attn.q"}',
                                  '{"module": "enc.layer.0.attn.q", "new_rank": 2}', "[40]",
                                  '{"step": 40, "module": "enc.layer.0.attn.q", "new_rank": "2"}'])
def test_a_damaged_log_line_is_named(tmp_path, capsys, line):
    """A cut-off or foreign allocation_log.jsonl line gave a bare 'Expecting ...' naming no
    file, or a KeyError / TypeError traceback out of compare_stats --allocation-plot."""
    root = tmp_path / "runs"
    run = _run(root, "default/seed0", [(10, MODULES[0], 2)])
    log = run / "allocation_log.jsonl"
    log.write_text(log.read_text() + line + "\n")
    with pytest.raises(ValueError, match=f"{log}:2"):
        ranks_over_time(run)
    png = tmp_path / "allocation.png"
    assert main([str(root), "--baseline", "default", "--out", str(tmp_path / "t.md"),
                 "--allocation-plot", str(png)]) == 2
    assert f"{log}:2" in capsys.readouterr().err and not png.exists()


def test_a_run_whose_log_does_not_replay_to_its_rank_pattern_is_refused(tmp_path, capsys):
    """An AdaLoRA run has a rank_pattern and a method_settings.init_r (12, pruned to 8) but no
    allocation log: its 'allocation' came out as every module flat at init_r, the ranks it
    started from and not the ones it ended with."""
    root = tmp_path / "runs"
    run = root / "rt" / "adalora" / "seed0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({
        "task": "rt", "seed": 0, "eval_accuracy": 0.8, "steps": 100, "method": "adalora",
        "rank_pattern": {MODULES[0]: 5, MODULES[1]: 2, MODULES[2]: 12, MODULES[3]: 9},
        "method_settings": {"init_r": 12, "target_r": 8}}))
    with pytest.raises(ValueError, match=f"{run / 'metrics.json'}.*rank_pattern"):
        ranks_over_time(run)
    png = tmp_path / "allocation.png"
    assert main([str(root), "--baseline", "adalora", "--out", str(tmp_path / "t.md"),
                 "--allocation-plot", str(png)]) == 2
    assert "rank_pattern" in capsys.readouterr().err and not png.exists()


def test_a_selected_step_run_ends_where_its_adapter_was_taken(tmp_path):
    """--select-best keeps the adapter (rank_pattern) and the log up to its selected step, but
    the run trains on to 'steps': the replay held the selected ranks flat to 'steps', as if
    the run had grown nothing after the selected step (rank_over_time.png ends there)."""
    run = _run(tmp_path, "seed0", [(10, MODULES[0], 2)])
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.update(selected_step=40, rank_pattern={m: 2 if m == MODULES[0] else 1
                                                   for m in MODULES})
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert sorted(ranks_over_time(run)) == [0, 10, 40]


@pytest.mark.parametrize("option", ["--allocation-plot", "--growth-plot", "--diff-plot"])
def test_a_plot_without_matplotlib_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch,
                                                                option):
    """Without matplotlib (a bare image, no finetune extra) a plot option ended in a
    ModuleNotFoundError traceback, after the outputs before it had been written."""
    root = tmp_path / "runs"
    for variant in ("default", "other"):
        run = _run(root, f"{variant}/seed0", [(10, MODULES[0], 2)])
        metrics = json.loads((run / "metrics.json").read_text())
        (run / "metrics.json").write_text(json.dumps(dict(metrics, train_losses=[1.0] * 100)))
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import fails
    out = tmp_path / "t.md"
    assert main([str(root), "--baseline", "default", "--out", str(out),
                 "--growth-profile", str(tmp_path / "g.json"), option, str(tmp_path / "p.png")]
                ) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and option in err and "[finetune]" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


@pytest.mark.parametrize("option", ["--allocation-plot", "--growth-plot", "--diff-plot"])
def test_a_plot_path_of_no_image_format_is_refused_first(tmp_path, capsys, option):
    """A plot path such as 'plot.txt' failed only once the runs were read and the outputs
    before it written, with matplotlib's "Format 'txt' is not supported" naming no option."""
    root = tmp_path / "runs"
    for variant in ("default", "other"):
        run = _run(root, f"{variant}/seed0", [(10, MODULES[0], 2)])
        metrics = json.loads((run / "metrics.json").read_text())
        (run / "metrics.json").write_text(json.dumps(dict(metrics, train_losses=[1.0] * 100)))
    assert main([str(root), "--baseline", "default", "--out", str(tmp_path / "t.md"),
                 "--growth-profile", str(tmp_path / "g.json"), option, str(tmp_path / "p.txt")]
                ) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{option} {tmp_path / 'p.txt'}" in err and ".png" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_twelve_layers_get_twelve_colours_in_layer_order(tmp_path, monkeypatch):
    """With more than ten groups (a 12-layer BERT's layers) the default colour cycle repeated:
    layers 0 and 10 drew in one colour, and the legend read 0, 1, 10, 11, 2, ..."""
    modules = [f"enc.layer.{i}.attn.q" for i in range(12)]
    run = tmp_path / "rt" / "seed0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({
        "steps": 10, "rank_pattern": {m: 1 for m in modules}, "method_settings": {"init_r": 1}}))
    drawn = []
    monkeypatch.setattr("increlora_fast.training.allocation_stats.write_figure",
                        lambda fig, path, dpi: drawn.append(fig))
    plot_allocation({"rt": [run]}, tmp_path / "a.png")
    by_layer = drawn[0].axes[1]
    labels = [line.get_label() for line in by_layer.get_lines()]
    assert labels == [str(i) for i in range(12)]
    assert len({line.get_color() for line in by_layer.get_lines()}) == 12
    assert [t.get_text() for t in by_layer.get_legend().get_texts()] == labels


def test_an_encoders_and_a_decoders_layer_of_one_number_are_apart(tmp_path, monkeypatch):
    """An encoder-decoder (BART, T5) has an encoder and a decoder layer 0: the per-layer panel
    averaged the two into one line labelled '0', so a decoder that grew nothing halved the
    encoder's growth there (the heatmap keeps them apart)."""
    modules = ["model.encoder.layers.0.fc1", "model.encoder.layers.1.fc1",
               "model.decoder.layers.0.fc1", "model.decoder.layers.1.fc1"]
    run = tmp_path / "rt" / "seed0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({
        "steps": 10, "rank_pattern": dict(zip(modules, (3, 1, 1, 1))),
        "method_settings": {"init_r": 1}}))
    (run / "allocation_log.jsonl").write_text(
        json.dumps({"step": 5, "module": modules[0], "new_rank": 3}) + "\n")
    drawn = []
    monkeypatch.setattr("increlora_fast.training.allocation_stats.write_figure",
                        lambda fig, path, dpi: drawn.append(fig))
    plot_allocation({"rt": [run]}, tmp_path / "a.png")
    lines = {line.get_label(): line.get_ydata()[-1] for line in drawn[0].axes[1].get_lines()}
    assert lines == {"model.decoder.layers.0": 1, "model.decoder.layers.1": 1,
                     "model.encoder.layers.0": 3, "model.encoder.layers.1": 1}
    bert = _run(tmp_path, "seed1", [(10, MODULES[0], 2)])  # one stack: the index alone
    drawn.clear()
    plot_allocation({"rt": [bert]}, tmp_path / "b.png")
    assert [line.get_label() for line in drawn[0].axes[1].get_lines()] == ["0", "1"]


def test_the_legend_hides_no_line(tmp_path, monkeypatch):
    """The legend sat in the panel ('best' place, upper left in practice): the group that grew
    most ran behind it (intermediate.dense on TREC-6), the line the plot is read for."""
    run = _run(tmp_path, "seed0", [(10, MODULES[1], 4), (10, MODULES[3], 4)])
    drawn = []
    monkeypatch.setattr("increlora_fast.training.allocation_stats.write_figure",
                        lambda fig, path, dpi: drawn.append(fig))
    plot_allocation({"rt": [run]}, tmp_path / "a.png")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = drawn[0]
    renderer = FigureCanvasAgg(fig).get_renderer()
    for ax in fig.axes:
        legend = ax.get_legend().get_window_extent(renderer)
        assert not legend.overlaps(ax.get_window_extent(renderer))
