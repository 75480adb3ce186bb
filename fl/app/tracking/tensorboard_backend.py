"""`tracking=tensorboard`: event files in <log root>/<run name>, the log root <run_dir>/tensorboard unless
`tracking.uri` names one (a sweep shares one root, so TensorBoard shows its cells side by side).

Params go in as one text summary (a Markdown table) and the tags as another; every metric is a scalar at
step = round; the plots are images. TensorBoard has no artifact store: the adapter stays in the run folder.
Open it with ``tensorboard --logdir <run_dir>/tensorboard``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig

from fl.app.tracking.base import Tracker, tag_pairs


def log_dir(tracking: DictConfig, run_dir: Path) -> Path:
    root = Path(str(tracking.uri)) if tracking.uri else Path(run_dir) / "tensorboard"
    return root / str(tracking.run_name or Path(run_dir).name)


class TensorBoardTracker(Tracker):
    def __init__(self, tracking: DictConfig, *, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = log_dir(tracking, run_dir)
        self.writer = SummaryWriter(log_dir=str(self.dir))
        tags = tag_pairs(tracking.tags)
        if tags:
            self.writer.add_text("tags", _table(tags), global_step=0)

    def log_params(self, params: Mapping[str, str]) -> None:
        self.writer.add_text("params", _table(params), global_step=0)

    def log_round(self, step: int, metrics: Mapping[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()

    def log_artifacts(self, adapter_dir: Path | None, plots: Sequence[Path]) -> None:
        import matplotlib.image

        for plot in plots:
            image = matplotlib.image.imread(str(plot))[..., :3]
            self.writer.add_image(f"plots/{Path(plot).stem}", image, global_step=0, dataformats="HWC")

    def finish(self, status: str = "FINISHED") -> None:
        self.writer.add_text("status", status)
        self.writer.close()


def _table(d: Mapping[str, str]) -> str:
    return "| key | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in d.items())


def make(tracking: DictConfig, *, run_dir: Path) -> Tracker:
    return TensorBoardTracker(tracking, run_dir=run_dir)
