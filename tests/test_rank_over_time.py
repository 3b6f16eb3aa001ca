"""`rank_over_time.png`: each module's rank against the step, from the allocation log, written
next to the final heatmap by a fine-tune run."""
from __future__ import annotations

import json

import pytest

from finetune_helpers import cli, sentiment_rows, write_csv, write_tiny_bert
from plot_helpers import break_savefig
from increlora_fast.visualize import rank_history, save_rank_over_time

PNG = b"\x89PNG\r\n\x1a\n"
LOG = [{"step": 4, "module": "layer.1.query", "new_rank": 3, "score": 0.5},
       {"step": 2, "module": "layer.0.query", "new_rank": 2, "score": 0.9},
       {"step": 4, "module": "layer.0.query", "new_rank": 3, "score": 0.7}]
INITIAL = {"layer.0.query": 1, "layer.1.query": 1, "layer.0.value": 1}


def test_history_starts_at_the_initial_rank_and_follows_the_log_in_step_order():
    history = rank_history(INITIAL, LOG)
    assert history == {"layer.0.query": [(0, 1), (2, 2), (4, 3)],
                       "layer.1.query": [(0, 1), (4, 3)], "layer.0.value": [(0, 1)]}


def test_log_of_an_unknown_module_is_an_error():
    with pytest.raises(ValueError, match="layer.9.key"):
        rank_history(INITIAL, LOG + [{"step": 5, "module": "layer.9.key", "new_rank": 2}])


def test_picture_is_drawn_and_depends_on_the_log(tmp_path):
    import matplotlib.image as mpimg

    grown = save_rank_over_time(INITIAL, LOG, tmp_path / "a" / "rank_over_time.png", last_step=8)
    flat = save_rank_over_time(INITIAL, [], tmp_path / "flat.png", last_step=8)
    assert grown.read_bytes()[:8] == PNG and flat.read_bytes()[:8] == PNG
    a, b = mpimg.imread(str(grown)), mpimg.imread(str(flat))
    assert a.shape == b.shape and a.std() > 0  # something is drawn
    assert (a != b).any()                      # and it is the ranks' movement


def test_finetune_writes_it_next_to_the_heatmap(tmp_path):
    model = write_tiny_bert(tmp_path / "bert")
    train = write_csv(tmp_path / "train.csv", sentiment_rows(64, seed=0))
    dev = write_csv(tmp_path / "dev.csv", sentiment_rows(16, seed=1))
    out = tmp_path / "run"
    assert cli(["--model", str(model), "--train-file", str(train), "--eval-file", str(dev),
                "--batch-size", "8", "--max-seq-len", "16", "--output-dir", str(out),
                "--no-progress", "--max-steps", "6"]) == 0
    assert (out / "rank_heatmap.png").read_bytes()[:8] == PNG
    assert (out / "rank_over_time.png").read_bytes()[:8] == PNG
    log = [json.loads(line) for line in (out / "allocation_log.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    history = rank_history({n: 1 for n in metrics["rank_pattern"]}, log)
    assert {n: points[-1][1] for n, points in history.items()} == metrics["rank_pattern"]


@pytest.mark.parametrize("save", ["heatmap", "over_time"])
def test_a_failed_save_leaves_the_earlier_picture(tmp_path, monkeypatch, save):
    """The savers wrote straight into their file: a save that failed half-way (a full disk, a
    kill) left a cut PNG where the resumed or --overwrite run's earlier one was."""
    from increlora_fast.visualize import save_rank_heatmap

    png = tmp_path / "rank.png"
    png.write_bytes(b"earlier picture")
    break_savefig(monkeypatch)
    with pytest.raises(OSError, match="No space"):
        if save == "heatmap":
            save_rank_heatmap(INITIAL, png, overwrite=True)
        else:
            save_rank_over_time(INITIAL, LOG, png, overwrite=True)
    assert png.read_bytes() == b"earlier picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank.png"]


def test_saving_a_picture_leaves_the_callers_matplotlib_backend(tmp_path):
    """The savers called matplotlib.use("Agg"): in a notebook (inline backend) or a script
    with a window, saving a rank picture switched the caller's own backend, so their later
    plt.show() showed nothing."""
    import matplotlib

    from increlora_fast.benchmarks.report import plot_time_vs_tokens
    from increlora_fast.training.allocation_stats import plot_allocation
    from increlora_fast.training.compare_stats import (PairedDifference, plot_differences,
                                                       plot_growth_profiles)
    from increlora_fast.visualize import save_rank_heatmap

    run = tmp_path / "rt" / "seed0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({
        "steps": 8, "rank_pattern": {"layer.0.query": 2, "layer.1.query": 3, "layer.0.value": 1},
        "method_settings": {"init_r": 1}}))
    (run / "allocation_log.jsonl").write_text(
        "".join(json.dumps(e) + "\n" for e in LOG if e["module"] != "layer.0.query" or
                e["step"] == 2))
    before = matplotlib.get_backend()
    matplotlib.use("pdf")
    try:
        save_rank_heatmap(INITIAL, tmp_path / "h.png")
        save_rank_over_time(INITIAL, LOG, tmp_path / "t.png")
        plot_allocation({"rt": [run]}, tmp_path / "a.png")
        # and the comparison's and the benchmark's plots
        plot_growth_profiles({"rt": {"default": {"0": 0.5, "1": 0.4}}}, tmp_path / "g.png")
        plot_differences([PairedDifference("rt", "v", "default", [0, 1], 0.8, 0.7, 0.1, 0.01,
                                           0.01, 0.19)], tmp_path / "d.png")
        records = [dict(level="layer", status="ok", phase="fwd+bwd", shape="8x8", tokens=t,
                        dtype="fp32", r_max=4, method="floor", median_ms=t / 100,
                        device="cpu") for t in (64, 128)]
        assert plot_time_vs_tokens(records, str(tmp_path / "b.png")) == str(tmp_path / "b.png")
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(before)
    assert all((tmp_path / n).read_bytes()[:8] == PNG
               for n in ("h.png", "t.png", "a.png", "g.png", "d.png", "b.png"))


def test_a_path_under_home_is_written_there(tmp_path, monkeypatch):
    """save_rank_heatmap("~/figs/h.png") made a folder named '~' in the working directory and
    wrote there (the CLI's paths are expanded; the savers' were not)."""
    from increlora_fast.visualize import save_rank_heatmap

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert save_rank_heatmap(INITIAL, "~/figs/h.png") == tmp_path / "home" / "figs" / "h.png"
    assert save_rank_over_time(INITIAL, LOG, "~/t.png") == tmp_path / "home" / "t.png"
    assert (tmp_path / "home" / "figs" / "h.png").read_bytes()[:8] == PNG
    assert not (tmp_path / "~").exists()
    with pytest.raises(FileExistsError):
        save_rank_heatmap(INITIAL, "~/figs/h.png")


def test_twelve_module_types_get_twelve_colours(tmp_path, monkeypatch):
    """save_rank_over_time coloured module types from tab10 by index modulo 10: the 11th type
    drew like the first (found by the plot audit)."""
    from increlora_fast import visualize
    initial = {f"layer.0.kind{k}": 1 for k in range(12)}
    drawn = []
    monkeypatch.setattr(visualize, "_save", lambda fig, path: drawn.append(fig) or path)
    save_rank_over_time(initial, [], tmp_path / "t.png", last_step=4)
    legend = drawn[0].axes[0].get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    colours = [h.get_color() for h in legend.legend_handles]
    assert labels[1:] == [f"kind{k}" for k in range(12)]
    assert len(set(colours[1:])) == 12


@pytest.mark.parametrize("save", ["heatmap", "over_time"])
def test_without_matplotlib_the_savers_name_the_extra_to_install(tmp_path, monkeypatch, save):
    """Without matplotlib the savers raised a bare "No module named 'matplotlib'", naming
    neither the function that needs it nor the extra that installs it."""
    import sys

    from increlora_fast.visualize import save_rank_heatmap

    # (also where no earlier test imported matplotlib: run alone, the test imported it)
    for name in {"matplotlib", *(m for m in sys.modules if m.startswith("matplotlib."))}:
        monkeypatch.setitem(sys.modules, name, None)
    png = tmp_path / "rank.png"
    with pytest.raises(ImportError, match=r"save_rank_.*matplotlib.*\[finetune\]"):
        if save == "heatmap":
            save_rank_heatmap(INITIAL, png)
        else:
            save_rank_over_time(INITIAL, LOG, png)
    assert not png.exists()


def test_the_legend_names_at_most_twenty_module_types_and_stays_in_the_picture(tmp_path,
                                                                                monkeypatch):
    """The legend had an entry per module type in a fixed 7.5 x 4.2 inch figure: 60 types ran
    it off the picture. The first 19 types keep their colour and entry; the rest are drawn in
    grey, under one entry naming how many they are."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from increlora_fast import visualize
    initial = {f"layer.{i}.kind{k}": 1 for i in range(2) for k in range(60)}
    log = [{"step": 3, "module": "layer.1.kind45", "new_rank": 4}]
    drawn, save = [], visualize._save
    monkeypatch.setattr(visualize, "_save", lambda fig, path: drawn.append(fig) or save(fig, path))
    save_rank_over_time(initial, log, tmp_path / "t.png", last_step=6)
    ax = drawn[0].axes[0]
    legend = ax.get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["mean over modules"] + [f"kind{k}" for k in range(19)] + \
        ["41 other module types"]
    colours = [h.get_color() for h in legend.legend_handles]
    assert len(set(colours)) == len(colours)
    # every module keeps its line (the grown one in "other"'s colour), and the mean its own
    drawn_lines = [line for line in ax.lines if len(line.get_ydata())]
    assert len(drawn_lines) == len(initial) + 1
    assert [line.get_color() for line in drawn_lines
            if tuple(line.get_ydata()) == (1, 4, 4)] == [colours[-1]]
    canvas = FigureCanvasAgg(drawn[0])
    canvas.draw()
    box, figure = legend.get_window_extent(canvas.get_renderer()), drawn[0].bbox
    assert figure.x0 <= box.x0 and box.x1 <= figure.x1 and figure.y0 <= box.y0 and \
        box.y1 <= figure.y1, (box, figure)


def test_a_log_without_rounds_or_last_step_says_so_and_shows_the_ranks(tmp_path, monkeypatch):
    """An empty allocation log without ``last_step`` drew every line from step 0 to step 0:
    a blank plot over steps -0.04 to 0.04 (found by an audit). The figure says there is
    nothing over time to draw and marks the ranks at step 0."""
    from increlora_fast import visualize
    drawn, save = [], visualize._save
    monkeypatch.setattr(visualize, "_save", lambda fig, path: drawn.append(fig) or save(fig, path))
    save_rank_over_time(INITIAL, [], tmp_path / "t.png")
    ax = drawn[0].axes[0]
    assert "no allocation round" in ax.get_title() and "last_step" in ax.get_title()
    assert ax.get_xlim()[0] >= 0
    mean = [line for line in ax.lines if line.get_label() == "mean over modules"]
    assert mean[0].get_marker() not in ("None", "", None)
    save_rank_over_time(INITIAL, LOG, tmp_path / "grown.png")  # a log of rounds: as before
    assert "no allocation round" not in drawn[1].axes[0].get_title()
