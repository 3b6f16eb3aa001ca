"""Drop-in safety (issue 14 item 9): the wrapper looks like the layer it replaced, and no parent
silently skips an adapter.

Parametrised over every transformers text family that builds offline from a tiny config with
random weights (enumerated from the auto mappings; one that cannot be built that way is skipped,
except a core set that must build) and over torch's built-in transformer layers. Per model:
output equals the base at init up to the reserve's 1e-5 lambda, every adapter that runs gets
gradients (and no base parameter does), a non-zero adapter changes the output, and merging gives
the unmerged output.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Dict, List

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from increlora_fast import IncreLoRAConfig, IncreLoRALinear, increlora_layers, inject_increlora
from increlora_fast import merge_and_unload
from increlora_fast.layer import is_supported_base
from increlora_fast.model import direct_weight_reader

VOCAB = 64
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            vocab_size=VOCAB, max_position_embeddings=64, num_key_value_heads=1, head_dim=16,
            d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37, use_cache=False)
MAX_PARAMS = 2_000_000
# Families that build but are too slow for CI on a 2-core CPU (seconds per forward pass).
TOO_SLOW = {"falcon_h1": "its pure-PyTorch Mamba scan takes about a minute on CPU"}
# Families that must build from TINY (a failure to build them is a failure, not a skip).
CORE = {"bert", "roberta", "deberta-v2", "gpt2", "llama", "bart", "opt", "mistral", "qwen2",
        "gemma", "phi", "bloom", "gpt_neox", "electra", "distilbert", "albert", "mpnet"}


def _family_names() -> List[str]:
    from transformers.models.auto import modeling_auto as ma

    names = set(ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES) \
        | set(ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)
    return sorted(n for n in names if n in ma.MODEL_MAPPING_NAMES)


def _build_family(name: str) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    if name in TOO_SLOW:
        pytest.skip(f"{name}: {TOO_SLOW[name]}")
    try:
        config = AutoConfig.for_model(name, **TINY)
        with torch.device("meta"):
            size = sum(p.numel() for p in AutoModel.from_config(config).parameters())
        if size > MAX_PARAMS:
            raise RuntimeError(f"the tiny config still gives {size:,} parameters")
        torch.manual_seed(0)
        model = AutoModel.from_config(config).eval()
        _first_output(model(**_inputs(model)))
    except Exception as err:  # any failure here means "not buildable offline from TINY"
        if name in CORE:
            raise
        pytest.skip(f"{name} does not build from a tiny config: {type(err).__name__}: "
                    f"{str(err)[:80]}")
    return model


def _inputs(model: nn.Module) -> Dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    params = inspect.signature(model.forward).parameters
    batch = {"input_ids": ids}
    if "decoder_input_ids" in params:
        batch["decoder_input_ids"] = ids
    return batch


def _float_outputs(out) -> List[torch.Tensor]:
    """Every floating tensor of a model output (nested tuples included), in order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    values = out.to_tuple() if hasattr(out, "to_tuple") else out
    if not isinstance(values, (tuple, list)):
        return []
    return [t for v in values for t in _float_outputs(v)]


def _first_output(out) -> torch.Tensor:
    return _float_outputs(out)[0]


def _targets(model: nn.Module) -> List[str]:
    """Every linear but the output head; those whose parent reads their weight directly are
    checked to be refused by inject_increlora and left out."""
    skip = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [n for n, m in model.named_modules() if n and is_supported_base(m) and m is not skip]
    refused = [n for n in names if direct_weight_reader(model, n)]
    if refused:
        with pytest.raises(ValueError, match=f"{refused[0]!r} cannot be adapted: .*directly"):
            inject_increlora(model, IncreLoRAConfig(target_modules=[refused[0]], r_max=4))
        assert not any(isinstance(m, IncreLoRALinear) for m in model.modules())
    return [n for n in names if n not in refused]


def _check_drop_in(model: nn.Module, run) -> None:
    """The four properties of the module docstring; ``run(model)`` returns the output tensor."""
    with torch.no_grad():
        base = run(model).float().clone()
    targets = _targets(model)
    if not targets:
        pytest.skip("no linear layers")
    inject_increlora(model, IncreLoRAConfig(target_modules=targets, r_max=4, init_r=1,
                                            target_rank=2, lora_alpha=8.0))
    layers = [layer for _, layer in increlora_layers(model)]
    for layer in layers:  # the attributes of the replaced layer, shared, not copied
        assert layer.weight is layer.base_layer.weight
        assert layer.bias is getattr(layer.base_layer, "bias", None)
    ran = set()
    hooks = [layer.register_forward_hook(lambda m, i, o: ran.add(id(m))) for layer in layers]
    out = run(model)
    for h in hooks:
        h.remove()
    assert ran, "no adapted layer was called"
    torch.testing.assert_close(out.float(), base, rtol=1e-3, atol=1e-4)
    out.float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        if not name.rsplit(".", 1)[-1].startswith("lora_"):
            assert p.grad is None, name
    # Where the loss reaches a layer at all (its base weight would get a gradient), the adapter
    # gets one too. (Some families leave a projection without signal at random init, e.g. an
    # attention over a single position; those are told apart by the base weight's gradient.)
    lam_grads = [layer.lora_lambda.grad for layer in layers]
    model.zero_grad(set_to_none=True)
    for layer in layers:
        layer.base_layer.weight.requires_grad_(True)
    run(model).float().pow(2).mean().backward()
    for layer, lam_grad in zip(layers, lam_grads):
        base_grad = layer.base_layer.weight.grad
        layer.base_layer.weight.requires_grad_(False)
        if id(layer) in ran and base_grad is not None and bool(base_grad.abs().sum() > 0):
            assert lam_grad is not None and bool(lam_grad.abs().sum() > 0), layer
    with torch.no_grad():
        for layer in layers:
            layer.lora_lambda.fill_(1.0)
        adapted = run(model).float().clone()
        assert float((adapted - base).abs().max()) > 1e-4, "the adapter does not change the output"
        merge_and_unload(model)
        assert not any(isinstance(m, IncreLoRALinear) for m in model.modules())
        torch.testing.assert_close(run(model).float(), adapted, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", _family_names())
def test_transformers_family_drop_in(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _build_family(name)
        batch = _inputs(model)
        _check_drop_in(model, lambda m: torch.cat([t.float().reshape(-1)
                                                   for t in _float_outputs(m(**batch))]))


def _encoder_layer():
    return nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, dropout=0.0, batch_first=True)


def _decoder_layer():
    return nn.TransformerDecoderLayer(16, 2, dim_feedforward=24, dropout=0.0, batch_first=True)


TORCH_MODELS = {
    "encoder_layer": (_encoder_layer, lambda m, x: m(x)),
    "encoder_stack": (lambda: nn.TransformerEncoder(_encoder_layer(), 2, enable_nested_tensor=False),
                      lambda m, x: m(x)),
    "decoder_layer": (_decoder_layer, lambda m, x: m(x, x)),
    "transformer": (lambda: nn.Transformer(16, 2, 1, 1, 24, dropout=0.0, batch_first=True),
                    lambda m, x: m(x, x)),
}


@pytest.mark.parametrize("name", list(TORCH_MODELS))
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "inference"])
def test_torch_transformer_layers_drop_in(name, grad):
    """``inference``: eval and no_grad, where TransformerEncoderLayer's fused fast path would
    read linear1/linear2's weights without calling them (it must not skip the adapters)."""
    build, call = TORCH_MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(4))
    targets = [n for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and not n.endswith("out_proj")]
    base = call(model, x).clone()
    inject_increlora(model, IncreLoRAConfig(target_modules=targets, r_max=4, lora_alpha=8.0))
    with torch.no_grad():
        torch.testing.assert_close(call(model, x), base, rtol=1e-3, atol=1e-4)
    if grad:
        call(model, x).pow(2).mean().backward()
        assert all(layer.lora_lambda.grad is not None and bool(layer.lora_lambda.grad.any())
                   for _, layer in increlora_layers(model))
    with torch.no_grad():
        for _, layer in increlora_layers(model):
            layer.lora_lambda.fill_(1.0)
        adapted = call(model, x).clone()
        assert float((adapted - base).abs().max()) > 1e-3
        merge_and_unload(model)
        torch.testing.assert_close(call(model, x), adapted, rtol=1e-4, atol=1e-5)



@pytest.mark.parametrize("entry", ["controller", "create_optimizer"])
def test_a_hand_built_layer_in_an_encoder_layer_runs_on_the_inference_fast_path(entry):
    """An IncreLoRALinear built by hand as an nn.TransformerEncoderLayer's linear1 (no
    inject_increlora, which keeps the layer's fused fast path off) was skipped in eval under
    no_grad: the fast path reads linear1.weight and never calls linear1. The controller and
    create_optimizer, which see the model, keep that fast path off as injection does."""
    from increlora_fast import IncreLoRAController, create_optimizer

    torch.manual_seed(0)
    model = _encoder_layer().eval()
    model.linear1 = IncreLoRALinear(model.linear1, r_max=4, init_r=1, lora_alpha=8.0)
    config = IncreLoRAConfig(target_modules=["linear1"], r_max=4, init_r=1, lora_alpha=8.0)
    IncreLoRAController(model, config) if entry == "controller" else \
        create_optimizer(model, config)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model.linear1.lora_lambda.fill_(1.0)
        model.linear1.lora_B.normal_()
        base = F.linear(x, model.linear1.weight, model.linear1.bias)
        assert float((model.linear1(x) - base).abs().max()) > 1e-3  # the adapter acts
        out = model(x)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)  # grad on: module path


def test_multihead_attention_out_proj_is_refused_with_the_reason():
    model = nn.Module()
    model.attn = nn.MultiheadAttention(16, 2, batch_first=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="'attn.out_proj' cannot be adapted: "
                                         "nn.MultiheadAttention reads out_proj.weight"):
        inject_increlora(model, IncreLoRAConfig(target_modules=["attn.out_proj"], r_max=4))
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    x = torch.randn(2, 5, 16)
    model.attn(x, x, x)  # still works


def test_the_wrapper_exposes_the_replaced_layers_attributes():
    base = nn.Linear(6, 4, dtype=torch.float64)
    layer = IncreLoRALinear(base, r_max=4)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.weight.dtype == torch.float64 and layer.weight.device == base.weight.device
    assert (layer.in_features, layer.out_features) == (6, 4)
    assert all(p is not base.weight for n, p in layer.named_parameters() if n != "base_layer.weight")
    assert IncreLoRALinear(nn.Linear(6, 4, bias=False), r_max=4).bias is None


def test_a_parent_that_computes_with_a_childs_weight_is_refused():
    class Mixer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(8, 8)
            self.dt_proj = nn.Linear(8, 8)

        def forward(self, x):
            x = self.inner(x).to(self.dt_proj.weight.dtype)  # reading the dtype is fine
            return x @ self.dt_proj.weight.t()

    model = nn.Module()
    model.mixer = Mixer()
    with pytest.raises(ValueError, match="'mixer.dt_proj' cannot be adapted: Mixer.forward "
                                         "computes with self.dt_proj.weight directly"):
        inject_increlora(model, IncreLoRAConfig(target_modules=["dt_proj"], r_max=4))
    inject_increlora(model, IncreLoRAConfig(target_modules=["inner"], r_max=4))
    assert isinstance(model.mixer.inner, IncreLoRALinear)


def test_a_direct_read_through_a_first_argument_not_named_self_is_refused():
    """The source was searched for ``self.<path>.weight`` only: a forward whose first argument
    has another name (``def forward(s, x): F.linear(x, s.fc.weight)``) was adapted, its adapter
    never ran, and training the target alone failed at backward with torch's "element 0 of
    tensors does not require grad"; ``"all-linear"`` adapted it without a word."""
    class Direct(nn.Module):
        def __init__(s) -> None:
            super().__init__()
            s.fc, s.out = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(s, x):
            return s.out(F.linear(x, s.fc.weight, s.fc.bias))

    with pytest.raises(ValueError, match="'fc' cannot be adapted: Direct.forward computes with "
                                         r"self.fc.weight directly"):
        inject_increlora(Direct(), IncreLoRAConfig(target_modules=["fc"], r_max=4))
    model = Direct()
    with pytest.warns(UserWarning, match="leaves out 1 linear"):
        inject_increlora(model, IncreLoRAConfig(target_modules="all-linear", r_max=4))
    assert sorted(n for n, _ in increlora_layers(model)) == ["out"]


def test_a_direct_read_counts_unless_the_models_config_rules_its_branch_out():
    """A read under an ``if`` that the config decides and that is false cannot happen (the
    layer is adapted); one under a test of anything else (the mode, an attribute the config
    does not hold) still counts."""
    from types import SimpleNamespace

    class Mixer(nn.Module):
        def __init__(self, config) -> None:
            super().__init__()
            self.split, self.fast = config.split, False
            self.proj = nn.Linear(8, 8)
            self.head = nn.Linear(8, 8)

        def forward(self, x):
            if self.split > 1 and not self.fast:
                x = x @ self.proj.weight.t()
            else:
                x = self.proj(x)
            return x @ self.head.weight.t() if self.training or self.fast else self.head(x)

    for split, refused in ((1, []), (2, ["proj"])):
        model = nn.Module()
        model.config = SimpleNamespace(split=split)
        model.mixer = Mixer(model.config)
        found = [n for n in ("proj", "head") if direct_weight_reader(model, f"mixer.{n}")]
        assert found == refused + ["head"]


def test_an_and_or_or_inside_a_comparison_is_compared_by_its_value_not_its_truth():
    """``(self.config.tp or 1) > 1`` with tp 2 is ``2 > 1``: the read under it happens. The
    truth of the ``or`` (True, i.e. 1) compared instead ruled the read out, so the layer was
    adapted and its adapter never ran."""
    from types import SimpleNamespace

    class Mixer(nn.Module):
        def __init__(self, config) -> None:
            super().__init__()
            self.config = config
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            if (self.config.tp or 1) > 1:
                return x @ self.proj.weight.t()
            return self.proj(x)

    for tp, refused in ((None, False), (1, False), (2, True)):
        model = nn.Module()
        model.config = SimpleNamespace(tp=tp)
        model.mixer = Mixer(model.config)
        assert (direct_weight_reader(model, "mixer.proj") is not None) is refused, tp



@pytest.mark.parametrize("test,config,refused", [
    ("(self.config.on and self.config.tp) > 1", dict(on=True, tp=2), True),
    ("(self.config.on and self.config.tp) > 1", dict(on=True, tp=1), False),
    ("(self.config.on and self.config.tp) > 1", dict(on=False, tp=2), False),
    ("(not self.config.off) == True", dict(off=True), False),
    ("(not self.config.off) == True", dict(off=False), True),
    ("self.config.tp > 1", dict(tp=None), True),  # None > 1: TypeError, so not decided
], ids=["and-last-2", "and-last-1", "and-first", "not-true", "not-false", "uncomparable"])
def test_and_or_not_inside_a_comparison_take_their_values(test, config, refused, tmp_path):
    """Inside a comparison an ``and`` that no operand settles is its last operand's value and
    a ``not`` is the negated value; a comparison Python refuses (None > 1) decides nothing, so
    the read under it counts."""
    import importlib.util
    from types import SimpleNamespace

    source = tmp_path / "mixer_module.py"
    source.write_text("from torch import nn\n\n\n"
                      "class Mixer(nn.Module):\n"
                      "    def __init__(self, config):\n"
                      "        super().__init__()\n"
                      "        self.config = config\n"
                      "        self.proj = nn.Linear(8, 8)\n\n"
                      "    def forward(self, x):\n"
                      f"        if {test}:\n"
                      "            return x @ self.proj.weight.t()\n"
                      "        return self.proj(x)\n")
    spec = importlib.util.spec_from_file_location("mixer_module", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = nn.Module()
    model.config = SimpleNamespace(**config)
    model.mixer = module.Mixer(model.config)
    assert (direct_weight_reader(model, "mixer.proj") is not None) is refused


def test_a_model_whose_classes_have_no_source_is_adapted():
    """Classes made by exec (``python -c``, generated code) have no source for the direct-read
    check to parse: their methods are passed over, and injection adapts their linears."""
    namespace = {"nn": nn}
    exec("class Block(nn.Module):\n"
         "    def __init__(self):\n"
         "        super().__init__()\n"
         "        self.proj = nn.Linear(8, 8)\n"
         "    def forward(self, x):\n"
         "        return self.proj(x).relu()\n", namespace)
    torch.manual_seed(0)
    model = nn.Sequential(namespace["Block"](), namespace["Block"]())
    x = torch.randn(3, 8)
    expected = model(x)
    inject_increlora(model, IncreLoRAConfig(target_modules=["proj"], r_max=4))
    assert sorted(n for n, _ in increlora_layers(model)) == ["0.proj", "1.proj"]
    torch.testing.assert_close(model(x), expected)


def test_an_ancestor_that_computes_with_a_descendants_weight_is_refused():
    """A grandparent or any module further up that computes with ``self.attn.proj.weight`` (or
    ``self.blocks[0].fc.weight``) skips an adapter on that linear just as a parent reading
    ``self.proj.weight`` does. Only the parent was read, so such an adapter was skipped without
    a word. The parent's rules hold: a read for the dtype, or on a branch the config rules out,
    does not count."""
    from types import SimpleNamespace

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.proj = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(self.qkv(x))

    class Block(nn.Module):
        def __init__(self, config) -> None:
            super().__init__()
            self.split = config.split
            self.attn, self.fc, self.gate = Attn(), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            x = x.to(self.attn.qkv.weight.dtype)
            h = self.attn.qkv(x)
            h = self.gate.weight @ h.t() if self.split > 1 else self.gate(h).t()
            return F.linear(h.t(), self.attn.proj.weight) + self.fc(x)

    class Top(nn.Module):
        def __init__(self, config) -> None:
            super().__init__()
            self.config = config
            self.blocks = nn.ModuleList([Block(config), Block(config)])

        def forward(self, x):
            return self.blocks[1](x) @ self.blocks[0].fc.weight.t()

    for split, gate in ((1, []), (2, ["blocks.0.gate", "blocks.1.gate"])):
        model = Top(SimpleNamespace(split=split))
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        found = [n for n in names if direct_weight_reader(model, n)]
        assert found == sorted(["blocks.0.attn.proj", "blocks.1.attn.proj", "blocks.0.fc"]
                               + gate, key=names.index), split
    assert "Block.forward (module 'blocks.1') computes with self.attn.proj.weight" in \
        direct_weight_reader(model, "blocks.1.attn.proj")
    with pytest.raises(ValueError, match=r"'blocks\.0\.fc' cannot be adapted: Top\.forward "
                                         r"\(the model\) computes with "
                                         r"self\.blocks\[0\]\.fc\.weight"):
        inject_increlora(model, IncreLoRAConfig(target_modules=["blocks.0.fc"], r_max=4))
    with pytest.warns(UserWarning, match="leaves out 5 linear"):
        inject_increlora(model, IncreLoRAConfig(target_modules="all-linear", r_max=4))
    assert sorted(n for n, _ in increlora_layers(model)) == [
        "blocks.0.attn.qkv", "blocks.1.attn.qkv", "blocks.1.fc"]


class _Router(nn.Linear):
    def forward(self, x):
        logits = super().forward(x)
        return logits.softmax(-1), logits


class _Scaled(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class _Lookup(nn.Linear):
    def forward(self, x, *, lookup: bool = False):
        return nn.functional.embedding(x, self.weight.T) if lookup else super().forward(x)


class _Cached(nn.Linear):
    """Computes with a copy of its weight made when built: merging into weight would be lost."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.register_buffer("frozen", self.weight.detach().clone())

    def forward(self, x):
        return nn.functional.linear(x, self.frozen, self.bias)


class _Plain(nn.Linear):
    """Falcon's FalconLinear: the linear map, by a forward of its own."""

    def forward(self, x):
        out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


class _Raises(nn.Linear):
    def forward(self, x):
        raise RuntimeError("needs a routing table")


class _Flattens(nn.Linear):
    def forward(self, x):
        return super().forward(x).flatten(0, -2)


class _Pinned(nn.Linear):
    """Fails on any weight but the one it was built with (a check against a stored copy)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.register_buffer("built", self.weight.detach().clone())

    def forward(self, x):
        if not torch.equal(self.weight, self.built):
            raise RuntimeError("weight changed")
        return super().forward(x)


@pytest.mark.parametrize("kind,why", [
    (_Router, "its forward returns a tuple"),
    (_Scaled, "its forward is not F.linear"),
    (_Lookup, "its forward takes arguments besides the input"),
    (_Cached, "its forward does not compute with the weight and bias it holds"),
    (_Raises, r"its forward raised RuntimeError on a \(2, 3, in_features\) input"),
    (_Flattens, r"its forward is not F\.linear\(x, weight, bias\): it returns \(6, 4\) "
                r"torch\.float32 where F\.linear returns \(2, 3, 4\) torch\.float32"),
    (_Pinned, "its forward does not compute with the weight and bias it holds"),
])
def test_a_linear_subclass_whose_forward_is_not_the_linear_map_is_refused(kind, why):
    model = nn.Module()
    model.router = kind(8, 4)
    with pytest.raises(TypeError, match=f"'router' is a {kind.__name__} .*{why}"):
        inject_increlora(model, IncreLoRAConfig(target_modules=["router"], r_max=4))
    assert type(model.router) is kind


@pytest.mark.parametrize("bias", [True, False])
def test_a_linear_subclass_whose_forward_is_the_linear_map_is_adapted(bias):
    """Probed once at injection: its adapter runs on top of its own forward, trains, and
    merges into its weight."""
    torch.manual_seed(0)
    model = nn.Sequential(_Plain(8, 6, bias=bias), nn.Tanh(), _Plain(6, 4, bias=bias))
    x = torch.randn(3, 8)
    assert _targets(model) == ["0", "2"]
    _check_drop_in(model, lambda m: m(x))  # equal at init, gradients, merge = unmerged
    assert all(type(m) is _Plain for m in (model[0], model[2]))


def test_a_linear_subclass_on_the_meta_device_is_not_probed():
    """Its forward cannot be called on a meta weight: refused, saying why, not adapted."""
    model = nn.Module()
    model.proj = _Plain(8, 4, device="meta")
    with pytest.raises(TypeError, match=r"'proj' is a _Plain .*its weight \(on the meta "
                                        r"device\) leaves its forward unchecked"):
        inject_increlora(model, IncreLoRAConfig(target_modules=["proj"], r_max=4))
    assert type(model.proj) is _Plain


def test_a_parametrized_linear_subclass_is_adapted_and_never_merged():
    """Its weight is computed on each call (not in ``_parameters``): the probe's second call,
    with a swapped weight, is skipped; the adapter runs on its forward and merging is
    refused, as for a parametrized nn.Linear."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.proj = _Plain(8, 4)
    nn.utils.parametrize.register_parametrization(model.proj, "weight", _Double())
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
    inject_increlora(model, IncreLoRAConfig(target_modules=["proj"], r_max=4))
    assert isinstance(model.proj, IncreLoRALinear) and model.proj.has_derived_weight()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    with pytest.raises(ValueError, match=r"merge_and_unload: .*proj"):
        merge_and_unload(model)


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


def test_a_module_registered_twice_is_adapted_under_both_names():
    shared = nn.Linear(8, 8)
    model = nn.Module()
    model.a, model.b = shared, shared
    inject_increlora(model, IncreLoRAConfig(target_modules=["a"], r_max=4))
    assert isinstance(model.a, IncreLoRALinear) and model.b is model.a


@pytest.mark.parametrize("kind", ["forward_hook", "forward_pre_hook", "instance_forward"])
def test_hooks_on_the_replaced_layer_still_run(kind):
    """A hook on the replaced layer (a user's activation capture; accelerate's device hooks,
    which replace the instance's ``forward``) runs, and changes the output, as without the
    adapter: the wrapper calls the base then instead of reading its weight directly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    seen = []
    if kind == "forward_hook":
        model[0].register_forward_hook(lambda m, i, o: seen.append(1) or o * 2)
    elif kind == "forward_pre_hook":
        model[0].register_forward_pre_hook(lambda m, i: seen.append(1) or (i[0] * 2,))
    else:
        plain = model[0].forward
        model[0].forward = lambda x: seen.append(1) or plain(x) * 2
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
    inject_increlora(model, IncreLoRAConfig(target_modules=["0", "2"], r_max=4,
                                            advance_learning=False))
    seen.clear()
    out = model(x)
    assert seen == [1]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.sum().backward()
    assert model[0].lora_lambda.grad is not None


def test_a_checkpoint_of_the_base_model_loads_into_the_adapted_model():
    """Loading a checkpoint of the model as it was before injection (keys ``fc.weight``) into
    the adapted one (``fc.base_layer.weight``) with strict=False dropped the adapted layers'
    base weights as unexpected keys: the base stayed at its random init, silently. They load
    into the base layers; only the adapter's own tensors are missing, and they keep their
    values."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.fc(x)))

    torch.manual_seed(0)
    pretrained = Net()
    torch.manual_seed(1)
    model = inject_increlora(Net(), IncreLoRAConfig(target_modules=["fc"], r_max=4, init_r=1,
                                                    target_rank=2))
    adapter = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" not in k
               and k.startswith("fc.")}
    result = model.load_state_dict(pretrained.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(adapter)
    assert torch.equal(model.fc.base_layer.weight, pretrained.fc.weight)
    assert torch.equal(model.fc.base_layer.bias, pretrained.fc.bias)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in adapter.items())
    x = torch.randn(3, 8)
    assert torch.allclose(model(x), pretrained(x), atol=1e-4)
    with pytest.raises(RuntimeError, match="Missing key"):  # strict: the adapter is missing
        model.load_state_dict(pretrained.state_dict())


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "inference"])
def test_encoder_nested_tensor_path_with_a_padding_mask(grad):
    """nn.TransformerEncoder (enable_nested_tensor=True, its default) in eval mode packs a batch
    with a src_key_padding_mask into a nested tensor before its layers (also with grad enabled:
    it checks only the frozen base weights): the adapted linear1/linear2 failed on it ("Internal
    error: NestedTensorImpl doesn't support sizes"). They compute on it, with the adapter.
    With grad, one layer: a second one's attention refuses a nested input that requires grad
    (torch's own limit, also under peft's adapters)."""
    torch.manual_seed(0)
    model = nn.TransformerEncoder(_encoder_layer(), 1 if grad else 2).eval()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    keep = ~mask

    def call(m):
        with torch.set_grad_enabled(grad):
            out = m(x, src_key_padding_mask=mask)
        return out[keep]  # the padded positions are zeros or left as computed, by path

    with torch.no_grad():
        base = call(model).clone()
    inject_increlora(model, IncreLoRAConfig(target_modules=["linear1", "linear2"], r_max=4,
                                            lora_alpha=8.0))
    torch.testing.assert_close(call(model), base, rtol=1e-3, atol=1e-4)
    if grad:
        call(model).pow(2).mean().backward()
        assert all(bool(layer.lora_lambda.grad.any()) for _, layer in increlora_layers(model))
    with torch.no_grad():
        for _, layer in increlora_layers(model):
            layer.lora_lambda.fill_(1.0)
        adapted = call(model).clone()
        assert float((adapted - base).abs().max()) > 1e-3
        merge_and_unload(model)
        torch.testing.assert_close(call(model), adapted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged], ids=["strided", "jagged"])
def test_nested_tensor_input_equals_its_tensors_one_by_one(layout):
    """A nested input gives, per tensor, the adapted output of that tensor, with the same
    gradients and the same exact score as the tensors padded with zero rows."""
    torch.manual_seed(0)
    parts = [torch.randn(3, 16), torch.randn(5, 16)]
    layers = []
    for _ in range(2):
        torch.manual_seed(1)
        layer = IncreLoRALinear(nn.Linear(16, 8), r_max=4, init_r=2)
        layer.score_enabled = True
        layers.append(layer)
    nested = torch.nested.nested_tensor(parts, layout=layout)
    out = layers[0](nested)
    assert out.is_nested and out.layout == layout
    padded = torch.nn.utils.rnn.pad_sequence(parts, batch_first=True)
    expected = layers[1](padded)
    for got, want, n in zip(out.unbind(), expected, (3, 5)):
        torch.testing.assert_close(got, want[:n])
    sum(t.pow(2).sum() for t in out.unbind()).backward()
    sum(t[:n].pow(2).sum() for t, n in zip(expected, (3, 5))).backward()
    for name in ("lora_A", "lora_B", "lora_lambda"):
        torch.testing.assert_close(getattr(layers[0], name).grad, getattr(layers[1], name).grad)
    torch.testing.assert_close(layers[0].take_score(), layers[1].take_score())


class _Counting(nn.Linear):
    """The linear map that counts its calls in a buffer (as an observer records statistics)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return nn.functional.linear(x, self.weight, self.bias)


class _Noisy(nn.Linear):
    """Dropout on its input while training: draws from the global generator."""

    def forward(self, x):
        return nn.functional.linear(nn.functional.dropout(x, 0.5, self.training), self.weight,
                                    self.bias)


def test_the_probe_at_injection_leaves_the_modules_state_and_the_global_rng_as_they_were():
    """The probe of a subclass's own forward calls it on a random input and weight: a buffer
    it updates (a call count; a QAT linear's fake-quant observer, whose range the random
    weight overwrote) and the global random numbers it draws (dropout) are put back."""
    from torch.ao.nn.qat import Linear as QATLinear
    from torch.ao.quantization import get_default_qat_qconfig

    from increlora_fast.layer import own_forward_problem

    counting = _Counting(8, 4)
    assert own_forward_problem(counting) is None
    assert int(counting.calls) == 0
    qat = QATLinear(16, 8, qconfig=get_default_qat_qconfig("fbgemm"))
    before = {n: b.clone() for n, b in qat.named_buffers()}
    assert own_forward_problem(qat) is not None  # fake-quantized: not F.linear
    after = dict(qat.named_buffers())
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    noisy = _Noisy(8, 4).train()
    torch.manual_seed(int(torch.randint(1 << 30, ())))
    state = torch.get_rng_state()
    assert own_forward_problem(noisy) is not None
    assert torch.equal(torch.get_rng_state(), state)


def test_saving_a_model_with_layers_built_by_hand_says_why_it_cannot(tmp_path):
    """A model holding IncreLoRALinear layers built by hand (no inject_increlora) trains with
    create_optimizer and the controller given a config, but save_adapter said "call
    inject_increlora(model, config)", which then refused the model ("already holds IncreLoRA
    layers"): the message names the hand-built layer and the way that works."""
    from increlora_fast import save_adapter

    model = nn.Sequential(IncreLoRALinear(nn.Linear(8, 8), r_max=4), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"IncreLoRA layers built by hand \(e\.g\. '0'\).*"
                                         r"plain nn\.Linear.*inject_increlora") as info:
        save_adapter(model, tmp_path / "adapter")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="already holds IncreLoRA layers"):
        inject_increlora(model, IncreLoRAConfig(target_modules=["2"], r_max=4))


def test_saving_a_module_that_holds_an_injected_model_names_the_model_to_pass(tmp_path):
    """save_adapter or export_peft given a module that holds the injected model (an
    ``IncreLoRAAveragedModel`` of it, the README's EMA, or a user's own wrapper) said its layers
    were "built by hand" and advised building the model anew with plain nn.Linear layers; the
    message names the injected model inside, to pass instead."""
    from increlora_fast import IncreLoRAAveragedModel, save_adapter
    from increlora_fast.integrations.peft_export import export_peft

    model = inject_increlora(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)),
                             IncreLoRAConfig(target_modules=["0"], r_max=4))

    class Holder(nn.Module):  # a user's own wrapper
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

    for write in (save_adapter, export_peft):
        for holder, said in ((Holder(model), r"holds the IncreLoRA model 'net'.*pass it "
                                             r"\(model\.net\)"),
                             (IncreLoRAAveragedModel(model), r"IncreLoRAAveragedModel wrapper.*"
                                                             r"\(model\.module\)")):
            with pytest.raises(ValueError, match=said) as info:
                write(holder, tmp_path / write.__name__)
            assert "\n" not in str(info.value)
            assert not (tmp_path / write.__name__).exists()
