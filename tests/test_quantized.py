"""Quantized bases (QLoRA, issue 14 item 10): bitsandbytes Linear4bit and Linear8bitLt as targets,
on CPU (bitsandbytes >= 0.45 runs both forward and backward there; it is an optional extra).

merge_and_unload refuses quantized bases (documented there): the adapter stays unmerged."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from increlora_fast import (IncreLoRAConfig, IncreLoRAController, create_optimizer,  # noqa: E402
                            increlora_layers, inject_increlora, load_adapter, merge_and_unload,
                            save_adapter)
from increlora_fast.persistence import (BaseMismatchError, base_difference,  # noqa: E402
                                        base_fingerprint)

WIDTH = 64  # bitsandbytes' CPU 4-bit kernels want feature sizes that are multiples of 64


class QNet(nn.Module):
    """A 4-bit linear, a ReLU and an 8-bit linear, quantized from float weights of seed 0."""

    def __init__(self, kinds=("4bit", "8bit")) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_quantized(kind) for kind in kinds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 0 else layer(torch.relu(x))
        return x


def _quantized(kind: str) -> nn.Module:
    if kind == "4bit":
        return bnb.nn.Linear4bit(WIDTH, WIDTH, compute_dtype=torch.float32, quant_type="nf4")
    return bnb.nn.Linear8bitLt(WIDTH, WIDTH, has_fp16_weights=False)


def build(kinds=("4bit", "8bit"), seed: int = 0) -> QNet:
    torch.manual_seed(seed)
    floats = nn.ModuleDict({"layers": nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in kinds)})
    model = QNet(kinds)
    model.load_state_dict(floats.state_dict())
    return model.to("cpu")  # quantizes the weights


def config(n: int) -> IncreLoRAConfig:
    return IncreLoRAConfig(target_modules=[f"layers.{i}" for i in range(n)], r_max=4, init_r=1,
                           target_rank=2, init_warmup=1, incre_interval=1, top_h=1)


def trained(kinds=("4bit", "8bit"), steps: int = 4) -> QNet:
    model = build(kinds)
    cfg = config(len(kinds))
    inject_increlora(model, cfg)
    opt = create_optimizer(model, cfg, lr=1e-2)
    ctl = IncreLoRAController(model, cfg)
    x = torch.randn(8, WIDTH, generator=torch.Generator().manual_seed(1))
    for step in range(steps):
        loss = model(x).pow(2).mean() + ctl.regularization_loss()
        loss.backward()
        ctl.step(step)
        opt.step()
        opt.zero_grad()
    return model


def x_batch() -> torch.Tensor:
    return torch.randn(5, WIDTH, generator=torch.Generator().manual_seed(2))


def test_quantized_bases_are_targets_with_their_own_feature_sizes():
    model = build()
    base = model(x_batch())
    inject_increlora(model, config(2))
    layers = [layer for _, layer in increlora_layers(model)]
    assert [type(layer.base_layer).__name__ for layer in layers] == ["Linear4bit", "Linear8bitLt"]
    for layer in layers:
        assert (layer.in_features, layer.out_features) == (WIDTH, WIDTH)
        assert layer.is_quantized and layer.weight is layer.base_layer.weight
        assert layer.lora_A.dtype == torch.float32 and layer.lora_A.shape == (4, WIDTH)
    # at init only the reserve's 1e-5 lambda separates the output from the base
    torch.testing.assert_close(model(x_batch()), base, rtol=1e-4, atol=1e-5)


def test_gradients_reach_only_the_adapter_tensors():
    model = build()
    inject_increlora(model, config(2))
    model(x_batch()).pow(2).sum().backward()
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_lambda"):
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    lam = [layer.lora_lambda.grad for _, layer in increlora_layers(model)]
    assert all(bool(g.abs().sum() > 0) for g in lam)


def test_training_changes_the_output_and_save_load_round_trips(tmp_path):
    model = trained()
    x = x_batch()
    ours = model(x)
    assert not torch.allclose(ours, build()(x), atol=1e-4)
    save_adapter(model, tmp_path / "adapter")
    fresh = build()
    inject_increlora(fresh, config(2))
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(fresh(x), ours, rtol=0, atol=0)


def test_merge_and_unload_refuses_quantized_bases_and_changes_nothing():
    model = trained()
    x = x_batch()
    before = model(x)
    with pytest.raises(ValueError, match="merge_and_unload refuses quantized bases"):
        merge_and_unload(model)
    layer = model.layers[0]
    with pytest.raises(RuntimeError, match="cannot merge into a quantized Linear4bit"):
        layer.merge()
    assert not layer.merged
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_peft_loads_the_export_on_the_same_quantized_base(tmp_path, kind):
    peft = pytest.importorskip("peft")
    from increlora_fast.integrations import export_peft

    model = trained((kind,))
    x = x_batch()
    with torch.no_grad():
        ours = model(x)
        model.layers[0].adapter_enabled = False
        ours_base = model(x)
        model.layers[0].adapter_enabled = True
    export_peft(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(build((kind,)), str(tmp_path / "peft"))
    with torch.no_grad():
        theirs = loaded(x)
        with loaded.disable_adapter():
            theirs_base = loaded(x)
    # One linear: output = base + adapter, and peft's adapter must equal ours. The base part is
    # compared with peft's own: PeftModel.from_pretrained on CPU (peft 0.21, bitsandbytes 0.50)
    # quantizes the already quantized weights again while loading, which moves the base output
    # by quantization noise (checked: also with an adapter peft itself saved).
    torch.testing.assert_close(theirs - theirs_base, ours - ours_base, rtol=1e-4, atol=1e-5)
    assert float((ours - ours_base).abs().max()) > 1e-3  # the adapter is not nothing


def _tiny_4bit_llama(transformers, tmp_path):
    """A 1-layer hidden-64 Llama (seed 0) saved under ``tmp_path / "base"`` and loaded back
    with transformers' BitsAndBytesConfig in 4 bits (float32 compute), on the CPU."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True,
                                                   bnb_4bit_compute_dtype=torch.float32)
    return transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=quantization, device_map="cpu")


def test_increlora_trainer_trains_a_transformers_4bit_model(tmp_path):
    """QLoRA with the drop-in Trainer: a model loaded with BitsAndBytesConfig carries adapters
    (IncreLoRA's), yet transformers' Trainer refused it as 'purely quantized' (it only knows
    peft's), so IncreLoRATrainer could not be built."""
    transformers = pytest.importorskip("transformers")
    from increlora_fast.integrations.trainer import IncreLoRATrainer

    model = _tiny_4bit_llama(transformers, tmp_path)
    assert getattr(model, "is_quantized", False)
    cfg = IncreLoRAConfig(target_modules=["q_proj", "v_proj"], r_max=4, init_r=1,
                          target_rank=2, init_warmup=1, incre_interval=1, top_h=1)
    inject_increlora(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(3))
    args = transformers.TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=4,
                                          max_steps=3, learning_rate=1e-2, report_to=[],
                                          save_strategy="no", use_cpu=True)
    trainer = IncreLoRATrainer(model=model, args=args,
                               train_dataset=[{"input_ids": r, "labels": r} for r in ids])
    assert not getattr(model, "_hf_peft_config_loaded", False)  # marked only while checked
    trainer.train()
    changed = [n for n, p in model.named_parameters()
               if p.requires_grad and not torch.equal(p, before[n])]
    assert any(n.endswith("lora_A") for n in changed) and any(
        n.endswith("lora_lambda") for n in changed)
    assert [type(layer.base_layer).__name__ for _, layer in increlora_layers(model)] == \
        ["Linear4bit", "Linear4bit"]


def test_modules_to_save_holding_a_quantized_layer_is_refused_clearly():
    """A module to save (trained in full) whose weights are 4/8-bit data cannot train: one
    ValueError naming modules_to_save and the layer, not torch's 'only Tensors of floating point
    dtype can require gradients', and the model unchanged."""
    model = build()
    _refused_unchanged(model, "layers.0", "layers.1", r"modules_to_save.*layers\.1.*quantized")
    assert type(model.layers[0]).__name__ == "Linear4bit"


def _refused_unchanged(model: nn.Module, target: str, to_save: str, match: str) -> None:
    """`inject_increlora` with ``to_save`` in modules_to_save raises ValueError matching
    ``match``, and no parameter of ``model`` changed whether it trains."""
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    cfg = IncreLoRAConfig(target_modules=[target], r_max=4, init_r=1, target_rank=2,
                          modules_to_save=[to_save])
    with pytest.raises(ValueError, match=match):
        inject_increlora(model, cfg)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_a_checkpoint_of_the_quantized_model_before_injection_loads_into_its_base_layers():
    """Keys of the model before injection (``layers.1.weight``, the 8-bit layer's ``SCB`` and
    ``weight_format``) load into the base layers; what is left over is what bitsandbytes leaves
    over loading into the plain model (its 4-bit quant-state keys), under the base's name."""
    plain = build().state_dict()
    left_plain = build().load_state_dict(plain, strict=False).unexpected_keys
    model = inject_increlora(build(), config(2))
    result = model.load_state_dict(plain, strict=False)
    assert sorted(result.unexpected_keys) == sorted(
        key.replace("layers.0.", "layers.0.base_layer.") for key in left_plain)
    assert all(".lora_" in key or ".slot_" in key for key in result.missing_keys)
    torch.testing.assert_close(model(x_batch()), build()(x_batch()), atol=1e-4, rtol=0)


def test_modules_to_save_holding_a_4bit_layer_with_float_storage_is_refused():
    """A 4-bit layer whose packed data is stored as bfloat16 (``quant_storage``, as FSDP QLoRA
    sets it) passed the check by dtype: its packed weight was set to train "in full", got no
    gradient and was saved into the adapter as if trained. It is refused like any quantized
    layer, the model unchanged."""
    model = nn.ModuleDict({"fc": nn.Linear(WIDTH, WIDTH), "head": bnb.nn.Linear4bit(
        WIDTH, WIDTH, compute_dtype=torch.float32, quant_storage=torch.bfloat16)}).to("cpu")
    assert model["head"].weight.is_floating_point()
    _refused_unchanged(model, "fc", "head", r"modules_to_save entry 'head' holds 'head\.weight'")


def test_merge_and_unload_after_transformers_dequantize_merges_exactly(tmp_path):
    """QLoRA's way to a merged model: ``model.dequantize()`` (transformers) swaps every 4-bit
    base for a full-precision nn.Linear, under the adapters too; merging then is exact. The
    layers kept calling their bases quantized (a flag set at injection), so merge_and_unload
    refused them as 'quantized bases' and the adapter could not be merged."""
    transformers = pytest.importorskip("transformers")
    model = _tiny_4bit_llama(transformers, tmp_path)
    cfg = IncreLoRAConfig(target_modules=["q_proj", "v_proj"], r_max=4, init_r=2,
                          target_rank=2)
    inject_increlora(model, cfg)
    with torch.no_grad():
        for _, layer in increlora_layers(model):
            layer.lora_lambda.normal_()  # a trained adapter: its effect is far from nothing
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    model.dequantize()
    layers = [layer for _, layer in increlora_layers(model)]
    assert [type(layer.base_layer) for layer in layers] == [nn.Linear, nn.Linear]
    with torch.no_grad():
        unmerged = model(ids).logits
        for layer in layers:
            layer.adapter_enabled = False
        base_only = model(ids).logits
        for layer in layers:
            layer.adapter_enabled = True
    assert float((unmerged - base_only).abs().max()) > 1e-2
    merge_and_unload(model)
    assert not list(increlora_layers(model))
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-4, atol=1e-4)


def _llama_config() -> IncreLoRAConfig:
    return IncreLoRAConfig(target_modules=["q_proj", "v_proj"], r_max=4, init_r=1,
                           target_rank=2, init_warmup=1, incre_interval=1, top_h=1)


def _llama_trainer(transformers, model, tmp_path, **kwargs):
    from increlora_fast.integrations.trainer import IncreLoRATrainer

    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(3))
    args = transformers.TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=4,
                                          max_steps=3, learning_rate=1e-2, report_to=[],
                                          save_strategy="no", use_cpu=True, **kwargs)
    return IncreLoRATrainer(model=model, args=args,
                            train_dataset=[{"input_ids": r, "labels": r} for r in ids])


def test_prepare_model_for_kbit_training_after_injection_is_named_before_training(tmp_path):
    """peft's recipe calls prepare_model_for_kbit_training before adding adapters; called after
    inject_increlora it froze every adapter tensor (it freezes every parameter), and training
    then changed nothing, silently (a warning came only at the first allocation round). The
    controller now warns and create_optimizer (also the Trainer's, at train()) refuses, in one
    line naming the cause and both fixes."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = _tiny_4bit_llama(transformers, tmp_path)
    inject_increlora(model, _llama_config())
    model = peft.prepare_model_for_kbit_training(model)
    cause = r"every adapter tensor .* is frozen.*prepare_model_for_kbit_training.*before " \
            r"inject_increlora.*re-enable"
    with pytest.raises(ValueError, match=cause):
        create_optimizer(model, lr=1e-2)
    with pytest.warns(RuntimeWarning, match=cause):
        IncreLoRAController(model)
    # the Trainer warns nothing at construction (an evaluation-only Trainer over a frozen
    # model is legitimate: found by an audit, it got the controller's warning) and refuses
    # train() in one line
    with warnings.catch_warnings(record=True) as caught:  # only ours: other libraries' vary
        warnings.simplefilter("always")
        trainer = _llama_trainer(transformers, model, tmp_path)
        assert math.isfinite(trainer.evaluate(trainer.train_dataset)["eval_loss"])
    assert not [w for w in caught if "every adapter tensor" in str(w.message)]
    with pytest.raises(ValueError, match=cause):
        trainer.train()


def test_a_few_frozen_adapters_are_no_error():
    """Freezing some adapters on purpose stays legitimate: no error, no warning at setup (the
    controller tells about frozen lambdas at its first allocation round)."""
    import warnings

    model = build()
    cfg = config(2)
    inject_increlora(model, cfg)
    for name in ("lora_A", "lora_B", "lora_lambda"):
        getattr(model.layers[0], name).requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_optimizer(model, cfg, lr=1e-2)
        IncreLoRAController(model, cfg)


def test_prepare_model_for_kbit_training_before_injection_trains_with_checkpointing(tmp_path):
    """peft's QLoRA recipe: prepare_model_for_kbit_training (it freezes every parameter, turns
    on gradient checkpointing and makes the input embeddings' output require grad) and then
    the adapters. The adapters alone train, and every adapter tensor gets its gradient through
    the checkpointed layers; the Trainer trains them."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = peft.prepare_model_for_kbit_training(_tiny_4bit_llama(transformers, tmp_path))
    assert model.is_gradient_checkpointing
    inject_increlora(model, _llama_config())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1].startswith("lora_") for n in trainable)
    model.train()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0)
               for n, p in model.named_parameters() if n in trainable)
    model.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in trainable}
    _llama_trainer(transformers, model, tmp_path).train()
    assert model.is_gradient_checkpointing
    changed = [n for n in trainable if not torch.equal(model.get_parameter(n), before[n])]
    assert any(n.endswith("lora_A") for n in changed) and any(
        n.endswith("lora_lambda") for n in changed)


def test_a_base_put_under_an_adapter_after_injection_is_frozen(tmp_path):
    """transformers' ``model.dequantize()`` puts a new nn.Linear, its weight requiring grad,
    under every adapter: the adapted layers' base weights then counted as trained in full,
    so save_adapter bundled them into the adapter ("any other trainable" parameter) and
    create_optimizer trained them. A base put in place after construction is frozen like the
    one wrapped at construction."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from increlora_fast.model import saved_module_parameters

    model = _tiny_4bit_llama(transformers, tmp_path)
    inject_increlora(model, _llama_config())
    model.dequantize()
    for name, layer in increlora_layers(model):
        assert type(layer.base_layer) is nn.Linear
        assert not any(p.requires_grad for p in layer.base_layer.parameters()), name
    assert not [n for n in saved_module_parameters(model) if ".base_layer." in n]
    save_adapter(model, tmp_path / "adapter")
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert not [k for k in keys if ".base_layer." in k]
    optimizer = create_optimizer(model, lr=1e-2)
    bases = {id(layer.base_layer.weight) for _, layer in increlora_layers(model)}
    assert not [p for g in optimizer.param_groups for p in g["params"] if id(p) in bases]


def test_a_full_precision_parameter_is_not_loaded_into_quantized_data(tmp_path):
    """An adapter that carries a parameter trained outside the adapters (unfrozen by hand, or a
    layer transformers' dequantize() made trainable), loaded into a model where that layer is
    8-bit: the int8 weight has the float weight's shape, so the float values were cast into
    the quantized data without a word (garbage outputs). It is refused before anything
    changes."""
    cfg = IncreLoRAConfig(target_modules=["layers.0"], r_max=4, init_r=1, target_rank=2)
    torch.manual_seed(0)
    floats = QNet(())
    floats.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(2))
    inject_increlora(floats, cfg)
    floats.layers[1].weight.requires_grad_(True)
    save_adapter(floats, tmp_path)
    model = build()
    inject_increlora(model, cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.layers[1].weight.shape == floats.layers[1].weight.shape
    with pytest.raises(ValueError, match=r"layers\.1\.weight.*quantized.*Linear8bitLt"):
        load_adapter(model, tmp_path)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not model.layers[1].weight.requires_grad


def test_an_adapter_is_refused_on_another_quantized_base_of_the_same_shapes(tmp_path):
    """The fingerprint of a quantized base recorded its shape alone, so an adapter trained on
    one 4-bit/8-bit model loaded onto another of the same architecture (another checkpoint,
    quantized alike) without a word. It samples the dequantized values now: another base is
    refused, the same base loads."""
    save_adapter(trained(), tmp_path / "adapter")
    other = inject_increlora(build(seed=1), config(2))
    with pytest.raises(BaseMismatchError, match=r"layers\.0: its weight values differ"):
        load_adapter(other, tmp_path / "adapter")
    load_adapter(inject_increlora(build(), config(2)), tmp_path / "adapter")


@pytest.mark.parametrize("quant", ["nf4", "fp4", "nf4 nested", "nf4 bfloat16 storage", "8bit",
                                   "nf4 nested repacked"])
def test_a_quantized_fingerprint_samples_the_dequantized_weight(quant):
    """A quantized base's entry holds the values a full-precision layer holding its dequantized
    weight records, after a marker naming the quantization and before their error bounds. A 4-bit
    weight that a CPU forward in inference repacked for its AVX512-bf16 kernels (another byte
    order, a bfloat16 absmax) gives the same marker and values within the comparison's
    tolerance."""
    torch.manual_seed(0)
    float_layer = nn.Linear(WIDTH, 2 * WIDTH)
    if quant == "8bit":
        layer = bnb.nn.Linear8bitLt(WIDTH, 2 * WIDTH, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(WIDTH, 2 * WIDTH, compute_dtype=torch.float32,
                                  quant_type=quant[:3], compress_statistics="nested" in quant,
                                  quant_storage=torch.bfloat16 if "storage" in quant
                                  else torch.uint8)
    layer.load_state_dict(float_layer.state_dict())
    quantized = nn.Sequential(layer.to("cpu"))
    weight, scales = quantized[0].weight, getattr(quantized[0].weight, "SCB", None)
    quantized(torch.zeros(1, WIDTH))  # 8 bits: moves the row scales to the layer's state
    dequantized = (bnb.functional.int8_vectorwise_dequant(weight.data, scales)
                   if quant == "8bit" else
                   bnb.functional.dequantize_4bit(weight.data, weight.quant_state))
    assert not torch.equal(dequantized, float_layer.weight)
    with torch.no_grad():
        float_layer.weight.copy_(dequantized)
    cfg = IncreLoRAConfig(target_modules=["0"], r_max=4, init_r=1, target_rank=2)
    plain = base_fingerprint(inject_increlora(nn.Sequential(float_layer), cfg))["modules"]["0"]
    inject_increlora(quantized, cfg)
    if "repacked" in quant:  # by hand: injection turns bitsandbytes' own repacking off
        from bitsandbytes.functional import _convert_weight_packed_for_cpu
        weight.data, _ = _convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    entry = base_fingerprint(quantized)["modules"]["0"]
    shape, kind, values, *bounds = entry.split(":")
    # a nested weight repacked for CPU dropped its absmax's own quantization state
    assert len(bounds) == (0 if quant == "nf4 nested repacked" else 1)
    assert kind == {"8bit": "quantized-int8", "fp4": "quantized-fp4-64"}.get(
        quant, "quantized-nf4-64" + ("-nested" if "nested" in quant else ""))
    if "repacked" in quant:
        assert base_difference({"modules": {"0": f"{shape}:{values}"}},
                               {"modules": {"0": plain}}) is None
    else:
        assert f"{shape}:{values}" == plain
    assert base_difference({"modules": {"0": entry}}, {"modules": {"0": plain}}) is None
    older = {"modules": {"0": f"{shape}:quantized"}}  # saved before the values were sampled
    assert base_difference(older, {"modules": {"0": entry}}) is None


def test_a_quantized_layout_the_fingerprint_cannot_read_records_the_shape_and_saves(
        tmp_path, monkeypatch):
    """The dequantized sample reads bitsandbytes' packed layouts; a layout it does not know
    (another bitsandbytes) must not fail `save_adapter` at the end of a training run: the entry
    falls back to the shape with the ``quantized`` marker, with a warning, and still loads."""
    import increlora_fast.persistence as persistence

    def unknown_layout(*args):
        raise IndexError("a layout of another bitsandbytes")
    monkeypatch.setattr(persistence, "_quantized_sample", unknown_layout)
    model = trained()
    with pytest.warns(RuntimeWarning, match="layout is not known .*IndexError"):
        save_adapter(model, tmp_path / "adapter")
        entries = base_fingerprint(model)["modules"]
    assert entries and all(entry.endswith(":quantized") for entry in entries.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        load_adapter(inject_increlora(build(seed=1), config(2)), tmp_path / "adapter")


def _float_or_quantized(quant: str, seed: int) -> nn.Module:
    """One linear of seed ``seed``'s float weights, full precision (``quant`` "full") or
    quantized by bitsandbytes as ``quant`` names it, under an adapter."""
    torch.manual_seed(seed)
    layer = nn.Linear(WIDTH, 2 * WIDTH)
    if quant == "8bit":
        quantized = bnb.nn.Linear8bitLt(WIDTH, 2 * WIDTH, has_fp16_weights=False)
    elif quant != "full":
        quantized = bnb.nn.Linear4bit(WIDTH, 2 * WIDTH, compute_dtype=torch.float32,
                                      quant_type=quant[:3], compress_statistics="nested" in quant)
    if quant != "full":
        quantized.load_state_dict(layer.state_dict())
        layer = quantized.to("cpu")
    cfg = IncreLoRAConfig(target_modules=["0"], r_max=4, init_r=1, target_rank=2)
    return inject_increlora(nn.Sequential(layer), cfg)


@pytest.mark.parametrize("saved, loaded", [
    ("nf4", "full"), ("full", "nf4"), ("fp4", "full"), ("full", "fp4"), ("nf4 nested", "full"),
    ("full", "nf4 nested"), ("8bit", "full"), ("full", "8bit"), ("nf4", "8bit")])
def test_a_quantized_base_is_compared_with_full_precision_within_its_error(tmp_path, saved,
                                                                           loaded):
    """A quantized side against full precision (or another quantization) compared the shape
    alone, so an NF4 adapter loaded silently onto another full-precision model of the same
    shapes, and a full-precision adapter onto another quantized one. The values compare within
    the quantization's error bound now: the same weights load, other ones (several seeds) are
    refused."""
    save_adapter(_float_or_quantized(saved, seed=0), tmp_path / "adapter")
    load_adapter(_float_or_quantized(loaded, seed=0), tmp_path / "adapter")
    for seed in (1, 2, 3):
        with pytest.raises(BaseMismatchError, match=r"0: its weight values differ"):
            load_adapter(_float_or_quantized(loaded, seed=seed), tmp_path / "adapter")


def test_a_quantized_entry_without_its_error_bound_compares_the_shape_alone():
    """Entries saved before the error bound was recorded (``<shape>:<quantization>:<values>``)
    still load onto full precision of any values, as they did."""
    entry = base_fingerprint(_float_or_quantized("nf4", seed=0))["modules"]["0"]
    older = {"modules": {"0": entry.rsplit(":", 1)[0]}}
    other = base_fingerprint(_float_or_quantized("full", seed=1))
    assert base_difference({"modules": {"0": entry}}, other) == "0: its weight values differ"
    assert base_difference(older, other) is None
    assert base_difference(other, older) is None


def test_a_quantized_classifier_to_save_names_the_skip_modules_fix(tmp_path):
    """transformers quantizes a BERT classifier too; listed in modules_to_save it is refused
    (it cannot train in full), and the message names the fix, which works: loading with
    BitsAndBytesConfig(llm_int8_skip_modules=['classifier']) keeps it full precision."""
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertConfig(vocab_size=64, hidden_size=WIDTH, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=WIDTH,
                                   max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(bert).save_pretrained(tmp_path / "base")
    cfg = IncreLoRAConfig(target_modules=["query", "value"], r_max=4, init_r=1, target_rank=2,
                          modules_to_save=["classifier"])

    def loaded(**skip):
        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, **skip)
        return transformers.AutoModelForSequenceClassification.from_pretrained(
            tmp_path / "base", quantization_config=quantization, device_map="cpu")
    with pytest.raises(ValueError, match=r"'classifier'.*BitsAndBytesConfig\("
                       r"llm_int8_skip_modules=\['classifier'\]\)"):
        inject_increlora(loaded(), cfg)
    model = inject_increlora(loaded(llm_int8_skip_modules=["classifier"]), cfg)
    assert model.classifier.weight.requires_grad


def _train_updating(model, cfg, *averaged) -> torch.Tensor:
    """Three optimizer steps of ``model`` on `x_batch`, each followed by an update of every
    averaged copy; returns the batch."""
    opt = create_optimizer(model, cfg, lr=1e-2)
    x = x_batch()
    for _ in range(3):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        for each in averaged:
            each.update_parameters(model)
    return x


@pytest.mark.parametrize("average", ["ema", "ema per tensor", "swa", "swa with foreach"])
def test_an_averaged_copy_keeps_the_quantized_base_weights_as_they_are(average, monkeypatch):
    """torch's AveragedModel averages every parameter, the frozen 4-bit and 8-bit base weights
    (uint8 / int8) too: EMA computes them in float and truncates, so every update lowered some
    of their bytes and the averaged model computed with a corrupted base. The averaged copy
    takes them from the model as they are. SWA on a device with foreach kernels (CUDA, where
    bitsandbytes runs; emulated here on the CPU) failed in torch's update with "Integer
    division with addcdiv is no longer supported"."""
    import torch.optim.swa_utils as swa_utils
    from torch.optim.swa_utils import get_ema_avg_fn, get_ema_multi_avg_fn

    from increlora_fast import IncreLoRAAveragedModel

    if average == "swa with foreach":
        monkeypatch.setattr(swa_utils, "_get_foreach_kernels_supported_devices",
                            lambda: ["cpu"])

    model = build()
    cfg = config(2)
    inject_increlora(model, cfg)
    kwargs = {"ema": dict(multi_avg_fn=get_ema_multi_avg_fn(0.9)),
              "ema per tensor": dict(avg_fn=get_ema_avg_fn(0.9))}.get(average, {})
    averaged = IncreLoRAAveragedModel(model, **kwargs)
    _train_updating(model, cfg, averaged)
    quantized = [(name, p) for name, p in model.named_parameters() if not p.is_floating_point()]
    assert [name for name, _ in quantized] == ["layers.0.base_layer.weight",
                                               "layers.1.base_layer.weight"]
    mine = dict(averaged.module.named_parameters())
    for name, p in quantized:
        assert type(mine[name]) is type(p) and torch.equal(mine[name], p), name
    lora_A = mine["layers.0.lora_A"]
    assert not torch.equal(lora_A, model.layers[0].lora_A)  # the adapters are averaged


def test_an_averaged_copy_shares_the_quantized_base_and_its_state():
    """torch's AveragedModel deep-copied the 4-bit and 8-bit base weights with their
    quantization state (Params4bit.quant_state, the 8-bit linear's CB / SCB): a second
    quantized base per EMA. The copy shares them with the source, through forwards of both
    (an 8-bit linear's forward puts its state's CB into its weight), and averages the adapters
    as a full copy does."""
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    from increlora_fast import IncreLoRAAveragedModel

    model = build()
    cfg = config(2)
    inject_increlora(model, cfg)
    shared = IncreLoRAAveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    full = IncreLoRAAveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9),
                                  share_frozen=False)
    x = _train_updating(model, cfg, shared, full)
    out = shared(x)
    torch.testing.assert_close(out, full(x), rtol=0, atol=0)
    theirs = {p.data_ptr() for p in model.parameters()}
    own = [name for name, p in shared.module.named_parameters() if p.data_ptr() not in theirs]
    assert own == [name for name, p in model.named_parameters() if p.requires_grad]
    four, eight = (layer.base_layer for layer in shared.module.layers)
    assert four.weight.quant_state is model.layers[0].base_layer.weight.quant_state
    source_state = model.layers[1].base_layer.state
    assert eight.state is not source_state  # (its flags are per module)
    for key in ("CB", "SCB"):
        assert getattr(eight.state, key) is getattr(source_state, key), key
    assert eight.weight.data_ptr() == model.layers[1].base_layer.weight.data_ptr()


def test_an_averaged_copy_leaves_its_8bit_source_as_a_forward_would_find_it():
    """Making the averaged copy ran the source's first-forward set-up of its 8-bit linears
    (their CB / SCB moved from the weight into the module's state), after which bitsandbytes
    refuses to load a state dict into it ("Loading a quantized checkpoint into non-quantized
    Linear8bitLt"): a model that loaded a checkpoint before the EMA was made no longer did
    after. Both still compute as a model with no copy, whichever runs first."""
    from increlora_fast import IncreLoRAAveragedModel

    def model_8bit() -> QNet:
        model = build(("8bit",))
        inject_increlora(model, config(1))
        return model

    plain, x = model_8bit(), x_batch()
    state = {key: value.clone() for key, value in plain.state_dict().items()}
    expected = plain(x)
    for first in ("copy", "source"):
        model = model_8bit()
        copy_ = IncreLoRAAveragedModel(model)
        model.load_state_dict(state)
        order = (copy_, model) if first == "copy" else (model, copy_)
        for which in order:
            torch.testing.assert_close(which(x), expected, rtol=0, atol=0, msg=first)


def _two_4bit(bias: bool) -> nn.Module:
    """Two 4-bit linears (nf4, float32 compute) quantized from float weights of seed 0, with
    IncreLoRA on both and a trained adapter (seed 1)."""
    torch.manual_seed(0)
    floats = nn.Sequential(nn.Linear(WIDTH, WIDTH, bias=bias), nn.ReLU(),
                           nn.Linear(WIDTH, WIDTH, bias=bias))
    model = nn.Sequential(*(bnb.nn.Linear4bit(WIDTH, WIDTH, bias=bias, compute_dtype=torch.float32)
                            if isinstance(m, nn.Linear) else m for m in floats))
    model.load_state_dict(floats.state_dict())
    return model.to("cpu")


def _adapted(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    inject_increlora(model, IncreLoRAConfig(target_modules=["0", "2"], r_max=4, init_r=2,
                                            target_rank=4))
    with torch.no_grad():
        for _, layer in increlora_layers(model):
            layer.lora_B.normal_()
            layer.lora_lambda.normal_()
    return model


def _adapter_grads(model: nn.Module) -> list:
    model.train()
    model(x_batch()).pow(2).sum().backward()
    return [layer.lora_A.grad for _, layer in increlora_layers(model)]


def _inference_forward(model: nn.Module) -> None:
    model.eval()
    with torch.no_grad():
        model(x_batch())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("when", ["after injection", "before injection"])
def test_an_inference_forward_on_cpu_leaves_the_4bit_base_trainable(bias, when):
    """bitsandbytes (0.50) repacks a 4-bit weight for its AVX512-bf16 CPU kernels at its first
    forward in inference (eval mode, input without grad: a Trainer's evaluate, generate), and
    computes a repacked weight with a kernel that has no autograd: the backward of a later
    training forward through a bias-free layer was silently wrong (a 4-bit Llama's adapters
    got no gradient at all, so training changed nothing), one with a bias failed inside
    bitsandbytes ('a view of a leaf Variable that requires grad'). Injection turns the
    repacking off for the model's 4-bit layers and unpacks a weight repacked before it."""
    if not bnb.nn.Linear4bit(WIDTH, WIDTH).support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-bf16: bitsandbytes repacks nothing")
    expected = _adapter_grads(_adapted(_two_4bit(bias)))
    if when == "after injection":
        model = _adapted(_two_4bit(bias))
        _inference_forward(model)
    else:
        model = _two_4bit(bias)
        _inference_forward(model)
        assert model[0].weight.quant_state.packing_format_for_cpu
        _adapted(model)
    grads = _adapter_grads(model)
    assert all(g is not None for g in grads)
    for got, want in zip(grads, expected):
        if when == "after injection":
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        else:  # unpacked by bitsandbytes' own inverse, which keeps the absmax in bfloat16
            assert float((got - want).norm() / want.norm()) < 1e-2


def test_transformers_dequantize_after_an_inference_forward_keeps_the_outputs(tmp_path):
    """The way to a merged model (``model.dequantize()``, then merge_and_unload) after an
    evaluation: bitsandbytes had repacked the 4-bit weights at the CPU forward in inference,
    and transformers' dequantize read the repacked bytes as the plain layout, so the merged
    model computed garbage (logits off by more than their size)."""
    transformers = pytest.importorskip("transformers")
    model = _tiny_4bit_llama(transformers, tmp_path)
    inject_increlora(model, _llama_config())
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        before = model(ids).logits
        model.dequantize()
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)
