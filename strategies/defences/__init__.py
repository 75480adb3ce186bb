"""Defences against hostile clients: robust aggregation chosen by `strategy.defence`, one class per module.

A registered client can send any finite update and claim any example count; screening (`strategies.screening`)
only rejects malformed replies. A defence acts on the sound replies of a round, in the space the method
aggregates in (`LoraStrategy.update_space`, read through `UpdateSpace`), before the method's own rule:

- ``none`` (`none.py`): every reply as sent.
- ``norm_bound`` (`norm_bound.py`): each update shrunk to ‖u_k‖ ≤ `strategy.defence_bound` (Sun et al., 2019);
  under client-level DP the bound is the DP clip.
- ``trimmed_mean`` / ``median`` (`trimmed_mean.py`, `median.py`, `coordinate.py`): coordinate-wise (Yin et al.,
  ICML 2018), one robust state that the method's rule takes alone.
- ``krum`` / ``multikrum`` (`krum.py`, `multikrum.py`): keep the 1 or `strategy.multikrum_m` updates with the
  lowest Krum score for `strategy.krum_f` hostile clients (Blanchard et al., NeurIPS 2017).

Uniform ranks compare updates in `strategies.robust_math`'s spaces (``factors``, ``product``), different ranks
(FLoRA, FlexLoRA, HetLoRA) in `strategies.robust_mixed`'s (``scaled_product``, ``padded``); every rule is defined
in all four. `strategies.robust.RobustAggregation` applies the run's defence after capping claimed weights
(`strategy.max_examples_weight`). Each round's record says who was capped, clipped, dropped or trimmed
(`defence_*` fields of metrics.jsonl).

A new defence is one class extending `Defence` (its fields as a `fl.config_defence.DefenceConfig` dataclass in
`schema`, its rule in `defend`, `client_dp_problem = None` if client-level DP covers it) and one `register` call;
its fields are then `strategy.<field>`, checked at compose.
"""

from strategies.defences.base import MEDIAN, Defence, Kept, UpdateSpace, keep_all, record_clip
from strategies.defences.krum import Krum
from strategies.defences.median import Median
from strategies.defences.multikrum import MultiKrum
from strategies.defences.none import NoDefence
from strategies.defences.norm_bound import NormBound
from strategies.defences.registry import DEFENCES, get_defence, make_defence, names, register, unregister
from strategies.defences.trimmed_mean import TrimmedMean

register("none", NoDefence)
register("norm_bound", NormBound)
register("trimmed_mean", TrimmedMean)
register("median", Median)
register("krum", Krum)
register("multikrum", MultiKrum)

__all__ = [
    "DEFENCES",
    "MEDIAN",
    "Defence",
    "Kept",
    "Krum",
    "Median",
    "MultiKrum",
    "NoDefence",
    "NormBound",
    "TrimmedMean",
    "UpdateSpace",
    "get_defence",
    "keep_all",
    "make_defence",
    "names",
    "record_clip",
    "register",
    "unregister",
]
