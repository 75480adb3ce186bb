"""Check the causal-LM path on a GPU: `python -m simulations.gpu_check [--model smollm2|tiny_llama] [--sim]`.

With CUDA it builds the model on the GPU (moved there before PEFT and Opacus wrap it, opacus #820), takes a
few local steps with `train.precision` autocast (bf16 where supported, else fp16), a few DP-SGD steps, checks
that the adapter weights changed and stayed on the GPU, evaluates, and with `--sim` runs a one-round
Flower simulation with `sim.client_gpus`. Without CUDA it prints why it skips and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny_llama"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sim", action="store_true", help="also a 1-round simulation with sim.client_gpus=0.5")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: skipped — torch sees no CUDA device (torch.cuda.is_available() is False).")
        return 0
    from clients.evaluate import evaluate_metrics
    from clients.train import local_train
    from fl.adapters import trainable_state
    from fl.app.workspace import get_workspace
    from fl.data import IndexedDataset
    from fl.runtime_env import set_quiet_env
    from privacy import ClientAccountant, make_private

    set_quiet_env()
    precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    overrides = [
        "+experiment=smollm2",
        f"model={args.model}",
        "train.device=cuda",
        f"train.precision={precision}",
        "data.test_size=64",
    ]
    ws = get_workspace(overrides)
    devices = {p.device.type for p in ws.model.parameters()}
    assert devices == {"cuda"}, f"model parameters on {devices}, expected cuda only"
    data = IndexedDataset(ws.task.train, np.arange(min(256, len(ws.task.train))))
    before = trainable_state(ws.model)
    print(f"gpu_check: {torch.cuda.get_device_name()} | {args.model} | precision {precision}")
    print("  before:", evaluate_metrics(ws.model, ws.task.test, batch_size=16, pad_id=ws.pad_id))
    kw = dict(batch_size=8, lr=1e-3, weight_decay=0.0, pad_id=ws.pad_id, precision=precision)
    t0 = time.perf_counter()
    res = local_train(ws.model, data, steps=args.steps, seed=0, **kw)  # type: ignore[arg-type]
    print(f"  {res.steps} steps: loss {res.loss:.4f}, {(time.perf_counter() - t0) / max(res.steps, 1):.3f} s/step")
    moved = sum(float((a - before[n]).abs().sum()) for n, a in trainable_state(ws.model).items())
    assert moved > 0, "the adapter did not change on the GPU"
    acc = ClientAccountant("rdp")

    def wrap(m, o, loader):
        return make_private(
            model=m,
            optimizer=o,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            accountant=acc,
            loss_fn=ws.task_def.per_example_loss,
        )

    dp_kw = {**kw, "precision": "fp32" if precision == "fp16" else precision}
    dp = local_train(ws.model, data, steps=2, seed=1, wrap=wrap, **dp_kw)  # type: ignore[arg-type]
    print(f"  DP-SGD: {dp.steps} steps, loss {dp.loss:.4f}, ε={acc.epsilon(1e-5):.3f}")
    print("  after:", evaluate_metrics(ws.model, ws.task.test, batch_size=16, pad_id=ws.pad_id))
    if args.sim:
        from fl.app.simulation import run_simulation

        run_dir = run_simulation(
            [*overrides, "sim.rounds=1", "sim.num_clients=2", "sim.client_gpus=0.5", "train.local_steps=2"]
        )
        print("  simulation:", run_dir)
    print("gpu_check: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
