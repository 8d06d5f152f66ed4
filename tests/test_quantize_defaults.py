"""CPU defaults of the quantizer: k-means on a faiss-style sample, the ``--preset`` flag, and the
ops.py wrappers through which every caller reaches the C k-means and beam search."""
import argparse

import pytest
import torch

from aqlm import AqlmScheme, ops
from aqlm.cli import add_quantize_arguments, quantize_config_from_args
from aqlm.quantize.layer import LayerConfig, init_quantized_weight


def parse(*options: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_quantize_arguments(parser)
    return parser.parse_args(["model", "--dataset", "data.txt", "--out", "out", *options])


def test_kmeans_trains_on_at_most_256_points_per_centroid_by_default():
    points = torch.randn(16 * 256 * 3, 8, generator=torch.Generator().manual_seed(0))
    sampled = ops.kmeans(points, 16, max_iter=10, seed=1)
    explicit = ops.kmeans(points, 16, max_iter=10, seed=1, max_points_per_centroid=256)
    everything = ops.kmeans(points, 16, max_iter=10, seed=1, max_points_per_centroid=None)
    assert torch.equal(sampled[0], explicit[0]) and torch.equal(sampled[1], explicit[1])
    assert not torch.equal(sampled[0], everything[0]), "the default must train on a sample"
    assert sampled[1].shape == (points.shape[0],) and sampled[1].dtype == torch.int64
    assert sampled[2] <= 1.05 * everything[2], "the sample's centroids must fit all points about as well"


def test_layer_init_uses_the_sampled_kmeans_by_default():
    assert LayerConfig().init_max_points_per_centroid == 256
    weight = torch.randn(128, 512, generator=torch.Generator().manual_seed(2))  # 8192 groups of 8
    scheme = AqlmScheme.parse("1x4g8")  # 16 centroids: a sample of 4096 groups
    default = init_quantized_weight(weight, LayerConfig(scheme=scheme, init_max_iter=5))
    sampled = init_quantized_weight(weight, LayerConfig(scheme=scheme, init_max_iter=5, init_max_points_per_centroid=256))
    full = init_quantized_weight(weight, LayerConfig(scheme=scheme, init_max_iter=5, init_max_points_per_centroid=None))
    assert all(torch.equal(a, b) for a, b in zip(default, sampled))
    assert not torch.equal(default[1], full[1])
    with pytest.raises(ValueError, match="init_max_points_per_centroid must be >= 1 or None, got 0"):
        LayerConfig(init_max_points_per_centroid=0)


@pytest.mark.parametrize("order", ["preset first", "preset last"])
def test_preset_sets_only_the_options_left_at_their_defaults(order):
    options = ["--preset", "cpu-fast"]
    options = options + ["--nsamples", "64"] if order == "preset first" else ["--nsamples", "64"] + options
    args = parse("--scheme", "2x8g8", *options)
    config = quantize_config_from_args(args)
    assert config.nsamples == 64 and config.seqlen == 512
    assert config.layer.max_epochs == 4 and config.layer.steps_per_epoch == 20
    assert config.layer.codebook_update == "lstsq" and config.layer.init_max_iter == 25
    assert config.layer.lstsq_tolerance == 3e-4
    fast = "bfloat16" if ops.cpu_has_fast_bf16() else "float32"
    assert config.finetune.max_epochs == 1 and config.finetune.dtype == fast and config.forward_dtype == fast
    assert config.layer.scheme == AqlmScheme.parse("2x8g8")


def test_preset_uses_bfloat16_products_only_where_the_cpu_has_them(monkeypatch):
    import importlib

    from aqlm.quantize import presets

    try:
        for fast, expected in ((True, "bfloat16"), (False, "float32")):
            monkeypatch.setattr(ops, "cpu_has_fast_bf16", lambda fast=fast: fast)
            reloaded = importlib.reload(presets)
            assert reloaded.PRESETS["cpu-fast"]["forward_dtype"] == reloaded.PRESETS["cpu-fast"]["finetune_dtype"] == expected
    finally:
        monkeypatch.undo()
        importlib.reload(presets)


def test_without_preset_the_upstream_defaults_stay():
    config = quantize_config_from_args(parse())
    assert config.nsamples == 128 and config.layer.max_epochs == 1000 and config.layer.codebook_update == "adam"
    assert config.layer.lstsq_tolerance is None and config.finetune.dtype == config.forward_dtype == "float32"
    assert config.layer.init_max_points_per_centroid == 256
    assert quantize_config_from_args(parse("--init-max-points-per-centroid", "0")).layer.init_max_points_per_centroid is None


def test_wrappers_check_arguments_at_the_boundary():
    with pytest.raises(TypeError, match="points must be float32, got torch.float64"):
        ops.kmeans(torch.zeros(10, 2, dtype=torch.float64), 2)
    codebooks = torch.randn(1, 16, 1, 8)
    scales = torch.ones(4)
    codes = torch.zeros(4, 2, 1, dtype=torch.int8)
    gradient = torch.zeros(4, 16)
    losses = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="codes must be contiguous"):
        ops.beam_search(None, codebooks, scales, torch.zeros(2, 4, 1, dtype=torch.int8).transpose(0, 1), gradient, losses)
    with pytest.raises(TypeError, match="losses must be float64"):
        ops.beam_search(None, codebooks, scales, codes, gradient, losses.float())
    ops.beam_search(None, codebooks, scales, codes, gradient, losses)
