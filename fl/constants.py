"""Message, record and metric keys, defined once in one casing (kebab-case on the wire)."""

from __future__ import annotations

# Records inside a Flower Message
ARRAYS = "arrays"  # ArrayRecord: the tensors a party sends
CONFIG = "config"  # ConfigRecord: round instructions to a client
METRICS = "metrics"  # MetricRecord: a client's reply metrics
FROZEN = "frozen"  # ArrayRecord: frozen shared tensors sent once (Fed-SB's A and B)
BASE_DELTA = "base-delta"  # ArrayRecord: the cumulative change to frozen W0 (FedEx-LoRA's fold), absolute
BASE_DELTA_FACTORS = "base-delta-factors"  # ArrayRecord: the same change as factor pairs B_t, A_t (FLoRA's stacks)

# ConfigRecord keys (server -> client)
SERVER_ROUND = "server-round"
OVERRIDES = "overrides"  # the Hydra overrides every party composes the config from
PHASE = "phase"  # what a train message asks for, one of the PHASE_* values
PHASE_TRAIN = "train"
PHASE_INIT_GRAD = "init-grad"  # Fed-SB: send the gradient sum over init examples
PHASE_HELLO = "hello"  # the query that asks a node its partition id
PHASE_EVALUATE = "evaluate"  # federated evaluation on a client's own data
ADAPTER_KIND = "adapter-kind"
LR = "lr"  # this round's client learning rate (train.lr_schedule); strategy.lr is the peak
# name suffixes of the tensors each client keeps between rounds and the server never sends (FedSA-LoRA's B): the
# client loads its own copy (PEFT's init before its first round) over whatever the message holds
PERSONAL = "personal-suffixes"

# MetricRecord keys (client -> server)
NUM_EXAMPLES = "num-examples"  # the aggregation weight n_k (Flower's default key)
PARTITION_ID = "partition-id"
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
TRAIN_STEPS = "train-steps"
EPSILON = "epsilon"
LORA_RANK = "lora-rank"  # the rank a client trains at (hello reply and training reply)
DP_STEPS = "dp-steps"  # noisy training steps this client's accountant has recorded so far (all rounds)
NOISE_MULTIPLIER = "noise-multiplier"  # σ of those steps
EXAMPLES_SEEN = "examples-seen"  # examples that went through the model this round
DECLINED = "declined"  # 1 when a client declined to train (e.g. privacy budget), else 0
EVAL_LOSS = "eval-loss"  # federated evaluation: the global adapter's loss on a client's own data
EVAL_ACCURACY = "eval-accuracy"
AGGREGATED = "aggregated"  # MetricRecord of an aggregation: how many replies it averaged

# A declined reply's ConfigRecord and its text field (privacy.policy)
DECLINE_RECORD = "privacy-decline"
DECLINE_REASON = "reason"

# Node config keys (Flower's own names)
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
NODE_LORA_RANK = "lora-rank"  # a node's own LoRA rank (heterogeneous federations; fl.ranks)
NODE_DATA_PATH = "data-path"  # a node's own data file: it trains on all of it instead of a partition of the pool
NODE_ATTACK = "attack"  # a simulated hostile node (clients/attack.py): scale | sign_flip | gaussian | ...
NODE_ATTACK_STRENGTH = "attack-strength"  # its strength (default: the attack's own)

# Context.state keys on a client
STATE_FROZEN = "fedlora-frozen"
STATE_PRIVACY = "fedlora-privacy"
STATE_OPTIMIZER = "fedlora-optimizer"  # train.keep_optimizer_state: the client's optimiser state (ArrayRecord)
STATE_PERSONAL = "fedlora-personal"  # the tensors named by PERSONAL, as this client last trained them (ArrayRecord)

# Run outputs
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
ADAPTER_DIR = "adapter"

# Fed-SB's initialisation exchanges (phase init-grad)
INIT_STEP = "init-step"  # ConfigRecord: which init release a client is asked for, one of INIT_STEP_*
INIT_EXCHANGE = "init-exchange"  # ConfigRecord: 0-based index of this init exchange (seeds its noise)
INIT_STEP_DENSE = "dense"  # send G_k (every adapted W0's gradient sum)
INIT_STEP_RIGHT = "sketch-right"  # send G_k·M per module (M = Ω from the seed, or the matrices sent)
INIT_STEP_LEFT = "sketch-left"  # send G_kᵀ·Q per module (Q sent by the server)

# metrics.jsonl fields of client-level DP (privacy=client; strategies.client_dp)
CLIENT_DP_EPSILON = "client_dp_epsilon"  # ε of the released global model after this round (null: σ = 0)
CLIENT_DP_RELEASES = "client_dp_releases"  # noisy aggregates released so far (the accountant's steps)
CLIENT_DP_NOISE_STD = "client_dp_noise_std"  # std of the noise added to each coordinate of this round's mean
CLIENT_DP_CLIPPED = "client_dp_clipped"  # fraction of this round's updates the server had to shrink to C

# metrics.jsonl fields of federated, per-client evaluation (sim.fraction_evaluate > 0, data.client_test_fraction > 0):
# each evaluating client scores the model it would keep on its own held-out share; spread over those clients
CLIENT_ACCURACY_MEAN = "client_accuracy_mean"  # unweighted mean over the clients that evaluated
CLIENT_ACCURACY_STD = "client_accuracy_std"  # population std over them (0 for one client)
CLIENT_ACCURACY_MIN = "client_accuracy_min"
CLIENT_ACCURACY_MAX = "client_accuracy_max"
CLIENT_LOSS_MEAN = "client_loss_mean"  # unweighted mean of their losses
CLIENTS_EVALUATED = "clients_evaluated"  # how many clients' scores the fields above summarise
CLIENTS_EVAL_FAILED = "clients_eval_failed"  # evaluate messages with an error or no reply (declines included)

# metrics.jsonl fields of federated optimisation (server_opt=, drift=, the validation split)
SERVER_STEP_RATIO = "server_step_ratio"  # ‖x_new − x‖ / ‖aggregate − x‖ on the optimised tensors (1 = FedAvg)
VAL_ACCURACY = "val_accuracy"  # the server's validation split (data.val_size), drawn from training data
VAL_LOSS = "val_loss"

# SCAFFOLD (drift=scaffold; Karimireddy et al., ICML 2020): control variates in the trained tensors' space, by name
SCAFFOLD_C = "scaffold-c"  # ArrayRecord (server -> client, train messages): the server's control variate c
SCAFFOLD_DELTA = "scaffold-delta"  # ArrayRecord (client -> server): Δc_i = c_i⁺ − c_i of this round
SCAFFOLD_CLIENT = "scaffold-client"  # ArrayRecord (server -> client, once after a resume): the server's copy of c_i
STATE_SCAFFOLD = "fedlora-scaffold"  # Context.state on a client: its c_i (ArrayRecord)
SCAFFOLD_C_NORM = "scaffold_c_norm"  # metrics.jsonl: ‖c‖ (L2 over every tensor) after the round's update
