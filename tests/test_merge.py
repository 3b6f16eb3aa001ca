"""Merging: layer.merge()/unmerge() in place, and merge_and_unload back to plain base layers."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune
from transformers.pytorch_utils import Conv1D

from increlora_fast import (IncreLoRAConfig, IncreLoRALinear, increlora_layers, inject_increlora,
                            merge_and_unload)


def perturb(model: nn.Module) -> None:
    """Give every adapter random, clearly nonzero values and a mix of slot states."""
    with torch.no_grad():
        for i, (_, layer) in enumerate(increlora_layers(model)):
            layer.activate_reserve(i % 2, step=1)
            layer.add_reserve(1, step=1)
            layer.lora_A.normal_(std=0.1)
            layer.lora_B.normal_(std=0.1)
            layer.lora_lambda.normal_()


def tiny_config(**kwargs) -> IncreLoRAConfig:
    return IncreLoRAConfig(target_modules=["fc", "proj", "head"], r_max=5, init_r=1,
                           target_rank=2, lora_dropout=0.1, reserve_lambda=0.2, **kwargs)


def _adapted_14_to_10(conv1d: bool):
    """A 14 -> 10 base (nn.Linear or Conv1D) and its IncreLoRALinear with random lambdas and B
    (an adapter far from nothing)."""
    base = Conv1D(10, 14) if conv1d else nn.Linear(14, 10)
    layer = IncreLoRALinear(base, r_max=6, init_r=2, reserve_rank=2, reserve_lambda=0.1)
    with torch.no_grad():
        layer.lora_lambda.normal_()
        layer.lora_B.normal_(std=0.3)
    return base, layer


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_layer_merge_unmerge_round_trip(conv1d):
    base, layer = _adapted_14_to_10(conv1d)
    original = base.weight.detach().clone()
    layer.eval()
    x = torch.randn(3, 4, 14)
    y = layer(x)

    layer.merge()
    assert layer.merged
    expected = original + (layer.delta_weight().t() if conv1d else layer.delta_weight())
    torch.testing.assert_close(base.weight, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(base.weight, original, atol=1e-3)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()

    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(base.weight, original, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_unmerge_after_the_adapter_changed_while_merged_restores_the_base(conv1d):
    """A merged layer's A, B and lambda still change when a training loop goes on (weight
    decay, the orthogonal penalty; found by the persistence audit): unmerge subtracted the
    changed adapter, not the one merge had added, and left the base weight off (by 0.13 after 3
    steps of that audit's loop). It subtracts what merge added now, so the base comes back."""
    base, layer = _adapted_14_to_10(conv1d)
    original = base.weight.detach().clone()
    layer.merge()
    with torch.no_grad():  # what AdamW's weight decay and a penalty step do meanwhile
        layer.lora_A.mul_(0.9).add_(0.05)
        layer.lora_B.mul_(0.9)
        layer.lora_lambda.add_(0.3)
    layer.unmerge()
    torch.testing.assert_close(base.weight, original, rtol=0, atol=1e-6)
    layer.merge()  # and a merge after it adds the adapter as it is now
    expected = original + (layer.delta_weight().t() if conv1d else layer.delta_weight())
    torch.testing.assert_close(base.weight, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("adapter_dtype", ["base", "auto"])
def test_merge_on_a_float16_base_with_a_float32_lambda(adapter_dtype):
    """float16 (or float32) A and B with the float32 lambda: dW is computed in float32 and the
    merged weight is float16 dW rounding away from the unmerged layer."""
    base = nn.Linear(14, 10).half()
    original = base.weight.detach().clone()
    layer = IncreLoRALinear(base, r_max=6, init_r=2, reserve_rank=2, reserve_lambda=0.1,
                            adapter_dtype=adapter_dtype)
    with torch.no_grad():
        layer.lora_lambda.normal_()
        layer.lora_B.normal_(std=0.3)
    delta = layer.delta_weight()
    assert delta.dtype == torch.float32
    x = torch.randn(3, 14).half()
    y = layer.eval()(x)
    layer.merge()
    assert base.weight.dtype == torch.float16
    torch.testing.assert_close(base.weight, (original.float() + delta).half(), rtol=0,
                               atol=2e-3)  # two float16 roundings of values below 2
    torch.testing.assert_close(layer(x), y, rtol=1e-2, atol=1e-2)
    layer.unmerge()
    torch.testing.assert_close(base.weight, original, rtol=0, atol=2e-3)


def test_merge_and_unload_gives_plain_layers_and_same_outputs(tiny_net, tmp_path):
    reference = copy.deepcopy(tiny_net)
    model = inject_increlora(tiny_net, tiny_config())
    perturb(model)
    model.eval()
    x = torch.randn(4, 6, 12)
    y = model(x)
    assert not torch.allclose(y, reference(x), atol=1e-3)

    merged = merge_and_unload(model)
    assert merged is model
    assert not any(isinstance(m, IncreLoRALinear) for m in merged.modules())
    assert {type(merged.get_submodule(n)) for n in
            ("blocks.0.fc", "blocks.1.proj", "head")} == {nn.Linear}
    assert set(merged.state_dict()) == set(reference.state_dict())
    assert not hasattr(merged, "increlora_config")
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)
    # saving the adapter of the merged model says where it went (it said "call
    # inject_increlora", as for a model never adapted: found by the new-user audit)
    from increlora_fast import save_adapter
    from increlora_fast.integrations import export_peft
    for write in (save_adapter, export_peft):
        with pytest.raises(ValueError, match="merge_and_unload folded it into the base"):
            write(merged, tmp_path / "adapter")
    inject_increlora(merged, tiny_config())  # a new adapter over the merged model is fine
    assert merged.increlora_config is not None


def test_merge_and_unload_on_an_already_merged_layer(tiny_net):
    model = inject_increlora(tiny_net, tiny_config())
    perturb(model)
    model.eval()
    x = torch.randn(5, 12)
    y = model(x)
    model.get_submodule("blocks.0.fc").merge()
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
    merged = merge_and_unload(model)
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_conv1d():
    model = nn.Sequential(Conv1D(16, 8), nn.GELU(), Conv1D(8, 16))
    reference = copy.deepcopy(model)
    model = inject_increlora(model, IncreLoRAConfig(target_modules=["0", "2"], r_max=4,
                                                    target_rank=2, reserve_lambda=0.3))
    perturb(model)
    x = torch.randn(3, 7, 8)
    y = model(x)
    assert not torch.allclose(y, reference(x), atol=1e-3)
    merged = merge_and_unload(model)
    assert type(merged[0]) is Conv1D and type(merged[2]) is Conv1D
    assert merged[0].weight.shape == reference[0].weight.shape
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_refuses_a_base_weight_tied_to_another_module():
    """An adapted lm_head tied to the input embedding (found by an audit: merging added the
    adapter to the embedding too, and the merged model's logits moved by about 3)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40,
                                       n_positions=16, bos_token_id=0, eos_token_id=0)).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    inject_increlora(model, IncreLoRAConfig(target_modules=["lm_head", "c_attn"], r_max=4,
                                            target_rank=2))
    perturb(model)
    embedding = model.transformer.wte.weight.detach().clone()
    with pytest.raises(ValueError, match=r"tied base weights \(lm_head with transformer\.wte"):
        merge_and_unload(model)
    assert torch.equal(model.transformer.wte.weight, embedding)
    assert not any(layer.merged for _, layer in increlora_layers(model))
    assert isinstance(model.lm_head, IncreLoRALinear)


def test_merge_and_unload_replaces_a_layer_under_every_name():
    """A module registered under two names is injected under both (`inject_increlora`), so it
    is unloaded under both (found by an audit: the second name kept the merged wrapper)."""
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.again = self.fc

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.again(torch.relu(self.fc(x)))

    torch.manual_seed(0)
    model = inject_increlora(Shared(), IncreLoRAConfig(target_modules=["fc"], r_max=4,
                                                       target_rank=2))
    assert model.again is model.fc
    perturb(model)
    x = torch.randn(3, 8)
    y = model(x)
    merge_and_unload(model)
    assert type(model.fc) is nn.Linear and model.again is model.fc
    assert not any(isinstance(m, IncreLoRALinear) for m in model.modules())
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


def _tiny_lm(family: str, tie: bool) -> nn.Module:
    """A one- or two-layer causal LM whose ``lm_head`` is (or is not) tied to the embedding."""
    import transformers

    torch.manual_seed(0)
    if family == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0,
            eos_token_id=0, tie_word_embeddings=tie)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=tie)).eval()


_EMBEDDING = {"gpt2": "transformer.wte", "llama": "model.embed_tokens"}
_ATTENTION = {"gpt2": "c_attn", "llama": "q_proj"}


def _inject_lm(family: str, tie: bool) -> nn.Module:
    model = _tiny_lm(family, tie)
    inject_increlora(model, IncreLoRAConfig(target_modules=["lm_head", _ATTENTION[family]],
                                            r_max=4, target_rank=2))
    perturb(model)
    return model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_layer_merge_refuses_a_base_weight_tied_to_another_module(family):
    """``layer.merge()`` on an adapted lm_head tied to the input embedding (found by an audit:
    only merge_and_unload refused; merge() added the adapter to the embedding too)."""
    model = _inject_lm(family, tie=True)
    embedding = model.get_submodule(_EMBEDDING[family]).weight
    assert model.lm_head.base_layer.weight is embedding
    before = embedding.detach().clone()
    with pytest.raises(ValueError) as error:
        model.lm_head.merge()
    message = str(error.value)
    assert "\n" not in message
    assert "'lm_head'" in message and f"'{_EMBEDDING[family]}'" in message
    assert "untie" in message
    assert torch.equal(embedding, before) and not model.lm_head.merged
    # an untied layer of the same model merges as before
    other = next(layer for name, layer in increlora_layers(model) if name != "lm_head")
    other.merge()
    assert other.merged


def test_layer_merge_refuses_a_tie_made_after_injection():
    """The tie is looked up in the model at merge time, not only recorded at injection."""
    model = _inject_lm("gpt2", tie=False)
    model.lm_head.base_layer.weight = model.transformer.wte.weight
    before = model.transformer.wte.weight.detach().clone()
    with pytest.raises(ValueError, match=r"'lm_head'.*'transformer\.wte'"):
        model.lm_head.merge()
    assert torch.equal(model.transformer.wte.weight, before) and not model.lm_head.merged


def test_layer_merge_after_untying_merges_exactly():
    """A weight tied at injection and untied (given its own copy) before merging merges as an
    untied one does: the live model decides, not the record of the injection."""
    model = _inject_lm("gpt2", tie=True)
    head = model.lm_head
    head.base_layer.weight = nn.Parameter(head.base_layer.weight.detach().clone(),
                                          requires_grad=False)
    embedding = model.transformer.wte.weight.detach().clone()
    expected = head.base_layer.weight.detach() + head.delta_weight()
    head.merge()
    assert torch.equal(head.base_layer.weight, expected)
    assert torch.equal(model.transformer.wte.weight, embedding)


def test_layer_unmerge_refuses_a_tie_made_after_merging():
    """unmerge() also writes into the base weight in place: refused on a tied weight."""
    model = _inject_lm("gpt2", tie=False)
    model.lm_head.merge()
    model.lm_head.base_layer.weight = model.transformer.wte.weight
    before = model.transformer.wte.weight.detach().clone()
    with pytest.raises(ValueError, match=r"cannot unmerge .*'lm_head'.*'transformer\.wte'"):
        model.lm_head.unmerge()
    assert torch.equal(model.transformer.wte.weight, before) and model.lm_head.merged


def test_layer_merge_refuses_a_tie_in_a_copied_or_pickled_model():
    """A deep copy (or a pickled model) of a tied model keeps its tie and the record of it,
    and still pickles: the reference to the model is dropped from the copy."""
    import io

    model = _inject_lm("gpt2", tie=True)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert twin.lm_head.base_layer.weight is twin.transformer.wte.weight
        before = twin.transformer.wte.weight.detach().clone()
        with pytest.raises(ValueError, match=r"'lm_head'.*'transformer\.wte'"):
            twin.lm_head.merge()
        assert torch.equal(twin.transformer.wte.weight, before)


def test_tie_weights_after_injection_ties_the_adapted_lm_heads_base():
    """transformers' ``tie_weights`` assigns ``lm_head.weight``: on an adapted lm_head that sets
    its base layer's weight, so the base is tied again and the adapter stays (before, nn.Module
    refused: "attribute 'weight' already exists"); an in-place merge is then refused as for any
    tied base. A weight of another shape is refused: the adapter cannot follow it."""
    import transformers

    from increlora_fast import IncreLoRAConfig, inject_increlora
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16))
    inject_increlora(model, IncreLoRAConfig(target_modules=["c_attn", "lm_head"], r_max=4,
                                            init_r=1, modules_to_save=[]))
    head = model.lm_head
    head.base_layer.weight = nn.Parameter(head.base_layer.weight.detach().clone(),
                                          requires_grad=False)  # untied
    model.tie_weights()
    assert head.base_layer.weight is model.transformer.wte.weight
    assert head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 40, (2, 5))
    assert model(input_ids=ids).logits.shape == (2, 5, 40)
    with pytest.raises(ValueError, match="tied"):
        head.merge()
    # a weight of another shape (another vocabulary size): refused, the base left as it was
    with pytest.raises(ValueError, match=r"IncreLoRALinear\.weight: a \(48, 16\) tensor"):
        head.weight = nn.Parameter(torch.zeros(48, 16), requires_grad=False)
    assert tuple(head.base_layer.weight.shape) == (40, 16)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_forward_after_resize_token_embeddings_on_a_tied_head_names_the_cause(family):
    """``resize_token_embeddings`` after injection swaps the tied tensor under an adapted
    lm_head (no setter sees it); its next forward failed deep in the adapter's matmul ("Bad
    in-place call ... [.., 48] ... [.., 40]"). It now says which layer, both shapes and what
    to do, in one line; another failure of a forward is left as it was."""
    model = _inject_lm(family, tie=True)
    ids = torch.randint(0, 40, (2, 5))
    with pytest.raises(RuntimeError):  # not this layer's shapes: torch's own error, unchanged
        model.lm_head(torch.randn(2, 5, 17))
    model.resize_token_embeddings(48, mean_resizing=False)
    with pytest.raises(ValueError) as error:
        model(input_ids=ids)
    message = str(error.value)
    assert "\n" not in message and "'lm_head'" in message
    assert "(48, 16)" in message and "(40, 16)" in message
    assert "resize before inject_increlora" in message
    assert isinstance(error.value.__cause__, RuntimeError)  # the original failure, kept


class _Doubled(nn.Module):
    """A weight parametrization: the layer computes with twice its stored weight."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * 2.0


def _derive_weight(linear: nn.Linear, kind: str) -> None:
    """Make ``linear.weight`` a tensor computed from others on every forward."""
    if kind == "parametrize":
        parametrize.register_parametrization(linear, "weight", _Doubled())
    elif kind == "weight_norm":
        torch.nn.utils.parametrizations.weight_norm(linear)
    elif kind == "old_weight_norm":
        torch.nn.utils.weight_norm(linear)
    elif kind == "spectral_norm":
        torch.nn.utils.spectral_norm(linear)
    else:
        prune.random_unstructured(linear, "weight", amount=0.3)


DERIVED = ["parametrize", "weight_norm", "old_weight_norm", "spectral_norm", "prune"]


@pytest.mark.filterwarnings("ignore:.*weight_norm.* is deprecated:FutureWarning")
@pytest.mark.parametrize("kind", DERIVED)
@pytest.mark.parametrize("how", ["merge_and_unload", "layer_merge"])
def test_merging_into_a_weight_computed_from_other_tensors_is_refused(tiny_net, kind, how):
    """A parametrized (weight_norm, spectral_norm, pruned) base recomputes its weight from other
    tensors on every forward, so an adapter added to it in place was silently lost (found by
    an audit); merging it is refused naming the layer, and the adapter still trains."""
    torch.manual_seed(0)
    model = tiny_net
    _derive_weight(model.head, kind)
    inject_increlora(model, tiny_config())
    perturb(model)
    model.eval()
    x = torch.randn(3, 4, 12)
    with torch.no_grad():
        expected = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as error:
        merge_and_unload(model) if how == "merge_and_unload" else model.head.merge()
    message = str(error.value)
    assert "\n" not in message and "'head'" in message and "remove" in message
    assert all(not layer.merged for _, layer in increlora_layers(model))
    assert isinstance(model.head, IncreLoRALinear)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    model.train()
    model(x).pow(2).mean().backward()
    assert model.head.lora_lambda.grad is not None
    assert bool(model.head.lora_lambda.grad.any())


@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel], ids=["compiled", "DataParallel"])
def test_inject_and_merge_through_a_wrapper_keep_the_config_on_the_model(tiny_net, wrap,
                                                                       tmp_path):
    """inject_increlora(nn.DataParallel(model)) put ``increlora_config`` on the wrapper, so
    save_adapter (which saves the wrapped model) said the model had no adapter; and
    merge_and_unload of a wrapper left the model's config behind, so the merged model was
    refused by a new inject_increlora as "already" adapted. Both act on the wrapped model."""
    from increlora_fast import save_adapter
    from increlora_fast.model import unwrapped
    wrapper = wrap(tiny_net)
    assert inject_increlora(wrapper, tiny_config()) is wrapper
    assert unwrapped(wrapper).increlora_config is not None
    assert {name for name, _ in increlora_layers(tiny_net)} == {
        "blocks.0.fc", "blocks.0.proj", "blocks.1.fc", "blocks.1.proj", "head"}
    save_adapter(wrapper, tmp_path / "adapter")
    perturb(tiny_net)
    tiny_net.eval()
    x = torch.randn(4, 6, 12)
    y = tiny_net(x)
    merged = wrap(tiny_net)
    assert merge_and_unload(merged) is merged
    assert not hasattr(tiny_net, "increlora_config")
    assert not any(isinstance(m, IncreLoRALinear) for m in tiny_net.modules())
    torch.testing.assert_close(tiny_net(x), y, rtol=1e-5, atol=1e-5)
    inject_increlora(tiny_net, tiny_config())  # a plain model again


def test_merge_and_unload_of_a_module_holding_the_model_drops_the_models_config(tiny_net,
                                                                               tmp_path):
    """merge_and_unload of a module that holds the injected model (a user's own wrapper, or
    ``IncreLoRAAveragedModel``) merged every layer but left ``increlora_config`` on the model
    inside, so save_adapter on that model wrote an adapter with no layers (which load_adapter
    then refused as missing every tensor), export_peft failed with "max() arg is an empty
    sequence", and a new inject_increlora was refused as "already" adapted."""
    from increlora_fast import IncreLoRAAveragedModel, save_adapter
    from increlora_fast.integrations.peft_export import export_peft

    class Holder(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

    for make_holder in (Holder, IncreLoRAAveragedModel):
        model = inject_increlora(copy.deepcopy(tiny_net), tiny_config())
        holder = make_holder(model)
        inner = holder.module if isinstance(holder, IncreLoRAAveragedModel) else model
        merge_and_unload(holder)
        assert not any(isinstance(m, IncreLoRALinear) for m in inner.modules())
        for write in (save_adapter, export_peft):
            with pytest.raises(ValueError, match="merge_and_unload folded it"):
                write(inner, tmp_path / write.__name__)
            assert not (tmp_path / write.__name__).exists()
        inject_increlora(inner, tiny_config())  # a plain model again
