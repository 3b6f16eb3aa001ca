"""Bad inputs get one clear line before any slow work, and labels and columns are checked
(issue 28, items 4 and 5)."""
from __future__ import annotations

import os
import warnings

import pytest

from finetune_helpers import sentiment_rows, write_csv
from increlora_fast.data import load_files
from increlora_fast.data.examples import (Example, LabelSpellingWarning, fixed_split,
                                          label_names_for)


# ---------------------------------------------------------------- labels and columns
def test_spellings_of_one_integer_are_one_class_with_a_warning(tmp_path):
    rows = sentiment_rows(40, seed=0, labels=("0", "1"))
    for i, r in enumerate(rows):
        if i % 3 == 0:
            r["label"] = {"0": "0.0", "1": " 1.0 "}[r["label"]]
    train = write_csv(tmp_path / "mixed.csv", rows)
    with pytest.warns(LabelSpellingWarning, match=r"mixed\.csv: column 'label' spells 2 label"):
        data = load_files(str(train), None)
    assert data.label_names == ["0", "1"]
    by_text = {r["text"]: int(float(r["label"])) for r in rows}
    assert all(e.label == by_text[e.text] for e in data.train + data.eval)


def test_whitespace_around_labels_is_one_class_and_consistent_spellings_are_kept():
    with pytest.warns(LabelSpellingWarning, match="'pos' and 'pos '"):
        assert label_names_for(["neg", "pos", "pos ", "neg"]) == ["neg", "pos"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert label_names_for(["1.0", "0.0", "1.0"]) == ["0.0", "1.0"]
        assert label_names_for([2, "0", "1"]) == ["0", "1", "2"]


def test_labels_that_differ_only_in_case_are_two_classes_with_a_warning(tmp_path):
    """'Positive' beside 'positive' (hand-labelled data) became a third class without a word;
    they stay two labels (case may be meant), but the warning names them."""
    rows = sentiment_rows(40, seed=0, labels=("negative", "positive"))
    rows[3]["label"] = rows[3]["label"].capitalize()
    train = write_csv(tmp_path / "cased.csv", rows)
    with pytest.warns(LabelSpellingWarning, match=r"cased\.csv: column 'label' holds labels that "
                                                  r"differ only in case.*"
                                                  + repr(rows[3]["label"])):
        data = load_files(str(train), None)
    assert len(data.label_names) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert label_names_for(["neg", "pos", "NEU"]) == ["NEU", "neg", "pos"]

def test_eval_file_spelling_matches_the_training_label(tmp_path):
    train = write_csv(tmp_path / "t.csv", sentiment_rows(30, seed=0, labels=("0", "1")))
    dev = write_csv(tmp_path / "d.csv", sentiment_rows(10, seed=1, labels=("0.0", "1.0")))
    data = load_files(str(train), str(dev))
    assert data.label_names == ["0", "1"] and {e.label for e in data.eval} == {0, 1}


def test_swapped_columns_are_refused_naming_the_column_and_file(tmp_path):
    rows = sentiment_rows(120, seed=0)
    train = write_csv(tmp_path / "reviews.csv", rows)
    with pytest.raises(ValueError) as err:
        load_files(str(train), None, text_column="label", label_column="text")
    message = str(err.value)
    assert "\n" not in message and str(train) in message and "'text'" in message
    assert "--label-column" in message and "swapped" in message


def test_dev_labels_unseen_in_training_are_refused(tmp_path):
    rows = sentiment_rows(60, seed=0)
    _, dev = fixed_split([Example(str(i), 0) for i in range(60)], 6)
    rows[int(dev[0].text)]["label"] = "neutral"  # one row only, which the fixed split holds out
    train = write_csv(tmp_path / "t.csv", rows)
    with pytest.raises(ValueError, match=r"t\.csv: the automatic dev split holds labels that no "
                                         r"training row has \(\['neutral'\]\).*swapped"):
        load_files(str(train), None)
    dev_file = write_csv(tmp_path / "d.csv", [{"text": "x", "label": "neutral"}])
    with pytest.raises(ValueError, match=r"d\.csv: line 2 has label 'neutral' \(--label-column "
                                         r"'label'\), which no row of the training data "
                                         r".*t2\.csv.*swapped"):
        load_files(str(write_csv(tmp_path / "t2.csv", sentiment_rows(20, 1))), str(dev_file))


# ---------------------------------------------------------------- data files
def test_a_folder_as_train_file_says_it_is_a_folder(tmp_path):
    with pytest.raises(ValueError, match=r"is a folder; give a file \(\.csv"):
        load_files(str(tmp_path), None)


def test_csv_cells_longer_than_the_csv_module_limit_load(tmp_path):
    rows = sentiment_rows(20, seed=0)
    rows[3]["text"] = "good " * 40_000  # 200,000 characters
    data = load_files(str(write_csv(tmp_path / "long.csv", rows)), None)
    assert max(len(e.text) for e in data.train + data.eval) == 200_000


# ---------------------------------------------------------------- the command line
def _refuse(monkeypatch, module, name: str, what: str) -> None:
    """Replace ``module.name`` by a function that fails the test: ``what`` happened before the
    bad input was refused."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"{what} before the bad input was refused")
    monkeypatch.setattr(module, name, refuse)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if finetune gets as far as loading a model."""
    from increlora_fast.training import finetune_run as finetune
    _refuse(monkeypatch, finetune, "load_model", "a model was loaded")


@pytest.fixture
def no_data_loading(monkeypatch, no_model_loading):
    """Fails the test if finetune gets as far as reading a packaged task (or loading a model)."""
    from increlora_fast.training import finetune_run as finetune
    _refuse(monkeypatch, finetune, "load_task", "the data was read")


def _one_line(capsys, *needles: str) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _main(argv):
    from increlora_fast.cli.main import main
    return main(argv)


def test_negative_seed_names_seed(tmp_path, capsys, monkeypatch, no_model_loading):
    code = _main(["finetune", "--seed", "-1", "--output-dir", str(tmp_path / "o"),
                               "--no-progress"])
    assert code == 2
    _one_line(capsys, "--seed -1", ">= 0")


@pytest.mark.parametrize("argv, needles", [
    (["--seed", "4294967296"], ["--seed 4294967296", "4294967295"]),
    (["--compare", "--methods", "lora", "--seed", "4294967295", "--seeds", "2"],
     ["--seeds 2", "--seed 4294967295", "4294967296"]),
])
def test_a_seed_past_numpys_range_is_refused_before_the_data_is_read(tmp_path, capsys, argv,
                                                                     needles, no_data_loading):
    """NumPy takes seeds below 2**32 only: a larger --seed (or a --compare whose last seed is)
    failed in seed_everything, after the data was read, with NumPy's words naming no option
    (in --compare, after the earlier seeds' runs)."""
    code = _main(["finetune", *argv, "--output-dir", str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    _one_line(capsys, *needles)


def test_sample_limits_are_checked_before_the_data_is_read(tmp_path, capsys, no_data_loading):
    code = _main(["finetune", "--max-train-samples", "0", "--output-dir", str(tmp_path / "o"),
                  "--no-progress"])
    assert code == 2
    _one_line(capsys, "--max-train-samples 0 is invalid", ">= 1")


def test_negative_save_steps_is_refused_before_the_data_is_read(tmp_path, capsys,
                                                                no_data_loading):
    code = _main(["finetune", "--save-steps", "-5", "--output-dir", str(tmp_path / "o"),
                  "--no-progress"])
    assert code == 2
    _one_line(capsys, "--save-steps -5 is invalid", "0 (no checkpoints)")


@pytest.mark.parametrize("value", ["inf", "0"])
def test_epochs_that_give_no_step_count_are_refused_before_the_data_is_read(
        value, tmp_path, capsys, no_data_loading):
    code = _main(["finetune", "--epochs", value, "--output-dir", str(tmp_path / "o"),
                  "--no-progress"])
    assert code == 2
    _one_line(capsys, f"--epochs {float(value)} is invalid", "finite number > 0")


@pytest.mark.parametrize("argv, needles", [
    (["--init-r", "0"], ["--init-r 0 is invalid", ">= 1"]),
    (["--init-r", "2", "--target-rank", "2", "--r-max", "2"],
     ["--r-max 2 is invalid", "2 + 1"]),
    (["--lora-dropout", "1.5"], ["--lora-dropout 1.5 is invalid", "[0, 1)"]),
    (["--method", "lora", "--lora-dropout", "-0.5"], ["--lora-dropout -0.5 is invalid"]),
    (["--method", "lora", "--lora-alpha", "0"], ["--lora-alpha 0.0 is invalid", "> 0"]),
    (["--orth-reg-weight", "-1"], ["--orth-reg-weight -1.0 is invalid", ">= 0"]),
    (["--top-h", "0"], ["--top-h 0 is invalid", ">= 1"]),
    (["--incre-interval", "0"], ["--incre-interval 0 is invalid", ">= 1"]),
    (["--init-warmup", "-5"], ["--init-warmup -5 is invalid", ">= 0"]),
    (["--method", "adalora", "--adalora-tinit", "-1"], ["--adalora-tinit -1 is invalid"]),
])
def test_adapter_options_are_checked_before_the_data_is_read(argv, needles, tmp_path, capsys,
                                                             no_data_loading):
    # they used to be checked by the method's config, built after the model was loaded and the
    # texts tokenized, naming IncreLoRAConfig's fields (LoRA: alpha 0 trained a null adapter)
    code = _main(["finetune", *argv, "--output-dir", str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    _one_line(capsys, *needles)


def test_warmup_that_leaves_no_step_names_warmup_ratio(tmp_path, capsys, no_model_loading):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(40, seed=0))
    code = _main(["finetune", "--train-file", str(train), "--max-steps", "1", "--warmup-ratio",
                  "0.9", "--output-dir", str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    _one_line(capsys, "--warmup-ratio 0.9 is invalid with 1 steps")


@pytest.mark.parametrize("argv, needles", [
    (["--max-steps", "50", "--epochs", "3"], ["--max-steps or --epochs, not both"]),
    (["--select-every", "5"], ["--select-every 5 goes with --select-best"]),
    (["--lrs", "0.001,0.002"], ["--lrs goes with --compare"]),
    (["--seeds", "5", "--methods", "lora"], ["--methods and --seeds go with --compare"]),
    (["--compare", "--lr", "0.5"], ["--lr 0.5 would be ignored", "--lrs instead"]),
    (["--compare", "--method", "lora"], ["--method lora would be ignored", "--methods instead"]),
    (["--compare", "--save-steps", "50"], ["--save-steps 50 would be ignored", "no checkpoints"]),
])
def test_options_that_would_be_ignored_are_refused(argv, needles, tmp_path, capsys,
                                                  no_data_loading):
    # each of these ran before, silently without the option (--epochs, --select-every, the
    # --compare options, or --lr / --method under --compare)
    code = _main(["finetune", *argv, "--output-dir", str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    _one_line(capsys, *needles)
    assert not (tmp_path / "o").exists()


def test_compare_learning_rates_must_be_finite(tmp_path, capsys, no_data_loading):
    # nan passed `lr <= 0` and inf too: the sweep then trained (after loading everything) on a
    # rate no run can use
    for text in ("nan", "1e-3,inf"):
        code = _main(["finetune", "--compare", "--lrs", text, "--output-dir", str(tmp_path / "o"),
                      "--no-progress"])
        assert code == 2
        _one_line(capsys, "--lrs", "is invalid", "finite")


def test_compare_with_resume_is_refused_before_the_checkpoint_is_read(tmp_path, capsys,
                                                                      no_data_loading):
    # the checkpoint was read first: a missing one was reported ("not a checkpoint"), and only
    # once it was fixed came the word that --compare cannot resume at all
    code = _main(["finetune", "--compare", "--resume", str(tmp_path / "missing"),
                  "--output-dir", str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    _one_line(capsys, "--compare cannot be combined with --resume")


def test_compare_with_resume_of_a_staging_folder_names_the_option_conflict(tmp_path, capsys,
                                                                           no_data_loading):
    # without --output-dir the resumed run's folder was worked out first: a checkpoint in the
    # staging folder of an --overwrite run was refused as such, not for --compare with --resume
    code = _main(["finetune", "--compare", "--resume",
                  str(tmp_path / "run.new-123" / "checkpoint-4"), "--no-progress"])
    assert code == 2
    _one_line(capsys, "--compare cannot be combined with --resume")


@pytest.mark.parametrize("text", ["1e-3,0.001", "0.001,0.0010000001"])
def test_compare_learning_rates_must_have_their_own_run_folders(tmp_path, capsys, text,
                                                                no_data_loading):
    # both rates ran into lr0.001/: the second was refused as "a finished run with other
    # settings" once the first had trained (or repeated it, reusing the first run)
    code = _main(["finetune", "--compare", "--lrs", text, "--output-dir", str(tmp_path / "o"),
                  "--no-progress"])
    assert code == 2
    _one_line(capsys, "--lrs [", "is invalid", "run folder lr0.001")


@pytest.mark.parametrize("option", ["--task", "--train-file", "--eval-file", "--model"])
def test_an_empty_name_is_refused(option, tmp_path, capsys, no_data_loading):
    # an empty --task silently ran the default task; an empty path named the working folder
    code = _main(["finetune", option, " ", "--output-dir", str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    _one_line(capsys, f"{option} ' ' is invalid: it is empty")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option", ["--text-column", "--text-pair-column", "--label-column"])
def test_an_empty_column_name_is_refused_before_the_data_is_read(option, tmp_path, capsys,
                                                                 monkeypatch, no_data_loading):
    # an empty --text-pair-column (a script's unset "$PAIR") trained on the first texts alone,
    # silently; an empty --text-column or --label-column was looked up after reading the file
    from increlora_fast.training import finetune_run
    _refuse(monkeypatch, finetune_run, "load_files", "the data file was read")
    rows = [dict(r, pair=r["text"]) for r in sentiment_rows(40, seed=0)]
    train = write_csv(tmp_path / "t.csv", rows)
    code = _main(["finetune", "--train-file", str(train), option, "", "--output-dir",
                  str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    _one_line(capsys, f"{option} '' is invalid: it is empty")
    assert not (tmp_path / "o").exists()

@pytest.mark.parametrize("argv, needles", [
    (["--text-pair-column", "text"], ["--text-pair-column 'text' is invalid",
                                      "same column as --text-column"]),
    (["--text-column", "review", "--label-column", "review"],
     ["--label-column 'review' is invalid", "same column as --text-column"]),
])
def test_one_column_for_two_roles_is_refused_before_the_data_is_read(argv, needles, tmp_path,
                                                                     capsys, no_data_loading):
    code = _main(["finetune", "--train-file", str(tmp_path / "t.csv"), *argv,
                  "--output-dir", str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    _one_line(capsys, *needles)


def test_a_target_name_with_nothing_close_lists_the_models_names():
    """No close match: the message shows names the model has, not an empty list."""
    from torch import nn
    from increlora_fast import IncreLoRAConfig, inject_increlora
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2)))
    model.add_module("proj", nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"none close; the model's module names end in.*proj"):
        inject_increlora(model, IncreLoRAConfig(target_modules=["zzzz"], r_max=4, init_r=1,
                                                target_rank=2))


def test_a_target_name_with_nothing_close_lists_every_leaf_name_of_a_bert():
    """README's memory example (`--target-modules q_proj,v_proj`) on a BERT: the names listed
    were the first 12 alphabetically (LayerNorm ... key), cutting off query and value, the
    names the user needed."""
    from transformers import BertConfig, BertForSequenceClassification
    from increlora_fast import IncreLoRAConfig, inject_increlora
    model = BertForSequenceClassification(BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        vocab_size=50))
    with pytest.raises(ValueError, match="none close") as err:
        inject_increlora(model, IncreLoRAConfig(target_modules=["q_proj"], r_max=4, init_r=1,
                                                target_rank=2))
    for name in ("'query'", "'key'", "'value'", "'dense'"):
        assert name in str(err.value), str(err.value)


def test_max_train_samples_that_drops_a_dev_label_warns_naming_it():
    from increlora_fast.data.examples import TaskData
    data = TaskData("t", [Example("a", 0), Example("b", 0), Example("c", 1)],
                    [Example("d", 0), Example("e", 1)], ["neg", "pos"])
    with pytest.warns(UserWarning, match=r"--max-train-samples 2 keeps no training example of "
                                         r"dev label\(s\) pos"):
        data.subset(2, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(data.subset(3, None).train) == 3


def test_swapped_columns_on_the_command_line(tmp_path, capsys, monkeypatch, no_model_loading):
    train = write_csv(tmp_path / "reviews.csv", sentiment_rows(120, seed=0))
    code = _main(["finetune", "--train-file", str(train), "--text-column", "label",
                               "--label-column", "text", "--output-dir", str(tmp_path / "o"),
                               "--no-progress"])
    assert code == 2
    _one_line(capsys, str(train), "'text'", "--label-column", "swapped")


@pytest.mark.parametrize("option", ["--train-file", "--eval-file"])
def test_folder_as_data_file_names_the_option(tmp_path, capsys, monkeypatch, no_model_loading,
                                              option):
    """A folder given as a data file was "data file … is a folder", naming no option: which of
    --train-file and --eval-file was wrong had to be guessed."""
    train = write_csv(tmp_path / "reviews.csv", sentiment_rows(120, seed=0))
    files = {"--train-file": str(train), option: str(tmp_path)}
    code = _main(["finetune", *[a for item in files.items() for a in item], "--output-dir",
                  str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    _one_line(capsys, f"{option} {tmp_path} is a folder", "give a file")


@pytest.mark.parametrize("kind", ["fifo", "process_substitution"])
def test_a_pipe_as_data_file_is_named_as_one(tmp_path, capsys, no_model_loading, kind):
    """A named pipe was refused as "does not exist", and ``--train-file <(zcat t.csv.gz)`` (a
    /dev/fd/N link to a pipe) as a made-up path ``/proc/…/fd/pipe:[N]`` that "does not exist":
    the given path is named as a pipe, and what to do."""
    if kind == "fifo":
        given = str(tmp_path / "train.csv")
        os.mkfifo(given)
    else:
        read_end, write_end = os.pipe()
        given = f"/dev/fd/{read_end}"
    try:
        code = _main(["finetune", "--train-file", given, "--output-dir", str(tmp_path / "o"),
                      "--no-progress"])
    finally:
        if kind != "fifo":
            os.close(read_end)
            os.close(write_end)
    assert code == 2
    _one_line(capsys, f"--train-file {given} is not a regular file", "save the data as a file")


def test_offline_glue_task_fails_at_once_in_one_line(capsys, monkeypatch, tmp_path,
                                                     no_model_loading):
    datasets = pytest.importorskip("datasets")
    import datasets.config
    import huggingface_hub.constants as hub_constants
    seen = []

    def load_dataset(*args, **kwargs):
        seen.append((datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE))
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setenv("INCRELORA_OFFLINE", "1")
    argv = ["finetune", "--task", "glue/mrpc", "--output-dir", str(tmp_path / "o"),
            "--no-progress"]
    assert _main(argv) == 2
    assert seen == [(True, True)]  # the hub clients were told to use their caches only
    assert (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE) == (False, False)
    _one_line(capsys, "--task glue/mrpc needs the Hugging Face hub", "INCRELORA_OFFLINE")
    from increlora_fast.data import assets
    monkeypatch.delenv("INCRELORA_OFFLINE")
    # no flag and the hub unreachable: the caches only as well, at once, saying why
    monkeypatch.setattr(assets, "hub_unreachable", lambda: True)
    assert _main(argv) == 2
    assert seen[-1] == (True, True)
    _one_line(capsys, "--task glue/mrpc needs the Hugging Face hub", "cannot be reached")
    # no flag, a reachable hub that fails anyway: the clients' own way, still one line
    monkeypatch.setattr(assets, "hub_unreachable", lambda: False)
    assert _main(argv) == 2
    assert seen[-1] == (False, False)
    _one_line(capsys, "--task glue/mrpc needs the Hugging Face hub", "ConnectionError")


def test_hub_probe(monkeypatch):
    """An unreachable hub host is found by one short connection attempt to the endpoint's host
    and port; with a proxy in the environment no probe is made (the clients go through it)."""
    import socket

    from increlora_fast.data import assets
    tried = []

    def refuse(address, timeout=None):
        tried.append((address, timeout))
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    for name in assets.PROXY_ENVS:
        monkeypatch.delenv(name, raising=False)
    assets.hub_unreachable.cache_clear()
    try:
        assert assets.hub_unreachable()
        assert tried == [(("huggingface.co", 443), assets.HUB_PROBE_TIMEOUT_S)]
        assert assets.hub_unreachable() and len(tried) == 1  # once per process
        assets.hub_unreachable.cache_clear()
        monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
        assert not assets.hub_unreachable() and len(tried) == 1
    finally:
        assets.hub_unreachable.cache_clear()


def test_offline_hub_model_fails_at_once(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants as hub_constants
    import transformers
    seen = []

    def from_pretrained(*args, **kwargs):
        seen.append(hub_constants.HF_HUB_OFFLINE)
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and "
                      "couldn't find them in the cached files.\nCheckout your internet ...")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    monkeypatch.setenv("INCRELORA_OFFLINE", "1")
    train = write_csv(tmp_path / "t.csv", sentiment_rows(40, seed=0))
    code = _main(["finetune", "--model", "someorg/nomodel", "--train-file",
                               str(train), "--output-dir", str(tmp_path / "o"), "--no-progress"])
    assert code == 2 and seen == [True] and hub_constants.HF_HUB_OFFLINE is False
    _one_line(capsys, "--model someorg/nomodel could not be loaded", "hub access is off")


def test_modules_to_save_without_the_head_adds_it(tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    from finetune_helpers import write_tiny_bert
    from increlora_fast.training.finetune_run import HeadAddedWarning
    model = write_tiny_bert(tmp_path / "bert")
    train = write_csv(tmp_path / "t.csv", sentiment_rows(64, seed=0))
    out = tmp_path / "out"
    with pytest.warns(HeadAddedWarning, match="--modules-to-save pooler leaves out the "
                                              "classification head 'classifier'; it is added"):
        code = _main([
            "finetune", "--model", str(model), "--train-file", str(train), "--batch-size", "8",
            "--max-seq-len", "16", "--max-steps", "2", "--no-progress", "--modules-to-save",
            "pooler", "--output-dir", str(out)])
    assert code == 0
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert any(k.endswith("classifier.weight") for k in tensors)
    assert any(k.endswith("pooler.dense.weight") for k in tensors)


# ---------------------------------------------------------------- bench, memory, gpu-check
@pytest.fixture
def no_measuring(monkeypatch):
    from increlora_fast.cli import bench
    _refuse(monkeypatch, bench, "_measure", "measuring started")


@pytest.mark.parametrize("argv, needles", [
    (["--device", "tpu"], ["--device 'tpu' is invalid", "cuda:N"]),
    (["--quick", "--methods", "nope"], ["--methods nope is invalid", "floor"]),
    (["--quick", "--model-methods", "floor,nope"], ["--model-methods nope is invalid"]),
    (["--quick", "--models", "nope"], ["--models nope is invalid", "minilm-l6"]),
    (["--quick", "--notes", "missing-notes.md", "--results-md", "never-written.md"],
     ["--notes missing-notes.md cannot be read"]),
    (["--quick", "--batch-size", "0"], ["--batch-size 0 is invalid"]),
    (["--quick", "--model-steps", "3", "--model-warmup-steps", "3"],
     ["--model-warmup-steps 3 is invalid", "from 1 to --model-steps - 2 (1)"]),
])
def test_bench_arguments_are_checked_before_measuring(argv, needles, capsys, monkeypatch,
                                                      no_measuring):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # bench sets it for cpu runs; undone afterwards
    assert _main(["bench", "--csv", ""] + argv) == 2
    _one_line(capsys, *needles)


def test_bench_include_json_that_is_not_json_names_the_file(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "notes.txt"
    bad.write_text("not json")
    assert _main(["bench", "--report-only", "--include-json", str(bad),
                               "--results-md", str(tmp_path / "R.md")]) == 2
    _one_line(capsys, f"--include-json {bad} is not JSON")


def test_bench_report_only_does_not_check_the_csv_it_never_writes(tmp_path, monkeypatch):
    """--csv gets only measured rows, and --report-only measures none: its default path (under
    a folder that cannot be made here) must not stop the report."""
    import json
    records = tmp_path / "records.json"
    records.write_text(json.dumps([]))
    blocker = tmp_path / "afile"
    blocker.write_text("")
    assert _main(["bench", "--report-only", "--include-json", str(records), "--csv",
                  str(blocker / "x.csv"), "--plot", "", "--results-md",
                  str(tmp_path / "R.md")]) == 0
    assert (tmp_path / "R.md").exists() and not blocker.is_dir()


@pytest.fixture
def no_memory_model(monkeypatch):
    from increlora_fast.benchmarks.memory import breakdown
    _refuse(monkeypatch, breakdown, "build_spec", "the model was built")


@pytest.mark.parametrize("argv, needles", [
    (["--device", "tpu"], ["--device 'tpu' is invalid"]),
    (["--target-rank", "9", "--r-max", "4"], ["--target-rank 9 is invalid", "--r-max (4)"]),
])
def test_memory_arguments_are_checked_before_the_model(argv, needles, capsys, monkeypatch,
                                                       no_memory_model):
    assert _main(["memory", "--model", "all-MiniLM-L6-v2"] + argv) == 2
    _one_line(capsys, *needles)


def test_memory_offline_hub_id_uses_the_cache_only(capsys, monkeypatch):
    import huggingface_hub.constants as hub_constants

    from increlora_fast.benchmarks.memory import breakdown
    seen = []

    def build_spec(model, head, dtype):
        seen.append(hub_constants.HF_HUB_OFFLINE)
        raise ValueError(f"--model {model}: not in the local hub cache")

    monkeypatch.setattr(breakdown, "build_spec", build_spec)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _main(["memory", "--model", "someorg/nomodel"]) == 2
    assert seen == [True]
    _one_line(capsys, "--model someorg/nomodel")


def test_gpu_check_bad_device_is_one_line(tmp_path, capsys, monkeypatch):
    for name in ("INCRELORA_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")  # gpu-check sets them; restored after the test
    assert _main(["gpu-check", "--out", str(tmp_path / "c"), "--device", "tpu"]) == 2
    _one_line(capsys, "--device 'tpu' is invalid")
    (tmp_path / "file").write_text("")
    assert _main(["gpu-check", "--out", str(tmp_path / "file"), "--dry-run"]) == 2
    _one_line(capsys, f"--out {tmp_path / 'file'} is a file")


# Written after minutes of measuring: a path that cannot be written was a traceback then, and
# the measurements were lost.
@pytest.fixture
def blocked(tmp_path) -> str:
    """A path under a file."""
    (tmp_path / "file").write_text("")
    return str(tmp_path / "file" / "out.json")


@pytest.mark.parametrize("option", ["--json", "--csv", "--plot", "--results-md"])
def test_bench_output_paths_are_checked_before_measuring(option, blocked, tmp_path, capsys,
                                                         monkeypatch, no_measuring):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    level = "layer" if option == "--plot" else "host"  # the plot is the layer level's
    argv = ["bench", "--levels", level, "--csv", "", option, blocked]
    assert _main(argv) == 2
    _one_line(capsys, f"{option} {blocked} cannot be written", "is a file")
    assert _main(["bench", "--levels", "host", "--csv", str(tmp_path)]) == 2
    _one_line(capsys, f"--csv {tmp_path} is a folder")


def test_memory_json_path_is_checked_before_the_model(blocked, capsys, no_memory_model):
    assert _main(["memory", "--model", "all-MiniLM-L6-v2", "--json", blocked]) == 2
    _one_line(capsys, f"--json {blocked} cannot be written")


def test_gpu_check_out_under_a_file_is_refused_before_any_part(blocked, capsys, monkeypatch):
    from increlora_fast.benchmarks.gpu_check import parts
    _refuse(monkeypatch, parts, "run_gpu_check", "a part ran")
    for name in ("INCRELORA_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    assert _main(["gpu-check", "--out", blocked, "--dry-run"]) == 2
    _one_line(capsys, f"--out {blocked} cannot be written", "is a file")


# ---------------------------------------------------------------- config
def test_target_rank_above_r_max_blames_target_rank():
    from increlora_fast.config import IncreLoRAConfig
    with pytest.raises(ValueError, match=r"^IncreLoRAConfig\.target_rank=9 is invalid: use a "
                                         r"value <= r_max \(4\)"):
        IncreLoRAConfig(target_rank=9, r_max=4)


def test_finetune_target_rank_above_r_max_before_loading(tmp_path, capsys, monkeypatch,
                                                         no_model_loading):
    code = _main(["finetune", "--target-rank", "9", "--r-max", "4", "--output-dir",
                               str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    _one_line(capsys, "--target-rank 9 is invalid", "--r-max (4)")


def test_warnings_are_one_line_while_the_command_runs(tmp_path):
    from increlora_fast.cli.main import _one_line_warning
    assert _one_line_warning("f.csv spells 1 label(s) several ways", UserWarning, "f.py", 3) == \
        "increlora-fast: warning: f.csv spells 1 label(s) several ways\n"
    before = warnings.formatwarning
    assert _main(["finetune", "--seed", "-1", "--output-dir", str(tmp_path / "o")]) == 2
    assert warnings.formatwarning is before  # restored for whoever called main in-process


@pytest.mark.parametrize("extra, needles", [
    # no allocation round after --init-warmup within the run: every module kept --init-r
    (["--init-warmup", "100"], ["0 allocation round(s)", "--init-warmup 100",
                                "total rank of at most 12 of the budget's 24"]),
    # 4 rounds of one module each: 4 of the 12 ranks the budget needs
    (["--top-h", "1"], ["4 allocation round(s)", "--top-h 1",
                        "total rank of at most 16 of the budget's 24"]),
])
def test_a_schedule_that_cannot_reach_the_rank_budget_warns(extra, needles, tmp_path):
    # these ran to the end below --target-rank (metrics.json: total_rank 12 or 16 of 24) and
    # said nothing
    from finetune_helpers import write_tiny_bert
    model = write_tiny_bert(tmp_path / "bert")
    train = write_csv(tmp_path / "t.csv", sentiment_rows(64, seed=0))
    with pytest.warns(RuntimeWarning, match="below --target-rank") as seen:
        code = _main(["finetune", "--model", str(model), "--train-file", str(train),
                      "--batch-size", "8", "--max-seq-len", "16", "--max-steps", "6",
                      "--no-progress", "--output-dir", str(tmp_path / "o"), *extra])
    assert code == 0
    message = next(str(w.message) for w in seen if "below --target-rank" in str(w.message))
    for needle in needles:
        assert needle in message, (needle, message)
    import json
    total = json.loads((tmp_path / "o" / "metrics.json").read_text())["total_rank"]
    assert f"at most {total} of" in message  # the bound is what the run reached


def test_the_default_schedule_reaches_the_rank_budget_without_a_warning(tmp_path):
    from finetune_helpers import write_tiny_bert
    model = write_tiny_bert(tmp_path / "bert")
    train = write_csv(tmp_path / "t.csv", sentiment_rows(64, seed=0))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        code = _main(["finetune", "--model", str(model), "--train-file", str(train),
                      "--batch-size", "8", "--max-seq-len", "16", "--max-steps", "6",
                      "--no-progress", "--output-dir", str(tmp_path / "o")])
    assert code == 0
    assert not [w for w in seen if "below --target-rank" in str(w.message)]


@pytest.mark.parametrize("method", ["increlora", "lora"])
def test_an_infinite_weight_decay_is_refused_before_the_data_is_read(method, tmp_path, capsys,
                                                                    no_data_loading):
    # it passed the check (>= 0): IncreLoRA failed after the model was loaded, naming
    # create_optimizer, and LoRA trained into NaN, blaming --lr
    code = _main(["finetune", "--method", method, "--weight-decay", "inf", "--output-dir",
                  str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    _one_line(capsys, "--weight-decay inf is invalid", "finite number >= 0")


@pytest.mark.parametrize("method", ["increlora", "lora", "adalora", "full"])
def test_a_warmup_that_never_ends_is_refused_for_every_method(method):
    """--max-steps 1 --warmup-ratio 0.9: the warmup covers every step, and the run trains at a
    learning rate of 0 (IncreLoRA was refused; LoRA, AdaLoRA and full ran, learning nothing:
    found by an audit)."""
    from increlora_fast.training.settings import RunSettings, resolve

    settings = RunSettings(method=method, max_steps=2, warmup_ratio=0.9)
    with pytest.raises(ValueError, match="--warmup-ratio 0.9 is invalid with 2 steps"):
        resolve(settings, 100)
    assert resolve(RunSettings(method=method, max_steps=20, warmup_ratio=0.9), 100).max_steps == 20


def test_init_warmup_help_states_the_default_the_code_uses():
    """``--init-warmup``'s help said its default was 5 % of the steps; `settings.resolve` sets
    it to the growth interval, which is 5 % only while ``--incre-interval`` is not given (with
    ``--incre-interval 40`` growth started at step 40, not at 5 %)."""
    import argparse

    from increlora_fast.cli.finetune import add_arguments
    from increlora_fast.training.settings import RunSettings, resolve

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = next(a.help for a in parser._actions if a.dest == "init_warmup")
    assert "--incre-interval" in text, text
    assert resolve(RunSettings(max_steps=300, incre_interval=40), 1000).init_warmup == 40


def test_compare_methods_named_twice_are_refused(tmp_path, capsys, no_data_loading):
    # `--compare --methods lora,lora` started the sweep: the second lora was the first's runs
    # again, and its table row was overwritten by them (one row for two requests)
    code = _main(["finetune", "--compare", "--methods", "lora,lora", "--output-dir",
                  str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    _one_line(capsys, "--methods 'lora,lora' is invalid", "each once")
