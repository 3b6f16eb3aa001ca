"""`static_positions.cache_relative_positions`: DeBERTa's relative positions computed once per
training shape give the encoder's own results, so its step has no host-to-device copy left for
a CUDA capture to refuse (the H200's graphed DeBERTa-v3 step failed there, 2026-12-05)."""
from __future__ import annotations

import pytest
import torch

from increlora_fast.training.static_positions import cache_relative_positions

transformers = pytest.importorskip("transformers")


def _deberta(version: int):
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=32, relative_attention=True,
                  pos_att_type=["p2c", "c2p"], num_labels=2, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    if version == 2:
        config = transformers.DebertaV2Config(position_buckets=8, norm_rel_ebd="layer_norm",
                                              share_att_key=True, **common)
        return transformers.DebertaV2ForSequenceClassification(config)
    return transformers.DebertaForSequenceClassification(transformers.DebertaConfig(**common))


def _module(version: int):
    if version == 2:
        from transformers.models.deberta_v2 import modeling_deberta_v2 as module
    else:
        from transformers.models.deberta import modeling_deberta as module
    return module


def _logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    logits.square().sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None}


@pytest.mark.parametrize("version", [1, 2])
def test_cached_positions_give_the_encoders_own_results(version, monkeypatch):
    """Bit for bit the same logits and gradients with the cache; the positions are built once
    per training sequence length, and again in every eval-mode forward."""
    module = _module(version)
    builds = []
    real = module.build_relative_position
    monkeypatch.setattr(module, "build_relative_position",
                        lambda *a, **k: builds.append(a[0].shape[-2]) or real(*a, **k))
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    plain, cached = _deberta(version), _deberta(version)
    handles = cache_relative_positions(cached)
    assert len(handles) == 1  # the one encoder
    for model in (plain, cached):
        model.train()
    want = [_logits_and_grads(plain, ids) for _ in range(2)]
    builds.clear()
    got = [_logits_and_grads(cached, ids) for _ in range(2)]
    assert builds == [12]  # once, at the first forward
    for (logits, grads), (ref_logits, ref_grads) in zip(got, want):
        assert torch.equal(logits, ref_logits) and grads.keys() == ref_grads.keys()
        assert all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)
    _logits_and_grads(cached, ids[:, :7])  # another length: built once for it
    assert builds == [12, 7]
    cached.eval()
    with torch.no_grad():
        cached(input_ids=ids)
    assert builds[2:] and all(n == 12 for n in builds[2:])  # eval mode builds its own
    for handle in handles:
        handle.remove()


def test_other_models_get_no_hook():
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32)
    assert cache_relative_positions(transformers.BertModel(config)) == []


@pytest.mark.parametrize("version", [1, 2])
def test_installing_the_cache_again_adds_no_hook(version):
    """A second runner built on the same model (or a finetune set up again) installs the cache
    again: each encoder keeps its one hook and cache (the same handles come back), and once
    removed it can be installed anew."""
    model = _deberta(version)
    encoder = next(m for m in model.modules() if hasattr(m, "get_rel_pos"))
    first = cache_relative_positions(model)
    again = cache_relative_positions(model)
    assert [h.id for h in again] == [h.id for h in first]
    assert len(encoder._forward_pre_hooks) == 1
    for handle in first:
        handle.remove()
    assert len(encoder._forward_pre_hooks) == 0
    anew = cache_relative_positions(model)
    assert len(anew) == 1 and len(encoder._forward_pre_hooks) == 1
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(
        int(torch.randint(0, 2**31, ()))))
    model.train()
    want = _logits_and_grads(_deberta(version).train(), ids)
    got = _logits_and_grads(model, ids)
    assert torch.equal(got[0], want[0])
