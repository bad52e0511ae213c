"""The resolved layout (``parallel.layout.ParallelLayout``) and the one local launcher (``parallel.launch``).

No process group: resolution and validation are pure (STYLE 27), and the launcher's torchrun call is recorded.
"""
from __future__ import annotations

import math
import subprocess
import sys

import pytest

from common.errors import ConfigError
from parallel.config import ParallelConfig
from parallel.launch import local_world_size
from parallel.layout import ParallelLayout, expert_tensor_parallel, min_data_parallel


def test_every_degree_is_resolved():
    layout = ParallelLayout.resolve(ParallelConfig(tp=2, pp=2, cp=2, vpp=2, sequence_parallel=True, zero=0),
                                    world_size=16)
    assert (layout.tp, layout.pp, layout.cp, layout.vpp, layout.ep, layout.etp, layout.dp) == (2, 2, 2, 2, 1, 2, 2)
    assert layout.world_size == 16 and layout.model_parallel_size == 8
    assert layout.sequence_parallel and layout.zero == 0 and not layout.deepspeed
    assert layout.describe() == "tp=2+sp pp=2 cp=2 vpp=2 dp=2 zero=0"


@pytest.mark.parametrize("tp, etp, expected", [(1, None, 1), (4, None, 4), (4, 1, 1), (2, 4, 4)])
def test_expert_tensor_parallel_defaults_to_tp(tp, etp, expected):
    assert expert_tensor_parallel(tp, etp) == expected
    parallel = ParallelConfig(tp=tp, etp=etp, ep=2)
    world = tp * math.lcm(1, 2 * expected)  # enough ranks for the expert groups
    assert ParallelLayout.resolve(parallel, world_size=world).etp == expected


def test_every_consumer_sees_the_resolved_etp():
    """The HF adapter's per-rank Layout and the planner's Layout take the same rule (null etp = tp)."""
    from pretrain.models.hf import Layout
    from pretrain.plan.memory import Layout as PlannerLayout

    layout = ParallelLayout.resolve(ParallelConfig(tp=2, ep=2, sequence_parallel=True), world_size=4)
    assert layout.etp == 2 and layout.dp == 2 and layout.expert_dp == 1  # tp × dp = 4 ranks hold ep × etp
    shard = Layout.of(layout, tp_rank=1, ep_rank=1, etp_rank=1)
    assert (shard.expert_tp, shard.expert_tp_rank, shard.ep, shard.ep_rank) == (2, 1, 2, 1)
    assert Layout(tp=2, tp_rank=1).expert_tp == 2 and Layout(tp=2, tp_rank=1).expert_tp_rank == 1
    assert PlannerLayout(tp=4, ep=2, dp=2).expert_tp == 4 and PlannerLayout(tp=4, etp=1, ep=2, dp=2).expert_tp == 1


@pytest.mark.parametrize("config, world_size, dp", [
    (dict(), 1, 1), (dict(), 8, 8), (dict(tp=2), 8, 4), (dict(tp=2, pp=2), 8, 2),
    (dict(tp=2, cp=2), 8, 2),  # cp ranks of one replica read the same samples: not counted in dp
    (dict(tp=2, dp=4), 8, 4),  # an explicit dp that fits
])
def test_dp_is_derived_from_the_world_size(config, world_size, dp):
    assert ParallelLayout.resolve(ParallelConfig(**config), world_size=world_size).dp == dp


@pytest.mark.parametrize("config, world_size, message", [
    (dict(tp=2, pp=2), 6, "world size 6 is not divisible by parallel.tp × parallel.pp = 2 × 2 = 4"),
    (dict(tp=2, cp=2), 6, "parallel.tp × parallel.pp × parallel.cp = 2 × 1 × 2 = 4"),
    (dict(tp=2, dp=2), 8, "parallel.tp × parallel.pp × parallel.dp = 2 × 1 × 2 = 4 processes, but the world size is 8"),
])
def test_a_layout_that_does_not_fit_the_world_names_its_fields(config, world_size, message):
    with pytest.raises(ConfigError) as err:
        ParallelLayout.resolve(ParallelConfig(**config), world_size=world_size)
    assert message in str(err.value)


def test_model_checks_name_the_field_and_return_the_layout():
    layout = ParallelLayout.resolve(ParallelConfig(tp=2, ep=4, etp=1, sequence_parallel=True), world_size=8)
    assert layout.check_model(num_layers=4, num_heads=4, num_kv_heads=2, num_experts=8, seq_len=64) is layout
    with pytest.raises(ConfigError, match="parallel.ep=4 does not divide the model's 6 experts"):
        layout.check_model(num_layers=4, num_heads=4, num_kv_heads=2, num_experts=6, seq_len=64)
    with pytest.raises(ConfigError, match="parallel.ep × expert tp = 4 × 2 must divide parallel.tp × dp = 2 × 1"):
        # etp null = tp = 2: 4 × 2 expert ranks do not fit into tp × dp = 2 ranks
        ParallelLayout.resolve(ParallelConfig(tp=2, ep=4), world_size=2).check_model(
            num_layers=4, num_heads=4, num_kv_heads=2, num_experts=8, seq_len=64)


def test_a_hand_built_layout_must_add_up():
    with pytest.raises(ConfigError, match="is not the world size 8"):
        ParallelLayout(world_size=8, tp=2, pp=1, vpp=1, cp=1, ep=1, etp=2, dp=2)
    assert ParallelLayout.single() == ParallelLayout(world_size=1, tp=1, pp=1, vpp=1, cp=1, ep=1, etp=1, dp=1)


@pytest.mark.parametrize("tp, pp, ep, etp", [(1, 1, 1, None), (2, 1, 1, None), (2, 2, 1, None), (1, 1, 4, None),
                                             (2, 1, 2, 1), (2, 1, 4, None), (4, 2, 2, 1), (2, 1, 2, 4)])
def test_local_world_size_is_the_converters_old_rule_too(tp, pp, ep, etp):
    """``python -m pretrain.convert import`` used to start pp × lcm(tp, ep × etp) processes; the shared rule gives
    the same count (tp × dp holds the ep × etp expert ranks)."""
    parallel = ParallelConfig(tp=tp, pp=pp, ep=ep, etp=etp)
    assert local_world_size(parallel) == pp * math.lcm(tp, ep * (etp or tp))
    ParallelLayout.resolve(parallel, world_size=local_world_size(parallel))  # and it resolves
    assert min_data_parallel(ParallelConfig(tp=2, dp=3)) == 3  # an explicit dp is kept


def test_both_commands_relaunch_through_the_one_launcher(monkeypatch, tmp_path):
    import parallel.launch as launch
    import pretrain.__main__ as train_cli
    import pretrain.convert as convert

    calls = []
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(launch.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(launch.subprocess, "run",
                        lambda cmd, env: calls.append((cmd, env)) or subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setattr(convert, "plan_import", lambda *a, **k: None)  # its checks read an HF dir
    argv = ["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "out"), "--tp", "2", "--ep", "2",
            "--etp", "1"]
    assert convert.main(argv) == 0
    (cmd, env), = calls
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                   "-m", "pretrain.convert", *argv]
    assert env["OMP_NUM_THREADS"] == "4"  # the cores shared out over the processes
    # The training CLI goes through the same function (nothing else in either module spells torchrun).
    assert train_cli.relaunch_local is launch.relaunch_local is convert.relaunch_local
    for module in (train_cli, convert):
        assert "torch.distributed.run" not in open(module.__file__).read()
