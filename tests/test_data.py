import pytest
import torch

from attnsparse.core.data import builtin_text, check_context, load_text, load_windows, tokenize, windows
from attnsparse.core.tiny import tiny_tokenizer
from attnsparse.errors import AttnsparseError


def test_windows_non_overlapping_and_evenly_spaced():
    ids = torch.arange(100)
    assert windows(ids, 30).tolist() == [list(range(30)), list(range(30, 60)), list(range(60, 90))]
    assert windows(ids, 30, stride=35)[:, 0].tolist() == [0, 35, 70]
    spaced = windows(ids, 10, count=4)
    assert spaced[:, 0].tolist() == [0, 25, 50, 75] and spaced.shape == (4, 10)


def test_window_errors_are_one_line_and_actionable():
    with pytest.raises(AttnsparseError, match="fewer than one window"):
        windows(torch.arange(5), 10)
    with pytest.raises(AttnsparseError, match="do not fit"):
        windows(torch.arange(100), 60, count=2)
    with pytest.raises(AttnsparseError, match="exceeds the model's maximum"):
        check_context(4096, 2048)


def test_text_file_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(AttnsparseError, match="is empty"):
        load_text(str(empty))
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(AttnsparseError, match="not valid UTF-8.*offset 3"):
        load_text(str(binary))
    with pytest.raises(AttnsparseError, match="does not exist"):
        load_text(str(tmp_path / "missing.txt"))
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    with pytest.raises(AttnsparseError, match="fewer than one window"):
        load_windows(tiny_tokenizer(), str(short), 64)


def test_builtin_text_is_long_english_and_deterministic():
    text = builtin_text()
    assert len(text) > 300_000 and "statement" in text and text == load_text(None)
    ids = tokenize(tiny_tokenizer(), text[:1000])
    assert ids.dtype == torch.long and ids.numel() == 1000


def test_hub_data_set_unreachable_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # the libraries read these when imported: patch their constants too, or a hanging network takes a minute
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("datasets.config.HF_DATASETS_OFFLINE", True)
    with pytest.raises(AttnsparseError, match="cannot load hub data set 'no-such/dataset'"):
        load_text("hf:no-such/dataset:cfg:test")


def test_unreachable_hub_data_set_fails_fast_with_one_request(unreachable_hub):
    with pytest.raises(AttnsparseError) as caught:
        load_text("hf:missing")
    assert unreachable_hub == {"requests": 1, "sleeps": 0}
    message = str(caught.value)
    assert "\n" not in message and "cannot load hub data set 'missing'" in message and "HF_HUB_OFFLINE=1" in message
