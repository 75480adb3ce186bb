"""Where a DP-SGD client's signal goes, on the real model and data (no training, a few minutes on CPU).

1. Per-example gradient norms at the start of a run, split into the task head and the adapter: under flat
   clipping to C every tensor shares one bound, so the head's share of each example's norm is the share of C
   its gradient keeps, while the noise σC is added to every coordinate alike.
2. For Fed-SB (W0 + B R A, only R trains): the fraction of the dense gradient's energy that R sees,
   ‖Bᵀ G Aᵀ‖²_F / ‖G‖²_F per adapted module, for several choices of the frozen A, B: random orthonormal (the
   DP preset's `init=random`), the top or bottom singular vectors of W0 (data-free), the gradient's own top-r
   subspace (an oracle) and another client's (what an init from other data of the same kind gives).

Usage::

    python -m simulations.probe_dp_signal [--rank 64] [--examples 256] [--clients 0 3] [--out probe.json]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from clients.fedsb_init import gradient_sum, init_examples
from fl.adapters import HEAD_MARK
from fl.app.workspace import get_workspace
from fl.data import IndexedDataset, client_partition
from fl.tasks import get_task
from simulations import harness


def norm_split(overrides: list[str], *, count: int) -> dict[str, float]:
    """Median per-example gradient norm over all trainable tensors, the head's part and the rest's."""
    ws = get_workspace(overrides)
    idx = client_partition(ws.task, ws.cfg.data, pid=0, num_partitions=int(ws.cfg.sim.num_clients), seed=0)
    data = IndexedDataset(ws.task.train, idx)
    task = get_task(data.split.task)
    params = {n: p for n, p in ws.model.named_parameters() if p.requires_grad}
    ws.model.eval()
    total, head, rest = [], [], []
    for i in range(min(count, len(data))):
        ws.model.zero_grad(set_to_none=True)
        task.loss_of(ws.model, task.collate([data[i]], ws.pad_id)).sum().backward()
        sq = {n: float(p.grad.pow(2).sum()) for n, p in params.items() if p.grad is not None}
        h = sum(v for n, v in sq.items() if HEAD_MARK in n)
        total.append(sum(sq.values()) ** 0.5)
        head.append(h**0.5)
        rest.append((sum(sq.values()) - h) ** 0.5)
    ws.model.zero_grad(set_to_none=True)
    return {
        "examples": len(total),
        "trainable": sum(p.numel() for p in params.values()),
        "total_median": float(np.median(total)),
        "head_median": float(np.median(head)),
        "adapter_median": float(np.median(rest)),
        "adapter_share_of_norm_median": float(np.median(np.array(rest) / np.array(total))),
    }


def energy_capture(rank: int, *, count: int, clients: list[int]) -> dict[str, dict[str, float]]:
    """Per (client, choice of A and B): mean/median/min over modules of the gradient energy R sees."""
    ws = get_workspace(["strategy=fed_sb", f"strategy.rank={rank}", "strategy.init=random"])
    num = int(ws.cfg.sim.num_clients)
    bases = {n: p.detach().double() for n, p in ws.model.named_parameters() if n.endswith(".base_layer.weight")}
    gen = torch.Generator().manual_seed(0)
    first: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    out: dict[str, list[float]] = {}
    for k, pid in enumerate(clients):
        idx = client_partition(ws.task, ws.cfg.data, pid=pid, num_partitions=num, seed=int(ws.cfg.seed))
        data = init_examples(IndexedDataset(ws.task.train, idx), count=count, seed=pid)
        grads = gradient_sum(ws.model, data, batch_size=16, pad_id=ws.pad_id)
        for name, g in grads.items():
            g = g.double()
            d_out, d_in = g.shape
            u, _, vh = torch.linalg.svd(bases[name], full_matrices=False)
            ug, _, vgh = torch.linalg.svd(g, full_matrices=False)
            qb, _ = torch.linalg.qr(torch.randn(d_out, rank, generator=gen, dtype=torch.float64))
            qa, _ = torch.linalg.qr(torch.randn(d_in, rank, generator=gen, dtype=torch.float64))
            choices = {
                "random orthonormal": (qb, qa),
                "W0 top-r singular vectors": (u[:, :rank], vh[:rank].T),
                "W0 bottom-r singular vectors": (u[:, -rank:], vh[-rank:].T),
                "own gradient top-r (oracle)": (ug[:, :rank], vgh[:rank].T),
            }
            if k == 0:
                first[name] = (ug[:, :rank], vgh[:rank].T)
            else:
                choices[f"client {clients[0]}'s gradient top-r"] = first[name]
            energy = float((g**2).sum())
            for label, (b, a) in choices.items():
                out.setdefault(f"client {pid}: {label}", []).append(float(((b.T @ g @ a) ** 2).sum()) / energy)
    return {
        key: {"mean": float(np.mean(v)), "median": float(np.median(v)), "min": float(np.min(v))}
        for key, v in out.items()
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Both probes on the default model; ``--out``: the results as JSON too."""
    ap = harness.parser(__doc__)
    ap.add_argument("--rank", type=int, default=64, help="Fed-SB rank r")
    ap.add_argument("--examples", type=int, default=256, help="examples per client gradient (and norm sample)")
    ap.add_argument("--clients", type=int, nargs="+", default=[0, 3], help="partitions; the first is the 'other'")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = harness.parse(ap, argv)
    result: dict[str, Any] = {}
    for label, ov in {
        f"Fed-SB r={args.rank} init=random": ["strategy=fed_sb", f"strategy.rank={args.rank}", "strategy.init=random"],
        "FFA-LoRA r=8": ["strategy=ffa_lora"],
    }.items():
        result[label] = norm_split(ov, count=min(args.examples, 64))
        print(f"{label}: {json.dumps(result[label])}")
    result["energy"] = energy_capture(args.rank, count=args.examples, clients=args.clients)
    for key, v in result["energy"].items():
        print(f"{key}: mean {v['mean']:.4f}, median {v['median']:.4f}, min {v['min']:.4f}")
    if args.out:
        harness.write_json(args.out, result)


if __name__ == "__main__":
    main()
