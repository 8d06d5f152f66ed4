"""scripts/reproduce_table.py: row names and how the tuned rows choose their learning rate."""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_table.py"


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("reproduce_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_row_names(table):
    for good in ("fp", "rtn-3", "gptq-4", "aqlm-2x8g8", "aqlm-3x8g8+p", "aqlm-4x8g8+pv", "llamacpp-IQ2_XS"):
        assert table.row_name(good) == good
    for bad in ("aqlm-2x8", "gptq-9", "aqlm-2x8g8+q", "llamacpp-iq2"):
        with pytest.raises(argparse.ArgumentTypeError):
            table.row_name(bad)


@pytest.fixture
def fake_tuning(table, monkeypatch, tmp_path):
    """_tune replaced by one that writes a pv_report.json whose best held-out perplexity is given per learning rate."""
    calls = []
    best = {1e-3: 40.0, 3e-4: 35.0}

    def tune(model_dir, quantized, args, out, budget):
        calls.append((out.relative_to(tmp_path).as_posix(), budget))
        out.mkdir(parents=True, exist_ok=True)
        evaluations = [{"step": 0, "perplexity": 50.0, "kl": 1.0}, {"step": 10, "perplexity": best[budget["lr"]], "kl": 0.5}]
        (out / "pv_report.json").write_text(json.dumps({"evaluations": evaluations, "seconds": 10.0}))

    monkeypatch.setattr(table, "_tune", tune)
    quantized = tmp_path / "base"
    quantized.mkdir()
    (quantized / "quantization_report.json").write_text(json.dumps({"bits_per_weight": 2.15, "seconds": 1.0}))
    return calls, best, quantized


def test_p_row_keeps_the_learning_rate_of_lowest_held_out_perplexity(table, fake_tuning, tmp_path):
    calls, best, quantized = fake_tuning
    args = argparse.Namespace(pv_config="{}")
    path, row = table._pv_row("aqlm-2x8g8+p", tmp_path, quantized, args, tmp_path / "work", {})
    assert [call[0] for call in calls] == ["work/aqlm-2x8g8+p/lr-0.001", "work/aqlm-2x8g8+p/lr-0.0003"]
    assert all(call[1]["update_codes"] is False for call in calls)
    assert path == tmp_path / "work" / "aqlm-2x8g8+p" / "lr-0.0003"
    assert row["lr"] == 3e-4 and row["tried"] == {"0.001": 40.0, "0.0003": 35.0}
    assert row["bits"] == 2.15 and row["seconds"] == 20.0  # both runs count

    best[1e-3] = 30.0
    calls.clear()
    path, row = table._pv_row("aqlm-3x8g8+p", tmp_path, quantized, args, tmp_path / "work", {})
    assert row["lr"] == 1e-3 and path.name == "lr-0.001"


def test_pv_row_tunes_with_its_p_rows_learning_rate(table, fake_tuning, tmp_path):
    calls, _, quantized = fake_tuning
    args = argparse.Namespace(pv_config="{}")
    with pytest.raises(LookupError, match=r"run aqlm-2x8g8\+p first"):
        table._pv_row("aqlm-2x8g8+pv", tmp_path, quantized, args, tmp_path / "work", {})
    path, row = table._pv_row("aqlm-2x8g8+pv", tmp_path, quantized, args, tmp_path / "work",
                              {"aqlm-2x8g8+p": {"lr": 3e-4}})
    assert calls[-1][0] == "work/aqlm-2x8g8+pv"
    assert calls[-1][1]["lr"] == 3e-4 and calls[-1][1]["update_codes"] is True
    assert row["lr"] == 3e-4


def test_pv_config_learning_rate_overrides_the_grid(table, fake_tuning, tmp_path):
    calls, _, quantized = fake_tuning
    args = argparse.Namespace(pv_config='{"lr": 0.001}')
    path, row = table._pv_row("aqlm-2x8g8+p", tmp_path, quantized, args, tmp_path / "work", {})
    assert [call[0] for call in calls] == ["work/aqlm-2x8g8+p/lr-0.001"] and row["lr"] == 1e-3


def test_results_come_from_every_row_on_disk(table, tmp_path):
    rows = tmp_path / "rows"
    rows.mkdir()
    (rows / "fp.json").write_text(json.dumps({"bits": 16.0, "size_mib": 256.6, "seconds": 0.0, "perplexity": 18.3}))
    # written by another run of the script, going on beside this one
    (rows / "aqlm-2x8g8+p.json").write_text(json.dumps(
        {"bits": 2.15, "size_mib": 81.3, "seconds": 9.0, "perplexity": 33.75, "lr": 1e-3, "tried": {"0.001": 95.7}}))
    table.write_outputs(tmp_path, argparse.Namespace(model="m", eval_windows=16, eval_seqlen=2048))
    text = (tmp_path / "results.md").read_text()
    assert "| fp | dense | 16.00 |" in text and "| aqlm-2x8g8+p | AQLM+P | 2.15 |" in text
    assert "- aqlm-2x8g8+p: lr 0.001 (0.001: 95.70)" in text
    assert (tmp_path / "perplexity_vs_bits.png").stat().st_size > 0
