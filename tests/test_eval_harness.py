"""fl-eval: lm-evaluation-harness scores a tiny Llama run's exported adapter and its base model offline, and the
shipped label-word task agrees with the run's own central evaluation record by record."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from loop_grid import LoopGrid
from peft import PeftModel
from safetensors.torch import save_file

pytest.importorskip("lm_eval", reason="lm-eval is not installed (the `eval` extra: pip install 'fedlora[eval]')")

from fl.app.eval.cli import evaluate, main, run_config
from fl.app.eval.harness import HarnessOptions, build_model
from fl.app.eval.records import GEN_TASK, MC_TASK, check_tasks
from fl.app.server_app import run_server
from fl.base_delta import BASE_DELTA_FILE
from fl.models import load_tokenizer
from fl.outputs import read_metrics
from fl.tasks import get_task

LLAMA = [
    "model=tiny_llama",
    "data.max_examples=64",
    "data.test_size=24",  # 2 of them have prompts over data.max_length: dropped by the run and by fl-eval
    "data.val_size=0",
    "data.max_length=112",
    "train.local_steps=2",
    "train.batch_size=4",
    "train.eval_batch_size=24",
    "train.precision=fp32",
    "strategy=fedit",
    "strategy.rank=4",
    "sim.num_clients=2",
    "sim.rounds=1",
    "data.partitioner=iid",
    "tracking=tensorboard",
]


@pytest.fixture(scope="module")
def run_dir(cache_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-round FedIT run of the tiny Llama (in-process ClientApps), with its adapter exported."""
    out = tmp_path_factory.mktemp("eval") / "run"
    return Path(run_server(LoopGrid(2), [*LLAMA, f"cache_dir={cache_dir}", f"run_dir={out}"]))


@pytest.fixture(scope="module")
def scored(run_dir: Path) -> dict[str, Any]:
    """fl-eval's entry for the run's adapter on both shipped tasks."""
    opts = HarnessOptions(tasks=(MC_TASK, GEN_TASK), batch_size=24, device="cpu", precision="fp32")
    return evaluate(run_config(run_dir), run_dir, adapter_dir=run_dir / "adapter", opts=opts)


def test_fl_eval_scores_the_adapter_into_eval_json_summary_and_tracking(run_dir: Path, scored: dict[str, Any]) -> None:
    saved = json.loads((run_dir / "eval.json").read_text())["adapter"]
    assert saved["tasks"] == scored["tasks"] and saved["model"] == "adapter"
    assert set(saved["tasks"]) == {MC_TASK, GEN_TASK}
    assert 0.0 <= saved["tasks"][GEN_TASK]["exact_match"] <= 1.0 and saved["tasks"][GEN_TASK]["n"] == 22
    assert json.loads((run_dir / "summary.json").read_text())["eval"]["adapter"]["tasks"] == scored["tasks"]
    # the records and the tasks as plain lm-eval reads them (`lm_eval --include_path <run>/eval/tasks`)
    assert len((run_dir / "eval" / "heldout.jsonl").read_text().splitlines()) == 22
    assert (
        str((run_dir / "eval" / "heldout.jsonl").resolve()) in (run_dir / "eval/tasks/fl_heldout_mc.yaml").read_text()
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard" / "run")).Reload()
    acc = events.Scalars(f"eval/{MC_TASK}/acc")
    assert [(e.step, e.value) for e in acc] == [(1, pytest.approx(scored["tasks"][MC_TASK]["acc"]))]


def test_the_tweets_task_accuracy_equals_the_runs_own_final_accuracy(run_dir: Path, scored: dict[str, Any]) -> None:
    final = read_metrics(run_dir)[-1]
    mc = scored["tasks"][MC_TASK]
    assert mc["n"] == 22 == scored["heldout_records"]
    assert mc["acc"] == pytest.approx(final["accuracy"], abs=1e-12)
    assert mc["acc"] == pytest.approx(json.loads((run_dir / "summary.json").read_text())["final_accuracy"], abs=1e-12)
    # Record by record: lm-eval's log-likelihood differences between label words are the task's own. (lm-eval
    # moves the prompt's trailing newline into each continuation: the same term for every word, so it cancels.)
    cfg = run_config(run_dir)
    tok = load_tokenizer(cfg.model, cfg.cache_dir)
    test = get_task("causal_lm").build_data(cfg.data, tok, seed=int(cfg.seed), cache_dir=cfg.cache_dir).test
    assert test.prompt_lengths is not None and test.label_token_ids is not None
    first = [w[0] for w in test.label_token_ids]
    model = build_model(cfg, run_dir / "adapter")
    samples = [json.loads(s) for s in (run_dir / "eval/adapter/samples_fl_heldout_mc.jsonl").read_text().splitlines()]
    assert len(samples) == len(test)
    with torch.no_grad():
        for s in samples:
            i = s["doc_id"]
            prompt = test.input_ids[i][: int(test.prompt_lengths[i])].long()
            ours = model(input_ids=prompt[None]).logits[0, -1].float().log_softmax(-1)[first]
            theirs = torch.tensor([r[0] for r in s["filtered_resps"]])
            assert s["target"] == int(test.labels[i])
            assert torch.allclose(theirs - theirs[0], ours - ours[0], atol=1e-4), i


def test_fl_eval_base_only_scores_the_zero_shot_model_beside_the_adapter(run_dir: Path, scored: dict[str, Any]) -> None:
    main([str(run_dir), "--base-only", "--tasks", MC_TASK, "--device", "cpu", "--no-track"])
    saved = json.loads((run_dir / "eval.json").read_text())
    assert saved["adapter"]["tasks"] == scored["tasks"]  # kept beside it
    assert saved["base"]["model"] == "base" and saved["base"]["adapter_dir"] is None
    # round 0 of every FedIT run is the base model (B = 0): its in-run accuracy is the zero-shot score
    assert saved["base"]["tasks"][MC_TASK]["acc"] == pytest.approx(read_metrics(run_dir)[0]["accuracy"], abs=1e-12)


def test_fl_eval_base_scores_a_model_named_by_overrides_without_a_run(cache_dir: str, tmp_path: Path) -> None:
    out = tmp_path / "zero-shot"
    main(["--base", *LLAMA, f"cache_dir={cache_dir}", "--out", str(out), "--tasks", MC_TASK, "--limit", "4"])
    saved = json.loads((out / "eval.json").read_text())
    assert list(saved) == ["base"] and saved["base"]["tasks"][MC_TASK]["n"] == 4 and saved["base"]["limit"] == 4
    assert run_config(out).model.name == "tiny_llama"  # the composed config beside it


def test_a_base_delta_is_folded_into_w0_before_the_adapter(run_dir: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(run_dir / "adapter", adapter)
    name = "model.layers.0.self_attn.q_proj.weight"  # the plain model's name, as fl.base_delta.save_base_delta writes
    cfg = run_config(run_dir)
    plain = build_model(cfg, None)
    delta = torch.randn(plain.get_parameter(name).shape, generator=torch.Generator().manual_seed(0))
    save_file({name: delta}, str(adapter / BASE_DELTA_FILE))
    peft_model = build_model(cfg, adapter)
    assert isinstance(peft_model, PeftModel)
    folded = peft_model.get_base_model()  # adapted modules keep W0 as base_layer.weight
    assert torch.allclose(
        folded.get_parameter(name.replace(".weight", ".base_layer.weight")), plain.get_parameter(name) + delta
    )
    other = "model.layers.1.self_attn.q_proj"
    assert torch.equal(folded.get_parameter(f"{other}.base_layer.weight"), plain.get_parameter(f"{other}.weight"))


def test_the_choice_task_is_refused_on_free_text_records() -> None:
    check_tasks([GEN_TASK], [{"prompt": "p", "response": "Blue."}])
    with pytest.raises(ValueError, match="fl_heldout_mc needs records whose response is their class word"):
        check_tasks([MC_TASK], [{"prompt": "p", "response": "Blue."}])


def test_fl_eval_scores_several_runs_in_turn_and_fl_report_shows_their_scores(
    run_dir: Path, scored: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from simulations.report import report

    other = tmp_path / "cells" / "copy"  # the same run with its scores dropped: scored again, to the same figure
    shutil.copytree(run_dir, other)
    (other / "eval.json").unlink()
    summary = json.loads((other / "summary.json").read_text())
    summary.pop("eval")
    (other / "summary.json").write_text(json.dumps(summary))
    missing = tmp_path / "cells" / "missing"
    args = [str(run_dir), str(missing), str(other), "--skip-scored", "--tasks", MC_TASK, "--device", "cpu"]
    with pytest.raises(SystemExit) as ended:
        main([*args, "--no-track"])
    out, err = capsys.readouterr()
    assert ended.value.code == 2 and "1 of 3 runs not scored" in err
    assert f"fl-eval: {missing}: error:" in err and "no config.yaml" in err  # named, and the next run still scored
    assert f"{run_dir}: already scored on {MC_TASK}" in out  # --skip-scored: its eval.json has the task
    again = json.loads((other / "eval.json").read_text())["adapter"]["tasks"][MC_TASK]
    assert again["acc"] == pytest.approx(scored["tasks"][MC_TASK]["acc"]) and again["n"] == 22
    df, _ = report(tmp_path / "cells")  # fl-report: the run's lm-eval accuracy per run and over seeds
    assert list(df["lm_eval_fl_heldout_mc"]) == [pytest.approx(again["acc"])]
    # the majority floor of a label-word run: the largest class's share of the records it scored (22 of 24)
    counts = json.loads((other / "eval.json").read_text())["adapter"]["heldout_classes"]
    assert list(df["majority"]) == [pytest.approx(max(counts.values()) / sum(counts.values()))]
    seeds = (tmp_path / "cells" / "seeds.md").read_text()
    assert "lm_eval_fl_heldout_mc" in seeds and "lm_eval_fl_heldout_gen" not in seeds


def test_a_run_without_its_tokenizer_here_gets_no_majority_floor_and_a_warning(
    run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from simulations.study import majority_share

    cfg = run_config(run_dir)
    cfg.model.tokenizer = "/no/such/tokenizer"  # a run folder copied to a machine without its model
    with caplog.at_level("WARNING", logger="simulations.study"):
        assert majority_share(cfg) is None
    assert "No majority floor" in caplog.text and "/no/such/tokenizer" in caplog.text


def test_the_centralised_anchor_writes_a_run_folder_fl_eval_scores_to_its_own_accuracy(
    cache_dir: str, tmp_path: Path
) -> None:
    """`simulations.centralised --out`: config, a PEFT adapter and a summary, scored by lm-eval like a federated run
    (the LLM table's anchor), and lm-eval's tweets accuracy is the anchor's own final accuracy."""
    from simulations.centralised import HISTORY_FILE
    from simulations.centralised import main as centralised

    out = tmp_path / "anchor"
    overrides = [o for o in LLAMA if not o.startswith("tracking=")]
    threads = str(torch.get_num_threads())  # the CLI sets torch's threads: leave the process's as they were
    centralised(["--steps", "2", "--eval-every", "1", "--threads", threads, "--out", str(out), *overrides])
    centralised_summary = json.loads((out / "summary.json").read_text())
    history = [json.loads(line) for line in (out / HISTORY_FILE).read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 1, 2] and centralised_summary["steps"] == 2
    assert centralised_summary["final_accuracy"] == history[-1]["accuracy"]
    assert (out / "adapter" / "adapter_config.json").is_file()
    main([str(out), "--tasks", MC_TASK, "--device", "cpu", "--no-track"])
    mc = json.loads((out / "eval.json").read_text())["adapter"]["tasks"][MC_TASK]
    assert mc["n"] == 22 and mc["acc"] == pytest.approx(centralised_summary["final_accuracy"], abs=1e-12)
    assert json.loads((out / "summary.json").read_text())["eval"]["adapter"]["tasks"][MC_TASK] == mc
