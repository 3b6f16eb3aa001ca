"""Causal LMs after IncreLoRA training, used for generation: `model.generate` with the adapters
on gives the tokens and logits of the same model with the adapter merged (`merge_and_unload`),
added to the base weights by hand from the slot tensors, saved and loaded into a fresh model,
and loaded by peft from `export_peft`; with and without the KV cache, on left-padded prompts of
different lengths; decode steps follow one forward over the whole sequence and make no more host
reads and keep no more tensors than the base model's; and generation changes nothing in the
adapters, the controller or a training run it interrupts.

No bug was found here (two generation audits); these tests keep what they checked. The Triton
path's one-token decode steps are in `test_generate_triton.py`.
"""
from __future__ import annotations

import copy
import functools
import gc

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, OPTConfig, OPTForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

from increlora_fast import (IncreLoRAConfig, IncreLoRAController, SlotState, create_optimizer,
                            increlora_layers, inject_increlora, load_adapter, merge_and_unload,
                            save_adapter)
from host_reads import HostReads

VOCAB = 64
PAD = 0
# float32 logits of the same computation in another association order (a merged weight, a
# peft adapter, the KV cache): measured up to 5e-7 on these models' logits of magnitude ~1
TOL32 = dict(rtol=0, atol=1e-5)
# bf16 weights and activations against the float32 model, teacher-forced on the same tokens
# (logits up to 0.4): the large test adapter drives hidden states to ~27, where bf16's spacing
# is 0.125, and the final norm carries that into the logits; measured max 0.035, mean 1.6e-3
# (the adapter moves logits by ~0.5, so a dropped adapter fails both)
TOL_BF16 = dict(rtol=0, atol=0.1)
TOL_BF16_MEAN = 5e-3


def _llama():
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=2))


def _gpt2():  # Conv1D layers
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                      n_positions=64, pad_token_id=PAD, bos_token_id=1,
                                      eos_token_id=2))


def _opt():
    return OPTForCausalLM(OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=PAD, bos_token_id=1,
        eos_token_id=2))


def _qwen2():  # the lm_head tied to the embedding
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, pad_token_id=PAD, bos_token_id=1, eos_token_id=2))


def _mistral():
    return MistralForCausalLM(MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=2))


FAMILIES = {"llama": _llama, "gpt2": _gpt2, "opt": _opt, "qwen2": _qwen2, "mistral": _mistral}


def fresh_base(family: str):
    torch.manual_seed(7)
    return FAMILIES[family]().eval()


def trained(family: str, steps: int = 5, targets="all-linear", **config):
    """The family's tiny model after ``steps`` steps of the README's plain loop (allocation
    rounds from step 2 on, so ranks differ and reserves compute), then with A and B drawn large
    enough that the adapter changes greedy tokens."""
    model = fresh_base(family)
    config = IncreLoRAConfig(**{**dict(
        target_modules=targets, r_max=5, init_r=1, target_rank=3, incre_rank_num=1,
        init_warmup=1, incre_interval=1, top_h=1, lora_alpha=8.0, reserve_lambda=0.5),
        **config})
    inject_increlora(model, config)
    model.train()
    optimizer = create_optimizer(model, config, lr=2e-2)
    controller = IncreLoRAController(model, config)
    train_steps(model, optimizer, controller, range(steps))
    with torch.no_grad():
        for _, layer in increlora_layers(model):
            layer.lora_A.normal_(std=0.3)
            layer.lora_B.normal_(std=0.3)
    return model.eval(), optimizer, controller


@functools.lru_cache(maxsize=None)
def trained_for_generation(family: str):
    """`trained` with its defaults, once per family (the tests only read it; those that change
    a model change a deep copy)."""
    model, _, controller = trained(family)
    return model, controller.rank_pattern()


def train_steps(model, optimizer, controller, steps) -> None:
    for step in steps:
        ids = torch.randint(3, VOCAB, (4, 10), generator=torch.Generator().manual_seed(500 + step))
        loss = model(input_ids=ids, labels=ids).loss + controller.regularization_loss()
        loss.backward()
        controller.step(step)
        optimizer.step()
        optimizer.zero_grad()


def prompts(rows: int = 3):
    """Left-padded prompts of lengths 4, 6 and 2, and their attention mask."""
    ids = torch.tensor([[PAD, PAD, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14],
                        [PAD, PAD, PAD, PAD, 20, 21]])[:rows]
    return ids, (ids != PAD).long()


def generate(model, use_cache: bool = True, new: int = 8):
    """(sequences, logits of every step (rows, new, vocab)) of greedy decoding."""
    ids, mask = prompts()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                         do_sample=False, use_cache=use_cache, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=PAD, eos_token_id=None)
    return out.sequences, torch.stack(out.logits, 1)


def assert_same_generation(got, expected, tol=TOL32) -> None:
    assert torch.equal(got[0], expected[0]), (got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], **tol)


def merged_by_hand(family: str, model):
    """The fresh base with ``B diag(lam_eff) A`` added to each adapted weight, lam_eff from the
    slot states as the spec defines it (lambda on active slots, the reserve lambda on reserve
    ones, 0 on inactive ones, times alpha / active rank): no library code computes it."""
    reference = fresh_base(family)
    with torch.no_grad():
        for name, layer in increlora_layers(model):
            state = layer.slot_state.long()
            active = state == SlotState.ACTIVE
            lam = torch.where(active, layer.lora_lambda,
                              (state == SlotState.RESERVE).float() * layer.reserve_lambda)
            lam = lam * layer.lora_alpha / active.sum()
            delta = layer.lora_B @ torch.diag(lam) @ layer.lora_A
            base = reference.get_submodule(name)
            base.weight += delta.t() if family == "gpt2" else delta
    return reference


def snapshot(model, controller):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
             for k, v in controller.state_dict().items()})


def assert_unchanged(before, after) -> None:
    for part_before, part_after in zip(before, after):
        assert part_before.keys() == part_after.keys()
        for k, v in part_before.items():
            w = part_after[k]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, k


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generate_matches_merged_by_hand_and_peft(family, tmp_path):
    peft = pytest.importorskip("peft")
    from increlora_fast.integrations import export_peft
    model, ranks = trained_for_generation(family)
    layers = dict(increlora_layers(model))
    assert len(set(ranks.values())) > 1  # ranks grew unevenly
    assert any(bool(l.reserve_mask.any()) for l in layers.values())  # reserves compute
    ours = generate(model)
    base_tokens = generate(fresh_base(family))
    assert not torch.equal(ours[0], base_tokens[0])  # the adapter changes greedy tokens
    assert_same_generation(generate(model, use_cache=False), ours)
    with torch.inference_mode():
        assert_same_generation(generate(model), ours)
    assert_same_generation(generate(merged_by_hand(family, model)), ours)
    assert_same_generation(generate(merge_and_unload(copy.deepcopy(model))), ours)
    export_peft(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(fresh_base(family), str(tmp_path)).eval()
    assert_same_generation(generate(loaded), ours)


def full_forward_logits(model, sequences):
    """Each position's next-token logits of one forward over the whole left-padded
    ``sequences`` (prompt and generated tokens), with the positions `generate` gives them."""
    ids, mask = prompts()
    mask = torch.cat([mask, torch.ones(len(ids), sequences.shape[1] - ids.shape[1],
                                       dtype=mask.dtype)], 1)
    with torch.no_grad():
        return model(input_ids=sequences, attention_mask=mask,
                     position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "mistral"])
def test_generate_after_save_and_load_matches_and_decode_follows_the_full_forward(family,
                                                                                   tmp_path):
    """The adapter saved and loaded into a fresh model generates the same tokens and logits,
    with and without the KV cache; each decode step's logits equal those of one forward over
    the whole sequence."""
    model, _ = trained_for_generation(family)
    ours = generate(model)
    full = full_forward_logits(model, ours[0])
    torch.testing.assert_close(full[:, prompts()[0].shape[1] - 1:-1], ours[1], **TOL32)
    save_adapter(model, tmp_path)
    fresh = fresh_base(family)
    inject_increlora(fresh, model.increlora_config)
    load_adapter(fresh, tmp_path)
    fresh.eval()
    assert_same_generation(generate(fresh), ours)
    assert_same_generation(generate(fresh, use_cache=False), ours)


def test_generate_with_a_tied_lm_head_adapted_matches_save_load_and_peft(tmp_path):
    """Qwen2's lm_head, tied to the embedding, adapted: the adapter changes greedy tokens, the
    KV cache, a saved and loaded adapter and peft's model from `export_peft` agree; merging is
    refused (it would change the embedding too)."""
    peft = pytest.importorskip("peft")
    from increlora_fast.integrations import export_peft
    model, _, _ = trained("qwen2", targets=["q_proj", "v_proj", "down_proj", "lm_head"])
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.weight
    ours = generate(model)
    assert not torch.equal(ours[0], generate(fresh_base("qwen2"))[0])
    assert_same_generation(generate(model, use_cache=False), ours)
    with pytest.raises(ValueError, match="tied"):
        merge_and_unload(copy.deepcopy(model))
    save_adapter(model, tmp_path / "ours")
    fresh = fresh_base("qwen2")
    inject_increlora(fresh, model.increlora_config)
    load_adapter(fresh, tmp_path / "ours")
    assert_same_generation(generate(fresh.eval()), ours)
    export_peft(model, tmp_path / "peft")
    with pytest.warns(UserWarning, match="tie"):  # peft's note on tied layers
        loaded = peft.PeftModel.from_pretrained(fresh_base("qwen2"), str(tmp_path / "peft"))
    assert_same_generation(generate(loaded.eval()), ours)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_decode_steps_read_and_keep_no_more_than_the_base_model(mode):
    """50 one-token decode steps under no_grad or inference_mode: no autograd graph, no score
    buffer touched, as many host reads per step as the base model makes, and as many live
    tensors after the 50th step as after the 5th (nothing kept per call)."""
    HostReads.self_check()
    model, _ = trained_for_generation("llama")

    def decode(net):
        ids, mask = prompts()
        reads, live = [], []
        with mode():
            out = net(input_ids=ids, attention_mask=mask, use_cache=True)
            for step in range(50):
                mask = torch.cat([mask, torch.ones(len(ids), 1, dtype=mask.dtype)], 1)
                with HostReads() as counter:
                    out = net(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=mask,
                              past_key_values=out.past_key_values, use_cache=True)
                reads.append(len(counter))
                assert out.logits.grad_fn is None and not out.logits.requires_grad
                if step in (4, 49):
                    gc.collect()
                    live.append(sum(1 for o in gc.get_objects() if torch.is_tensor(o)))
        return reads, live

    layers = [layer for _, layer in increlora_layers(model)]
    scores = [layer.score_sum.clone() for layer in layers]
    base_reads, _ = decode(fresh_base("llama"))
    reads, live = decode(model)
    assert reads == base_reads, (reads, base_reads)
    assert live[0] == live[1], live
    assert all(torch.equal(s, layer.score_sum) and layer.score_grad is None
               for s, layer in zip(scores, layers))


def test_generate_changes_nothing_and_leaves_the_training_trajectory_alone():
    """Generating between training steps (eval, generate, train again), also inside the score
    window before a round, changes no parameter, buffer (slot states, score accumulators) or
    controller state, draws no random numbers, and the run goes on as one without it."""
    def run(interleave: bool):
        model, optimizer, controller = trained(
            "llama", steps=0, targets=["q_proj", "v_proj", "down_proj"], target_rank=4,
            init_warmup=2, incre_interval=2, lora_dropout=0.1)
        model.train()
        for step in range(8):
            train_steps(model, optimizer, controller, [step])
            if interleave and step in (2, 3, 5):
                before, rng = snapshot(model, controller), torch.get_rng_state()
                if step == 3:  # the score window of the round at step 4 is open
                    assert any(layer.score_enabled for _, layer in increlora_layers(model))
                model.eval()
                generate(model, new=3)
                generate(model, use_cache=False, new=3)
                model.train()
                assert_unchanged(before, snapshot(model, controller))
                assert torch.equal(torch.get_rng_state(), rng)
        return model.state_dict(), controller

    (plain, c1), (interleaved, c2) = run(False), run(True)
    assert c1.allocation_log and c1.rank_pattern() == c2.rank_pattern()
    assert torch.equal(c1.ipt, c2.ipt)
    assert all(torch.equal(plain[k], interleaved[k]) for k in plain)


def test_generate_in_bfloat16_keeps_lambda_float32_and_follows_float32():
    model, _ = trained_for_generation("llama")
    ours = generate(model)
    low = copy.deepcopy(model).to(torch.bfloat16)
    layers = [layer for _, layer in increlora_layers(low)]
    assert {l.lora_lambda.dtype for l in layers} == {torch.float32}
    assert {l.lora_A.dtype for l in layers} == {torch.bfloat16}
    tokens, logits = generate(low)
    assert logits.dtype == torch.float32 and tokens.shape == ours[0].shape
    # teacher-forced on the float32 model's tokens (greedy paths may part on a near tie)
    ids, mask = prompts()
    mask = torch.cat([mask, torch.ones(len(ids), ours[0].shape[1] - ids.shape[1],
                                       dtype=mask.dtype)], 1)
    with torch.no_grad():
        want = model(input_ids=ours[0], attention_mask=mask).logits
        got = low(input_ids=ours[0], attention_mask=mask).logits.float()
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], **TOL_BF16)
    assert (got[keep] - want[keep]).abs().mean() < TOL_BF16_MEAN
    torch.testing.assert_close(logits[:, 0].float(), ours[1][:, 0], **TOL_BF16)
