"""Decoding on the Triton path (INCRELORA_BACKEND=triton, the CUDA default): `model.generate`'s
one-token decode steps send (batch, in) inputs of 1 to 3 rows through the kernels, after a
prefill of (batch * prompt length) rows; every step's logits equal the torch path's.

On CPU the kernels run under the Triton interpreter (conftest), with 64-wide tiles
(`whole_loop_tiles`); on CUDA compiled. No bug was found here (the generation audit).
"""
from __future__ import annotations

import pytest
import torch

from increlora_fast import IncreLoRAConfig, increlora_layers, inject_increlora
from increlora_fast.kernels import launch_counts, reset_launch_counts
from test_generate import FAMILIES, PAD, fresh_base, prompts

NEW = 3  # tokens: one prefill and two decode steps
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def _adapted(family: str, device: str):
    """The family's tiny model with an adapter set by hand: active and reserve slots, lambdas
    (one at a visible reserve lambda) and A, B large enough to change greedy tokens."""
    model = fresh_base(family)
    inject_increlora(model, IncreLoRAConfig(target_modules=TARGETS[family], r_max=5, init_r=1,
                                            target_rank=3, lora_alpha=8.0, reserve_lambda=0.5))
    with torch.no_grad():
        for i, (_, layer) in enumerate(increlora_layers(model)):
            layer.activate_reserve(i % 2 + 1, step=1)
            layer.add_reserve(1, step=1)
            layer.lora_A.normal_(std=0.3)
            layer.lora_B.normal_(std=0.3)
            layer.lora_lambda.normal_()
    return model.to(device).eval()


def _generate(model, rows: int, device: str):
    ids, mask = prompts(rows)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                         max_new_tokens=NEW, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=PAD, eos_token_id=None)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.usefixtures("whole_loop_tiles")
@pytest.mark.parametrize("family, rows, fused", [
    ("llama", 1, False), ("llama", 3, True), ("gpt2", 2, False)])
def test_decode_steps_on_the_kernels_match_the_torch_path(family, rows, fused, monkeypatch,
                                                           kernel_device):
    assert family in FAMILIES
    model = _adapted(family, kernel_device)
    monkeypatch.setenv("INCRELORA_BACKEND", "torch")
    expected = _generate(model, rows, kernel_device)
    assert not torch.equal(expected[0], _generate(fresh_base(family).to(kernel_device), rows,
                                                  kernel_device)[0])  # the adapter matters
    monkeypatch.setenv("INCRELORA_BACKEND", "triton")
    monkeypatch.setenv("INCRELORA_FUSED_LINEAR", "1" if fused else "0")
    monkeypatch.setenv("INCRELORA_KERNEL_CHECK", "0")  # (tested apart) its launches uncounted
    reset_launch_counts()
    got = _generate(model, rows, kernel_device)
    calls = NEW * len(list(increlora_layers(model)))  # every layer at every step
    counts = launch_counts()
    assert counts.get("_project_kernel") == calls, counts
    assert counts.get("_fused_linear_adapter_kernel" if fused else "_expand_kernel") == calls, \
        counts
    assert torch.equal(got[0], expected[0])
    # float32 throughout; on a GPU the kernels' dots may take TF32 inputs (checks.py: 1e-4
    # relative), the interpreter never does (measured 9e-8 here)
    tol = 1e-3 if kernel_device == "cuda" else 1e-5
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=tol)


@pytest.mark.usefixtures("whole_loop_tiles")
@pytest.mark.parametrize("fused", [False, True])
def test_decode_steps_at_odd_widths_and_sixteen_slots_match_the_torch_path(fused, monkeypatch,
                                                                           kernel_device):
    """One-token decode steps of a Llama with odd widths (36 hidden, 18 per k/v projection,
    51 in the MLP) through every linear, r_max 16 with half the slots inactive: the kernels'
    tokens and logits, also under inference_mode, equal the torch path's."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(7)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=36, intermediate_size=51, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        pad_token_id=PAD))
    inject_increlora(model, IncreLoRAConfig(target_modules="all-linear", r_max=16, init_r=2,
                                            target_rank=8, lora_alpha=8.0, reserve_lambda=0.5))
    with torch.no_grad():
        for i, (_, layer) in enumerate(increlora_layers(model)):
            layer.activate_reserve(i % 2 + 1, step=1)
            layer.add_reserve(2, step=1)
            layer.lora_A.normal_(std=0.3)
            layer.lora_B.normal_(std=0.3)
            layer.lora_lambda.normal_()
    model = model.to(kernel_device).eval()
    assert all(int((layer.slot_state == 0).sum()) >= 8 for _, layer in increlora_layers(model))
    monkeypatch.setenv("INCRELORA_BACKEND", "torch")
    expected = _generate(model, 3, kernel_device)
    monkeypatch.setenv("INCRELORA_BACKEND", "triton")
    monkeypatch.setenv("INCRELORA_FUSED_LINEAR", "1" if fused else "0")
    monkeypatch.setenv("INCRELORA_KERNEL_CHECK", "0")
    reset_launch_counts()
    got = _generate(model, 3, kernel_device)
    assert launch_counts().get("_project_kernel") == NEW * len(list(increlora_layers(model)))
    with torch.inference_mode():
        got_inference = _generate(model, 3, kernel_device)
    tol = 1e-3 if kernel_device == "cuda" else 1e-5
    for tokens, logits in (got, got_inference):
        assert torch.equal(tokens, expected[0])
        torch.testing.assert_close(logits, expected[1], rtol=0, atol=tol)
