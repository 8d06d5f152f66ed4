"""`collect_xtx` shares one X^T X between linears with one input (q/k/v, gate/up): the same values
as a separate product per linear, one matrix product per input group and forward pass."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from aqlm.calibration import capture_block_inputs, find_linears, get_blocks, run_block
from aqlm.quantize.model import collect_xtx, input_groups

from random_models import tiny_llama

HIDDEN, INTERMEDIATE = 64, 128


def per_linear_xtx(block, inputs, kwargs, names):
    """The definition: one float64 product per linear and pass, divided by the token count."""
    sums, counts, handles = {}, {}, []

    def hook_for(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + (x.T @ x).double()
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    for name in names:
        handles.append(block.get_submodule(name).register_forward_pre_hook(hook_for(name)))
    try:
        run_block(block, inputs, kwargs, batch_size=2)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / counts[name]).float() for name in names}


class CountSquareProducts(TorchDispatchMode):
    """Counts matrix products whose result is [width, width] (X^T X; the tokens per pass differ from width)."""

    def __init__(self, width: int):
        super().__init__()
        self.width, self.count = width, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.matmul.default) and tuple(out.shape) == (self.width,) * 2:
            self.count += 1
        return out


def block_and_inputs():
    model = tiny_llama(seed=3)
    windows = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(5))
    inputs, kwargs = capture_block_inputs(model, windows, batch_size=2, progress=False)
    return get_blocks(model)[0], inputs, kwargs


def test_shared_input_groups_get_the_per_linear_values_once():
    block, inputs, kwargs = block_and_inputs()
    groups = input_groups(block, inputs[:1], kwargs)
    assert ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"] in groups
    for group in groups:
        expected = per_linear_xtx(block, inputs, kwargs, group)
        width = block.get_submodule(group[0]).in_features
        with CountSquareProducts(width) as counter:
            got = collect_xtx(block, inputs, kwargs, group, batch_size=2)
        for name in group:
            assert torch.equal(got[name], expected[name]), name
            assert got[name] is got[group[0]], "linears with one input must share one tensor"
        assert counter.count == inputs.shape[0] // 2, f"{group}: {counter.count} products for 2 passes"


def test_linears_with_different_inputs_keep_their_own_xtx():
    block, inputs, kwargs = block_and_inputs()
    names = list(find_linears(block))  # one collection for all linears (true_sequential=False)
    expected = per_linear_xtx(block, inputs, kwargs, names)
    got = collect_xtx(block, inputs, kwargs, names, batch_size=2)
    for name in names:
        assert torch.equal(got[name], expected[name]), name
    assert got["self_attn.q_proj"] is got["self_attn.v_proj"]
    assert got["self_attn.q_proj"] is not got["self_attn.o_proj"]
    assert got["mlp.gate_proj"] is got["mlp.up_proj"]
    assert not torch.equal(got["self_attn.q_proj"], got["mlp.gate_proj"])


def test_each_pass_stops_after_the_last_needed_input():
    block, inputs, kwargs = block_and_inputs()
    calls = []
    handle = block.get_submodule("mlp.down_proj").register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        collect_xtx(block, inputs, kwargs, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], batch_size=2)
        assert calls == [], "the MLP ran although only q/k/v inputs were needed"
        collect_xtx(block, inputs, kwargs, ["mlp.down_proj"], batch_size=2)
        assert len(calls) == 2
    finally:
        handle.remove()


class CountProducts(TorchDispatchMode):
    """Counts matrix products (linears and attention) of any shape."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def sequential_xtx(block, inputs, kwargs, groups, replay):
    """collect_xtx group by group, each group's linears then replaced (a stand-in for quantizing
    them); per group, the X^T X of its first linear and the matrix products of the collection."""
    results = []
    for index, group in enumerate(groups):
        with CountProducts() as counter:
            xtx = collect_xtx(block, inputs, kwargs, group, batch_size=1, replay=replay)
        results.append((xtx[group[0]], counter.count))
        for name in group:
            linear = block.get_submodule(name)
            changed = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
            with torch.no_grad():
                changed.weight.copy_(linear.weight * (1.0 + 0.1 * index) + 0.01)
                if linear.bias is not None:
                    changed.bias.copy_(linear.bias)
            block.set_submodule(name, changed)
    return results


def test_forward_replay_gives_the_same_bits_with_fewer_products():
    from copy import deepcopy

    from aqlm.quantize.model import ForwardReplay

    block, inputs, kwargs = block_and_inputs()
    groups = input_groups(block, inputs[:1], kwargs)
    assert [group[0] for group in groups] == ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    plain_block, replay_block = deepcopy(block), deepcopy(block)
    plain = sequential_xtx(plain_block, inputs, kwargs, groups, None)
    replayed = sequential_xtx(replay_block, inputs, kwargs, groups, ForwardReplay(replay_block))
    for group, (want, want_products), (got, got_products) in zip(groups, plain, replayed):
        assert torch.equal(got, want), group
    # q/k/v are replayed in the gate/up pass; the whole attention (and o_proj) in the down_proj pass
    passes = inputs.shape[0]
    assert replayed[2][1] == plain[2][1] - 3 * passes
    assert replayed[3][1] == plain[3][1] - 4 * passes
    assert all(not hasattr(module, "__dict__") or "forward" not in module.__dict__ for module in replay_block.modules())


def test_nonfinite_activations_are_reported_with_the_linear_they_enter():
    import pytest

    block, inputs, kwargs = block_and_inputs()
    broken = inputs.clone()
    broken[1, 3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"calibration activations entering self_attn\.q_proj contain NaN or Inf"):
        collect_xtx(block, broken, kwargs, ["self_attn.q_proj", "self_attn.k_proj"], batch_size=1)
    broken[1, 3, 5] = float("inf")
    with pytest.raises(ValueError, match=r"calibration activations entering mlp\.down_proj contain NaN or Inf"):
        collect_xtx(block, broken, kwargs, ["mlp.down_proj"], batch_size=2)


def test_bfloat16_forward_passes_keep_float32_products():
    """QuantizeConfig(forward_dtype="bfloat16") runs the passes in bfloat16; X^T X is still the
    float32 product of the (bfloat16-valued) activations, not a bfloat16 one."""
    from aqlm.quantize.model import QuantizeConfig

    block, inputs, kwargs = block_and_inputs()
    seen = []
    handle = block.get_submodule("mlp.down_proj").register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with QuantizeConfig(forward_dtype="bfloat16").forward_precision(inputs.device):
            got = collect_xtx(block, inputs, kwargs, ["mlp.down_proj"], batch_size=2)["mlp.down_proj"]
    finally:
        handle.remove()
    assert {x.dtype for x in seen} == {torch.bfloat16}
    x = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen]).double()
    torch.testing.assert_close(got, (x.T @ x / x.shape[0]).float(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        plain = collect_xtx(block, inputs, kwargs, ["mlp.down_proj"], batch_size=2)["mlp.down_proj"]
    assert not torch.equal(plain, got)
