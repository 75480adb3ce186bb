"""Causal-LM instruction tuning: record shapes and checks, response-only loss, every strategy (and DP-SGD)
through a real Flower simulation on a tiny random Llama, and exports that reload with plain PEFT."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from loop_grid import LoopGrid
from peft import PeftModel

from fl.adapters import load_tensors
from fl.app.config import compose
from fl.app.server_app import run_server
from fl.app.simulation import run_simulation
from fl.app.workspace import get_workspace
from fl.checkpoint import Checkpoint
from fl.data import IndexedDataset
from fl.models import load_tokenizer
from fl.outputs import read_metrics
from fl.tasks import get_task, load_base_model
from fl.tasks.causal_lm import IGNORE
from fl.tasks.instructions import load_records, tokenize_conversations

LLAMA = [
    "model=tiny_llama",
    "data.max_examples=160",
    "data.test_size=24",
    "data.val_size=8",  # not the tweets' 500: each is a forward per label word over 49,152-token logits
    "data.max_length=112",
    "data.system_prompt=Be brief.",
    "train.local_steps=2",
    "train.batch_size=4",
    "train.eval_batch_size=24",
    "strategy.rank=4",
]
ALPACA = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
]
CHAT = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {
        "messages": [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "Merci"},
        ]
    },
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _data_cfg(path: Path, *extra: str):  # type: ignore[no-untyped-def]
    return compose(["model=tiny_llama", "data=file", f"data.path={path}", "data.partitioner=iid", *extra]).data


@pytest.fixture(scope="module")
def tokenizer(cache_dir: str):  # type: ignore[no-untyped-def]
    return load_tokenizer(compose(["model=tiny_llama"]).model, cache_dir)


@pytest.mark.parametrize("rows", [ALPACA, CHAT], ids=["alpaca", "chat"])
def test_both_record_shapes_are_formatted_with_the_chat_template(rows, tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rec = load_records(_data_cfg(_jsonl(tmp_path / "d.jsonl", rows)))
    ids, lengths, kept = tokenize_conversations(rec.conversations, tokenizer, max_length=256)
    assert kept == [0, 1]
    for conv, x, p in zip(rec.conversations, ids, lengths, strict=True):
        text = tokenizer.decode(x)
        assert text == tokenizer.apply_chat_template(conv, tokenize=False)  # the template's own rendering
        assert tokenizer.decode(x[:p]).endswith("<|im_start|>assistant\n")  # the prompt ends where the answer starts
        assert tokenizer.decode(x[p:]).startswith(conv[-1]["content"])
    if rows is ALPACA:
        assert rec.conversations[1][0]["content"] == "Add the numbers.\n\n2 and 3"


def test_prompt_tokens_carry_no_loss(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rec = load_records(_data_cfg(_jsonl(tmp_path / "d.jsonl", ALPACA)))
    ids, lengths, _ = tokenize_conversations(rec.conversations, tokenizer, max_length=256)
    task = get_task("causal_lm")
    batch = task.collate([(torch.tensor(x), -1, p) for x, p in zip(ids, lengths, strict=True)], pad_id=0)
    for i, (x, p) in enumerate(zip(ids, lengths, strict=True)):
        assert (batch["labels"][i, :p] == IGNORE).all()  # prompt
        assert batch["labels"][i, p : len(x)].tolist() == x[p:]  # response
        assert (batch["labels"][i, len(x) :] == IGNORE).all()  # padding
    # Changing the logits at prompt positions leaves the loss unchanged; at a response position it does not.
    logits = torch.randn(*batch["input_ids"].shape, 64)
    batch["labels"] = batch["labels"].clamp(max=63).masked_fill(batch["labels"] == IGNORE, IGNORE)
    base = task.per_example_loss(type("O", (), {"logits": logits})(), batch)
    bumped = logits.clone()
    bumped[:, : min(lengths) - 1] += torch.randn_like(bumped[:, : min(lengths) - 1])
    assert torch.allclose(task.per_example_loss(type("O", (), {"logits": bumped})(), batch), base)
    bumped[0, lengths[0] - 1, 0] += 5.0  # the logit of one token at the first response prediction
    assert not torch.allclose(task.per_example_loss(type("O", (), {"logits": bumped})(), batch), base)


def test_only_the_response_positions_get_logits_and_every_score_is_unchanged(cache_dir: str) -> None:
    """`logits_to_keep` (CausalLM.model_inputs): the LM head runs from the first position that predicts a response
    token; the per-example losses, gradients and the evaluation's metrics equal those from the full logits."""
    ws = get_workspace([*LLAMA, "seed=3"])
    task, model, split = ws.task_def, ws.model, ws.task.test
    items = [(split.input_ids[i], int(split.labels[i]), int(split.prompt_lengths[i])) for i in range(6)]
    batch = task.collate(items, ws.pad_id)
    full_inputs = {k: v for k, v in batch.items() if k != "labels"}
    kept_inputs = task.model_inputs(batch)
    first = min(p for _, _, p in items) - 1  # the first position whose logits predict a response token
    length = batch["input_ids"].shape[1]
    assert kept_inputs["logits_to_keep"].tolist() == list(range(first, length))
    full, kept = model(**full_inputs), model(**kept_inputs)
    assert kept.logits.shape[1] == length - first < full.logits.shape[1]
    loss_full, loss_kept = task.per_example_loss(full, batch), task.per_example_loss(kept, batch)
    assert torch.allclose(loss_kept, loss_full, atol=1e-6)
    trained = [p for p in model.parameters() if p.requires_grad]
    g_full = torch.autograd.grad(loss_full.sum(), trained)
    g_kept = torch.autograd.grad(task.per_example_loss(model(**kept_inputs), batch).sum(), trained)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_full, g_kept, strict=True))
    # the evaluation (label words at the prompt's last position, response-token accuracy) against the full logits
    metrics = task.evaluate(model, split, batch_size=5, pad_id=ws.pad_id)
    words = torch.tensor([w[0] for w in split.label_token_ids])
    correct, loss = 0, 0.0
    for i in range(len(split)):
        one = task.collate([(split.input_ids[i], int(split.labels[i]), int(split.prompt_lengths[i]))], ws.pad_id)
        with torch.no_grad():
            out = model(**{k: v for k, v in one.items() if k != "labels"})
        loss += float(task.per_example_loss(out, one)[0])
        correct += int(out.logits[0, int(split.prompt_lengths[i]) - 1, words].argmax()) == int(split.labels[i])
    assert metrics["accuracy"] == correct / len(split)
    assert metrics["loss"] == pytest.approx(loss / len(split), rel=1e-5)


def test_a_causal_lm_without_logits_to_keep_is_refused_naming_the_model() -> None:
    from fl.tasks.causal_lm import accept_logits_to_keep

    class Old(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None: ...

    with pytest.raises(ValueError, match=r"model.name=org/old: Old.forward takes no `logits_to_keep`"):
        accept_logits_to_keep(Old(), "org/old")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([*ALPACA, {"instruction": "No answer"}], r"record 2: field 'output' is missing"),
        ([*ALPACA, {"instruction": "Empty", "input": "", "output": "  "}], r"record 2: field 'output' is empty"),
        ([{"messages": [{"role": "user", "content": "Hi"}]}], r"record 0: field 'messages' must end with an assistant"),
        (
            [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}],
            r"record 0: field 'messages\[1\]\.content' is empty",
        ),
    ],
    ids=["no-response", "empty-response", "no-assistant-turn", "empty-turn"],
)
def test_a_bad_record_fails_before_training_naming_the_field(rows, match: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        load_records(_data_cfg(_jsonl(tmp_path / "bad.jsonl", rows)))


@pytest.fixture(scope="module", params=["fedit", "ffa_lora+dp", "lora_fair", "fed_sb+dp"])
def run(request: pytest.FixtureRequest, cache_dir: str, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    strategy, _, dp = str(request.param).partition("+")
    run_dir = tmp_path_factory.mktemp(strategy) / "run"
    overrides = [
        *LLAMA,
        f"strategy={strategy}",
        "sim.num_clients=2",
        "sim.rounds=1",
        "data.partitioner=iid",
        f"cache_dir={cache_dir}",
        f"run_dir={run_dir}",
    ]
    if strategy == "lora_fair":
        overrides.append("strategy.steps=20")
    if strategy == "fed_sb":
        overrides.append("strategy.init_examples=8")
    if dp:
        overrides += ["privacy=dp", "privacy.target_epsilon=8"]
    # FFA-LoRA + DP on the Simulation Runtime (Ray actors); the others in-process, which gives the same numbers
    # (test_reliability.py) without ~30 s of Ray start-up each
    done = run_simulation(overrides) if request.param == "ffa_lora+dp" else run_server(LoopGrid(2), overrides)
    return request.param, done, overrides


def test_every_strategy_trains_the_tiny_llama(run) -> None:  # type: ignore[no-untyped-def]
    name, run_dir, overrides = run
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["aggregated"] == 2 and rows[1]["failed"] == 0 and rows[1]["declined"] == 0, name
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["loss"] > 0 for r in rows)
    assert rows[1]["loss"] != rows[0]["loss"]  # the adapter moved
    ws = get_workspace(overrides)
    trained = [n for n, p in ws.model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_" in n for n in trained)  # no head, no embeddings, no lm_head
    adapted = {n.split(".")[-4] for n in trained}
    assert adapted >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} or name.startswith(
        "fed_sb"
    )
    cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "tiny_llama" and not cfg["modules_to_save"]
    assert sorted(cfg["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ) or all(t.split(".")[-1].endswith("proj") for t in cfg["target_modules"])


def test_export_reloads_with_plain_peft_to_the_framework_logits(run) -> None:  # type: ignore[no-untyped-def]
    _, run_dir, overrides = run
    ws = get_workspace(overrides)  # the framework's model, given the run's final trained state
    load_tensors(ws.model, Checkpoint.load(run_dir).arrays)
    base = load_base_model(ws.cfg.model, num_labels=0, seed=int(ws.cfg.seed), cache_dir=ws.cfg.cache_dir)
    reloaded = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    ds = IndexedDataset(ws.task.test)
    batch = ws.task_def.collate([ds[i] for i in range(8)], ws.pad_id)
    with torch.no_grad():
        theirs = reloaded(**ws.task_def.model_inputs(batch)).logits
        ours = ws.model(**ws.task_def.model_inputs(batch)).logits
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert ws.task_def.evaluate(reloaded, ws.task.test, batch_size=24, pad_id=ws.pad_id)["accuracy"] == pytest.approx(
        read_metrics(run_dir)[-1]["accuracy"]
    )


def test_a_client_subset_keeps_what_its_task_needs(run) -> None:  # type: ignore[no-untyped-def]
    _, _, overrides = run
    ws = get_workspace(overrides)
    sub = ws.task.train.subset(torch.arange(5).numpy() * 3)
    assert sub.task == "causal_lm" and sub.label_token_ids == ws.task.train.label_token_ids
    assert (
        sub.prompt_lengths is not None and sub.prompt_lengths.tolist() == ws.task.train.prompt_lengths[::3][:5].tolist()
    )
    assert set(ws.task_def.evaluate(ws.model, sub, batch_size=4, pad_id=ws.pad_id)) >= {
        "loss",
        "accuracy",
        "perplexity",
    }


def test_the_centralised_anchor_trains_on_the_clients_objective(
    cache_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`simulations.centralised` steps on the task's per-example losses (kept logits, a mean over examples), as
    every client does (`clients.train`), not on the model's own token-weighted loss over full logits."""
    from simulations.centralised import run as centralised

    task = get_task("causal_lm")
    calls: list[tuple[bool, bool]] = []
    real = type(task).loss_of

    def spy(self, model, batch):  # type: ignore[no-untyped-def]
        losses = real(self, model, batch)
        calls.append((model.training, losses.requires_grad and losses.ndim == 1))
        return losses

    monkeypatch.setattr(type(task), "loss_of", spy)
    overrides = [*LLAMA, "sim.rounds=1", "sim.num_clients=2", "data.partitioner=iid", f"cache_dir={cache_dir}"]
    history = centralised(overrides, steps=2, eval_every=2)
    assert calls == [(True, True), (True, True)]  # one per optimiser step, per-example and differentiable
    assert [h["step"] for h in history] == [0, 2] and all(math.isfinite(h["loss"]) for h in history)
