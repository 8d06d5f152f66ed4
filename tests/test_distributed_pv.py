"""Data-parallel PV-Tuning: 2 gloo processes give the run of 1 process (losses, evaluations, codes), resume included."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aqlm import save_quantized
from aqlm.cli import main
from aqlm.distributed import World, environment_world_size, leave_process_group
from aqlm.launch import without_nproc
from aqlm.pv_tuning import PVConfig, pv_tune
from aqlm.pv_tuning.train import CHECKPOINT_DIR, REPORT_FILE, check_batch_split
from random_models import quantize_linears, tiny_llama

REPO = Path(__file__).resolve().parents[1]
VOCAB = 128
STEPS = 4
SETTINGS = dict(nsamples=8, seqlen=32, num_steps=STEPS, batch_size=4, microbatch_size=1, eval_windows=3,
                eval_every=2, save_every=2, code_lr=0.3, max_code_change_per_step=0.05, num_threads=1)
CLI_SETTINGS = [
    "--nsamples", "8", "--seqlen", "32", "--steps", str(STEPS), "--batch-size", "4", "--microbatch-size", "1",
    "--eval-windows", "3", "--eval-every", "2", "--save-every", "2", "--code-lr", "0.3",
    "--max-code-change-per-step", "0.05", "--threads", "1", "--no-progress",
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny dense Llama, its quick 2x4g4 AQLM student (k-means initialisation only) and a token file."""
    root = tmp_path_factory.mktemp("dist_pv")
    tiny_llama(seed=0, vocab=VOCAB).save_pretrained(root / "dense")
    tiny_llama(seed=0, vocab=VOCAB).to(torch.bfloat16).save_pretrained(root / "dense_bf16")
    student = tiny_llama(seed=0, vocab=VOCAB)
    quantize_linears(student, "2x4g4", init_max_iter=4)
    save_quantized(student, root / "aqlm")
    torch.save(torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(0)), root / "tokens.pt")
    return {"dense": root / "dense", "dense_bf16": root / "dense_bf16", "aqlm": root / "aqlm", "tokens": root / "tokens.pt"}


def finetune_in_processes(model_dirs, out: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    command = [
        sys.executable, "-m", "aqlm", "finetune", "--base", str(model_dirs["dense"]),
        "--quantized", str(model_dirs["aqlm"]), "--dataset", str(model_dirs["tokens"]), "--out", str(out),
        "--nproc", str(nproc), *CLI_SETTINGS, *extra,
    ]
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)


def single_process_run(model_dirs, out: Path, callback=None, resume: bool = False, **settings) -> None:
    """pv_tune on one thread with SETTINGS, changed by ``settings`` (in every process of a group when called there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pv_tune(model_dirs["dense"], model_dirs["aqlm"], model_dirs["tokens"], out, PVConfig(**{**SETTINGS, **settings}),
                resume=resume, progress=False, log=lambda line: None, callback=callback)
    finally:
        torch.set_num_threads(threads)


def assert_same_run(out: Path, reference: Path, processes: int = 2, exact: bool = False) -> None:
    """Same per-step losses and code changes, evaluations and saved tensors (codes exactly; all but the
    final evaluation exactly with ``exact``); ``out`` finished by ``processes`` processes, ``reference`` by one."""
    report, expected = (json.loads((d / REPORT_FILE).read_text()) for d in (out, reference))
    assert report["processes"] == processes and expected["processes"] == 1
    assert [s["step"] for s in report["steps"]] == list(range(1, STEPS + 1))
    if exact:  # not the final evaluation: the saved layers' kernels depend on the number of tokens per call
        assert report["steps"] == expected["steps"] and report["evaluations"] == expected["evaluations"]
    torch.testing.assert_close(torch.tensor([s["loss"] for s in report["steps"]], dtype=torch.float64),
                               torch.tensor([s["loss"] for s in expected["steps"]], dtype=torch.float64),
                               rtol=1e-4, atol=0)
    assert [s["codes_changed"] for s in report["steps"]] == [s["codes_changed"] for s in expected["steps"]]
    for got, want in zip(report["evaluations"] + [report["final"]], expected["evaluations"] + [expected["final"]]):
        assert got["step"] == want["step"]
        assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-4)
        assert got["kl"] == pytest.approx(want["kl"], rel=1e-3, abs=1e-7)
    saved, wanted = load_file(str(out / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert saved.keys() == wanted.keys()
    for key, tensor in saved.items():
        if key.endswith(".codes") or exact:
            assert torch.equal(tensor, wanted[key]), key
        else:
            torch.testing.assert_close(tensor, wanted[key], rtol=1e-4, atol=1e-6, msg=key)
    assert not (out / CHECKPOINT_DIR).exists()


def assert_two_processes_resume_one(model_dirs, tmp_path: Path, *flags: str, exact: bool = False, **settings) -> None:
    """A 1-process run (``settings``) stopped by Ctrl-C after its step-2 checkpoint, resumed by 2
    processes with ``flags``, gives the uninterrupted 1-process run in ``tmp_path / "one"``."""
    def interrupt(record: dict) -> None:
        if record["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        single_process_run(model_dirs, tmp_path / "resumed", callback=interrupt, **settings)
    assert (tmp_path / "resumed" / CHECKPOINT_DIR).is_dir()
    resumed = finetune_in_processes(model_dirs, tmp_path / "resumed", 2, "--resume", *flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path / "resumed", tmp_path / "one", exact=exact)


def test_two_gloo_processes_reproduce_one_process_and_resume(model_dirs, tmp_path):
    single_process_run(model_dirs, tmp_path / "one")
    assert json.loads((tmp_path / "one" / REPORT_FILE).read_text())["steps"][-1]["codes_changed"] > 0

    two = finetune_in_processes(model_dirs, tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("tuning, 4 steps") == 1  # rank 0 alone reports
    assert_same_run(tmp_path / "two", tmp_path / "one")

    assert_two_processes_resume_one(model_dirs, tmp_path)


def test_sharded_optimizer_state_gives_the_same_run_and_resumes(model_dirs, tmp_path):
    """--shard-optimizer-state (ZeRO stage 1): 2 processes, each holding about half of the
    optimizer moments, give the 1-process run, and resume a 1-process checkpoint."""
    single_process_run(model_dirs, tmp_path / "one")
    sharded = finetune_in_processes(model_dirs, tmp_path / "sharded", 2, "--shard-optimizer-state")
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "optimizer state sharded over 2 processes" in sharded.stdout
    assert_same_run(tmp_path / "sharded", tmp_path / "one")
    report, expected = (json.loads((tmp_path / d / REPORT_FILE).read_text()) for d in ("sharded", "one"))
    assert report["optimizer_state_sharded"] and not expected["optimizer_state_sharded"]
    assert report["optimizer_state_mib_rank0"] < 0.75 * expected["optimizer_state_mib_rank0"]

    assert_two_processes_resume_one(model_dirs, tmp_path, "--shard-optimizer-state")


ONE_MICROBATCH_PER_PROCESS = ["--microbatch-size", "2"]  # 4 windows per step: 2 processes x 1 microbatch


@pytest.mark.parametrize("teacher", ["dense", "dense_bf16"])
def test_fsdp_gives_the_run_of_one_process_bit_for_bit_and_resumes(model_dirs, tmp_path, teacher):
    """--fsdp: 2 processes, each holding its rows of the decoder blocks of both models, give the
    1-process run bit for bit when each takes one microbatch per step (one process then also sums
    two microbatches' gradients), hold less than one process does, and resume its checkpoint; also
    with a bfloat16 teacher file, which each FSDP process converts to float32 after sharding."""
    model_dirs = {**model_dirs, "dense": model_dirs[teacher]}
    single_process_run(model_dirs, tmp_path / "one", microbatch_size=2)
    sharded = finetune_in_processes(model_dirs, tmp_path / "fsdp", 2, "--fsdp", *ONE_MICROBATCH_PER_PROCESS)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "decoder blocks of both models sharded over 2 processes (FSDP2)" in sharded.stdout
    assert_same_run(tmp_path / "fsdp", tmp_path / "one", exact=True)
    report, expected = (json.loads((tmp_path / d / REPORT_FILE).read_text()) for d in ("fsdp", "one"))
    assert report["fsdp"] and not expected["fsdp"]
    assert report["tensors_mib_rank0"] < 0.75 * expected["tensors_mib_rank0"]

    assert_two_processes_resume_one(model_dirs, tmp_path, "--fsdp", *ONE_MICROBATCH_PER_PROCESS, exact=True,
                                    microbatch_size=2)


@pytest.mark.parametrize("flags,settings", [
    (["--delta-decay", "1"], dict(delta_decay=1.0)),
    (["--delta-decay", "0.5", "--update-non-quantized-parameters", "--code-trust-ratio", "0.01"],
     dict(delta_decay=0.5, update_non_quantized_parameters=True, code_trust_ratio=0.01)),
    (["--no-update-codes", "--eval-batch-size", "1"], dict(update_codes=False, eval_batch_size=1)),
    (["--code-selection-temperature", "0.5", "--adam"], dict(code_selection_temperature=0.5, lamb=False)),
], ids=["direct-v-step", "penalized-trust-ratio-all-parameters", "p-only-uneven-evaluation", "sampled-selection-adam"])
def test_fsdp_gives_the_run_of_one_process_in_every_mode(model_dirs, tmp_path, flags, settings):
    """The V step's variants (direct, penalized with a trust ratio, none), sampled code selection,
    Adam, and trained non-quantized parameters: 2 FSDP processes give one process's run bit for bit.
    With one evaluation window per batch, 3 windows give rank 0 one batch more than rank 1, which
    must then run a forward pass more (FSDP gathers every block from both)."""
    single_process_run(model_dirs, tmp_path / "one", microbatch_size=2, **settings)
    sharded = finetune_in_processes(model_dirs, tmp_path / "fsdp", 2, "--fsdp", *flags, *ONE_MICROBATCH_PER_PROCESS)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert_same_run(tmp_path / "fsdp", tmp_path / "one", exact=True)


def _fsdp_run_interrupted_after_its_checkpoint(rank: int, world_size: int, init_file: str, dirs: dict, out: str):
    """pv_tune with FSDP in a gloo group, interrupted during step 3 (after the checkpoint of step 2)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)

    def interrupt(record: dict) -> None:
        if record["step"] == 3:
            raise KeyboardInterrupt

    try:
        single_process_run(dirs, Path(out), callback=interrupt, microbatch_size=2, fsdp=True)
    except KeyboardInterrupt:
        pass
    finally:
        leave_process_group()


def test_fsdp_checkpoint_is_sharded_and_resumes_with_one_or_two_processes(model_dirs, tmp_path):
    """An FSDP checkpoint: each process writes its rows of the moments and buffers
    (torch.distributed.checkpoint), rank 0 the small rest; one process and 2 FSDP processes resume it
    to the uninterrupted run, bit for bit."""
    import shutil

    import torch.multiprocessing as mp

    single_process_run(model_dirs, tmp_path / "one", microbatch_size=2)
    mp.start_processes(_fsdp_run_interrupted_after_its_checkpoint,
                       args=(2, str(tmp_path / "init"), model_dirs, str(tmp_path / "fsdp")),
                       nprocs=2, start_method="spawn")
    checkpoint = tmp_path / "fsdp" / CHECKPOINT_DIR
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    assert state["step"] == 2 and state["sharded_tensors"] == "tensors-2"
    assert sorted(p.name for p in (checkpoint / "tensors-2").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert [p.name for p in checkpoint.iterdir() if p.name.startswith("tensors-")] == ["tensors-2"]  # step 2 only
    assert "state" not in state["optimizer"] and state["optimizer"]["tensor_names"]  # no moments in state.pt
    shutil.copytree(tmp_path / "fsdp", tmp_path / "fsdp_again")

    single_process_run(model_dirs, tmp_path / "fsdp", resume=True, microbatch_size=2)
    assert_same_run(tmp_path / "fsdp", tmp_path / "one", processes=1, exact=True)
    again = finetune_in_processes(model_dirs, tmp_path / "fsdp_again", 2, "--resume", "--fsdp",
                                  *ONE_MICROBATCH_PER_PROCESS)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout
    assert_same_run(tmp_path / "fsdp_again", tmp_path / "one", exact=True)


def _sharded_optimizer_steps(rank: int, world_size: int, init_file: str, out: str) -> None:
    """Two PV steps with fixed gradients on a tiny student, optimizer state sharded over the
    processes of a gloo group (none for world_size 1); rank 0 saves the gathered state."""
    import torch.distributed as dist

    from aqlm.pv_tuning.optim import PVOptimizer
    from aqlm.pv_tuning.train import dequantized_student

    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    student = tiny_llama(seed=0, vocab=VOCAB)
    quantize_linears(student, "2x4g4", init_max_iter=2)
    entries, non_quantized = dequantized_student(student)
    config = PVConfig(update_non_quantized_parameters=True, code_lr=0.3, max_code_change_per_step=0.05,
                      shard_optimizer_state=True, num_threads=1)
    optimizer = PVOptimizer(entries, non_quantized, config)
    generator = torch.Generator().manual_seed(5)
    for _ in range(2):
        optimizer.zero_grad()
        for parameter in [e.linear.weight for e in entries] + list(non_quantized.values()):
            parameter.grad = torch.randn(parameter.shape, generator=generator) * 1e-2
        optimizer.step()
    optimizer.gather_state()
    if rank == 0:
        torch.save({"sharded": optimizer.sharded, "optimizer": optimizer.state_dict()["optimizer"],
                    "codes": [e.quantized.codes.clone() for e in entries]}, out)
    if world_size > 1:
        leave_process_group()


def test_gathered_sharded_state_is_the_state_of_one_optimizer(tmp_path):
    import torch.multiprocessing as mp

    _sharded_optimizer_steps(0, 1, "", str(tmp_path / "one.pt"))
    mp.start_processes(_sharded_optimizer_steps, args=(2, str(tmp_path / "init"), str(tmp_path / "two.pt")),
                       nprocs=2, start_method="spawn")
    one, two = (torch.load(tmp_path / f"{n}.pt", weights_only=False) for n in ("one", "two"))
    assert two["sharded"] and not one["sharded"]
    assert all(torch.equal(a, b) for a, b in zip(one["codes"], two["codes"]))
    assert one["optimizer"]["param_groups"] == two["optimizer"]["param_groups"]
    assert one["optimizer"]["state"].keys() == two["optimizer"]["state"].keys() and one["optimizer"]["state"]
    for index, state in one["optimizer"]["state"].items():
        for key, value in state.items():
            other = two["optimizer"]["state"][index][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (index, key)


def test_batch_must_split_into_whole_microbatches_per_process(model_dirs, tmp_path, capsys):
    assert check_batch_split(4, 1, 2) == 2 and check_batch_split(3, 2, 1) == 3
    with pytest.raises(ValueError, match="batch_size 4 must be a multiple of the number of processes 2 times "
                                         r"microbatch_size 4 \(= 8\)"):
        check_batch_split(4, 4, 2)
    argv = ["finetune", "--base", str(model_dirs["dense"]), "--quantized", str(model_dirs["aqlm"]),
            "--dataset", str(model_dirs["tokens"]), "--out", str(tmp_path / "out"), "--nproc", "3", *CLI_SETTINGS]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "error: batch_size 4 must be a multiple of the number of processes 3 times microbatch_size 1 (= 3): "
        "each process takes an equal share of every batch in whole microbatches"
    )
    assert not (tmp_path / "out").exists()


def test_nproc_is_removed_from_the_command_line_of_the_processes():
    assert without_nproc(["finetune", "--nproc", "2", "--steps", "3", "--nproc=4", "--nprocx"]) == [
        "finetune", "--steps", "3", "--nprocx"]


def test_shares_cover_the_windows_once():
    shares = [list(range(10))[World(rank, 3).share(10)] for rank in range(3)]
    assert shares == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert World().share(5) == slice(0, 5) and World().is_main and not World().active


def test_world_size_from_the_environment():
    assert environment_world_size({}) == 1 and environment_world_size({"WORLD_SIZE": "3"}) == 3
    for bad in ("two", "0", "-1"):
        with pytest.raises(ValueError, match=f"WORLD_SIZE must be a positive integer, got '{bad}'"):
            environment_world_size({"WORLD_SIZE": bad})


def test_finetune_nproc_under_torchrun_is_refused(model_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["finetune", "--base", str(model_dirs["dense"]), "--quantized", str(model_dirs["aqlm"]),
            "--dataset", str(model_dirs["tokens"]), "--out", str(tmp_path / "out"), "--nproc", "2", *CLI_SETTINGS]
    assert main(argv) == 2
    assert "--nproc 2 given inside a distributed launch (WORLD_SIZE=2)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_row_shards_keep_output_groups_whole():
    from aqlm.pv_tuning.sharding import RowShard

    assert RowShard.of(torch.zeros(10, 3)) == RowShard(0, 10, 10, 10)
    shard = RowShard(6, 10, 10, 6)  # the second of 2 processes: torch.chunk(10 rows, 2) -> 6 + 4
    assert shard.rows == slice(6, 10) and shard.distributed
    assert shard.in_groups(2) == RowShard(3, 5, 5, 3)
    with pytest.raises(ValueError, match="a weight of 10 rows sharded in chunks of 6 rows does not split into "
                                         "whole output groups of 4 rows"):
        shard.in_groups(4)


def test_fsdp_and_sharded_optimizer_state_exclude_each_other():
    with pytest.raises(ValueError, match="use fsdp or shard_optimizer_state, not both"):
        PVConfig(fsdp=True, shard_optimizer_state=True)
    assert "fsdp" not in PVConfig(fsdp=True).fingerprint()  # a run may resume with or without it
