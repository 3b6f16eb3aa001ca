"""inject_increlora: target matching, freezing, errors, and the trainable-parameter counts."""
from __future__ import annotations

import ast
import copy
import re

import pytest
import torch
from torch import nn

from increlora_fast import (IncreLoRAConfig, IncreLoRALinear, count_trainable_parameters,
                            increlora_layers, inject_increlora)

ALL_TARGETS = {"blocks.0.fc", "blocks.0.proj", "blocks.1.fc", "blocks.1.proj"}


def config(**kwargs) -> IncreLoRAConfig:
    kwargs.setdefault("target_modules", ["fc", "proj"])
    kwargs.setdefault("r_max", 6)
    kwargs.setdefault("target_rank", 3)
    return IncreLoRAConfig(**kwargs)


def adapted(model: nn.Module) -> set:
    return {name for name, _ in increlora_layers(model)}


def snapshot(model: nn.Module) -> dict:
    return {"types": {n: type(m) for n, m in model.named_modules()},
            "grad": {n: p.requires_grad for n, p in model.named_parameters()}}


@pytest.mark.parametrize("targets,expected", [
    (["fc", "proj"], ALL_TARGETS),
    (["fc"], {"blocks.0.fc", "blocks.1.fc"}),
    (["0.fc", "blocks.1.proj"], {"blocks.0.fc", "blocks.1.proj"}),
    (r"blocks\.1\.(fc|proj)", {"blocks.1.fc", "blocks.1.proj"}),
    (r".*\.fc", {"blocks.0.fc", "blocks.1.fc"}),
    (r"head|blocks\.0\.proj", {"head", "blocks.0.proj"}),
])
def test_targets_by_suffix_list_and_regex(tiny_net, targets, expected):
    model = inject_increlora(tiny_net, config(target_modules=targets))
    assert adapted(model) == expected
    for name in ({"head"} | ALL_TARGETS) - expected:
        assert type(model.get_submodule(name)) is nn.Linear


@pytest.mark.parametrize("targets,missing,similar", [
    (["fc", "fcc"], "'fcc'", "fc"),
    (["blocks.2.fc"], "'blocks.2.fc'", "blocks.1.fc"),
    (r"block\.\d\.fc", repr(r"block\.\d\.fc"), "blocks.0.fc"),
])
def test_target_matching_nothing_names_it_and_lists_similar(tiny_net, targets, missing, similar):
    before = snapshot(tiny_net)
    with pytest.raises(ValueError) as err:
        inject_increlora(tiny_net, config(target_modules=targets))
    message = str(err.value)
    assert missing in message and similar in message
    assert snapshot(tiny_net) == before


def test_a_regex_that_is_a_suffix_says_regexes_match_full_names(tiny_net):
    """``target_modules="fc"`` is a regex matched against full names, so it matches no
    ``blocks.0.fc``; the error offered ``['fc']`` as the similar name, the very string given.
    It names a full name the string would have to match, and the list that matches suffixes."""
    with pytest.raises(ValueError) as err:
        inject_increlora(tiny_net, config(target_modules="fc"))
    message = str(err.value)
    assert "target_modules" in message and "'blocks.0.fc'" in message
    assert "['fc']" in message and "similar names" not in message
    assert "\n" not in message


def test_a_regex_matching_part_of_names_suggests_one_matching_them_whole(tiny_net):
    """``target_modules="fc|proj"`` (peft's regex is matched against the full name) matches only
    the ends of ``blocks.0.fc`` etc.: the error listed names "similar" to the pattern's text.
    It names one it matches part of, and a regex that matches such names whole, which works."""
    with pytest.raises(ValueError) as err:
        inject_increlora(copy.deepcopy(tiny_net), config(target_modules="fc|proj"))
    message = str(err.value)
    assert "'blocks.0.fc'" in message and "similar names" not in message
    suggested = re.search(r"target_modules=('[^']+')", message).group(1)
    model = inject_increlora(tiny_net, config(target_modules=ast.literal_eval(suggested)))
    assert adapted(model) == ALL_TARGETS


def test_target_that_is_not_a_linear(tiny_net):
    with pytest.raises(TypeError, match="blocks.0.norm.*LayerNorm"):
        inject_increlora(tiny_net, config(target_modules=["norm"]))


@pytest.mark.parametrize("targets", [["emb"], ["conv"], "emb", r"conv|emb", ["fc", "emb"]])
def test_a_target_that_is_no_linear_names_target_modules_and_the_models_linears(targets):
    """A target naming an Embedding or Conv2d (peft adapts them; IncreLoRA does not) was refused
    as "target module 'emb' is a Embedding ...; IncreLoRA adapts nn.Linear ...": it named neither
    the option nor a module the user could target instead."""
    model = nn.Module()
    model.emb, model.conv = nn.Embedding(10, 8), nn.Conv2d(1, 1, 1)
    model.block = nn.Module()
    model.block.fc, model.block.proj = nn.Linear(8, 8), nn.Linear(8, 8)
    with pytest.raises(TypeError) as err:
        inject_increlora(model, config(target_modules=targets))
    message = str(err.value)
    assert "\n" not in message and "target_modules" in message
    assert "'block.fc'" in message and "'block.proj'" in message
    assert type(model.block.fc) is nn.Linear


@pytest.mark.parametrize("targets", ["attn", r".*attn", "attn|mlp"])
def test_a_regex_matching_only_parents_of_linears_says_so(targets):
    """A regex matches full names, and one naming only blocks that hold linears (``"attn"``)
    selects no linear: the refusal said that "every target lies inside modules_to_save None",
    with no modules_to_save given."""
    model = nn.Module()
    model.attn = nn.Module()
    model.attn.q = nn.Linear(8, 8)
    model.mlp = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(TypeError) as err:
        inject_increlora(model, config(target_modules=targets))
    message = str(err.value)
    assert "\n" not in message and "modules_to_save" not in message
    assert f"target_modules={targets!r}" in message and "'attn'" in message
    assert "not nn.Linear" in message and "'attn.q'" in message
    assert type(model.attn.q) is nn.Linear


def test_default_names_matching_only_linears_that_take_no_adapter_say_why():
    """``target_modules=None`` whose default names match only an nn.Linear subclass that is no
    linear map (a router returning a tuple) selects nothing: the refusal said that "every
    target lies inside modules_to_save None"; it names the subclass and why."""
    class Router(nn.Linear):
        def forward(self, x):
            return super().forward(x), None

    model = nn.Module()
    model.q_proj = Router(8, 8)
    with pytest.raises(ValueError) as err:
        inject_increlora(model, config(target_modules=None))
    message = str(err.value)
    assert "\n" not in message and "modules_to_save" not in message
    assert "selected no module to adapt" in message and "Router" in message


@pytest.mark.parametrize("exclude", ["head", ["head"]])
def test_all_linear_on_a_model_without_linears_says_so_whatever_exclude_modules_is(exclude):
    """``"all-linear"`` on a model with no linear layer, with ``exclude_modules`` set, failed
    with an IndexError (a regex) or said that the entry "leaves out none of the 0 target
    modules" and that the model's names end in ``[]``; the refusal is the one given without
    ``exclude_modules``: nothing selected."""
    model = nn.Sequential(nn.Embedding(10, 8), nn.ReLU())
    with pytest.raises(ValueError) as err:
        inject_increlora(model, config(target_modules="all-linear", exclude_modules=exclude))
    message = str(err.value)
    assert "\n" not in message
    assert "target_modules='all-linear' selected no module to adapt" in message


@pytest.mark.parametrize("kwargs", [dict(target_modules=["fc"]),
                                    dict(target_modules=["0"], exclude_modules=["fc"])])
def test_a_name_matching_nothing_in_a_sequential_lists_its_names(kwargs):
    """The names offered when nothing is close were the last parts of the model's names that
    are no index: in an nn.Sequential every name is an index, and the message said that the
    model's names "end in []"."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8)))
    with pytest.raises(ValueError) as err:
        inject_increlora(model, config(**kwargs))
    message = str(err.value)
    assert "\n" not in message and "[]" not in message
    assert "'0'" in message and "'2.0'" in message


def test_a_linear_of_another_library_is_named_by_its_module():
    """torch.ao's dynamic-quantized Linear is not an nn.Linear: the refusal said "'0' is a
    Linear; IncreLoRA adapts nn.Linear" (found by an audit); it names where the class is from."""
    model = torch.ao.quantization.quantize_dynamic(
        nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), {nn.Linear}, dtype=torch.qint8)
    for refuse in (lambda: inject_increlora(model, config(target_modules=["0"])),
                   lambda: IncreLoRALinear(model[0])):
        with pytest.raises(TypeError) as err:
            refuse()
        message = str(err.value)
        assert "\n" not in message and "torch.ao.nn.quantized.dynamic" in message
    assert type(model[0]).__module__.startswith("torch.ao.")


def test_listed_name_of_a_parent_of_linears_is_refused_not_skipped(tiny_net):
    """As in peft, a listed name must name linears: a block holding linears is not silently
    skipped while the other names are adapted (the user would think the block is adapted)."""
    before = snapshot(tiny_net)
    with pytest.raises(TypeError, match=r"'blocks\.0' matches only .*'blocks\.0'.*TinyBlock"):
        inject_increlora(tiny_net, config(target_modules=["blocks.0", "head"]))
    assert snapshot(tiny_net) == before


def test_a_model_holding_peft_adapters_is_refused(tiny_net):
    """Injection would freeze peft's adapters and skip the linears they wrap (default targets
    silently so): refused, unchanged."""
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(tiny_net, LoraConfig(target_modules=["fc"], r=2))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"peft adapter layers .*blocks\.0\.fc"):
        inject_increlora(model, config(target_modules=["fc", "proj"]))
    assert snapshot(model) == before


def test_default_targets_need_known_names(tiny_net):
    with pytest.raises(ValueError, match="target_modules"):
        inject_increlora(tiny_net, config(target_modules=None))


def test_freezing_and_modules_to_save(tiny_net):
    model = inject_increlora(tiny_net, config(modules_to_save=["head"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{t}.{k}" for t in ALL_TARGETS for k in ("lora_A", "lora_B", "lora_lambda")}
    assert trainable == expected | {"head.weight", "head.bias"}
    assert all(not p.requires_grad for n, p in model.named_parameters()
               if "base_layer" in n or "norm" in n)


def test_without_modules_to_save_only_adapters_train(tiny_net):
    model = inject_increlora(tiny_net, config())
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "lora_lambda"}


def test_modules_to_save_matching_nothing(tiny_net):
    before = snapshot(tiny_net)
    with pytest.raises(ValueError, match="'haed'.*head"):
        inject_increlora(tiny_net, config(modules_to_save=["haed"]))
    assert snapshot(tiny_net) == before


def test_double_injection_raises(tiny_net):
    model = inject_increlora(tiny_net, config())
    with pytest.raises(ValueError, match="already"):
        inject_increlora(model, config())
    assert adapted(model) == ALL_TARGETS


@pytest.mark.parametrize("total,bound", [(6 * 4 + 1, "r_max x modules = 24"),
                                         (2 * 4 - 1, "init_r x modules = 8")])
def test_budget_that_the_modules_cannot_hold(tiny_net, total, bound):
    before = snapshot(tiny_net)
    with pytest.raises(ValueError) as err:
        inject_increlora(tiny_net, config(init_r=2, target_total_rank=total))
    assert "target_total_rank" in str(err.value) and bound in str(err.value)
    assert snapshot(tiny_net) == before


def test_layers_get_the_config_values(tiny_net):
    cfg = config(init_r=2, incre_rank_num=3, lora_alpha=7.0, lora_dropout=0.1,
                 reserve_lambda=2e-5, advance_learning=False)
    model = inject_increlora(tiny_net, cfg)
    assert model.increlora_config is cfg
    for _, layer in increlora_layers(model):
        assert (layer.r_max, layer.active_rank, layer.reserve_rank) == (6, 2, 3)
        assert layer.lora_alpha == 7.0 and layer.reserve_lambda == 2e-5
        assert not layer.advance_learning
        assert isinstance(layer.lora_dropout, nn.Dropout) and layer.lora_dropout.p == 0.1


def test_injected_model_equals_base_model_at_init(tiny_net):
    x = torch.randn(4, 5, 12)
    expected = tiny_net(x)
    exact = inject_increlora(copy.deepcopy(tiny_net), config(advance_learning=False))
    assert torch.equal(exact(x), expected)
    near = inject_increlora(copy.deepcopy(tiny_net), config())
    torch.testing.assert_close(near(x), expected, rtol=0, atol=1e-5)


def test_injection_keeps_dtype(tiny_net):
    model = inject_increlora(tiny_net.double(), config())
    for _, layer in increlora_layers(model):
        assert layer.lora_A.dtype == layer.lora_lambda.dtype == torch.float64
    assert model(torch.randn(2, 12, dtype=torch.float64)).dtype == torch.float64


def test_count_trainable_parameters_by_hand(tiny_net):
    # TinyNet: 2 blocks of fc 12->20 and proj 20->12; head 12->3 with bias
    model = inject_increlora(tiny_net, config(init_r=2, incre_rank_num=1,
                                              modules_to_save=["head"]))
    per_slot = 12 + 20 + 1
    head = 12 * 3 + 3
    counts = count_trainable_parameters(model)
    assert counts == {"active": 4 * 2 * per_slot + head, "padded": 4 * 6 * per_slot + head,
                      "other": head}
    assert counts["padded"] == sum(p.numel() for p in model.parameters() if p.requires_grad)

    dict(increlora_layers(model))["blocks.1.fc"].activate_reserve(1, step=5)
    assert count_trainable_parameters(model)["active"] == (4 * 2 + 1) * per_slot + head
    assert count_trainable_parameters(model)["padded"] == counts["padded"]


def test_wrapped_layer_types(tiny_net):
    model = inject_increlora(tiny_net, config())
    for name in ALL_TARGETS:
        layer = model.get_submodule(name)
        assert isinstance(layer, IncreLoRALinear)
        assert type(layer.base_layer) is nn.Linear


def _peft_all_linear(model: nn.Module) -> set:
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(target_modules="all-linear", r=2))
    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
            if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_all_linear_adapts_what_peft_adapts(family):
    """peft's "all-linear" shorthand: every linear (Conv1D included) but the output layer."""
    import transformers
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=24, vocab_size=32))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=16, n_layer=2, n_head=2, vocab_size=32, n_positions=16))
    expected = _peft_all_linear(model)
    assert expected and "lm_head" not in expected
    injected = inject_increlora(model, config(target_modules="all-linear", r_max=4, target_rank=2))
    assert adapted(injected) == expected


def _tiny_falcon() -> nn.Module:
    import transformers
    torch.manual_seed(0)
    return transformers.FalconForCausalLM(transformers.FalconConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=32)).eval()


def test_all_linear_adapts_falcons_own_forward_linears_as_peft_does():
    """Falcon's linears are FalconLinear, an nn.Linear subclass whose own forward computes
    ``x @ W.T + b``: peft adapts them, but "all-linear" found nothing to adapt and a named one
    was refused as "not a plain linear map" (found by an audit)."""
    model = _tiny_falcon()
    expected = _peft_all_linear(model)
    assert expected and "lm_head" not in expected
    inject_increlora(model, config(target_modules="all-linear", r_max=4, target_rank=2))
    assert adapted(model) == expected
    assert all(type(layer.base_layer).__name__ == "FalconLinear"
               for _, layer in increlora_layers(model))


def test_all_linear_over_only_linears_that_are_not_linear_maps_names_them_and_why():
    """A model whose only linears have a forward that is not the linear map (a router
    returning a tuple): "all-linear" finds nothing, and says which classes and why, not that
    the modules "are not nn.Linear or Conv1D", which they are."""
    class Router(nn.Linear):
        def forward(self, x):
            logits = super().forward(x)
            return logits.softmax(-1), logits

    model = nn.Sequential(Router(8, 4))
    with pytest.raises(ValueError) as err:
        inject_increlora(model, config(target_modules="all-linear", r_max=4, target_rank=2))
    message = str(err.value)
    assert "\n" not in message and message.startswith("target_modules='all-linear'")
    assert "Router" in message and "returns a tuple" in message
    assert "are not nn.Linear" not in message


BLOOM_DIRECT = {"transformer.h.0.self_attention.dense", "transformer.h.0.mlp.dense_4h_to_h"}


def _tiny_bloom(**kwargs) -> nn.Module:
    import transformers
    torch.manual_seed(0)
    return transformers.BloomForCausalLM(transformers.BloomConfig(
        hidden_size=16, n_layer=1, n_head=2, vocab_size=32, **kwargs)).eval()


@pytest.mark.parametrize("settings", [{}, {"pretraining_tp": 2}],
                         ids=["default", "tp2-not-slow-but-exact"])
def test_bloom_linears_read_directly_only_on_a_branch_this_config_skips_are_adapted(settings):
    """Bloom's attention and MLP read ``dense.weight`` / ``dense_4h_to_h.weight`` directly only
    when ``pretraining_tp > 1 and slow_but_exact``; otherwise they call the layers. The source
    scan saw the read and left both out of "all-linear" (silently) and refused them by name,
    though peft adapts them and their adapters run (found by an audit)."""
    model = _tiny_bloom(**settings)
    expected = _peft_all_linear(model)
    assert BLOOM_DIRECT <= expected
    inject_increlora(model, config(target_modules="all-linear", r_max=4, target_rank=2))
    assert adapted(model) == expected
    named = _tiny_bloom(**settings)
    inject_increlora(named, config(target_modules=["dense", "dense_4h_to_h"], r_max=4,
                                   target_rank=2))
    assert adapted(named) == BLOOM_DIRECT
    ran = set()
    for name in BLOOM_DIRECT:
        named.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: ran.add(name))
    named(torch.tensor([[1, 2, 3]]))
    assert ran == BLOOM_DIRECT


def test_bloom_linears_read_directly_under_slow_but_exact_are_refused_and_named():
    """With ``pretraining_tp > 1 and slow_but_exact`` Bloom computes with the weights and never
    calls the layers: a named target is refused, and "all-linear" leaves them out in one
    warning naming them and why (it left them out silently)."""
    settings = dict(pretraining_tp=2, slow_but_exact=True)
    with pytest.raises(ValueError, match=r"'transformer.h.0.self_attention.dense' cannot be "
                                         r"adapted: BloomAttention.forward computes with "
                                         r"self.dense.weight directly"):
        inject_increlora(_tiny_bloom(**settings), config(target_modules=["dense"], r_max=4))
    model = _tiny_bloom(**settings)
    with pytest.warns(UserWarning) as record:
        inject_increlora(model, config(target_modules="all-linear", r_max=4, target_rank=2))
    messages = [str(w.message) for w in record if "leaves out" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert all(f"{name!r}" in messages[0] for name in BLOOM_DIRECT)
    assert "computes with self.dense.weight directly" in messages[0]
    assert not adapted(model) & BLOOM_DIRECT and adapted(model)


def test_all_linear_on_a_plain_module_adapts_its_head_as_peft_does(tiny_net):
    """A model without ``get_output_embeddings`` has no output layer to leave out: its head is
    adapted, by peft too (the config's docstring says so, and how to keep it out)."""
    expected = _peft_all_linear(tiny_net)
    assert "head" in expected
    injected = inject_increlora(tiny_net, config(target_modules="all-linear"))
    assert adapted(injected) == expected == ALL_TARGETS | {"head"}


def test_all_linear_leaves_out_modules_to_save_and_weight_readers(tiny_net):
    model = inject_increlora(tiny_net, config(target_modules="all-linear",
                                              modules_to_save=["head"]))
    assert adapted(model) == ALL_TARGETS
    assert model.head.weight.requires_grad
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    inject_increlora(layer, config(target_modules="ALL-LINEAR", r_max=4, target_rank=2))
    assert adapted(layer) == {"linear1", "linear2"}  # MultiheadAttention never calls out_proj


def test_a_target_narrower_than_r_max_is_named_in_one_warning():
    """Rank beyond min(in, out) adds nothing a layer can express, yet allocation may spend
    budget there: injection says which targets are that narrow (peft accepts it silently)."""
    import warnings
    settings = dict(r_max=4, init_r=1, target_rank=2, init_warmup=2, incre_interval=2, top_h=1)
    narrow = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
    with pytest.warns(UserWarning, match=r"r_max=4 exceeds min\(in, out\) of 1 target "
                                         r"module\(s\): '2' \(32 -> 3\)"):
        inject_increlora(narrow, IncreLoRAConfig(target_modules=["0", "2"], **settings))
    wide = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inject_increlora(wide, IncreLoRAConfig(target_modules=["0", "2"], **settings))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_adapted_layers_take_the_mode_of_the_layers_they_replace(tiny_net, training):
    """A model in eval mode (as from_pretrained returns it) got its new layers in train mode:
    their lora dropout ran in inference until the next model.eval(), so two forwards of one
    input differed. The layers (and their dropout) take the replaced layer's mode."""
    tiny_net.train(training)
    model = inject_increlora(tiny_net, config(lora_dropout=0.5))
    assert {m.training for m in model.modules()} == {training}
    with torch.no_grad():
        for _, layer in increlora_layers(model):
            layer.lora_lambda.fill_(3.0)
    x = torch.randn(4, 12)
    assert torch.equal(model(x), model(x)) is not training


def test_injecting_into_a_distributed_data_parallel_model_is_refused(tiny_net, tmp_path):
    """DistributedDataParallel registers the parameters to average when it is built: adapters
    injected into a model it already wraps trained with no gradient averaging at all, so the
    ranks drifted apart silently. Injection into it is refused, the model left unchanged."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        wrapper = nn.parallel.DistributedDataParallel(tiny_net)
        before = snapshot(tiny_net)
        for model in (wrapper, torch.compile(wrapper)):
            with pytest.raises(ValueError) as err:
                inject_increlora(model, config())
            message = str(err.value)
            assert "DistributedDataParallel" in message and "\n" not in message
            assert snapshot(tiny_net) == before
    finally:
        dist.destroy_process_group()
    assert adapted(inject_increlora(tiny_net, config())) == ALL_TARGETS


def test_a_data_parallel_wrapper_given_for_its_model_is_named_as_such(tiny_net):
    """IncreLoRAController or create_optimizer given nn.DataParallel(adapted model) said the
    model had no adapter and to call inject_increlora, which had been called. The error says
    it is a wrapper and which model to pass."""
    from increlora_fast import IncreLoRAController, create_optimizer
    model = inject_increlora(tiny_net, config())
    wrapper = nn.DataParallel(model)
    for build in (lambda: IncreLoRAController(wrapper), lambda: create_optimizer(wrapper)):
        with pytest.raises(ValueError) as err:
            build()
        message = str(err.value)
        assert "DataParallel" in message and ".module" in message and "\n" not in message
        assert "call inject_increlora" not in message
    assert IncreLoRAController(wrapper.module).config is model.increlora_config


@pytest.mark.parametrize("exclude,expected", [
    (["blocks.0.fc"], ALL_TARGETS - {"blocks.0.fc"}),
    (("proj",), {"blocks.0.fc", "blocks.1.fc"}),
    (r"blocks\.1\..*", {"blocks.0.fc", "blocks.0.proj"}),
    ([], ALL_TARGETS),
])
def test_exclude_modules_leaves_out_what_peft_leaves_out(tiny_net, exclude, expected):
    """peft's ``exclude_modules``: suffixes of a target's own name, or one regex matched against
    the full name; the same choice as peft's on the same model."""
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(copy.deepcopy(tiny_net), LoraConfig(
        target_modules=["fc", "proj"], exclude_modules=exclude or None, r=2))
    peft_adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                    if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)}
    model = inject_increlora(tiny_net, config(exclude_modules=exclude))
    assert adapted(model) == expected == peft_adapted
    assert not any(p.requires_grad for n, p in model.named_parameters()
                   if n.startswith(tuple(ALL_TARGETS - expected)))


def test_exclude_modules_with_all_linear_and_the_default_targets(tiny_net):
    model = inject_increlora(tiny_net, config(target_modules="all-linear",
                                              exclude_modules=["head", "1.proj"]))
    assert adapted(model) == ALL_TARGETS - {"blocks.1.proj"}
    bert = _tiny_bert()
    inject_increlora(bert, config(target_modules=None, exclude_modules=r".*\.(key|value)"))
    assert adapted(bert) and not any(n.endswith((".key", ".value")) for n in adapted(bert))


@pytest.mark.parametrize("exclude,message", [
    (["blocks.0"], r"entry 'blocks.0' leaves out none of the 4 target modules \(it names "
                   r"'blocks.0', not a target; .*regex string such as r'blocks\\.0\\.\.\*'\)"),
    (["fcc"], r"entry 'fcc' leaves out none of the 4 target modules \(similar names: "
              r".*'fc'"),
    (["head"], r"entry 'head' leaves out none of the 4 target modules \(it names 'head', "
               r"which is not a target and holds none\)"),
    (r"fc", r"regex 'fc' matches none of the 4 target modules \(it must match the full name"),
    (["fc", "proj"], r"leaves out every one of the 4 target modules"),
])
def test_an_exclusion_that_changes_nothing_or_leaves_nothing_is_refused(tiny_net, exclude,
                                                                        message):
    """An exclusion that leaves out no target (a parent's name, a typo, a regex matching part
    of names) would silently adapt what the user meant to leave out; one that leaves out every
    target would adapt nothing. Both are refused before the model changes."""
    before = snapshot(tiny_net)
    with pytest.raises(ValueError, match=message):
        inject_increlora(tiny_net, config(exclude_modules=exclude))
    assert snapshot(tiny_net) == before


@pytest.mark.parametrize("bad", ["", "(", [""], 3, ["fc", 1]])
def test_exclude_modules_must_be_names_or_one_regex(bad):
    with pytest.raises(ValueError, match="IncreLoRAConfig.exclude_modules="):
        config(exclude_modules=bad)


def test_a_target_inside_modules_to_save_gets_no_adapter_as_in_peft(tiny_net):
    """A linear that modules_to_save trains in full got an adapter too, training beside its
    full weight (RoBERTa's ``classifier.dense`` under targets ``[..., "dense"]`` and
    ``modules_to_save=["classifier"]``); peft leaves it unadapted, and so does injection now.
    A listed name that matches only such linears, or targets all inside modules to save, would
    adapt nothing of what was asked: refused, the model unchanged."""
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(copy.deepcopy(tiny_net), LoraConfig(
        target_modules=["fc", "proj"], modules_to_save=["1"], r=2))
    peft_adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                    if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)}
    model = inject_increlora(copy.deepcopy(tiny_net), config(modules_to_save=["1"]))
    assert adapted(model) == {"blocks.0.fc", "blocks.0.proj"} == peft_adapted
    assert all(p.requires_grad for p in model.blocks[1].parameters())
    before = snapshot(tiny_net)
    with pytest.raises(ValueError, match=r"target module '1.fc' matches only modules inside "
                                         r"modules_to_save \['1'\]"):
        inject_increlora(tiny_net, config(target_modules=["0.fc", "1.fc"], modules_to_save=["1"]))
    with pytest.raises(ValueError, match="every target lies inside modules_to_save"):
        inject_increlora(tiny_net, config(target_modules=r"blocks\.1\.(fc|proj)",
                                          modules_to_save=["blocks"]))
    assert snapshot(tiny_net) == before
    bert = _tiny_bert()
    inject_increlora(bert, config(target_modules=None, modules_to_save=["encoder.layer.1"]))
    assert adapted(bert) and not any(n.startswith("encoder.layer.1.") for n in adapted(bert))
    assert all(p.requires_grad for p in bert.encoder.layer[1].parameters())


def _tiny_bert() -> nn.Module:
    import transformers
    return transformers.BertModel(transformers.BertConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        vocab_size=32, max_position_embeddings=16))


class _Wrapper(nn.Module):
    """A user's module whose linear happens to be named ``base_layer`` (the attribute name
    IncreLoRALinear gives the layer it wraps)."""

    def __init__(self) -> None:
        super().__init__()
        self.base_layer, self.fc = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.base_layer(x))


@pytest.mark.parametrize("targets", [["base_layer", "fc"], "all-linear", r"block\..*"])
def test_a_linear_named_base_layer_is_a_target_like_any_other(targets):
    """Only the base layer inside an IncreLoRALinear is not a target; a user's linear named
    ``base_layer`` was skipped by name: listed, it was refused as 'not nn.Linear', and
    'all-linear' or a regex left it out."""
    model = nn.Module()
    model.block = _Wrapper()
    inject_increlora(model, IncreLoRAConfig(target_modules=targets, r_max=4))
    assert sorted(n for n, _ in increlora_layers(model)) == ["block.base_layer", "block.fc"]


class _ReadsInWordsOnly(nn.Module):
    """Calls its linear; only its docstring and a comment name the weight."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        """Calls self.fc, never F.linear(x, self.fc.weight) by hand."""
        return self.fc(x)  # not self.fc.weight @ x


def test_a_weight_named_only_in_a_docstring_is_no_direct_read():
    """The parent's source was searched for ``self.<path>.weight`` as text first, and a match
    the code does not hold (a docstring's words) counted as a read of unknown guards: the
    linear was refused, 'computes with self.fc.weight directly'. Only the code's reads count."""
    model = nn.Sequential(_ReadsInWordsOnly())
    inject_increlora(model, IncreLoRAConfig(target_modules=["fc"], r_max=4, init_r=1,
                                            target_rank=2, total_step=10))
    assert isinstance(model[0].fc, IncreLoRALinear)


def test_all_linear_names_fused_mixture_of_experts_weights_it_leaves_frozen():
    """transformers 5 holds a Mixtral layer's experts as 3-D parameters (``MixtralExperts``),
    no linear layers: 'all-linear' adapted only the attention, and the experts, most of the
    model, stayed frozen without a word."""
    import warnings
    from transformers import MixtralConfig, MixtralForCausalLM
    model = MixtralForCausalLM(MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2))
    fused = [n for n, m in model.named_modules() if type(m).__name__ == "MixtralExperts"]
    if not fused:
        pytest.skip("this transformers holds Mixtral's experts as linear layers")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inject_increlora(model, IncreLoRAConfig(target_modules="all-linear", r_max=4))
    said = [str(w.message) for w in caught if "mixture-of-experts" in str(w.message)]
    assert len(said) == 1 and "2 module(s)" in said[0]
    assert all(repr(n) in said[0] for n in fused)
    dense = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 3))  # a 3-D weight, no experts
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inject_increlora(dense, IncreLoRAConfig(target_modules="all-linear", r_max=4))
    assert not [w for w in caught if "mixture-of-experts" in str(w.message)]


def _head_warnings(model, target_modules, saved):
    """The frozen-head warnings of injecting ``model`` (target_rank 2, r_max 4) with these
    ``target_modules`` and ``modules_to_save=saved``."""
    import warnings

    config = IncreLoRAConfig(target_modules=target_modules, target_rank=2, r_max=4,
                             modules_to_save=saved)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inject_increlora(model, config)
    return [str(w.message) for w in caught if "the head of" in str(w.message)]


@pytest.mark.parametrize("saved", [None, ["classifier"]])
def test_a_task_models_frozen_head_is_warned_of(saved):
    """inject_increlora on a transformers sequence classifier without modules_to_save left its
    head (random from from_pretrained) frozen without a word; peft's task_type trains it."""
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=48, num_labels=3))
    said = _head_warnings(model, ["query", "value"], saved)
    assert model.classifier.weight.requires_grad == (saved is not None)
    if saved is None:
        assert len(said) == 1 and "modules_to_save=['classifier']" in said[0], said
    else:
        assert said == []


@pytest.mark.parametrize("saved", [None, ["classifier"]])
def test_a_head_adapted_only_in_part_is_warned_of(saved):
    """RoBERTa's head is a module holding two linears (``classifier.dense``,
    ``classifier.out_proj``): target_modules=['dense'] adapts the first, and the warning took
    that for a trained head, so the random ``out_proj`` stayed frozen without a word."""
    from transformers import RobertaConfig, RobertaForSequenceClassification
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=48, num_labels=3, max_position_embeddings=40))
    said = _head_warnings(model, ["query", "value", "dense"], saved)
    assert model.classifier.out_proj.weight.requires_grad == (saved is not None)
    if saved is None:
        assert len(said) == 1 and "'classifier.out_proj'" in said[0], said
    else:
        assert said == []


@pytest.mark.parametrize("saved", [["classifier"], ["pre_classifier", "classifier"]])
def test_a_head_of_several_modules_is_warned_of_by_each(saved):
    """DistilBERT's head is two modules, ``pre_classifier`` and ``classifier``, both random
    from from_pretrained: with only ``classifier`` saved, ``pre_classifier`` stayed frozen
    without a word (the warning stopped at the first head module it found trained)."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification
    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=64, dim=32, n_layers=1, n_heads=2, hidden_dim=48, num_labels=3))
    said = _head_warnings(model, ["q_lin", "v_lin"], saved)
    if len(saved) == 1:
        assert len(said) == 1 and "'pre_classifier'" in said[0], said
        assert "modules_to_save=['pre_classifier']" in said[0] and "'classifier'" not in said[0]
    else:
        assert said == []
