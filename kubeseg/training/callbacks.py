"""Hooks that let trackers (MLflow, Kubeflow metadata, ...) observe training.

The trainer calls these at fixed points and never imports any tracker itself.  Implement
any subset by subclassing :class:`TrainingCallback` (all methods are no-ops), or any
object with the same method names (see :class:`TrainingCallbackProtocol`).

An exception raised by a callback propagates and stops training; the trainer still shuts
its data workers down, and the last epoch-end checkpoint stays usable for resuming.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, runtime_checkable

log = logging.getLogger(__name__)


@runtime_checkable
class TrainingCallbackProtocol(Protocol):
    def on_train_start(self, info: Mapping[str, Any]) -> None: ...
    def on_epoch_end(self, epoch: int, metrics: Mapping[str, Any]) -> None: ...
    def on_artifact(self, path: Path) -> None: ...
    def on_train_end(self, info: Mapping[str, Any]) -> None: ...


class TrainingCallback:
    """No-op base class.

    * ``on_train_start(info)``: once per run (also when resuming), after the network and
      data are set up; ``info`` has fold, configuration, schedule, start epoch, device, ...
    * ``on_epoch_end(epoch, metrics)``: after each epoch's validation, with
      ``train_loss``, ``val_loss``, ``pseudo_dice`` (per class), ``mean_fg_dice``,
      ``ema_fg_dice``, ``lr``, ``epoch_time_s``.  The checkpoint for that epoch is already
      written when this is called.
    * ``on_artifact(path)``: a file was written (checkpoint, plot, metrics, validation).
    * ``on_train_end(info)``: training and final validation are done (also called when a
      finished fold is found and nothing is trained); ``info`` has the validation summary.
    * ``on_iteration_end(epoch, iteration, loss)``: optional, after every training step.
    """

    def on_train_start(self, info: Mapping[str, Any]) -> None:
        pass

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        pass

    def on_artifact(self, path: Path) -> None:
        pass

    def on_train_end(self, info: Mapping[str, Any]) -> None:
        pass

    def on_iteration_end(self, epoch: int, iteration: int, loss: float) -> None:
        pass


class CallbackList:
    """Fans every hook out to a list of callbacks (methods a callback lacks are skipped)."""

    def __init__(self, callbacks: Iterable[Any] = ()):
        self.callbacks = list(callbacks)

    def _call(self, name: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, name, None)
            if fn is not None:
                fn(*args)

    def on_train_start(self, info):
        self._call("on_train_start", info)

    def on_epoch_end(self, epoch, metrics):
        self._call("on_epoch_end", epoch, metrics)

    def on_artifact(self, path):
        self._call("on_artifact", Path(path))

    def on_train_end(self, info):
        self._call("on_train_end", info)

    def on_iteration_end(self, epoch, iteration, loss):
        self._call("on_iteration_end", epoch, iteration, loss)
