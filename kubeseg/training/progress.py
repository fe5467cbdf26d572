"""Per-epoch training log: nnU-Net's logging lists, the EMA pseudo-Dice, plot and JSON.

The lists have one entry per epoch and are stored verbatim in checkpoints under
``logging`` (as plain python floats, so ``torch.load(weights_only=True)`` works), which
is what nnU-Net v2 does too.  The EMA of the mean foreground pseudo-Dice is
``0.9 * previous + 0.1 * current`` (the first value is taken as is); it selects
``checkpoint_best``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

KEYS = ("mean_fg_dice", "ema_fg_dice", "dice_per_class_or_region", "train_losses", "val_losses", "lrs",
        "epoch_start_timestamps", "epoch_end_timestamps")


def _plain(v: Any) -> Any:
    """numpy / torch scalars and arrays -> python floats / lists."""
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(i) for i in v]
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    return v


class ProgressLog:
    """nnU-Net-compatible per-epoch logging lists."""

    def __init__(self, state: Optional[dict] = None):
        self.data: dict[str, list] = {k: [] for k in KEYS}
        if state:
            for k, v in state.items():
                self.data[k] = list(v)

    def log(self, key: str, value: Any, epoch: int) -> None:
        if key not in self.data:
            raise KeyError(key)
        lst = self.data[key]
        value = _plain(value)
        if len(lst) < epoch + 1:
            if len(lst) != epoch:
                raise RuntimeError(f"logging {key} for epoch {epoch} but have {len(lst)} entries")
            lst.append(value)
        else:
            lst[epoch] = value
        if key == "mean_fg_dice":
            prev = self.data["ema_fg_dice"][epoch - 1] if epoch > 0 and self.data["ema_fg_dice"] else None
            ema = value if prev is None or (isinstance(prev, float) and math.isnan(prev)) else 0.9 * prev + 0.1 * value
            self.log("ema_fg_dice", ema, epoch)

    def get(self, key: str, epoch: int = -1) -> Any:
        return self.data[key][epoch]

    @property
    def num_epochs_logged(self) -> int:
        return min(len(v) for v in self.data.values())

    def truncate(self, num_epochs: int) -> None:
        """Drop entries of epochs >= num_epochs (a partially logged epoch before a crash)."""
        for k in self.data:
            del self.data[k][num_epochs:]

    def state(self) -> dict:
        return {k: list(v) for k, v in self.data.items()}

    def epoch_records(self) -> list[dict]:
        n = self.num_epochs_logged
        out = []
        for e in range(n):
            out.append({
                "epoch": e,
                "train_loss": self.data["train_losses"][e],
                "val_loss": self.data["val_losses"][e],
                "pseudo_dice": self.data["dice_per_class_or_region"][e],
                "mean_fg_dice": self.data["mean_fg_dice"][e],
                "ema_fg_dice": self.data["ema_fg_dice"][e],
                "lr": self.data["lrs"][e],
                "epoch_time_s": self.data["epoch_end_timestamps"][e] - self.data["epoch_start_timestamps"][e],
            })
        return out

    def write_json(self, path: Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"epochs": self.epoch_records()}, f, indent=2, allow_nan=True)
        os.replace(tmp, path)
        return path

    def plot(self, path: Path) -> Path:
        """Loss, pseudo-Dice, epoch duration and learning rate over epochs (nnU-Net's progress.png)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        n = self.num_epochs_logged
        x = list(range(n))
        d = self.data
        fig, axes = plt.subplots(3, 1, figsize=(10, 14))
        ax = axes[0]
        ax.plot(x, d["train_losses"][:n], color="b", label="loss_tr")
        ax.plot(x, d["val_losses"][:n], color="r", label="loss_val")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax2 = ax.twinx()
        ax2.plot(x, d["mean_fg_dice"][:n], color="g", ls="dotted", label="pseudo dice")
        ax2.plot(x, d["ema_fg_dice"][:n], color="g", ls="-", label="pseudo dice (mov. avg.)")
        ax2.set_ylabel("pseudo dice")
        ax.legend(loc="upper left")
        ax2.legend(loc="upper right")
        axes[1].plot(x, [e - s for s, e in zip(d["epoch_start_timestamps"][:n], d["epoch_end_timestamps"][:n])],
                     color="b", label="epoch duration")
        axes[1].set_ylim(bottom=0)
        axes[1].set_xlabel("epoch")
        axes[1].set_ylabel("time [s]")
        axes[1].legend()
        axes[2].plot(x, d["lrs"][:n], color="b", label="learning rate")
        axes[2].set_xlabel("epoch")
        axes[2].set_ylabel("learning rate")
        axes[2].legend()
        fig.tight_layout()
        path = Path(path)
        tmp = path.with_name(path.stem + ".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, path)
        return path
