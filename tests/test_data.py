from __future__ import annotations

import json

import pytest
import torch

from aqlm.data import (
    calibration_windows,
    evaluation_windows,
    load_text,
    load_tokens,
    prepare_windows,
    tokenize_text,
)


class WordTokenizer:
    """A minimal tokenizer with the Hugging Face call signature: ids of whitespace-separated words."""

    def __init__(self) -> None:
        self.vocab: dict = {}

    def __call__(self, text: str, return_tensors: str = "pt", verbose: bool = True) -> dict:
        ids = [self.vocab.setdefault(word, len(self.vocab)) for word in text.split()]
        return {"input_ids": torch.tensor([ids])}


def test_load_text_txt_is_verbatim(tmp_path):
    text = " = Title = \n\n Some text , with @-@ tokens .\n"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    assert load_text(tmp_path / "a.txt") == text


def test_load_text_jsonl_joins_records(tmp_path):
    lines = [json.dumps({"text": "first"}), "", json.dumps({"text": "second", "id": 2})]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert load_text(str(tmp_path / "a.jsonl")) == "first\n\nsecond"


def test_load_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match="a.csv"):
        load_text(tmp_path / "a.csv")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match="line 1"):
        load_text(tmp_path / "bad.jsonl")


def test_tokenize_text_is_one_dimensional_long():
    ids = tokenize_text(WordTokenizer(), "a b a c")
    assert ids.dtype == torch.long
    assert ids.tolist() == [0, 1, 0, 2]


def test_load_tokens_from_tensor_and_files(tmp_path):
    flat = torch.arange(12, dtype=torch.int32)
    assert load_tokens(flat).dtype == torch.long
    torch.save(flat.reshape(3, 4), tmp_path / "t.pt")
    assert torch.equal(load_tokens(tmp_path / "t.pt"), flat.long())
    (tmp_path / "c.txt").write_text("x y x")
    assert load_tokens(tmp_path / "c.txt", WordTokenizer()).tolist() == [0, 1, 0]


def test_load_tokens_errors(tmp_path):
    (tmp_path / "c.txt").write_text("x y x")
    with pytest.raises(ValueError, match="tokenizer"):
        load_tokens(tmp_path / "c.txt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_tokens(tmp_path / "nope.pt")
    torch.save(torch.zeros(3), tmp_path / "f.pt")
    with pytest.raises(TypeError, match="float32"):
        load_tokens(tmp_path / "f.pt")
    with pytest.raises(ValueError, match="shape"):
        load_tokens(torch.zeros(2, 2, 2, dtype=torch.long))


def test_calibration_windows_are_seeded_slices():
    tokens = torch.arange(1000)
    windows = calibration_windows(tokens, nsamples=16, seqlen=32, seed=3)
    assert windows.shape == (16, 32) and windows.dtype == torch.long
    # every window is a run of consecutive tokens that leaves at least one token after it
    assert torch.equal(windows - windows[:, :1], torch.arange(32).expand(16, 32))
    assert int(windows[:, -1].max()) <= 998
    assert torch.equal(windows, calibration_windows(tokens, 16, 32, seed=3))
    assert not torch.equal(windows, calibration_windows(tokens, 16, 32, seed=4))


def test_calibration_windows_need_seqlen_plus_one_tokens():
    assert calibration_windows(torch.arange(33), 4, 32, seed=0).shape == (4, 32)
    with pytest.raises(ValueError, match=r"33 tokens.*got 32"):
        calibration_windows(torch.arange(32), 4, 32, seed=0)


def test_evaluation_windows_drop_the_tail():
    windows = evaluation_windows(torch.arange(10), 3)
    assert windows.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert evaluation_windows(torch.arange(2), 3).shape == (0, 3)
    with pytest.raises(ValueError, match="seqlen"):
        evaluation_windows(torch.arange(10), 0)


def _windows(dataset, seqlen: int, **overrides):
    settings = dict(nsamples=12, seqlen=seqlen, seed=0, val_fraction=0.1, eval_windows=5, vocab_size=96)
    settings.update(overrides)
    return prepare_windows(dataset, None, None, **settings)


def test_two_dimensional_tokens_are_independent_sequences():
    rows = torch.arange(10 * 40).view(10, 40) % 96
    windows, held_out = _windows(rows, 32)
    assert windows.shape == (12, 32) and held_out.shape == (1, 32)
    starts = {int(w[0]) for w in windows}
    assert starts == {int(r[0]) for r in rows[:9]}  # every training window is a row prefix, held-out row excluded
    torch.testing.assert_close(held_out, rows[9:, :32])
    with pytest.raises(ValueError, match="fewer than seqlen"):
        _windows(rows, 48)


def test_stream_windows_are_seeded_calibration_windows_of_the_head_and_consecutive_ones_of_the_tail():
    tokens = torch.randint(0, 96, (1000,), generator=torch.Generator().manual_seed(1))
    windows, held_out = _windows(tokens, 16, seed=3)
    torch.testing.assert_close(windows, calibration_windows(tokens[:900], 12, 16, 3))
    torch.testing.assert_close(held_out, evaluation_windows(tokens[900:], 16)[:5])
    again, _ = _windows(tokens, 16, seed=3)
    assert torch.equal(windows, again) and not torch.equal(windows, _windows(tokens, 16, seed=4)[0])


def test_window_errors_name_the_problem():
    with pytest.raises(ValueError, match="vocabulary"):
        _windows(torch.full((500,), 200), 16)
    with pytest.raises(ValueError, match="too few tokens: training windows"):
        _windows(torch.arange(10), 16)
    with pytest.raises(ValueError, match="too few tokens for evaluation"):
        _windows(torch.arange(100) % 96, 16)
