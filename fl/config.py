"""Config schemas (Hydra structured configs) and the one function every party composes config with.

`fl-sim`, `flwr run` (ServerApp and every ClientApp) and the sweep harness all call `compose(overrides)`
on the same list of Hydra overrides, so server and clients always see one config. The schemas make a
misspelt key fail at compose time with Hydra's own message ("Key 'rnak' not in 'LoraStrategyConfig'").
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import MISSING, DictConfig, OmegaConf

from fl import config_defence
from fl.checks import require as _require
from fl.config_optim import DriftConfig, ServerOptConfig
from fl.config_privacy import PrivacyConfig
from fl.schedule import SCHEDULES

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
LOG_LEVELS = ("info", "debug", "warning")  # `log_level`: what the console shows (fl.app.console)


@dataclass
class TinyArch:
    """Shape of a tiny random model built in-process (`model=tiny`, `model=tiny_llama`): tests only."""

    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 64


@dataclass
class ModelConfig:
    """Base model: `minilm`, `smollm2` (embedded), `tiny`/`tiny_llama` (random), or any HF name/path."""

    name: str = "minilm"
    task: str = "seq_cls"  # a registered fl.tasks name: seq_cls | causal_lm
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # blocks with adapters (PEFT layers_to_transform), e.g. [3,4,5]: cheaper backward (MiniLM top 3: 0.69x); null: all
    lora_layers: list[int] | None = None
    tokenizer: str | None = None  # defaults to the model's own (tiny reuses MiniLM's, tiny_llama SmolLM2's)
    arch: TinyArch | None = None  # only the tiny models: their shape


@dataclass
class DataConfig:
    """Dataset, held-out split and partitioning (flwr-datasets partitioners)."""

    source: str = "tweets"  # tweets | file | hf
    path: str | None = None  # file path (csv/json/jsonl/parquet) or HF dataset name
    split: str = "train"  # HF split to read
    text_column: str = "text"
    label_column: str = "label"
    test_size: int = 2000  # examples held out on the server for central evaluation (0 only on a node's own file)
    labels: list[str] | None = None  # class names in label-id order; default: the sorted labels found in the data
    max_examples: int | None = None  # subsample the training pool (quick runs)
    # examples kept out of every client and never evaluated on, treated as public (Fed-SB's init_data=public)
    public_size: int = 0
    # the server's validation split (training examples no client holds): every choice reads it, never the test; 0=off
    val_size: int = 0
    # per-client evaluation (sim.fraction_evaluate > 0): each client's held-out share; 0 = off, else in (0, 0.5]
    client_test_fraction: float = 0.0
    max_length: int = 64  # tokens; batches are padded dynamically up to this
    partitioner: str = "dirichlet"  # iid | dirichlet | pathological | natural
    alpha: float = 0.5  # Dirichlet concentration (smaller = more heterogeneous)
    labels_per_client: int = 2  # pathological: classes per client
    natural_column: str | None = None  # natural: the column that names each example's owner
    min_partition_size: int = 10  # Dirichlet resamples until every client has this many
    self_balancing: bool = True  # Dirichlet: stop filling a client past the mean size (flwr-datasets)
    # Instruction records (model.task=causal_lm): Alpaca fields or a chat `messages` list.
    instruction_column: str = "instruction"
    input_column: str = "input"  # optional context appended to the instruction
    response_column: str = "output"
    messages_column: str = "messages"
    system_prompt: str | None = None  # prepended as a system turn (default: the chat template's own)


@dataclass
class StrategyConfig:
    """Fields every federated LoRA strategy has; methods extend it (see strategies/)."""

    name: str = MISSING
    rank: int = 8
    alpha: float = 16.0  # LoRA scaling s = alpha / rank
    dropout: float = 0.0
    lr: float = 1e-3  # client learning rate (AdamW); methods tune their own default
    # a registered defence (strategies/defences/); its fields (e.g. strategy.trim_fraction) join this group
    defence: str = "none"
    max_examples_weight: str | None = None  # cap on a claimed count: null | a number | median | equal (weights 1)


@dataclass
class TrainConfig:
    """Local training on a client."""

    batch_size: int = 16
    local_steps: int = 20
    local_epochs: float | None = None  # if set, overrides local_steps (epochs of the partition)
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | sgd (clients.optim.OPTIMIZERS; checked by fl.app.config)
    momentum: float = 0.9  # train.optimizer=sgd: heavy-ball momentum (0 = plain SGD)
    keep_optimizer_state: bool = False  # a client keeps its optimiser state across the rounds it joins
    # keep a new task head (e.g. the classifier) at its seeded init, the same on every node: only the adapter trains
    # (under flat DP clipping the adapter keeps ~8% of C: the new head dominates each example's gradient; BENCHMARKS.md)
    freeze_head: bool = False
    eval_batch_size: int = 128
    threads: int = 0  # torch threads per process (0 = leave torch's default)
    lr_schedule: str = "constant"  # constant | cosine, across rounds (fl.schedule); strategy.lr is the peak
    warmup_rounds: int = 0  # rounds of linear warm-up before the schedule
    lr_min: float = 0.0  # the floor the cosine decays towards
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    # auto (bf16 where native: CUDA with bf16, a CPU with AVX512-BF16/AMX; fp32 elsewhere) | fp32 | bf16 | fp16
    # (autocast on CUDA; bf16 also on CPUs with native bf16; an explicit one that cannot run warns: fl.accel)
    precision: str = "auto"
    gradient_checkpointing: bool = False  # recompute activations in backward (long sequences, big models)
    # batches of similar-length examples (transformers' LengthGroupedSampler): less padding, a cheaper step; DP
    # runs keep Opacus' Poisson sampling (its accounting assumes it), so there it does nothing
    group_by_length: bool = False
    # FedLC (Zhang et al., ICML 2022): logits shifted by τ·n_c^(-1/4) of the client's label counts; 0 = off
    fedlc_tau: float = 0.0


@dataclass
class SimConfig:
    """Federation shape and the Simulation Runtime's resources."""

    num_clients: int = 10
    rounds: int = 5
    fraction_train: float = 1.0
    client_sampling: str = "uniform"  # uniform (a fresh draw each round) | cyclic (strategies/sampling.py)
    min_train_clients: int = 2
    # federated (client-side) evaluation on each client's held-out share (needs data.client_test_fraction > 0);
    # central eval always runs
    fraction_evaluate: float = 0.0
    client_cpus: float = 1.0  # Ray CPUs per virtual client (2 cores here -> 2 clients at once)
    client_gpus: float = 0.0  # Ray GPUs per virtual client (0.25 = four clients share a GPU)
    # ray: Flower's Simulation Runtime (a SuperLink, flwr-simulation, Ray actors); inline: the ServerApp and each
    # ClientApp call in fl-sim's own process, clients one after another (fl/app/inline.py: tiny runs, debugging)
    runtime: str = "ray"
    ray_address: str | None = None  # an existing Ray cluster (e.g. auto); default: start a local Ray
    # CPUs of the local Ray the run starts (null: every core of this machine); a sweep's parallel cells each
    # take their share (simulations/launch.py). Ignored with ray_address: a cluster owns its resources.
    cpus: int | None = None
    timeout: float = 3600.0  # seconds the server waits for a round's replies
    # heterogeneous ranks (fl.ranks): a list cycled over partition ids (or drawn from it, seeded); null: strategy.rank
    client_ranks: list[int] | None = None
    client_rank_draw: str = "cycle"  # cycle | random
    # simulated hostile clients (clients/attack.py); a deployed node attacks with --node-config "attack=scale"
    attack: str = "none"  # none | scale | sign_flip | gaussian | label_flip | num_examples
    attackers: Any = 0  # how many (drawn with the run seed), or a list of partition ids
    attack_strength: float | None = None  # default: the attack's own (scale 100, sign_flip 1, gaussian 10, ...)
    # held-out examples scored after every round but the last (a fixed seeded subset of data.test_size; the
    # last round always scores all of them); null: every round scores the whole split
    round_eval_size: int | None = None


@dataclass
class TrackingConfig:
    """Experiment tracking (`tracking=none|mlflow|tensorboard|wandb`, fl.app.tracking): the flattened config as
    params, every round's metrics at step = round, the adapter and plots as artifacts."""

    backend: str = "none"
    # MLflow: a tracking URI or a folder for mlflow.db (default: SQLite <run_dir>/mlflow.db); TensorBoard: the log
    # root (default <run_dir>/tensorboard); W&B: the folder its run files go to (default the run folder)
    uri: str | None = None
    experiment: str = "fedlora"  # MLflow experiment / W&B project and group; a sweep sets its own
    run_name: str | None = None  # default: the run folder's name
    tags: list[str] = field(default_factory=list)  # "key=value" strings (a sweep tags each cell with its swept keys)
    mode: str = "offline"  # W&B: offline (no network) | online
    artifacts: bool = True  # log the adapter folder and the plots


@dataclass
class Config:
    """The whole run. `strategy` is typed Any because each method's schema validates its own group."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    strategy: Any = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    server_opt: ServerOptConfig = field(default_factory=ServerOptConfig)  # `server_opt=` (strategies.server_opt)
    drift: DriftConfig = field(default_factory=DriftConfig)  # `drift=` (clients.drift)
    seed: int = 0
    log_level: str = "info"  # info: our progress only, Flower's and Ray's output hidden | debug: everything
    run_dir: str | None = None  # where outputs go; fl-sim sets it to Hydra's run dir
    resume: str | None = None  # a run folder to continue from its last complete round
    cache_dir: str | None = None  # tokenised data cache; default ~/.cache/fedlora


STRATEGY_SCHEMAS: dict[str, type[StrategyConfig]] = {"lora": StrategyConfig}
"""`/schema/strategy/<name>` -> the method's schema. Each method registers its own (`strategies.registry.register`
calls `add_strategy_schema`), so a method's fields live in its one module; `fl.app.config.compose` imports them."""


def add_strategy_schema(name: str, schema: type[StrategyConfig]) -> None:
    """Make `schema` the Hydra schema of `/schema/strategy/<name>` (a strategy YAML extends it)."""
    if not issubclass(schema, StrategyConfig):
        raise TypeError(f"The schema of strategy {name!r} must extend fl.config.StrategyConfig, got {schema!r}.")
    if STRATEGY_SCHEMAS.get(name, schema) is not schema:
        raise ValueError(f"Strategy {name!r} already has the schema {STRATEGY_SCHEMAS[name].__name__}.")
    STRATEGY_SCHEMAS[name] = schema
    _compose_cached.cache_clear()


_REGISTERED: list[object] = []  # the strategy and defence schemas last stored


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent). Storing them took about half of every
    compose, and every party composes many times (each ClientApp message): they are stored again only when a
    method or a defence registered a schema since, or the store lost them."""
    cs = ConfigStore.instance()
    key = (tuple(STRATEGY_SCHEMAS.items()), tuple(config_defence.DEFENCE_SCHEMAS.items()))
    if _REGISTERED and _REGISTERED[0] == key and "config_schema.yaml" in cs.repo:
        return
    _REGISTERED[:] = [key]
    cs.store(name="config_schema", node=Config)
    # Schemas live in their own groups so they never show up as options of the real groups;
    # each YAML extends one with `defaults: [/schema/<group>/<name>@_here_]`.
    cs.store(group="schema/model", name="model", node=ModelConfig)
    cs.store(group="schema/data", name="data", node=DataConfig)
    cs.store(group="schema/privacy", name="privacy", node=PrivacyConfig)
    cs.store(group="schema/sim", name="sim", node=SimConfig)
    cs.store(group="schema/tracking", name="tracking", node=TrackingConfig)
    cs.store(group="schema/server_opt", name="server_opt", node=ServerOptConfig)
    cs.store(group="schema/drift", name="drift", node=DriftConfig)
    for name, schema in STRATEGY_SCHEMAS.items():  # each with every registered defence's fields
        cs.store(group="schema/strategy", name=name, node=config_defence.strategy_node(schema))


def split_overrides(overrides: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Overrides as a list: a run-config string is split like a shell command line."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return shlex.split(overrides)
    return list(overrides)


@lru_cache(maxsize=32)
def _compose_cached(overrides: tuple[str, ...], defences: int) -> DictConfig:
    """`defences` (`config_defence.generation()`) keys the cache too: a defence registered since adds fields."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    OmegaConf.set_readonly(cfg, True)
    return cfg


def compose(overrides: str | list[str] | tuple[str, ...] | None = None) -> DictConfig:
    """Compose the run config from Hydra overrides with the ground's checks (`validate`).

    Every party composes through `fl.app.config.compose`, which adds the registered methods' schemas and the
    checks of the layers above (strategy fields, optimiser names, privacy).

    Parameters
    ----------
    overrides : str or list of str
        e.g. ``["strategy=fed_sb", "sim.num_clients=20"]`` or the same as one string.

    Returns
    -------
    DictConfig
        Read-only, validated against the schemas (a misspelt key or a bad value raises).
    """
    cfg = _compose_cached(tuple(split_overrides(overrides)), config_defence.generation())
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Check values the schemas' types cannot: ranges and cross-field rules of the ground's groups (the fields
    every strategy has among them). Raises ValueError."""
    s, d, sim, t = cfg.strategy, cfg.data, cfg.sim, cfg.train
    _require(s.rank > 0, "strategy.rank", s.rank, "the LoRA rank must be a positive integer.")
    _require(s.lr > 0, "strategy.lr", s.lr, "the client learning rate must be > 0.")
    _require(0 <= s.dropout < 1, "strategy.dropout", s.dropout, "use a value in [0, 1).")
    _require(sim.num_clients >= 1, "sim.num_clients", sim.num_clients, "need at least one client.")
    _require(sim.rounds >= 1, "sim.rounds", sim.rounds, "need at least one round.")
    _require(0 < sim.fraction_train <= 1, "sim.fraction_train", sim.fraction_train, "use a fraction in (0, 1].")
    _require(
        0 <= sim.fraction_evaluate <= 1,
        "sim.fraction_evaluate",
        sim.fraction_evaluate,
        "use a fraction in [0, 1] (0 skips federated evaluation).",
    )
    _require(
        1 <= sim.min_train_clients <= sim.num_clients,
        "sim.min_train_clients",
        sim.min_train_clients,
        f"must be between 1 and sim.num_clients ({sim.num_clients}).",
    )
    _require(
        not sim.client_ranks or all(int(r) >= 1 for r in sim.client_ranks),
        "sim.client_ranks",
        sim.client_ranks,
        "list positive integer ranks, e.g. [2,4,8,16], or null for strategy.rank everywhere.",
    )
    inline_on_ray = f"an inline run does not use Ray: drop sim.ray_address={sim.ray_address}, or use sim.runtime=ray."
    runtimes = "use ray (Flower's Simulation Runtime) or inline (every client in fl-sim's process, one after another)."
    ok = sim.runtime == "ray" or (sim.runtime == "inline" and not sim.ray_address)
    _require(ok, "sim.runtime", sim.runtime, inline_on_ray if sim.runtime == "inline" else runtimes)
    _require(
        sim.client_rank_draw in ("cycle", "random"),
        "sim.client_rank_draw",
        sim.client_rank_draw,
        "use cycle (partition i gets ranks[i % len]) or random (a seeded draw from the list).",
    )
    _require(d.alpha > 0, "data.alpha", d.alpha, "the Dirichlet concentration must be > 0.")
    _require(d.test_size >= 0, "data.test_size", d.test_size, "hold out 0 or more examples (the server needs > 0).")
    _require(d.public_size >= 0, "data.public_size", d.public_size, "use 0 (no public slice) or more examples.")
    _require(d.val_size >= 0, "data.val_size", d.val_size, "use 0 (no validation split) or more examples.")
    _require(
        d.labels is None or len(set(d.labels)) == len(d.labels) >= 2,
        "data.labels",
        d.labels,
        "list at least 2 distinct class names, or null to take the sorted labels found in the data.",
    )
    _require(
        d.client_test_fraction == 0 or 0 < d.client_test_fraction <= 0.5,
        "data.client_test_fraction",
        d.client_test_fraction,
        "use 0 (no per-client evaluation) or a share in (0, 0.5] of each client's partition.",
    )
    _require(
        d.client_test_fraction == 0 or sim.fraction_evaluate > 0,
        "data.client_test_fraction",
        d.client_test_fraction,
        "it holds out a share of every client's data that no one scores while sim.fraction_evaluate=0; "
        "set sim.fraction_evaluate (e.g. 1.0) or data.client_test_fraction=0.",
    )
    _require(
        sim.fraction_evaluate == 0 or d.client_test_fraction > 0,
        "sim.fraction_evaluate",
        sim.fraction_evaluate,
        "clients would evaluate with no held-out share of their own (data.client_test_fraction=0); "
        "set data.client_test_fraction (e.g. 0.2) or sim.fraction_evaluate=0.",
    )
    _require(d.max_length > 1, "data.max_length", d.max_length, "use at least 2 tokens.")
    _require(t.batch_size >= 1, "train.batch_size", t.batch_size, "use at least 1.")
    _require(t.local_steps >= 1, "train.local_steps", t.local_steps, "use at least 1 step.")
    _require(
        t.local_epochs is None or t.local_epochs > 0,
        "train.local_epochs",
        t.local_epochs,
        "use a positive number of epochs, or null to use train.local_steps.",
    )
    _require(0 <= t.momentum < 1, "train.momentum", t.momentum, "use a momentum in [0, 1).")
    _require(t.lr_schedule in SCHEDULES, "train.lr_schedule", t.lr_schedule, f"use one of {', '.join(SCHEDULES)}.")
    _require(
        0 <= t.warmup_rounds < sim.rounds,
        "train.warmup_rounds",
        t.warmup_rounds,
        f"use 0 to {sim.rounds - 1} (fewer than sim.rounds={sim.rounds}).",
    )
    _require(0 <= t.lr_min <= s.lr, "train.lr_min", t.lr_min, f"use a floor in [0, strategy.lr={s.lr}].")
    _require(
        t.device in ("auto", "cpu", "cuda") or str(t.device).startswith("cuda:"),
        "train.device",
        t.device,
        "use auto, cpu, cuda or cuda:N.",
    )
    _require(
        t.precision in ("auto", "fp32", "bf16", "fp16"), "train.precision", t.precision, "use auto, fp32, bf16 or fp16."
    )
    _require(
        sim.round_eval_size is None or sim.round_eval_size >= 1,
        "sim.round_eval_size",
        sim.round_eval_size,
        "use null (every round scores all of data.test_size) or a positive number of examples.",
    )
    _require(cfg.log_level in LOG_LEVELS, "log_level", cfg.log_level, f"use one of {', '.join(LOG_LEVELS)}.")
    _require(sim.client_gpus >= 0, "sim.client_gpus", sim.client_gpus, "use 0 or a (fractional) GPU count.")
    _require(
        sim.cpus is None or sim.cpus >= sim.client_cpus,
        "sim.cpus",
        sim.cpus,
        f"use null (every core) or at least sim.client_cpus={sim.client_cpus:g} (one client must fit).",
    )


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML (what a run folder's config.yaml holds)."""
    return OmegaConf.to_yaml(cfg, resolve=True)
