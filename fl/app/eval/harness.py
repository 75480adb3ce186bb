"""Score a run's model with EleutherAI's lm-evaluation-harness (`lm-eval`, the `eval` extra), offline.

The model handed to lm-eval's Hugging Face model (`lm_eval.models.huggingface.HFLM`) is built here, not by
HFLM from a path, because a run's base need not be a folder: the tiny Llama is built from the run's seed and
SmolLM2 is de-quantised from its GGUF once (`fl.tasks.load_base_model` does both, as the run did). On it go,
in order: the base-weight change a FedEx-LoRA / FLoRA run exports (``adapter/base_delta.safetensors``,
`fl.base_delta.apply_to_base`: W0 += ΔW0), then the exported PEFT adapter (`PeftModel.from_pretrained`), kept
unmerged as in the run. HFLM takes that model object (``pretrained=``) with the run's tokenizer; its own
``peft=`` argument needs the base as a path and cannot fold a base delta, so it is not used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from fl.accel import autocast_dtype, resolve_device
from fl.base_delta import BASE_DELTA_FILE, apply_to_base
from fl.tasks import load_base_model

log = logging.getLogger(__name__)

SKIP = ("alias", "sample_len")  # lm-eval's per-task bookkeeping, not scores ("n" says how many were scored)
EXTRA_HINT = "pip install 'fedlora[eval]' (lm-eval; `bash dev.sh setup` installs it)"


def require_lm_eval() -> str:
    """lm-eval's version; ImportError naming the extra when it is not installed."""
    try:
        import lm_eval
    except ImportError as e:
        raise ImportError(f"fl-eval needs EleutherAI's lm-evaluation-harness: {EXTRA_HINT}.") from e
    return str(getattr(lm_eval, "__version__", "unknown"))


def build_model(cfg: DictConfig, adapter_dir: Path | None) -> torch.nn.Module:
    """The run's base model (seeded as in the run), its base delta folded in and its adapter on top, in eval mode.

    `adapter_dir` None: the base model alone (its zero-shot score; a base delta is not applied either).
    """
    base = load_base_model(cfg.model, num_labels=0, seed=int(cfg.seed), cache_dir=cfg.cache_dir)
    if adapter_dir is None:
        return base.eval()
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir}: no exported PEFT adapter (adapter_config.json); did the run finish?")
    delta = adapter_dir / BASE_DELTA_FILE
    if delta.is_file():
        log.info("Folding the run's base-weight change %s into W0", delta)
        apply_to_base(base, delta)
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


@dataclass(frozen=True)
class HarnessOptions:
    """How lm-eval runs: tasks, batch size (examples), an optional cap on examples per task, device, precision."""

    tasks: tuple[str, ...]
    batch_size: int = 16
    limit: int | None = None
    device: str = "auto"
    precision: str = "fp32"
    num_fewshot: int | None = None
    include_path: Path | None = None  # extra task YAML folder (the run's copied shipped tasks)


def run_harness(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, opts: HarnessOptions) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` on `model` through HFLM; its raw result (``results``, ``n-samples``, ``samples``)."""
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    device = resolve_device(opts.device)
    model.to(device)
    lm = HFLM(
        pretrained=model,  # a PeftModel or PreTrainedModel object, already on its device
        tokenizer=tokenizer,
        batch_size=opts.batch_size,
        add_bos_token=False,  # the chat template writes any BOS itself, as in the run's tokenisation
        mixed_precision_dtype=autocast_dtype(device, opts.precision),
    )
    shipped_only = opts.include_path is not None and all(
        (opts.include_path / f"{t}.yaml").is_file() for t in opts.tasks
    )
    # lm-eval's own task index (thousands of YAMLs) is read only when a task needs it (a hub task)
    manager = TaskManager(include_path=opts.include_path, include_defaults=not shipped_only)
    results = simple_evaluate(
        model=lm,
        tasks=list(opts.tasks),
        num_fewshot=opts.num_fewshot,
        limit=opts.limit,
        task_manager=manager,
        log_samples=True,
        bootstrap_iters=1000,  # a mean's standard error is by formula; bootstrapped metrics (F1, BLEU) get 1,000 draws
    )
    if results is None:
        raise RuntimeError("lm-eval returned no results (a non-zero rank of a distributed launch).")
    return dict(results)


def task_metrics(results: dict[str, Any]) -> dict[str, dict[str, float | int]]:
    """{task: {metric: value, ..., "n": examples scored}} from lm-eval's results (filter suffix ``,none`` dropped)."""
    out: dict[str, dict[str, float | int]] = {}
    for task, row in results.get("results", {}).items():
        metrics: dict[str, float | int] = {}
        for key, value in row.items():
            name, _, filt = str(key).partition(",")
            if key in SKIP or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            metrics[name if filt in ("", "none") else f"{name},{filt}"] = float(value)
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        if n is not None:
            metrics["n"] = int(n)
        out[task] = metrics
    return out
