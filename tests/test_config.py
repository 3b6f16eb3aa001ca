"""IncreLoRAConfig: validation messages, impossible combinations, budgets and (de)serialisation."""
from __future__ import annotations

import json
import math
import random

import pytest

from increlora_fast import IncreLoRAConfig

# (field, bad value, fragment of the "what is allowed" part of the message)
BAD_VALUES = [
    ("target_modules", [], "non-empty list"),
    ("target_modules", ["q", ""], "non-empty list"),
    ("target_modules", 7, "regex string"),
    ("target_modules", "[qv]_proj(", "valid regular expression"),  # before the model loads
    ("target_modules", "", "non-empty"),  # a regex no module name can match
    ("modules_to_save", ["head", 3], "list of module-name suffixes"),
    ("modules_to_save", "classifier", "list of module-name suffixes"),  # not its characters
    ("r_max", 0, "integer >= 1"),
    ("r_max", 4.0, "integer >= 1"),
    ("r_max", True, "integer >= 1"),
    ("init_r", 0, "integer >= 1"),
    ("incre_interval", 0, "integer >= 1"),
    ("top_h", -2, "integer >= 1"),
    ("incre_rank_num", 0, "integer >= 1"),
    ("init_warmup", -1, "integer >= 0"),
    ("warmup_steps", -5, "integer >= 0"),
    ("target_rank", 0, "integer >= init_r"),
    ("target_rank", 9, "<= r_max"),
    ("target_total_rank", 0, "integer >= 1"),
    ("target_total_rank", True, "integer >= 1"),
    ("total_step", 0, "integer > warmup_steps"),
    ("total_step", 2.5, "integer > warmup_steps"),
    ("lora_alpha", 0, "finite number > 0"),
    ("lora_alpha", math.inf, "finite number > 0"),
    ("lora_alpha", "16", "finite number > 0"),
    ("lora_dropout", 1.0, "[0, 1)"),
    ("lora_dropout", -0.1, "[0, 1)"),
    ("lora_dropout", "0.1", "[0, 1)"),
    ("beta1", 1.0, "[0, 1)"),
    ("beta2", -0.5, "[0, 1)"),
    ("beta2", None, "[0, 1)"),
    ("reserve_lambda", -1e-5, "finite number >= 0"),
    ("reserve_lambda", math.nan, "finite number >= 0"),
    ("reserve_lambda", "tiny", "finite number >= 0"),
    ("orth_reg_weight", -0.1, "finite number >= 0"),
    ("orth_reg_weight", "0.1", "finite number >= 0"),
    ("advance_learning", "yes", "True or False"),
    ("exact_step_score", 1, "None, True or False"),
    ("score", "fisher", "delta_w"),
]


@pytest.mark.parametrize("field,value,allowed", BAD_VALUES,
                         ids=[f"{f}={v!r}" for f, v, _ in BAD_VALUES])
def test_invalid_value_names_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ValueError) as err:
        IncreLoRAConfig(**{field: value})
    message = str(err.value)
    assert field in message
    assert repr(value) in message
    assert allowed in message


def test_defaults_are_valid_and_follow_the_spec():
    config = IncreLoRAConfig()
    assert config.lora_dropout == 0.0
    assert config.advance_learning is True
    assert config.reserve_lambda == 1e-5
    assert (config.beta1, config.beta2) == (0.85, 0.85)
    assert config.orth_reg_weight == 0.1
    assert config.score == "delta_w"


@pytest.mark.parametrize("target_rank,expected", [(2, 1), (4, 2), (6, 3), (8, 4)])
def test_incre_rank_num_derived_from_target_rank(target_rank, expected):
    assert IncreLoRAConfig(target_rank=target_rank, r_max=12).incre_rank_num == expected


def test_r_max_must_hold_init_r_plus_reserve():
    with pytest.raises(ValueError) as err:
        IncreLoRAConfig(r_max=4, init_r=2, target_rank=3, incre_rank_num=3)
    message = str(err.value)
    assert "r_max" in message and "4" in message and "init_r + incre_rank_num" in message
    IncreLoRAConfig(r_max=5, init_r=2, target_rank=3, incre_rank_num=3)


@pytest.mark.parametrize("num_modules", [1, 3, 7])
def test_total_budget_from_target_rank_and_total(num_modules):
    assert IncreLoRAConfig(r_max=6, target_rank=3).total_budget(num_modules) == 3 * num_modules
    config = IncreLoRAConfig(r_max=6, target_rank=3, target_total_rank=2 * num_modules + 1)
    assert config.total_budget(num_modules) == 2 * num_modules + 1


@pytest.mark.parametrize("total,bound", [(3 * 6 + 1, "r_max x modules"), (3 - 1, "init_r x modules")])
def test_total_budget_outside_what_modules_hold(total, bound):
    config = IncreLoRAConfig(r_max=6, init_r=1, target_rank=2, target_total_rank=total)
    with pytest.raises(ValueError) as err:
        config.total_budget(3)
    message = str(err.value)
    assert "target_total_rank" in message and repr(total) in message and bound in message


def test_from_dict_rejects_unknown_keys():
    data = IncreLoRAConfig().to_dict()
    data["rank"] = 4
    data["lora_alhpa"] = 8
    with pytest.raises(ValueError) as err:
        IncreLoRAConfig.from_dict(data)
    assert "rank" in str(err.value) and "lora_alhpa" in str(err.value)


@pytest.mark.parametrize("option,value,advice", [
    ("layers_to_transform", [0, 1], "target_modules regex"),
    ("layers_pattern", "layers", "exclude_modules"),
    ("use_dora", True, "a peft LoraConfig option"),
])
def test_a_peft_option_is_named_as_one(option, value, advice):
    """peft's LoraConfig options IncreLoRAConfig lacks failed with Python's bare "unexpected
    keyword argument"; the TypeError says it is a peft option and, for the layer selection,
    what selects layers here."""
    pytest.importorskip("peft")
    with pytest.raises(TypeError) as err:
        IncreLoRAConfig(target_modules=["q_proj"], **{option: value})
    message = str(err.value)
    assert "\n" not in message and f"IncreLoRAConfig has no {option}" in message
    assert "a peft LoraConfig option" in message and advice in message


@pytest.mark.parametrize("option,value,advice", [
    ("bias", "lora_only", "requires_grad_(True)"),
    ("fan_in_fan_out", True, "Conv1D"),
])
def test_a_peft_option_with_a_counterpart_is_not_said_to_have_none(option, value, advice):
    """bias and fan_in_fan_out were answered "IncreLoRA has no equivalent", yet a bias of an
    adapted layer trains when made trainable by hand (export_peft writes it as bias="lora_only")
    and transformers' Conv1D layers are recognised without a flag."""
    pytest.importorskip("peft")
    with pytest.raises(TypeError) as err:
        IncreLoRAConfig(target_modules=["c_attn"], **{option: value})
    message = str(err.value)
    assert "\n" not in message and advice in message and "no equivalent" not in message


def test_construction_still_round_trips_through_copies_and_pickles():
    """The keyword check runs at construction only: dataclasses.replace, copies and pickles
    rebuild an equal config."""
    import copy
    import dataclasses
    import pickle
    config = IncreLoRAConfig(target_modules=["q_proj"], r_max=6, target_rank=3)
    assert dataclasses.replace(config, r_max=7) == IncreLoRAConfig(
        target_modules=["q_proj"], r_max=7, target_rank=3)
    assert pickle.loads(pickle.dumps(config)) == copy.deepcopy(config) == config
    with pytest.raises(TypeError, match="IncreLoRAConfig has no layers_pattern"):
        dataclasses.replace(config, layers_pattern="layers")


def test_the_signature_still_lists_the_fields():
    """inspect.signature (help(), IDE hints, tools that build options from it) reads a class's
    own __new__ before its __init__: since the peft-option check's __new__ it showed
    IncreLoRAConfig(*args, **kwargs) instead of the fields."""
    import dataclasses
    import inspect
    fields = [f.name for f in dataclasses.fields(IncreLoRAConfig) if f.init]
    assert list(inspect.signature(IncreLoRAConfig).parameters) == fields


def test_from_dict_validates_values():
    with pytest.raises(ValueError, match="lora_dropout"):
        IncreLoRAConfig.from_dict({"lora_dropout": 2.0})


def test_json_round_trip():
    config = IncreLoRAConfig(target_modules=("q_proj", "v_proj"), r_max=10, init_r=2,
                             target_rank=4, lora_alpha=32, modules_to_save=("classifier",),
                             score="triplet", total_step=500, warmup_steps=10)
    assert config.target_modules == ["q_proj", "v_proj"]
    again = IncreLoRAConfig.from_dict(json.loads(config.to_json()))
    assert again == config
    assert IncreLoRAConfig(target_modules=r".*\.(query|value)").target_modules == r".*\.(query|value)"


def test_target_modules_as_peft_holds_them():
    """peft's LoraConfig keeps target_modules as a set: it is taken as the same list of names."""
    from peft import LoraConfig
    lora = LoraConfig(target_modules=["v_proj", "q_proj"])
    assert isinstance(lora.target_modules, set)
    config = IncreLoRAConfig(target_modules=lora.target_modules)
    assert config.target_modules == ["q_proj", "v_proj"]
    assert IncreLoRAConfig.from_dict(json.loads(config.to_json())) == config


@pytest.mark.parametrize("kind", [set, frozenset])
def test_modules_to_save_as_a_set(kind):
    """A set of modules to save was accepted before the string check (a5d65af) and is taken
    like a set of target_modules: a sorted list, which also serializes."""
    config = IncreLoRAConfig(target_modules=kind({"query"}),
                             modules_to_save=kind({"pooler", "classifier"}))
    assert config.modules_to_save == ["classifier", "pooler"]
    assert IncreLoRAConfig.from_dict(json.loads(config.to_json())) == config


def test_allocation_rounds_count_the_controllers_round_steps():
    """`IncreLoRAConfig.allocation_rounds` counts the steps that `allocation_due` takes for
    rounds (t > init_warmup, t a multiple of incre_interval), over random schedules and ranges;
    `reachable_total_rank` grows by top_h x incre_rank_num per round up to the budget."""
    rng = random.Random(0)
    for _ in range(300):
        config = IncreLoRAConfig(target_modules=["q"], init_warmup=rng.randint(0, 12),
                                 incre_interval=rng.randint(1, 7), top_h=rng.randint(1, 3),
                                 target_rank=4, r_max=8)
        start, end = rng.randint(0, 20), rng.randint(0, 40)
        due = [t for t in range(start, end)
               if t > config.init_warmup and t % config.incre_interval == 0]
        assert config.allocation_rounds(start, end) == len(due), (config, start, end)
        grown = 5 + len(due) * config.top_h * config.incre_rank_num
        assert config.reachable_total_rank([1] * 5, start, end) == min(20, grown)


def test_reachable_total_rank_counts_no_more_modules_per_round_than_there_are():
    """A round grows each module at most once, so top_h above the number of modules adds
    nothing: 2 modules from rank 1 to a budget of 3 each (6) grow by at most 2 per round, and
    one round reaches 4, not 6 (top_h 4 x 1 counted as if 4 modules grew, hiding the warning
    that the run ends below its budget)."""
    config = IncreLoRAConfig(target_modules=["q"], init_warmup=1, incre_interval=2, top_h=4,
                             target_rank=3, incre_rank_num=1, r_max=8)
    assert config.allocation_rounds(0, 3) == 1
    assert config.reachable_total_rank([1, 1], 0, 3) == 4
    assert config.reachable_total_rank([1, 1], 0, 5) == 6


def test_reachable_total_rank_counts_what_each_modules_capacity_leaves():
    """A module grows by incre_rank_num or what is left of r_max: 4 modules from rank 1 to a
    budget of 8 each (32, their whole capacity) with incre_rank_num 4 need two growths each,
    +4 and +3, so 7 rounds of one module reach 4 + 4 x 4 + 3 x 3 = 29, not 4 + 7 x 4 = 32
    (counted so, the run ended below its budget with no warning)."""
    config = IncreLoRAConfig(target_modules=["q"], init_warmup=0, incre_interval=1, top_h=1,
                             target_rank=8, incre_rank_num=4, r_max=8)
    assert config.allocation_rounds(0, 8) == 7
    assert config.reachable_total_rank([1] * 4, 0, 8) == 29
    assert config.reachable_total_rank([1] * 4, 0, 9) == 32
    # a module at capacity grows no more; one round grows each module once at most
    assert config.reachable_total_rank([8, 1], 0, 2) == 8 + 1 + 4
    assert config.reachable_total_rank([8, 1], 0, 3) == 8 + 1 + 4 + 3


def test_a_total_rank_budget_needs_no_target_rank_above_init_r():
    """target_total_rank overrides target_rank, yet IncreLoRAConfig(init_r=3, r_max=8,
    target_total_rank=40) was refused for the default target_rank=2 being below init_r."""
    config = IncreLoRAConfig(init_r=3, r_max=8, target_total_rank=40)
    assert config.total_budget(8) == 40
    with pytest.raises(ValueError, match="init_x modules|init_r x modules"):
        config.total_budget(14)  # 3 x 14 = 42 > 40: the budget is still checked
    with pytest.raises(ValueError, match="target_rank"):
        IncreLoRAConfig(init_r=3, r_max=8, target_rank=2)  # without a total: still refused
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="target_rank"):
            IncreLoRAConfig(init_r=3, r_max=8, target_rank=bad, target_total_rank=40)


@pytest.mark.parametrize("field,value,allowed", [("top_h", 0, "integer >= 1"),
                                                 ("lora_alpha", -1.0, "finite number > 0"),
                                                 ("score", "fisher", "one of")])
def test_a_field_changed_after_construction_is_checked_before_use(tiny_net, field, value,
                                                                  allowed):
    """A dataclass field can be set on a constructed config; inject_increlora and the
    controller check the config again, so the change is refused in one line naming it (top_h
    0 used to give a controller that silently never grew a module)."""
    from increlora_fast import IncreLoRAController, inject_increlora
    cfg = IncreLoRAConfig(target_modules=["fc", "proj"], r_max=6, target_rank=3)
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=f"IncreLoRAConfig.{field}=.*{allowed}"):
        inject_increlora(tiny_net, cfg)
    setattr(cfg, field, getattr(IncreLoRAConfig(), field))
    model = inject_increlora(tiny_net, cfg)
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=f"IncreLoRAConfig.{field}=.*{allowed}"):
        IncreLoRAController(model)
