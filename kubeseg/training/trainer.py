"""Train one fold of one plans configuration the way nnU-Net v2 does.

Entry point: :func:`train_fold`.  Output layout (nnU-Net v2's, under ``out_dir``)::

    out_dir/plans.json, dataset.json, (dataset_fingerprint.json)
    out_dir/fold_<f>/checkpoint_latest.pth   every epoch while training (removed at the end)
                     checkpoint_best.pth     best EMA pseudo-Dice so far
                     checkpoint_final.pth    after the last epoch
                     progress.png            loss / pseudo-Dice / epoch time / LR curves
                     metrics.json            per-epoch metrics
                     training_log_<timestamp>.txt
                     validation/<case>.npz   probabilities + segmentation of held-out cases
                     validation/summary.json Dice and HD95 per label

Running :func:`train_fold` again with the same arguments resumes from
``checkpoint_latest.pth`` (written atomically after every epoch, so a kill at any moment
loses at most the running epoch); a fold with ``checkpoint_final.pth`` is not retrained
(only its validation is redone if ``validation/summary.json`` is missing).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from kubeseg.device import resolve_device
from kubeseg.network import build_network, load_network_weights, set_deep_supervision
from kubeseg.training.augmentation import (configure_augmentation, default_num_workers, worker_processes,
                                           get_training_transforms, get_validation_transforms,
                                           running_augmenter)
from kubeseg.training.callbacks import CallbackList
from kubeseg.training.watchdog import TrainingWatchdog
from kubeseg.training.checkpoint import (atomic_torch_save, load_checkpoint, load_pretrained_weights,
                                         make_checkpoint)
from kubeseg.training.data import PatchLoader, PreprocessedDataset, list_case_identifiers
from kubeseg.training.evaluation import label_metrics, summarize, write_summary
from kubeseg.training.finetune import parameter_groups
from kubeseg.training.loss import build_loss
from kubeseg.training.plans import (ConfigurationView, LabelInfo, deep_supervision_scales,
                                    num_input_channels)
from kubeseg.jsonio import read_json, write_json
from kubeseg.inference.sliding_window import SlidingWindowSettings, predict_logits
from kubeseg.training.progress import ProgressLog
from kubeseg.training.schedule import (OptimizerSettings, Schedule, get_schedule, make_optimizer, poly_lr,
                                       set_lr)
from kubeseg.training.splits import SPLITS_FILENAME, Fold, load_or_create_splits, select_fold

log = logging.getLogger("kubeseg.training")

PathLike = Union[str, Path]


@dataclass
class TrainSettings:
    """How to train (the *what* comes from plans and the preprocessed data).

    device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    schedule: a :class:`Schedule` or a name (``"default"``, ``"tiny"``, ``"<N>epochs"``).
    seed: seeds torch/numpy and the augmentation workers (offset by the start epoch, so a
        resumed run does not replay the same batches).
    num_workers: augmentation worker processes for training (validation gets half, at
        least 1); ``None`` = nnU-Net-like default (min(12, CPUs)); ``0`` = no background
        processes (everything in this process; used by tests).
    pretrained_weights: fine-tuning: a ``checkpoint_final.pth`` of a compatible network to
        start from (nnU-Net's ``-pretrained_weights``; segmentation heads are skipped when
        the label set differs, any other mismatch is refused). Ignored when resuming.
    callbacks: objects implementing any of the :class:`~kubeseg.training.callbacks.TrainingCallback` hooks.
    previous_stage_dir: cascade stages only: folder with the previous stage's
        segmentations ``<case>.npz`` (key ``seg``) / ``<case>.npy`` in this stage's geometry.
    splits_file: user-supplied ``splits_final.json``; default ``PRE/splits_final.json``
        (created with nnU-Net's seeded 5-fold split if missing).
    log_to_console: also print the human-readable log lines (via ``tqdm.write``); they
        always go to ``training_log_*.txt`` and to the ``kubeseg.training`` logger at INFO,
        so set this to False if the caller already shows that logger on the console.
    """

    device: str = "auto"
    schedule: Union[str, Schedule] = "default"
    seed: int = 12345
    num_workers: Optional[int] = None
    callbacks: Sequence[Any] = ()
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    oversample_foreground_percent: float = 0.33
    enable_deep_supervision: bool = True
    continue_training: bool = True
    run_validation: bool = True
    save_probabilities: bool = True
    validation_mirroring: bool = True
    validation_step_size: float = 0.5
    splits_file: Optional[PathLike] = None
    previous_stage_dir: Optional[PathLike] = None
    pretrained_weights: Optional[PathLike] = None
    deterministic_workers: bool = False
    torch_threads: Optional[int] = None
    progress_bar: bool = True
    log_to_console: bool = True


def _settings_summary(s: TrainSettings, schedule: Schedule) -> dict:
    """The settings as plain values. Callbacks are left out before anything is copied: they may
    hold locks, threads or clients that cannot be deep-copied."""
    d = {f.name: getattr(s, f.name) for f in fields(s) if f.name != "callbacks"}
    d = {k: asdict(v) if is_dataclass(v) else v for k, v in d.items()}
    d["schedule"] = asdict(schedule)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


@contextlib.contextmanager
def _sigterm_raises(reason=lambda: None):
    """Turn SIGTERM (Kubernetes pod deletion, or the watchdog) into ``SystemExit`` so workers are
    shut down; the exit message is ``reason()`` (the watchdog's) or the signal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(f"training stopped: {reason() or f'received signal {signal.Signals(signum).name}'}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _out_of_place_activations(network: torch.nn.Module) -> int:
    """Make in-place activations (``nonlin_kwargs: {inplace: true}`` in the plans) out-of-place.

    On the CPU, instance norm returns a *view* of its batch-norm result, so an in-place
    LeakyReLU on it makes autograd copy the whole activation back into the base tensor in
    the backward pass (CopySlices) and hands the next convolution a strided tensor to copy
    again: about 4 % of a training step of nnU-Net's 3D U-Net. The results are identical;
    the cost is one more activation tensor per block, which the GPU (where memory is what
    limits the patch size) does not pay. Returns how many modules were changed."""
    n = 0
    for m in network.modules():
        if isinstance(m, (torch.nn.LeakyReLU, torch.nn.ReLU, torch.nn.ReLU6, torch.nn.ELU, torch.nn.Hardtanh,
                          torch.nn.SiLU, torch.nn.Mish)) and getattr(m, "inplace", False):
            m.inplace = False
            n += 1
    return n


class _RunLog:
    """Timestamped lines to ``training_log_<ts>.txt`` and (optionally) the console."""

    def __init__(self, folder: Path, console: bool):
        ts = datetime.now()
        self.path = folder / ("training_log_%d_%d_%d_%02d_%02d_%02d.txt" %
                              (ts.year, ts.month, ts.day, ts.hour, ts.minute, ts.second))
        self.console = console

    def __call__(self, *parts: Any) -> None:
        msg = " ".join(str(p) for p in parts)
        line = f"{datetime.now()}: {msg}"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        log.info(msg)
        if self.console:
            tqdm.write(line)


class FoldTrainer:
    """State and steps of one fold's training; use :func:`train_fold` unless you need the parts."""

    def __init__(self, preprocessed_dir: PathLike, plans_path: PathLike, configuration: str, fold: Fold,
                 out_dir: PathLike, settings: TrainSettings):
        self.pre = Path(preprocessed_dir)
        self.plans_path = Path(plans_path)
        self.plans = read_json(self.plans_path)
        ds_json = self.pre / "dataset.json"
        if not ds_json.is_file():
            ds_json = self.plans_path.parent / "dataset.json"
        self.dataset_json = read_json(ds_json)
        self.configuration = configuration
        self.fold: Fold = fold if fold == "all" else int(fold)
        self.out_dir = Path(out_dir)
        self.fold_dir = self.out_dir / f"fold_{self.fold}"
        self.settings = settings
        self.schedule = get_schedule(settings.schedule)
        self.cfg = ConfigurationView.from_plans(self.plans, configuration)
        self.labels = LabelInfo.from_dataset_json(self.dataset_json)
        self.device = resolve_device(settings.device)
        self.callbacks = CallbackList(settings.callbacks)
        self.aug = configure_augmentation(self.cfg.patch_size)
        self.ds_scales = deep_supervision_scales(self.cfg.pool_op_kernel_sizes) \
            if settings.enable_deep_supervision else None
        if self.cfg.is_cascaded and settings.previous_stage_dir is None:
            raise ValueError(f"configuration {configuration!r} is a cascade stage: "
                             "TrainSettings.previous_stage_dir must point at the previous stage's segmentations")
        self.data_folder = self.pre / self.cfg.data_identifier
        if not self.data_folder.is_dir():
            raise FileNotFoundError(f"preprocessed data folder {self.data_folder} does not exist")

        self.network: Optional[torch.nn.Module] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.grad_scaler = None
        self.loss = None
        self.progress = ProgressLog()
        self.best_ema: Optional[float] = None
        self.current_epoch = 0
        self.run_log: Optional[_RunLog] = None

    # -- paths ------------------------------------------------------------------------
    @property
    def latest_path(self) -> Path:
        return self.fold_dir / "checkpoint_latest.pth"

    @property
    def best_path(self) -> Path:
        return self.fold_dir / "checkpoint_best.pth"

    @property
    def final_path(self) -> Path:
        return self.fold_dir / "checkpoint_final.pth"

    @property
    def validation_dir(self) -> Path:
        return self.fold_dir / "validation"

    # -- setup ------------------------------------------------------------------------
    def prepare_output(self) -> None:
        self.fold_dir.mkdir(parents=True, exist_ok=True)
        for stale in list(self.fold_dir.glob(".*.tmp*")) + list(self.fold_dir.glob("*.tmp")):
            stale.unlink(missing_ok=True)  # half-written files of a killed run
        self.run_log = _RunLog(self.fold_dir, self.settings.log_to_console)
        write_json(self.plans, self.out_dir / "plans.json")
        write_json(self.dataset_json, self.out_dir / "dataset.json")
        fp = self.pre / "dataset_fingerprint.json"
        if fp.is_file():
            shutil.copyfile(fp, self.out_dir / "dataset_fingerprint.json")

    def split(self) -> tuple[list[str], list[str]]:
        ids = list_case_identifiers(self.data_folder)
        if not ids:
            raise FileNotFoundError(f"no preprocessed cases in {self.data_folder}")
        if self.fold == "all":
            return select_fold(ids, "all")
        if self.settings.splits_file is not None:
            splits = read_json(self.settings.splits_file)
            used = Path(self.settings.splits_file)
        else:
            splits, used = load_or_create_splits(ids, self.pre / SPLITS_FILENAME, fallback_dir=self.out_dir)
        self.run_log(f"using splits from {used} ({len(splits)} folds)")
        # the splits this model folder was trained with travel with it (bundle, fine-tuning)
        if not (self.out_dir / SPLITS_FILENAME).is_file() or read_json(self.out_dir / SPLITS_FILENAME) != splits:
            write_json(splits, self.out_dir / SPLITS_FILENAME)
        return select_fold(ids, self.fold, splits)

    def init_args(self) -> dict:
        return {"plans": self.plans, "configuration": self.configuration, "fold": self.fold,
                "dataset_json": self.dataset_json, "device": str(self.device),
                "schedule": asdict(self.schedule), "optimizer": asdict(self.settings.optimizer)}

    def build(self) -> None:
        torch.manual_seed(self.settings.seed)
        self.network = build_network(
            self.cfg.network_class_name, self.cfg.arch_kwargs, self.cfg.kw_requires_import,
            num_input_channels(self.cfg, self.labels), self.labels.num_segmentation_heads,
            deep_supervision=self.settings.enable_deep_supervision, initialize=True).to(self.device)
        if self.device.type == "cpu":
            _out_of_place_activations(self.network)
        o = self.settings.optimizer
        params = self.network.parameters() if o.encoder_lr_scale == o.decoder_lr_scale == 1.0 else \
            parameter_groups(self.network, o.encoder_lr_scale, o.decoder_lr_scale)
        self.optimizer = make_optimizer(params, o)
        self.grad_scaler = torch.amp.GradScaler("cuda") if self.device.type == "cuda" else None
        self.loss = build_loss(self.cfg.batch_dice, len(self.ds_scales) if self.ds_scales else None,
                               regions=self.labels.has_regions, ignore_label=self.labels.ignore_label)

    def save_checkpoint(self, path: Path, finished_epochs: int) -> Path:
        ckpt = make_checkpoint(self.network.state_dict(), self.optimizer.state_dict(),
                               self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
                               self.progress.state(), self.best_ema, finished_epochs, self.init_args(),
                               self.aug.mirror_axes)
        atomic_torch_save(ckpt, path)
        self.callbacks.on_artifact(path)
        return path

    def load_checkpoint(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location=self.device)
        load_network_weights(self.network, ckpt)
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        if self.grad_scaler is not None and ckpt.get("grad_scaler_state"):
            self.grad_scaler.load_state_dict(ckpt["grad_scaler_state"])
        self.current_epoch = int(ckpt["current_epoch"])
        self.best_ema = ckpt.get("_best_ema")
        self.progress = ProgressLog(ckpt.get("logging"))
        self.progress.truncate(self.current_epoch)
        old = (ckpt.get("init_args") or {}).get("schedule")
        if old and old != asdict(self.schedule):
            self.run_log(f"WARNING: checkpoint was trained with schedule {old}, continuing with "
                         f"{asdict(self.schedule)}")

    # -- steps ------------------------------------------------------------------------
    def _to_device(self, batch: dict):
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        if isinstance(target, list):
            target = [t.to(self.device, non_blocking=True) for t in target]
        else:
            target = target.to(self.device, non_blocking=True)
        return data, target

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast(self.device.type, enabled=True)
        return contextlib.nullcontext()

    def train_step(self, batch: dict) -> float:
        data, target = self._to_device(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            output = self.network(data)
            loss = self.loss(output, target)
        clip = self.settings.optimizer.grad_clip_norm
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), clip)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), clip)
            self.optimizer.step()
        return float(loss.detach().cpu())

    @torch.no_grad()
    def validation_step(self, batch: dict) -> dict:
        """Loss plus hard tp/fp/fn per foreground label of the full-resolution output
        (nnU-Net's "pseudo Dice": patches of held-out cases, summed over the epoch)."""
        data, target = self._to_device(batch)
        with self._autocast():
            output = self.network(data)
            loss = self.loss(output, target)
        if isinstance(output, (list, tuple)):
            output, target = output[0], target[0]
        axes = [0] + list(range(2, output.ndim))
        mask = None
        if self.labels.has_regions:  # sigmoid outputs, one binary target channel per region
            pred = (torch.sigmoid(output.float()) > 0.5).float()
            if self.labels.ignore_label is not None:
                mask, target = ~target[:, -1:].bool(), target[:, :-1]
            tgt = target.float()
        else:
            seg = output.argmax(1)[:, None]
            pred = torch.zeros(output.shape, device=output.device, dtype=torch.float32).scatter_(1, seg, 1)
            labels = target.long().clamp_min(0)
            if self.labels.ignore_label is not None:
                mask = labels != self.labels.ignore_label
                labels = torch.where(mask, labels, 0)
            tgt = torch.zeros(output.shape, device=output.device, dtype=torch.float32).scatter_(1, labels, 1)
        if mask is not None:
            pred, tgt = pred * mask, tgt * mask
        tp = (pred * tgt).sum(axes)
        fp = (pred * (1 - tgt)).sum(axes)
        fn = ((1 - pred) * tgt).sum(axes)
        first = 0 if self.labels.has_regions else 1  # softmax: leave out background
        return {"loss": float(loss.detach().cpu()), "tp": tp[first:].cpu().numpy(), "fp": fp[first:].cpu().numpy(),
                "fn": fn[first:].cpu().numpy()}

    # -- the loop ---------------------------------------------------------------------
    def _loaders(self, tr_keys, val_keys):
        prev = self.settings.previous_stage_dir
        ds_tr = PreprocessedDataset(self.data_folder, tr_keys, prev)
        ds_val = PreprocessedDataset(self.data_folder, val_keys, prev)
        bs = self.cfg.batch_size
        p = self.settings.oversample_foreground_percent
        dl_tr = PatchLoader(ds_tr, bs, self.aug.initial_patch_size, self.cfg.patch_size, p)
        dl_val = PatchLoader(ds_val, bs, self.cfg.patch_size, self.cfg.patch_size, p)
        fg = self.labels.foreground_labels
        regions, ignore = self.labels.regions, self.labels.ignore_label
        tr_t = get_training_transforms(self.aug, self.ds_scales, self.cfg.use_mask_for_norm or None,
                                       self.cfg.is_cascaded, fg, regions=regions, ignore_label=ignore)
        val_t = get_validation_transforms(self.ds_scales, self.cfg.is_cascaded, fg, regions=regions,
                                          ignore_label=ignore)
        return dl_tr, tr_t, dl_val, val_t

    def run(self) -> Path:
        s = self.settings
        self.prepare_output()
        rl = self.run_log
        if self.final_path.is_file():
            rl(f"fold {self.fold} already finished ({self.final_path.name} exists): not retraining")
            summary = None
            if s.run_validation and not (self.validation_dir / "summary.json").is_file():
                self.build()
                load_network_weights(self.network, load_checkpoint(self.final_path, self.device))
                summary = self.validate()
            self.callbacks.on_train_end({"fold": self.fold, "already_finished": True, "validation": summary,
                                         "fold_dir": str(self.fold_dir)})
            return self.fold_dir

        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        tr_keys, val_keys = self.split()
        rl(f"fold {self.fold}: {len(tr_keys)} training and {len(val_keys)} validation cases")
        self.build()
        resuming = s.continue_training and self.latest_path.is_file()
        if resuming:
            self.load_checkpoint(self.latest_path)
            rl(f"resuming from {self.latest_path.name} at epoch {self.current_epoch}")
        elif self.latest_path.is_file():
            rl("continue_training=False: ignoring existing checkpoint_latest.pth")
        if s.pretrained_weights is not None:
            if resuming:
                rl(f"pretrained weights {s.pretrained_weights} ignored: resuming wins")
            else:
                info = load_pretrained_weights(self.network, s.pretrained_weights)
                rl(f"initialised {info['loaded']} tensors from pretrained weights {s.pretrained_weights} "
                   f"(segmentation heads {info['heads']})")

        rl(f"configuration {self.configuration}: patch {self.cfg.patch_size}, batch {self.cfg.batch_size}, "
           f"initial patch {self.aug.initial_patch_size}, dummy 2D aug {self.aug.do_dummy_2d}, "
           f"batch_dice {self.cfg.batch_dice}, deep supervision {self.ds_scales is not None}")
        rl(f"device {self.device}, schedule {asdict(self.schedule)}")

        start = self.current_epoch
        np.random.seed((s.seed + 7919 * start) % 2 ** 32)
        torch.manual_seed(s.seed + 7919 * start)
        n_tr = default_num_workers() if s.num_workers is None else int(s.num_workers)
        n_val = 0 if n_tr == 0 else max(1, n_tr // 2)
        dl_tr, tr_t, dl_val, val_t = self._loaders(tr_keys, val_keys)
        base_seed = (s.seed + 7919 * start) % (2 ** 31 - 100)
        pin = self.device.type == "cuda"

        workers: list = []  # a snapshot: batchgenerators forgets its processes when it shuts them down
        watchdog = TrainingWatchdog(lambda: workers)
        with _sigterm_raises(lambda: watchdog.reason), watchdog, contextlib.ExitStack() as stack:
            gen_tr = stack.enter_context(running_augmenter(
                dl_tr, tr_t, n_tr, seeds=[base_seed + i for i in range(n_tr)] if n_tr else None,
                pin_memory=pin, deterministic=s.deterministic_workers))
            gen_val = stack.enter_context(running_augmenter(
                dl_val, val_t, n_val, seeds=[base_seed + 1000 + i for i in range(n_val)] if n_val else None,
                num_cached=max(3, n_tr // 4), pin_memory=pin, deterministic=s.deterministic_workers))
            workers += worker_processes(gen_tr) + worker_processes(gen_val)
            stack.callback(watchdog.pause_workers)  # runs first on exit: shutting workers down is no fault
            self.callbacks.on_train_start({
                "fold": self.fold, "configuration": self.configuration, "start_epoch": start,
                "num_epochs": self.schedule.num_epochs, "device": str(self.device),
                "fold_dir": str(self.fold_dir), "train_cases": len(tr_keys), "val_cases": len(val_keys),
                "settings": _settings_summary(s, self.schedule), "resumed": start > 0})
            try:
                for epoch in range(start, self.schedule.num_epochs):
                    self.run_epoch(epoch, gen_tr, gen_val)
            except RuntimeError as e:  # batchgenerators noticed a dead worker before the watchdog did
                fault = watchdog.check()
                if fault is None:
                    raise
                rl(fault)
                raise SystemExit(f"training stopped: {fault}") from e

        self.save_checkpoint(self.final_path, self.schedule.num_epochs)
        if self.latest_path.is_file():
            self.latest_path.unlink()
        rl("training done")
        summary = self.validate() if s.run_validation else None
        self.callbacks.on_train_end({"fold": self.fold, "already_finished": False, "validation": summary,
                                     "fold_dir": str(self.fold_dir)})
        return self.fold_dir

    def run_epoch(self, epoch: int, gen_tr, gen_val) -> dict:
        s, sched, rl = self.settings, self.schedule, self.run_log
        self.current_epoch = epoch
        self.progress.log("epoch_start_timestamps", time.time(), epoch)
        lr = poly_lr(epoch, sched.num_epochs, s.optimizer.initial_lr, s.optimizer.poly_exponent)
        set_lr(self.optimizer, lr)
        self.progress.log("lrs", lr, epoch)
        groups = self.optimizer.param_groups
        rl(f"epoch {epoch}  lr {lr:.5f}" if len(groups) == 1 and "name" not in groups[0] else
           f"epoch {epoch}  lr {lr:.3g} (" + ", ".join(f"{g.get('name', i)} {g['lr']:.3g}" for i, g in
                                                   enumerate(groups)) + ")")

        self.network.train()
        losses = []
        bar = tqdm(range(sched.train_iterations), desc=f"epoch {epoch}/{sched.num_epochs - 1}",
                   disable=not s.progress_bar, leave=False, dynamic_ncols=True)
        for it in bar:
            loss = self.train_step(next(gen_tr))
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}")
            self.callbacks.on_iteration_end(epoch, it, loss)
        bar.close()
        self.progress.log("train_losses", float(np.mean(losses)), epoch)

        self.network.eval()
        val_losses, tp, fp, fn = [], 0, 0, 0
        for _ in range(sched.val_iterations):
            out = self.validation_step(next(gen_val))
            val_losses.append(out["loss"])
            tp, fp, fn = tp + out["tp"], fp + out["fp"], fn + out["fn"]
        if sched.val_iterations:
            with np.errstate(invalid="ignore", divide="ignore"):
                dice = [float(2 * a / (2 * a + b + c)) if (2 * a + b + c) > 0 else float("nan")
                        for a, b, c in zip(tp, fp, fn)]
            mean_dice = float(np.nanmean(dice)) if not all(np.isnan(dice)) else float("nan")
            val_loss = float(np.mean(val_losses))
        else:
            dice, mean_dice, val_loss = [float("nan")] * len(self.labels.scheme.classes), float("nan"), \
                float("nan")
        self.progress.log("val_losses", val_loss, epoch)
        self.progress.log("dice_per_class_or_region", dice, epoch)
        self.progress.log("mean_fg_dice", mean_dice, epoch)
        self.progress.log("epoch_end_timestamps", time.time(), epoch)

        ema = self.progress.get("ema_fg_dice", epoch)
        metrics = {
            "epoch": epoch, "train_loss": self.progress.get("train_losses", epoch), "val_loss": val_loss,
            "pseudo_dice": {key: d for key, d in zip(self.labels.scheme.class_keys, dice)},
            "mean_fg_dice": mean_dice, "ema_fg_dice": ema, "lr": lr,
            "epoch_time_s": self.progress.get("epoch_end_timestamps", epoch)
            - self.progress.get("epoch_start_timestamps", epoch),
        }
        rl(f"train_loss {metrics['train_loss']:.4f}  val_loss {val_loss:.4f}  "
           f"pseudo dice {[round(d, 4) for d in dice]}  epoch time {metrics['epoch_time_s']:.1f} s")

        # checkpoints: best on EMA improvement, latest every epoch (the resume point; written
        # last so that it already knows the updated best EMA)
        if not np.isnan(ema) and (self.best_ema is None or ema > self.best_ema):
            self.best_ema = float(ema)
            rl(f"new best EMA pseudo Dice: {self.best_ema:.4f}")
            self.save_checkpoint(self.best_path, epoch + 1)
        self.save_checkpoint(self.latest_path, epoch + 1)
        self.callbacks.on_artifact(self.progress.plot(self.fold_dir / "progress.png"))
        self.callbacks.on_artifact(self.progress.write_json(self.fold_dir / "metrics.json"))
        self.callbacks.on_epoch_end(epoch, metrics)
        self.current_epoch = epoch + 1
        return metrics

    # -- final validation -------------------------------------------------------------
    def _voxel_spacing(self, properties: dict, ndim: int) -> list[float]:
        """Voxel spacing of the preprocessed arrays: the configuration's spacing; 2D
        configurations keep the original (transposed) spacing along the first axis, as
        nnU-Net's preprocessing does."""
        spacing = list(self.cfg.spacing)
        if len(spacing) < ndim:
            orig = properties.get("spacing")
            tf = self.plans.get("transpose_forward", list(range(ndim)))
            first = float(orig[tf[0]]) if orig is not None and len(orig) == ndim else 1.0
            spacing = [first] + spacing
        return spacing

    def validate(self) -> dict:
        """Predict every held-out case whole (sliding window), save probabilities, and
        write Dice/HD95 per label to ``validation/summary.json`` (preprocessed geometry)."""
        rl = self.run_log
        _, val_keys = self.split()
        self.validation_dir.mkdir(parents=True, exist_ok=True)
        if self.settings.enable_deep_supervision:
            set_deep_supervision(self.network, False)
        self.network.eval()
        ds = PreprocessedDataset(self.data_folder, val_keys, self.settings.previous_stage_dir)
        mirror = self.aug.mirror_axes if self.settings.validation_mirroring else None
        per_case = []
        for key in val_keys:
            case = ds.load_case(key)
            data = np.asarray(case.data, dtype=np.float32)
            if case.seg_prev is not None:
                prev = np.asarray(case.seg_prev)
                onehot = np.stack([prev == lab for lab in self.labels.foreground_labels]).astype(np.float32)
                data = np.concatenate((data, onehot), 0)
            with self._autocast():
                window = SlidingWindowSettings(step=self.settings.validation_step_size,
                                               mirror_axes=tuple(mirror) if mirror else None, accumulator="float32")
                logits = predict_logits(self.network, data, self.cfg.patch_size,
                                        self.labels.num_segmentation_heads, self.device, window)
            scheme = self.labels.scheme
            probs = (torch.sigmoid if scheme.has_regions else partial(torch.softmax, dim=0))(logits.float()).numpy()
            seg = scheme.to_segmentation(probs)
            arrays = {"segmentation": seg}
            if self.settings.save_probabilities:
                arrays["probabilities"] = probs.astype(np.float32)
            out = self.validation_dir / f"{key}.npz"
            tmp = self.validation_dir / f".{key}.tmp.npz"
            np.savez_compressed(tmp, **arrays)
            os.replace(tmp, out)
            self.callbacks.on_artifact(out)
            ref = np.asarray(case.seg[0]).astype(np.int16)
            ref[ref < 0] = 0
            spacing = self._voxel_spacing(case.properties, seg.ndim)
            annotated = scheme.annotated(ref)
            metrics = {key: label_metrics(seg, ref, cls if len(cls) > 1 else cls[0], spacing, annotated)
                       for key, cls in zip(scheme.class_keys, scheme.classes)}
            per_case.append({"case": key, "prediction_file": str(out), "metrics": metrics})
            rl(f"validation {key}: " + ", ".join(f"label {k} Dice {v['Dice']:.4f} HD95 {v['HD95']:.2f}"
                                                 for k, v in metrics.items()))
        summary = summarize(per_case, [c if len(c) > 1 else c[0] for c in self.labels.scheme.classes])
        path = write_summary(summary, self.validation_dir / "summary.json",
                             extra={"geometry": "preprocessed", "configuration_spacing": list(self.cfg.spacing),
                                    "configuration": self.configuration, "fold": self.fold})
        self.callbacks.on_artifact(path)
        rl(f"validation done: mean foreground Dice {summary['foreground_mean']['Dice']:.4f}")
        if self.settings.enable_deep_supervision:
            set_deep_supervision(self.network, True)
        return summary


def train_fold(preprocessed_dir: PathLike, plans_path: PathLike, configuration: str, fold: Fold,
               out_dir: PathLike, settings: Optional[TrainSettings] = None) -> Path:
    """Train (or resume, or skip if finished) one fold; returns ``out_dir/fold_<fold>``.

    ``preprocessed_dir`` is the preprocessed dataset folder (``PRE/`` with
    ``dataset.json`` and ``<data_identifier>/``); ``plans_path`` its ``plans.json``;
    ``fold`` an int or ``"all"``.
    """
    settings = settings if settings is not None else TrainSettings()
    return FoldTrainer(preprocessed_dir, plans_path, configuration, fold, out_dir, settings).run()
