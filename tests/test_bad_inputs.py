"""Bad inputs get one clear line before any slow work, and labels and columns are checked
(issue 28, items 4 and 5)."""
from __future__ import annotations

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
    with pytest.raises(ValueError, match=r"d\.csv row 1: label 'neutral' does not occur in the "
                                         r"training data .*t2\.csv.*'label'.*swapped"):
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
