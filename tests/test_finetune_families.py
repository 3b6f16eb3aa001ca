"""`finetune` on tiny random models of other families than BERT, offline: target modules and pad
tokens."""
from __future__ import annotations

from pathlib import Path

import pytest

from finetune_helpers import VOCAB, cli, tiny_args, tiny_files


def write_tiny_deberta(directory: Path) -> Path:
    """A randomly initialised DeBERTa-v2 (attention linears named query_proj, key_proj,
    value_proj) with the word tokenizer of `finetune_helpers`."""
    from transformers import BertTokenizer, DebertaV2Config, DebertaV2Model

    directory.mkdir(parents=True, exist_ok=True)
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(str(directory))
    DebertaV2Model(DebertaV2Config(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=24,
                                   max_position_embeddings=64)).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("families")
    return dict(tiny_files(root, train_rows=32, dev_rows=8),
                deberta=str(write_tiny_deberta(root / "deberta")))


@pytest.mark.parametrize("method", ["lora", "adalora", "increlora"])
def test_target_modules_the_model_lacks_are_refused_naming_the_option(tiny, tmp_path, capsys,
                                                                     method):
    """The default --target-modules name BERT's linears; DeBERTa-v2 has no 'query', 'key' or
    'value' (its are query_proj, ...): peft adapted the rest without a word, so a LoRA run
    trained fewer modules than asked; every method refuses it in one line naming the option,
    the entries and the model's linear layers."""
    out = tmp_path / method
    assert cli(tiny_args(dict(tiny, model=tiny["deberta"]), out, "--method", method,
                         steps=20)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "--target-modules" in err and "'query', 'key', 'value'" in err
    assert "query_proj" in err and "classifier" not in err.split("linear layers")[-1]
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize("tokenizer_pad", [False, True])
def test_a_config_pad_token_id_outside_the_vocabulary_is_replaced_by_the_padding_one(
        tmp_path, tokenizer_pad):
    """Some decoder configs name pad_token_id -1 (early Llama) or an id past the vocabulary: no
    input holds it, so a decoder classifier read the last position of every input, on padded
    batches a padding one, in training and evaluation (a warning only said they differ). The
    config now gets the id the batches are padded with."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from finetune_helpers import write_tiny_gpt2
    from increlora_fast.training.finetune_run import set_pad_token
    tokenizer = AutoTokenizer.from_pretrained(str(write_tiny_gpt2(tmp_path / "gpt2")))
    if tokenizer_pad:
        tokenizer.pad_token = "[UNK]"
    pad = tokenizer.convert_tokens_to_ids("[UNK]" if tokenizer_pad else "<eos>")
    for named in (-1, len(tokenizer)):
        model = SimpleNamespace(config=SimpleNamespace(pad_token_id=named))
        with pytest.warns(UserWarning, match=f"pad_token_id {named} .*{pad}"):
            assert set_pad_token(tokenizer, model, "m") == pad
        assert model.config.pad_token_id == tokenizer.pad_token_id == pad
