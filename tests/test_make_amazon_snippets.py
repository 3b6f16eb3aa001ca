"""scripts/compare/make_amazon_snippets.py: the class quotas of --majority-share on synthetic rows."""
import importlib.util
import random
from collections import Counter
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare" / "make_amazon_snippets.py"
spec = importlib.util.spec_from_file_location("make_amazon_snippets", SCRIPT)
snippets = importlib.util.module_from_spec(spec)
spec.loader.exec_module(snippets)


def _rows(n=4000, seed=0):
    rng = random.Random(seed)
    labels = rng.choices(["positive", "negative", "neutral"], weights=[46, 33, 21], k=n)
    return [(f"text {i}", lab) for i, lab in enumerate(labels)]


def test_quota_gives_the_share_and_keeps_the_other_classes_ratio():
    rows = _rows()
    quota = snippets.class_quota(rows, 600, 0.64)
    assert sum(quota.values()) == 600 and quota["positive"] == 384
    counts = Counter(lab for _, lab in rows)
    assert quota["negative"] / quota["neutral"] == pytest.approx(
        counts["negative"] / counts["neutral"], rel=0.03)


def test_split_with_a_share_fills_both_files_without_overlap():
    rows = _rows()
    train, dev = snippets.split(rows, 0.7)
    assert len(train) == snippets.TRAIN_ROWS and len(dev) == snippets.DEV_ROWS
    for part in (train, dev):
        assert Counter(lab for _, lab in part)["positive"] == 420
    assert not {t for t, _ in train} & {t for t, _ in dev}


def test_split_without_a_share_is_two_consecutive_blocks():
    rows = _rows()
    assert snippets.split(rows, None) == (rows[:600], rows[600:1200])


def test_too_few_rows_for_the_share_is_a_clear_error():
    with pytest.raises(SystemExit, match="--majority-share 0.9: not enough snippets"):
        snippets.split(_rows(n=1500), 0.9)


@pytest.mark.parametrize("share", ["0.3", "1.0"])
def test_share_out_of_range_names_the_option(share, tmp_path, capsys):
    with pytest.raises(SystemExit):
        snippets.main([str(tmp_path / "out"), "--majority-share", share])
    assert "--majority-share" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
