"""The ``increlora-fast`` command shows no third-party deprecation that the user's command
cannot act on: peft's ``PeftModel`` reads ``model.is_gradient_checkpointing``, which
transformers 5.x deprecates with a FutureWarning, so every ``--method lora|adalora`` run,
``--compare`` and ``increlora-fast memory`` printed 'use is_activation_checkpointing instead'.
Its own parse errors are one line too."""
import sys
import types
import warnings

import pytest

from increlora_fast.cli import main as cli_main


def _deprecation_shown(transformers) -> bool:
    """Whether reading ``is_gradient_checkpointing`` warns here, outside the command."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        _ = transformers.BertModel(transformers.BertConfig(
            vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32)).is_gradient_checkpointing
    return any("is_gradient_checkpointing" in str(w.message) for w in caught)


def test_peft_reading_is_gradient_checkpointing_does_not_warn_in_the_command(monkeypatch):
    pytest = __import__("pytest")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    if not _deprecation_shown(transformers):  # transformers 5.17 (the GPU machine's) has none
        pytest.skip(f"transformers {transformers.__version__} does not deprecate "
                    "is_gradient_checkpointing")
    seen = []

    def run(args):
        model = transformers.BertModel(transformers.BertConfig(
            vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32))
        with warnings.catch_warnings(record=True) as caught:  # keeps the command's filters
            peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["query"]))
            _ = model.is_gradient_checkpointing  # transformers' own deprecation, as peft reads it
        seen.extend(str(w.message) for w in caught)
        return 0

    fake = types.ModuleType("fake_subcommand")
    fake.add_arguments = lambda parser: None
    fake.run = run
    monkeypatch.setitem(sys.modules, "fake_subcommand", fake)
    monkeypatch.setattr(cli_main, "SUBCOMMANDS", {"fake": ("fake_subcommand", "a test")})
    assert cli_main.main(["fake"]) == 0
    assert not [m for m in seen if "is_gradient_checkpointing" in m], seen
    assert _deprecation_shown(transformers)  # the filter ends with the command


@pytest.mark.parametrize("argv, option", [
    (["finetune", "--max-steps", "abc"], "--max-steps"),
    (["finetune", "--method", "foo"], "--method"),
    (["memory", "--quantized", "3bit"], "--quantized"),
    (["bench", "--no-such-option"], "--no-such-option"),
])
def test_a_value_the_parser_refuses_is_one_error_line(argv, option, capsys):
    """argparse printed the subcommand's whole usage (45 lines for finetune) above its error
    line; the command prints the one line, naming the option and where to read the rest."""
    with pytest.raises(SystemExit) as info:
        cli_main.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and option in err[0] and err[0].endswith(" -h)"), err


def test_the_top_level_help_describes_the_tool_to_a_user(capsys):
    """`increlora-fast -h` described itself with its module docstring's first line, written for
    developers ("Entry point of the ``increlora-fast`` console command.")."""
    with pytest.raises(SystemExit) as info:
        cli_main.main(["-h"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "Entry point" not in out and "``" not in out and "IncreLoRA" in out
    assert all(name in out for name in cli_main.SUBCOMMANDS)
