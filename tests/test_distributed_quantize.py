"""``quantize`` with several processes (torch.distributed, gloo on CPU): the checkpoint is bit-identical
to a single process's with the same threads per process, also when a 2-process run resumes a run.
Ranks with work borrow the threads of idle ranks, which keeps the identity because the layer
search and block fine-tuning give the same bits at any thread count (tested here on shapes large
enough for torch to use several threads)."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aqlm.cli import build_parser, main, quantize_config_from_args
from aqlm.launch import check_nproc
from aqlm.quantize import quantize_model
from aqlm.distributed import World
from aqlm.format import AqlmScheme
from aqlm.inference import QuantizedLinear
from aqlm.kernel_choice import cpuinfo_field
from aqlm.quantize.distributed import CoreShare, assign_owners, torch_threads, tree_nodes, tree_sum
from aqlm.quantize.finetune import FinetuneConfig, finetune_block
from aqlm.quantize.layer import LayerConfig, quantize_weight

from test_quantize_model import tiny_model_dir, token_file

# Six batches of one window (split 3 + 3 between two ranks) and two validation windows.
SETTINGS = ["--scheme", "2x4g8", "--nsamples", "6", "--val-size", "2", "--seqlen", "32", "--max-epochs", "2",
            "--steps-per-epoch", "5", "--init-max-iter", "5", "--codebook-update", "lstsq", "--finetune-max-epochs", "1",
            "--finetune-lr", "1e-4", "--threads", "1", "--no-progress"]


def arguments(model_dir: Path, tokens: Path, out: Path, *extra: str) -> list[str]:
    return ["quantize", str(model_dir), "--dataset", str(tokens), "--out", str(out), *SETTINGS, *extra]


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "aqlm", *argv], capture_output=True, text=True, env=env, timeout=300)


def in_process(function, *args, **kwargs):
    """Call ``function`` in this process with one torch thread, as the workers run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return function(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def assert_same_checkpoint(expected: Path, got: Path) -> None:
    want, have = load_file(str(expected / "model.safetensors")), load_file(str(got / "model.safetensors"))
    assert want.keys() == have.keys()
    for name in want:
        assert torch.equal(want[name], have[name]), f"{name} differs"
    reports = [json.loads((path / "quantization_report.json").read_text()) for path in (expected, got)]
    assert reports[0]["bits_per_weight"] == reports[1]["bits_per_weight"]
    assert [(l["name"], l["bits_per_weight"]) for l in reports[0]["layers"]] == [
        (l["name"], l["bits_per_weight"]) for l in reports[1]["layers"]
    ]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The model, the tokens and the checkpoint of a one-process run."""
    tmp_path = tmp_path_factory.mktemp("distributed")
    model_dir, tokens = tiny_model_dir(tmp_path), token_file(tmp_path)
    assert in_process(main, arguments(model_dir, tokens, tmp_path / "one")) == 0
    return model_dir, tokens, tmp_path / "one"


def test_two_processes_write_the_checkpoint_of_one(single, tmp_path):
    model_dir, tokens, one = single
    result = run_cli(*arguments(model_dir, tokens, tmp_path / "two", "--nproc", "2"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("block 0 self_attn.q_proj") == 1, "only rank 0 logs"
    assert "block 0: fine-tuning on rank 0 with 2 threads" in result.stdout, "rank 1's thread is lent to rank 0"
    lines = {line.split()[2]: line for line in result.stdout.splitlines() if line.startswith("block 0 ")}
    assert lines["self_attn.q_proj"].endswith("on rank 0 with 1 thread"), "q/k/v: both ranks busy, none lent"
    assert lines["self_attn.k_proj"].endswith("on rank 1 with 1 thread")
    assert lines["self_attn.o_proj"].endswith("on rank 0 with 2 threads"), "o_proj alone: rank 1 lends its thread"
    assert lines["mlp.down_proj"].endswith("on rank 0 with 2 threads")
    assert_same_checkpoint(one, tmp_path / "two")


def test_two_processes_match_one_with_cpu_fasts_bfloat16_and_early_ending_options(single, tmp_path):
    """bfloat16 forward passes and fine-tuning, and the least-squares tolerance, keep the identity
    with one process that has both processes' threads (on AMX, bfloat16 fine-tuning's bits follow
    the thread count, and rank 0 fine-tunes with 2)."""
    model_dir, tokens, _ = single
    extra = ("--forward-dtype", "bfloat16", "--finetune-dtype", "bfloat16", "--lstsq-tolerance", "3e-4")
    assert in_process(main, arguments(model_dir, tokens, tmp_path / "one", *extra, "--threads", "2")) == 0
    result = run_cli(*arguments(model_dir, tokens, tmp_path / "two", *extra, "--nproc", "2"))
    assert result.returncode == 0, result.stderr
    assert_same_checkpoint(tmp_path / "one", tmp_path / "two")


def test_two_processes_resume_a_killed_run(single, tmp_path):
    model_dir, tokens, one = single
    out = tmp_path / "resumed"
    argv = arguments(model_dir, tokens, out)

    class Killed(Exception):
        pass

    def log(line: str) -> None:
        if line.startswith("block 0 took"):  # written after block 0 is saved
            raise Killed

    config = quantize_config_from_args(build_parser().parse_args(argv))
    with pytest.raises(Killed):
        in_process(quantize_model, model_dir, tokens, out, config, progress=False, log=log)
    assert (out / "aqlm_progress" / "block_0000.json").exists() and not (out / "model.safetensors").exists()
    result = run_cli(*argv, "--resume", "--nproc", "2")
    assert result.returncode == 0, result.stderr
    assert "block 0: restored" in result.stdout
    assert_same_checkpoint(one, out)


def test_tree_sum_is_the_same_for_every_split():
    """Full-width float64 leaves, so that the order of the additions shows in the last bits."""
    leaves = torch.randn(13, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1e3
    in_order = [leaves[0]]
    for leaf in leaves[1:]:
        in_order.append(in_order[-1] + leaf)
    assert not all(torch.equal(tree_sum(0, n, lambda i: leaves[i], torch.add), in_order[n - 1]) for n in range(1, 14))
    for count in range(1, 14):
        whole = tree_sum(0, count, lambda i: leaves[i], torch.add)
        for size in range(1, 6):
            known = {}
            for batches in World(0, size).batch_ranges(count):
                for node in tree_nodes(0, count, batches.start, batches.stop):
                    known[node] = tree_sum(*node, lambda i: leaves[i], torch.add)
            assert sum(hi - lo for lo, hi in known) == count
            combined = tree_sum(0, count, lambda i: pytest.fail("a leaf outside the known nodes"), torch.add, known)
            assert torch.equal(combined, whole), (count, size)


def test_linears_are_shared_out_largest_first():
    assert assign_owners([64 * 64, 32 * 64, 32 * 64], 2) == [0, 1, 1]
    assert assign_owners([128 * 64, 128 * 64], 2) == [0, 1]
    assert assign_owners([64 * 128], 2) == [0]
    assert assign_owners([5, 5, 5], 1) == [0, 0, 0]


def test_idle_ranks_lend_their_threads_to_busy_ranks_on_their_machine():
    machines, threads = ("a", "a", "b", "b", "b"), (1, 1, 2, 2, 3)
    share = lambda rank: CoreShare(rank, machines, threads)
    assert [share(rank).threads_with({0}) for rank in range(5)] == [2, 1, 2, 2, 3], "machine b has no busy rank"
    assert [share(rank).threads_with({0, 2}) for rank in range(5)] == [2, 1, 7, 2, 3]
    assert [share(rank).threads_with({2, 3}) for rank in range(5)] == [1, 1, 5, 2, 3], "rank 4's threads go to rank 2"
    assert [share(rank).threads_with(set(range(5))) for rank in range(5)] == list(threads)
    assert [share(rank).lent_to({0, 2}) for rank in range(5)] == [1, 0, 5, 0, 0]
    alone = CoreShare.gather(World(), 3)
    assert alone.threads == (3,) and alone.threads_with({0}) == 3 and alone.lent_to({0}) == 0


def _bits(tensors) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def bfloat16_sums_follow_threads() -> bool:
    """Whether torch's bfloat16 products here may give other bits at another thread count: oneDNN's
    AMX kernels split long sums between threads (measured on a 2-core Xeon with AMX: the weight
    gradient of a bfloat16 linear over 4096 tokens, 4096x576 inputs by a 1536x576 weight, differs at
    1 and 2 threads, and agrees under ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16)."""
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    flags = (cpuinfo_field("flags") or "").split()
    return "amx_bf16" in flags and (not limit or "AMX" in limit or limit == "ALL")


@pytest.mark.parametrize("finetune_dtype", ["float32", "bfloat16"])
def test_layer_search_and_finetuning_give_the_same_bits_at_1_and_2_threads(finetune_dtype):
    """What lets a busy rank borrow threads without changing the checkpoint. Where bfloat16 sums
    follow the thread count (AMX), bfloat16 fine-tuning runs at 2 threads both times: rank 0
    fine-tunes with every thread of its machine, as one process with them all does."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=768, num_attention_heads=8, num_key_value_heads=2)
    dense = LlamaDecoderLayer(config, layer_idx=0)
    x = torch.randn(4, 128, 256)
    kwargs = {"position_embeddings": LlamaRotaryEmbedding(config)(x, torch.arange(128)[None]), "attention_mask": None}
    with torch.no_grad():
        targets = dense(x, **kwargs)
        targets = targets[0] if isinstance(targets, tuple) else targets
    layer_config = LayerConfig(scheme=AqlmScheme.parse("2x6g8"), max_epochs=2, steps_per_epoch=10, init_max_iter=5,
                               codebook_update="lstsq")
    names = ("mlp.down_proj", "self_attn.o_proj")
    xtx = {}  # X^T X is summed by each rank on its own threads: not part of what is compared
    for name in names:
        inputs = torch.randn(512, dense.get_submodule(name).in_features, generator=torch.Generator().manual_seed(1))
        xtx[name] = inputs.T @ inputs
    results = []
    for threads in (1, 2):
        block = copy.deepcopy(dense)
        found = []
        with torch_threads(threads):
            for name in names:
                linear = block.get_submodule(name)
                result = quantize_weight(linear.weight.detach(), xtx[name], layer_config, layer_seed=7)
                found += _bits((result.codes, result.codebooks, result.scales))
                block.set_submodule(name, QuantizedLinear.from_parts(result.codes, result.codebooks, result.scales))
            finetune_at = 2 if finetune_dtype == "bfloat16" and bfloat16_sums_follow_threads() else threads
            with torch_threads(finetune_at):
                finetune_block(block, x, targets, kwargs,
                               FinetuneConfig(max_epochs=1, lr=1e-3, dtype=finetune_dtype), seed=3, progress=False)
        results.append(found + _bits(p for p in block.parameters() if p.is_floating_point()))
    assert len(results[0]) == len(results[1])
    for one, two in zip(*results):
        assert torch.equal(one, two)


def test_bad_process_counts_are_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="--nproc must be at least 1, got 0"):
        check_nproc(0, {})
    with pytest.raises(ValueError, match="WORLD_SIZE=2.*--nproc-per-node"):
        check_nproc(2, {"WORLD_SIZE": "2"})
    assert check_nproc(None, {"WORLD_SIZE": "2"}) == 1
    assert main(arguments(tmp_path, tmp_path / "tokens.pt", tmp_path / "out", "--nproc", "-1")) == 2
    assert capsys.readouterr().err.strip() == "error: --nproc must be at least 1, got -1"


def test_a_failing_worker_fails_the_launch(tmp_path):
    result = run_cli(*arguments(tmp_path / "missing", tmp_path / "tokens.pt", tmp_path / "out", "--nproc", "2"))
    assert result.returncode == 1
    assert "error: model" in result.stderr  # the worker's own one-line error
    assert result.stderr.strip().splitlines()[-1] == (
        "error: the 2-process quantize run failed (torchrun exit status 1); the failing process's error is printed above"
    )
