"""Per-phase wall time of a quantization run: in quantization_report.json, the summary and the ETA line."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aqlm import AqlmScheme
from aqlm.quantize import FinetuneConfig, LayerConfig, QuantizeConfig, quantize_model
from aqlm.quantize.phases import PHASES, PhaseTimer


def test_phase_timer_adds_time_per_phase_and_rejects_unknown_names():
    timer = PhaseTimer()
    with timer.phase("beam_search"):
        sum(range(10000))
    timer.add({"beam_search": 1.0, "saving": 2.0})
    seconds = timer.as_dict()
    assert list(seconds) == list(PHASES)
    assert 1.0 < seconds["beam_search"] < 2.0 and seconds["saving"] == 2.0 and seconds["xtx"] == 0.0
    assert "beam_search 1.0 s" in timer.summary()
    with pytest.raises(ValueError, match="unknown phase 'beam'"):
        with timer.phase("beam"):
            pass


def test_report_splits_the_wall_time_into_phases(tmp_path):
    torch.manual_seed(0)
    model_config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(model_config).save_pretrained(tmp_path / "dense")
    torch.save(torch.randint(0, 96, (4000,), generator=torch.Generator().manual_seed(0)), tmp_path / "tokens.pt")
    config = QuantizeConfig(
        layer=LayerConfig(scheme=AqlmScheme.parse("2x4g8"), max_epochs=2, steps_per_epoch=5, init_max_iter=5,
                          codebook_update="lstsq"),
        finetune=FinetuneConfig(max_epochs=1, lr=1e-4),
        nsamples=4,
        seqlen=32,
    )
    lines = []
    report = quantize_model(tmp_path / "dense", tmp_path / "tokens.pt", tmp_path / "q", config, progress=False,
                            log=lines.append)
    written = json.loads((tmp_path / "q" / "quantization_report.json").read_text())
    phases = written["phase_seconds"]
    assert list(phases) == list(PHASES)
    for name in PHASES:
        assert phases[name] > 0, f"phase {name} was not timed"
    assert sum(phases.values()) <= written["seconds"] + 1e-6
    assert report.phases == phases
    assert list(written["phase_cpu_seconds"]) == list(PHASES) and written["phase_cpu_seconds"]["beam_search"] > 0
    assert "phases (this run): calibration" in lines[-1] and "beam_search" in lines[-1]
    assert any("ETA for the 1 remaining blocks" in line for line in lines)


def test_cpu_time_is_kept_per_phase():
    timer = PhaseTimer()
    with timer.phase("kmeans_init"):
        sum(i * i for i in range(200000))
    timer.add({"xtx": 1.0}, {"xtx": 0.5})
    assert timer.cpu_dict()["kmeans_init"] > 0 and timer.cpu_dict()["xtx"] == 0.5
    assert list(timer.cpu_dict()) == list(PHASES)
