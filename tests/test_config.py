"""Config composition: one function, schemas that reject typos, values checked with the field named."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from fl.app.config import compose, split_overrides


def test_compose_defaults_and_overrides() -> None:
    cfg = compose(["strategy=fedit", "sim.num_clients=20", "data.alpha=0.1"])
    assert cfg.strategy.name == "fedit"
    assert cfg.sim.num_clients == 20
    assert cfg.data.alpha == pytest.approx(0.1)
    assert cfg.model.name == "minilm"
    assert cfg.privacy.enabled is False


def test_run_config_string_gives_the_same_config() -> None:
    as_list = compose(["strategy=fedit", "sim.rounds=3"])
    as_string = compose("strategy=fedit sim.rounds=3")
    assert as_list == as_string
    assert split_overrides("a=1 'b=x y'") == ["a=1", "b=x y"]


def test_unknown_strategy_lists_valid_names() -> None:
    with pytest.raises(MissingConfigException, match="nosuch") as err:
        compose(["strategy=nosuch"])
    assert "fedit" in str(err.value)


@pytest.mark.parametrize("bad", ["sim.num_clientz=3", "strategy.rnak=3", "data.alhpa=1"])
def test_misspelt_key_fails_at_compose(bad: str) -> None:
    with pytest.raises(ConfigCompositionException, match=bad.split("=")[0]):
        compose([bad])


def test_appended_unknown_strategy_key_is_refused() -> None:
    with pytest.raises(ValueError, match="rnak"):
        compose(["+strategy.rnak=3"])


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("strategy.rank=0", "strategy.rank"),
        ("data.alpha=0", "data.alpha"),
        ("sim.fraction_train=1.5", "sim.fraction_train"),
        ("sim.fraction_train=0", "sim.fraction_train"),
        ("sim.min_train_clients=11", "sim.min_train_clients"),
        ("privacy=dp", None),
        ("privacy=dp privacy.target_epsilon=0", "privacy.target_epsilon"),
        ("train.device=tpu", "train.device"),
        ("train.precision=fp8", "train.precision"),
        ("privacy=dp train.precision=fp16", "train.precision"),
        ("privacy=dp train.gradient_checkpointing=true", "train.gradient_checkpointing"),
        ("sim.client_gpus=-1", "sim.client_gpus"),
        ("sim.runtime=local", "sim.runtime"),
        ("sim.runtime=inline sim.ray_address=auto", "sim.ray_address=auto"),
    ],
)
def test_bad_values_name_the_field(override: str, field: str | None) -> None:
    if field is None:
        assert compose(override.split()).privacy.enabled
        return
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        compose(override.split())


@pytest.mark.parametrize(("arg", "needle"), [("strategy=nosuch", "nosuch"), ("sim.num_clientz=3", "num_clientz")])
def test_fl_sim_fails_at_once_on_bad_input(arg: str, needle: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "fl.app.cli", arg], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert needle in proc.stdout + proc.stderr


def test_only_tiny_models_carry_an_architecture() -> None:
    for model in ("minilm", "smollm2", "hf model.name=x"):
        assert compose(f"model={model}".split()).model.arch is None
    assert compose(["model=tiny"]).model.arch.hidden_size == 32
    assert compose(["model=tiny_llama"]).model.arch.num_layers == 2


def test_unknown_task_lists_the_valid_ones() -> None:
    from fl.tasks import get_task

    with pytest.raises(ValueError, match=r"model\.task='seq2seq'.*causal_lm.*seq_cls"):
        get_task("seq2seq")


def test_federation_config_leaves_a_ray_cluster_its_resources() -> None:
    """`flwr run --federation-config`: a local Ray gets this machine's cores, a cluster keeps its own."""
    from fl.app.simulation import federation_config

    local = federation_config(compose(["sim.num_clients=3", "sim.client_cpus=2"]))
    assert local["num-supernodes"] == 3 and local["client-resources-num-cpus"] == 2 and "init-args-num-cpus" in local
    assert "init-args-num-cpus" not in federation_config(compose(["sim.ray_address=auto"]))
    with pytest.raises(ValueError, match=r"sim\.client_cpus=0\.5: .*whole CPUs"):
        federation_config(compose(["sim.client_cpus=0.5"]))


@pytest.mark.parametrize(
    ("strategy", "override", "says"),
    [
        ("lora_fair", "strategy.solver=nosuch", "strategy.solver='nosuch' is unknown; use one of sgd, closed_form"),
        ("lora_fair", "strategy.lam=-1", "strategy.lam=-1.0 is invalid"),
        ("lora_fair", "strategy.steps=0", "strategy.steps=0 must be >= 1"),
        ("fed_sb", "strategy.init=nosuch", "strategy.init='nosuch' is invalid"),
        ("fed_sb", "strategy.init_fraction=0", "strategy.init_fraction=0.0 is invalid"),
        ("fed_sb", "strategy.init_lr=0", "strategy.init_lr=0.0 is invalid"),
        ("fed_sb", "strategy.init=server", "strategy.init_data=None is invalid"),
        ("fed_sb", "strategy.init_data=public", "strategy.init_data='public' is invalid: the run has no public slice"),
        ("fedit", "strategy.rank=0", "strategy.rank=0 is invalid"),
        ("ffa_lora", "train.optimizer=adam", "train.optimizer='adam' is invalid: use one of adamw, sgd"),
    ],
)
def test_a_bad_strategy_field_fails_at_compose_naming_it(strategy: str, override: str, says: str) -> None:
    """The method's typed constructor checks its fields when the config is composed, before any client trains."""
    with pytest.raises(ValueError, match=re.escape(says)):
        compose([f"strategy={strategy}", override])
