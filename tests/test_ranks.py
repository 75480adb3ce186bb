"""Ranks: every rank a run names must fit the model (all strategies, both tiny models), per-client ranks are
cycled / drawn / taken from node config, and methods that need one rank refuse mixed ones at compose."""

from __future__ import annotations

import pytest

import strategies
from fl import ranks
from fl.adapters import build_adapter, check_ranks_fit
from fl.app.config import compose
from fl.app.workspace import get_workspace
from fl.ranks import rank_source
from fl.tasks import get_task, load_base_model

NARROWEST = {"tiny": 32, "tiny_llama": 16}  # tiny: hidden 32; tiny_llama: k/v projections 16 wide
UNIFORM_ONLY = ["fedit", "ffa_lora", "fed_sb", "lora_fair", "fedex_lora"]


def _check(cfg) -> None:  # type: ignore[no-untyped-def]
    """What `get_workspace` checks before building any adapter."""
    task = get_task(str(cfg.model.task))
    base = load_base_model(cfg.model, num_labels=3, seed=0)
    check_ranks_fit(
        base,
        ranks.configured_ranks(cfg),
        targets=list(cfg.model.target_modules),
        modules_to_save=task.trained_modules(base),
    )


@pytest.mark.parametrize("model", sorted(NARROWEST))
@pytest.mark.parametrize("strategy", strategies.names())
def test_a_rank_wider_than_a_module_is_refused_naming_it(strategy: str, model: str) -> None:
    wide = NARROWEST[model] + 1
    _check(compose([f"model={model}", f"strategy={strategy}", f"strategy.rank={NARROWEST[model]}"]))  # fits
    with pytest.raises(ValueError, match="does not fit module") as err:
        _check(compose([f"model={model}", f"strategy={strategy}", f"strategy.rank={wide}"]))
    msg = str(err.value)
    assert f"strategy.rank={wide} does not fit module" in msg and f"at most {NARROWEST[model]}" in msg, msg
    assert ("k_proj (d_out x d_in = 16 x 32)" if model == "tiny_llama" else "(d_out x d_in = 32 x 32)") in msg, msg


def test_fed_sb_default_rank_on_tiny_llama_is_refused_before_any_work(cache_dir: str) -> None:
    """The reproduction of issue 26: Fed-SB's r=32 used to die in `_prepare_fedsb` with a size mismatch."""
    with pytest.raises(ValueError, match=r"strategy.rank=32 does not fit module model.layers.0.self_attn.k_proj"):
        get_workspace(["model=tiny_llama", "strategy=fed_sb", "data.max_examples=60", f"cache_dir={cache_dir}"])


def test_a_client_rank_that_does_not_fit_names_its_key() -> None:
    base = load_base_model(compose(["model=tiny_llama"]).model, num_labels=3, seed=0)
    with pytest.raises(ValueError, match=r"sim.client_ranks\[1\]=17 does not fit module .*k_proj .* lower sim.client"):
        check_ranks_fit(base, {"strategy.rank": 8, "sim.client_ranks[1]": 17}, targets=["all-linear"])


@pytest.mark.parametrize("strategy", UNIFORM_ONLY)
def test_methods_that_need_one_rank_refuse_mixed_ranks_at_compose(strategy: str) -> None:
    with pytest.raises(ValueError, match=r"sim.client_ranks=\[2, 4\] gives clients ranks other than strategy.rank"):
        compose([f"strategy={strategy}", "sim.client_ranks=[2,4]"])
    compose([f"strategy={strategy}", "strategy.rank=4", "sim.client_ranks=[4]"])  # one rank everywhere: fine


def test_client_ranks_cycle_draw_and_node_config() -> None:
    base = ["strategy=fedit", "strategy.rank=8"]
    assert [ranks.partition_rank(compose(base), p) for p in range(3)] == [8, 8, 8]
    cyc = {"sim": {"client_ranks": [2, 4, 8], "client_rank_draw": "cycle"}, "strategy": {"rank": 8}, "seed": 0}
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(cyc)
    assert [ranks.partition_rank(cfg, p) for p in range(5)] == [2, 4, 8, 2, 4]
    cfg.sim.client_rank_draw = "random"
    drawn = [ranks.partition_rank(cfg, p) for p in range(20)]
    assert drawn == [ranks.partition_rank(cfg, p) for p in range(20)] and set(drawn) == {2, 4, 8}  # seeded
    cfg.seed = 1
    assert [ranks.partition_rank(cfg, p) for p in range(20)] != drawn
    assert ranks.client_rank(cfg, 0, {"lora-rank": "16"}) == 16
    assert ranks.rank_source({"lora-rank": 16}) == "--node-config lora-rank"
    with pytest.raises(ValueError, match="lora-rank='x' is invalid"):
        ranks.client_rank(cfg, 0, {"lora-rank": "x"})


@pytest.mark.parametrize(
    ("override", "says"),
    [("sim.client_ranks=[0,4]", "sim.client_ranks"), ("sim.client_rank_draw=roundrobin", "sim.client_rank_draw")],
)
def test_bad_rank_settings_fail_at_compose(override: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        compose(["strategy=fedit", override])


@pytest.mark.parametrize("strategy", ["flora", "flexlora", "hetlora"])
def test_heterogeneous_methods_take_mixed_ranks_within_the_server_rank(strategy: str) -> None:
    compose([f"strategy={strategy}", "strategy.rank=8", "sim.client_ranks=[2,4,8]"])
    with pytest.raises(ValueError, match=r"strategy.rank=4 is below max\(sim.client_ranks\)=8"):
        compose([f"strategy={strategy}", "strategy.rank=4", "sim.client_ranks=[2,8]"])
    cfg = compose(["model=tiny", f"strategy={strategy}"])
    base = load_base_model(cfg.model, num_labels=3, seed=0)
    with pytest.raises(ValueError, match=r"--node-config lora-rank=40 does not fit module"):  # a node's own rank
        build_adapter(
            base,
            kind="lora",
            strategy_cfg=cfg.strategy,
            targets=["all-linear"],
            seed=0,
            rank=40,
            rank_key=rank_source({"lora-rank": 40}),
        )
