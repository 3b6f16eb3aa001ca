"""Issue 3 item 7: allocation log through logging, rank-pattern table, rank heatmap PNG."""
import logging
import re

import pytest
import torch

from increlora_fast.visualize import rank_table, save_rank_heatmap, split_module_name

from method_helpers import ParallelBranches, branch_config, make_run, train_steps


def test_allocation_is_logged_with_step_module_rank_and_score(caplog):
    torch.manual_seed(0)
    model, opt, ctl = make_run(ParallelBranches(3), branch_config(target_rank=2, top_h=1))
    with caplog.at_level(logging.INFO, logger="increlora_fast"):
        train_steps(model, opt, ctl, range(12))
    grown = [r.getMessage() for r in caplog.records if "-> rank" in r.getMessage()]
    assert len(grown) == len(ctl.allocation_log) == 3
    for message, entry in zip(grown, ctl.allocation_log):
        assert f"step {entry['step']}: {entry['module']} -> rank {entry['new_rank']}" in message
    assert any("budget 6 reached" in r.getMessage() for r in caplog.records)


def test_split_module_name_finds_layer_and_type():
    assert split_module_name("bert.encoder.layer.3.attention.self.query") == ("3", "attention.self.query")
    assert split_module_name("h.11.mlp.c_fc") == ("11", "mlp.c_fc")
    assert split_module_name("proj") == ("-", "proj")


def test_rank_table_lists_every_module_once():
    pattern = {f"enc.layer.{i}.{k}": i + j for i in range(3) for j, k in enumerate(["q", "v"])}
    table = rank_table(pattern).splitlines()
    assert table[0].split("|")[1].strip() == "q" and table[0].split("|")[2].strip() == "v"
    assert [row.split("|")[0].strip() for row in table[2:5]] == ["0", "1", "2"]
    assert table[4].split("|")[2].strip() == str(pattern["enc.layer.2.v"])
    assert table[-1] == f"total rank {sum(pattern.values())} over 6 modules"
    assert rank_table({"proj": 3}).splitlines()[-1] == "total rank 3 over 1 module"


def test_heatmap_png_is_written(tmp_path):
    pattern = {f"enc.layer.{i}.{k}": 1 + (i * j) % 3 for i in range(4) for j, k in enumerate(["q", "k", "v"])}
    path = save_rank_heatmap(pattern, tmp_path / "sub" / "ranks.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_modules_that_share_a_layer_index_and_type_get_rows_of_their_own():
    """An encoder-decoder (BART: model.encoder.layers.0 and model.decoder.layers.0) put several
    modules on one (layer, type) cell, and the table showed only the last one's rank."""
    bart = {"model.encoder.layers.0.self_attn.q_proj": 2,
            "model.decoder.layers.0.self_attn.q_proj": 5,
            "model.encoder.layers.1.self_attn.q_proj": 3}
    rows = rank_table(bart).splitlines()[2:-1]
    cells = {row.split("|")[0].strip(): row.split("|")[1].strip() for row in rows}
    assert len(rows) == len(bart)
    for name, rank in bart.items():  # each module's rank on a row naming its layer
        assert [c for label, c in cells.items() if name.startswith(label + ".")] == \
            [str(rank)], (name, cells)
    # where the layer index alone names the layer, the rows stay that index
    bert = {f"bert.encoder.layer.{i}.attention.self.query": i for i in range(11)}
    assert [r.split("|")[0].strip() for r in rank_table(bert).splitlines()[2:-1]] == \
        [str(i) for i in range(11)]


def test_t5_rows_are_its_blocks_as_in_the_allocation_plots():
    """T5 names a module encoder.block.N.layer.K.SelfAttention.q: the table and heatmap took
    the last integer (K, the sublayer) for the layer, so every block's attention and FFN sat on
    rows of their own (encoder.block.3.layer.0, encoder.block.3.layer.1) and the allocation
    plots, which group by the first (the block), grouped otherwise. A row is now one block."""
    from increlora_fast.training.allocation_stats import layer_group

    torch.manual_seed(0)
    parts = {"encoder": ["layer.0.SelfAttention.q", "layer.1.DenseReluDense.wi"],
             "decoder": ["layer.0.SelfAttention.q", "layer.1.EncDecAttention.q",
                         "layer.2.DenseReluDense.wi"]}
    pattern = {f"{stack}.block.{i}.{kind}": int(torch.randint(1, 9, ()))
               for stack, kinds in parts.items() for i in range(3) for kind in kinds}
    assert split_module_name("decoder.block.2.layer.1.EncDecAttention.q") == \
        ("2", "layer.1.EncDecAttention.q")
    table = rank_table(pattern).splitlines()
    kinds = [k.strip() for k in table[0].split("|")[1:]]
    rows = {row.split("|")[0].strip(): [c.strip() for c in row.split("|")[1:]]
            for row in table[2:-1]}
    group = layer_group(pattern)
    assert sorted(rows) == sorted({group(name) for name in pattern}) == \
        sorted(f"{stack}.block.{i}" for stack in parts for i in range(3))
    for name, rank in pattern.items():
        block, kind = group(name), split_module_name(name)[1]
        assert rows[block][kinds.index(kind)] == str(rank), name
    assert sum(c != "" for cells in rows.values() for c in cells) == len(pattern)


def test_a_path_without_suffix_is_written_where_asked_and_returned(tmp_path):
    """matplotlib appends ".png" to a name without a suffix: save_rank_heatmap(p, "out/ranks")
    wrote out/ranks.png and returned out/ranks, a path that did not exist."""
    from increlora_fast.visualize import save_rank_over_time

    heatmap = save_rank_heatmap({"enc.layer.0.q": 1, "enc.layer.1.q": 2}, tmp_path / "ranks")
    over_time = save_rank_over_time({"enc.layer.0.q": 1}, [], tmp_path / "over")
    for path, asked in ((heatmap, "ranks"), (over_time, "over")):
        assert path == tmp_path / asked and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["over", "ranks"]


def test_an_empty_rank_pattern_is_a_clear_error_for_the_heatmap(tmp_path):
    """save_rank_heatmap({}) failed inside numpy ("zero-size array to reduction operation
    fmin"), after opening a figure it never closed."""
    import pytest

    with pytest.raises(ValueError, match="save_rank_heatmap needs at least one module"):
        save_rank_heatmap({}, tmp_path / "ranks.png")
    assert not (tmp_path / "ranks.png").exists()


def test_the_pngs_never_replace_a_file_unless_asked(tmp_path):
    """save_rank_heatmap and save_rank_over_time replaced whatever file lay at their path (a
    user's figure, an earlier run's PNG); they refuse it in one line naming the path, before
    drawing, and replace it with overwrite=True."""
    import pytest
    from increlora_fast.visualize import save_rank_over_time

    pattern = {"enc.layer.0.q": 1, "enc.layer.1.q": 2}
    for name, save in (("heatmap.png", lambda p, **kw: save_rank_heatmap(pattern, p, **kw)),
                       ("over.png", lambda p, **kw: save_rank_over_time(pattern, [], p, **kw))):
        path = tmp_path / name
        path.write_bytes(b"the user's own figure")
        with pytest.raises(FileExistsError) as err:
            save(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)
        assert "overwrite=True" in str(err.value)
        assert path.read_bytes() == b"the user's own figure"
        assert save(path, overwrite=True) == path
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_number_every_name_shares_is_not_the_layer():
    """A model wrapped in a Sequential (a SentenceTransformer's ``0.auto_model.encoder.layer.3``)
    starts every name with the same ``0``: reading the first integer as the layer put every
    module on one row and the allocation plots averaged all layers into one line. The layer
    is the first number whose place holds more than one value among the names."""
    from increlora_fast.training.allocation_stats import layer_group, type_group
    from increlora_fast.visualize import module_layers

    torch.manual_seed(0)
    kinds = ["attention.self.query", "intermediate.dense"]
    pattern = {f"0.auto_model.encoder.layer.{i}.{kind}": int(torch.randint(1, 9, ()))
               for i in range(4) for kind in kinds}
    rows = rank_table(pattern).splitlines()
    assert [k.strip() for k in rows[0].split("|")[1:]] == kinds
    assert [r.split("|")[0].strip() for r in rows[2:-1]] == ["0", "1", "2", "3"]
    for i in range(4):
        cells = [c.strip() for c in rows[2 + i].split("|")[1:]]
        assert cells == [str(pattern[f"0.auto_model.encoder.layer.{i}.{k}"]) for k in kinds]
    by_layer, by_type = layer_group(pattern), type_group(pattern)
    assert {by_layer(n) for n in pattern} == {"0", "1", "2", "3"}
    assert {by_type(n) for n in pattern} == set(kinds)
    # a name alone has nothing to be read against: its first integer is the layer
    one = module_layers(["0.auto_model.encoder.layer.0.intermediate.dense"])
    assert one["0.auto_model.encoder.layer.0.intermediate.dense"].kind == \
        "auto_model.encoder.layer.0.intermediate.dense"


def _switch_expert_names():
    """The linear layers of a tiny SwitchTransformers built offline: transformers 5 names its
    experts ``...mlp.experts.expert_N.wi`` (Mixtral, Qwen2-MoE, OLMoE and DeepSeek hold theirs
    in fused 3-D parameters there; transformers 4 named them ``...experts.N.w1``)."""
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration
    config = SwitchTransformersConfig(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=2,
                                      num_decoder_layers=2, num_heads=2, num_experts=4,
                                      encoder_sparse_step=1, decoder_sparse_step=1)
    model = SwitchTransformersForConditionalGeneration(config)
    return [n for n, m in model.encoder.named_modules() if isinstance(m, torch.nn.Linear)]


MOE_NAMINGS = {  # {naming: (names, the expert columns they make)}
    "mixtral": ([f"model.layers.{i}.{k}" for i in range(3) for k in
                 ["self_attn.q_proj", "self_attn.v_proj"]
                 + [f"block_sparse_moe.experts.{e}.w{w}" for e in range(5) for w in (1, 2, 3)]],
                [f"block_sparse_moe.experts.*.w{w}" for w in (1, 2, 3)]),
    "qwen2_moe": ([f"model.layers.{i}.{k}" for i in range(3) for k in
                   ["self_attn.q_proj", "mlp.shared_expert.gate_proj"]
                   + [f"mlp.experts.{e}.{w}" for e in range(12) for w in ("gate_proj", "down_proj")]],
                  ["mlp.experts.*.gate_proj", "mlp.experts.*.down_proj"]),
    "switch": (None, ["layer.1.mlp.experts.*.wi", "layer.1.mlp.experts.*.wo"]),
}


@pytest.mark.parametrize("naming", sorted(MOE_NAMINGS))
def test_the_experts_of_a_layer_share_one_column_holding_their_mean(tmp_path, monkeypatch,
                                                                     naming):
    """An expert's number stayed in its module type: a mixture-of-experts model with 32 experts
    x 3 weights per layer made 96 columns in the table and the heatmap (520 experts: a PNG
    206,064 px wide). The experts of a layer now share one column per weight, whose cell is
    their mean rank, as the table's note and the heatmap's title say."""
    from increlora_fast import visualize

    names, expert_kinds = MOE_NAMINGS[naming]
    names = names or _switch_expert_names()
    torch.manual_seed(0)
    pattern = {n: int(torch.randint(1, 9, ())) for n in names}
    split = visualize.module_layers(pattern)
    dense_kinds = list(dict.fromkeys(k for _, _, k in split.values() if "experts." not in k))
    table = rank_table(pattern).splitlines()
    kinds = [k.strip() for k in table[0].split("|")[1:]]
    assert sorted(kinds) == sorted(dense_kinds + expert_kinds)
    assert "mean rank over" in table[-2] and table[-1].startswith("total rank")
    rows = {r.split("|")[0].strip(): [c.strip() for c in r.split("|")[1:]] for r in table[2:-2]}
    assert sorted(rows) == sorted({index for index, _, _ in split.values()})
    for layer, cells in rows.items():
        for kind, cell in zip(kinds, cells):
            ranks = [pattern[n] for n, (index, _, k) in split.items() if index == layer and
                     re.sub(r"experts\.(expert_)?\d+", "experts.*", k) == kind]
            assert cell == (f"{round(sum(ranks) / len(ranks), 1):g}" if ranks else ""), \
                (layer, kind)
            assert len(ranks) <= 1 or kind in expert_kinds

    drawn = []
    monkeypatch.setattr(visualize, "_save", lambda fig, path: drawn.append(fig) or path)
    save_rank_heatmap(pattern, tmp_path / "h.png")
    ax = drawn[0].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == kinds
    assert "mean rank over" in ax.get_title()
    visualize.save_rank_over_time(pattern, [], tmp_path / "t.png")
    legend = [t.get_text() for t in drawn[1].axes[0].get_legend().get_texts()]
    assert sorted(legend[1:]) == sorted(kinds)


@pytest.mark.parametrize("layers,kinds", [(3, 300), (400, 2)])
def test_the_heatmap_stays_a_bounded_picture_for_any_model(tmp_path, layers, kinds):
    """The heatmap grew 1.1 inches per module type and 0.45 per layer without end: 520 types
    made a PNG 206,064 px wide in 21 s. Past a size it keeps its size, and its cells their
    colour, without the numbers that no longer fit (the rank table has them)."""
    import matplotlib.image as mpimg

    pattern = {f"stack.{i}.proj_{k}": 1 + (i + k) % 7 for i in range(layers) for k in range(kinds)}
    height, width = mpimg.imread(str(save_rank_heatmap(pattern, tmp_path / "h.png"))).shape[:2]
    assert width <= 4000 and height <= 4000, (width, height)


def test_the_experts_of_one_adapted_layer_are_not_read_as_layers():
    """With one layer adapted (target_modules naming layer 3 only), the experts' numbers were
    the only place holding several numbers, so they were read as the layer index: 64 experts
    made 64 rows, one per expert, and no expert column. An expert's number is never the
    layer index."""
    from increlora_fast.training.allocation_stats import layer_group

    pattern = {f"model.layers.3.{kind}": 1 + len(kind) % 5 for kind in
               ["self_attn.q_proj"] + [f"mlp.experts.{e}.{w}" for e in range(64)
                                       for w in ("gate_proj", "down_proj")]}
    table = rank_table(pattern).splitlines()
    assert [k.strip() for k in table[0].split("|")[1:]] == \
        ["self_attn.q_proj", "mlp.experts.*.gate_proj", "mlp.experts.*.down_proj"]
    assert [r.split("|")[0].strip() for r in table[2:-2]] == ["3"]
    assert {layer_group(pattern)(n) for n in pattern} == {"3"}
