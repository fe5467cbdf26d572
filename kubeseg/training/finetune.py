"""Incremental fine-tuning: a short, gentle continuation of a trained fold on new labelled cases.

The design's rule (``DESIGN.md``, the continual-learning loop): a fine-tune starts from the
champion's weights of the same configuration and fold, keeps the champion's plans and its
cross-validation splits, trains at most a few epochs (default 10) at a small learning rate
(default 1e-4, polynomial decay over those epochs) with layer-wise rates, and the new cases
join every fold's *training* set, never a validation set. So no fold's validation case was
ever seen in training by that fold's model, before or after the fine-tune, and the fold's CV
Dice stays an out-of-sample estimate.

Encoder and decoder (:func:`parameter_groups`). dynamic-network-architectures' ``PlainConvUNet``
and ``ResidualEncoderUNet`` (the networks nnU-Net v2 plans) hold two submodules:

* **encoder** = ``network.encoder`` (``PlainConvEncoder`` / ``ResidualEncoder``): the stem (ResEnc)
  and every down-sampling stage, i.e. the feature extractor that the skips come from;
* **decoder** = everything else: ``decoder.transpconvs``, ``decoder.stages`` and the segmentation
  heads ``decoder.seg_layers``. (``UNetDecoder`` keeps a reference to the encoder as
  ``decoder.encoder``; those parameters count as encoder, each parameter belongs to one group.)

A network without an ``encoder`` attribute is refused when the two rates differ: there is no
honest split to make.

Splits (:func:`incremental_splits`): the champion's ``splits_final.json`` with the new cases
added to every fold's ``train`` list. A case that is neither in the champion's splits nor new
is refused (the champion's folds would not say which fold may validate on it).

Which new cases (:func:`choose_new_cases`): all of them, or with ``max_new_cases`` and a
confidence per case (the review queue's), the ``max_new_cases`` least confident ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import torch

from kubeseg.errors import KubesegError
from kubeseg.jsonio import read_json, write_json

#: the file a retraining plan writes into the champion folder it hands to the training tasks
FINETUNE_FILE = "kubeseg_finetune.json"
#: the carried-over splits beside it, in ``splits_final.json``'s format (``TrainSettings.splits_file``)
FINETUNE_SPLITS = "kubeseg_finetune_splits.json"
ENCODER, DECODER = "encoder", "decoder"


@dataclass(frozen=True)
class FinetuneSettings:
    """How an incremental fine-tune trains. ``epochs``: at most this many epochs (a shorter run
    schedule wins; iterations per epoch are the run schedule's); ``lr``: initial learning rate
    (polynomial decay to 0 over the epochs, as nnU-Net's schedule); ``encoder_lr_scale`` /
    ``decoder_lr_scale``: multipliers of ``lr`` for the two parameter groups;
    ``max_new_cases``: 0 = every new case, else at most that many (the least confident, when
    confidences are given)."""

    epochs: int = 10
    lr: float = 1e-4
    encoder_lr_scale: float = 0.5
    decoder_lr_scale: float = 1.0
    max_new_cases: int = 0

    def __post_init__(self):
        if int(self.epochs) < 1:
            raise KubesegError(f"fine-tuning needs at least one epoch, got {self.epochs}")
        for what, v in (("lr", self.lr), ("encoder_lr_scale", self.encoder_lr_scale),
                        ("decoder_lr_scale", self.decoder_lr_scale)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise KubesegError(f"fine-tuning {what} must be a finite number >= 0, got {v!r}")
        if self.lr <= 0 or max(self.encoder_lr_scale, self.decoder_lr_scale) <= 0:
            raise KubesegError("fine-tuning with a learning rate of 0 would not train at all")
        if int(self.max_new_cases) < 0:
            raise KubesegError(f"max_new_cases must be >= 0, got {self.max_new_cases}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping) -> "FinetuneSettings":
        return cls(epochs=int(d.get("epochs", 10)), lr=float(d.get("lr", 1e-4)),
                   encoder_lr_scale=float(d.get("encoder_lr_scale", 0.5)),
                   decoder_lr_scale=float(d.get("decoder_lr_scale", 1.0)),
                   max_new_cases=int(d.get("max_new_cases", 0)))


def parameter_groups(network: torch.nn.Module, encoder_scale: float = 1.0,
                     decoder_scale: float = 1.0) -> list[dict]:
    """The network's trainable parameters as optimizer groups ``{"params", "name", "lr_scale"}``.

    Equal scales: one group (``"all"``), exactly what the optimizer got before layer-wise rates
    existed (so old checkpoints' optimizer states still load). Different scales: ``encoder``
    (``network.encoder``) and ``decoder`` (every other parameter); see the module doc."""
    net = network
    for attr in ("module", "_orig_mod"):  # DDP / torch.compile wrappers
        net = getattr(net, attr, net)
    params = [p for p in net.parameters() if p.requires_grad]
    if encoder_scale == decoder_scale:
        return [{"params": params, "name": "all", "lr_scale": float(encoder_scale)}]
    encoder = getattr(net, "encoder", None)
    if not isinstance(encoder, torch.nn.Module):
        raise KubesegError(f"{type(net).__name__} has no encoder submodule: layer-wise learning rates "
                           f"(encoder x{encoder_scale}, decoder x{decoder_scale}) cannot be applied")
    enc_ids = {id(p) for p in encoder.parameters()}
    enc = [p for p in params if id(p) in enc_ids]
    dec = [p for p in params if id(p) not in enc_ids]
    if not enc or not dec:
        raise KubesegError(f"{type(net).__name__}: the encoder holds {len(enc)} and the rest {len(dec)} "
                           "trainable tensors; both must hold some for layer-wise rates")
    return [{"params": enc, "name": ENCODER, "lr_scale": float(encoder_scale)},
            {"params": dec, "name": DECODER, "lr_scale": float(decoder_scale)}]


def incremental_splits(champion_splits: Sequence[Mapping], case_ids: Iterable[str],
                       new_cases: Iterable[str]) -> list[dict]:
    """The champion's folds with ``new_cases`` added to every fold's training set.

    ``case_ids``: every case of the dataset that is trained on now. A case of the champion's
    splits that is no longer in the dataset is dropped from them; a case that is neither in the
    champion's splits nor in ``new_cases`` is refused (no fold could take it without guessing);
    a new case that the champion's splits already name is refused (it is not new)."""
    ids = set(case_ids)
    new = list(dict.fromkeys(new_cases))
    if not champion_splits:
        raise KubesegError("the champion's splits_final.json holds no fold")
    known = {c for f in champion_splits for k in ("train", "val") for c in f[k]}
    clash = sorted(set(new) & known)
    if clash:
        raise KubesegError(f"new case(s) {clash[:5]} are already in the champion's splits: not new")
    missing = sorted(set(new) - ids)
    if missing:
        raise KubesegError(f"new case(s) {missing[:5]} are not in the dataset")
    stray = sorted(ids - known - set(new))
    if stray:
        raise KubesegError(f"{len(stray)} case(s) of the dataset are neither in the champion's splits nor new "
                           f"({stray[:5]}): no fold can take them without leaking; retrain instead")
    out = []
    for f in champion_splits:
        train = [c for c in f["train"] if c in ids]
        val = [c for c in f["val"] if c in ids]
        out.append({"train": train + [c for c in new if c not in train], "val": val})
    return out


def check_no_leak(champion_splits: Sequence[Mapping], splits: Sequence[Mapping]) -> list[str]:
    """Problems (empty: none): a fold-k validation case of ``splits`` that the champion's fold k
    trained on, or a validation case that is not one of the champion's fold-k validation cases."""
    problems = []
    for k, (old, now) in enumerate(zip(champion_splits, splits)):
        seen = set(old["train"])
        leaked = sorted(set(now["val"]) & seen)
        if leaked:
            problems.append(f"fold {k}: validation case(s) {leaked[:5]} were in the champion's fold-{k} training set")
        foreign = sorted(set(now["val"]) - set(old["val"]))
        if foreign:
            problems.append(f"fold {k}: validation case(s) {foreign[:5]} were not fold-{k} validation cases")
    if len(splits) < len(champion_splits):
        problems.append(f"{len(splits)} folds, the champion has {len(champion_splits)}")
    return problems


def choose_new_cases(new_cases: Sequence[str], max_cases: int = 0,
                     confidence: Optional[Mapping[str, float]] = None) -> list[str]:
    """The new cases a fine-tune uses: all of them (``max_cases`` 0), else at most ``max_cases``:
    the least confident first when ``confidence`` (case -> the served model's confidence) is
    given (a case without a confidence counts as least confident: nobody scored it), else the
    last ``max_cases`` in the given order (the most recent, as the review export lists them)."""
    cases = list(dict.fromkeys(new_cases))
    if not max_cases or len(cases) <= max_cases:
        return cases
    if confidence:
        order = sorted(range(len(cases)), key=lambda i: (float(confidence.get(cases[i], -math.inf)), -i))
        return [cases[i] for i in sorted(order[:max_cases])]
    return cases[-max_cases:]


def write_finetune_spec(folder: str | Path, settings: FinetuneSettings, splits: Sequence[Mapping],
                        champion_splits: Sequence[Mapping], new_cases: Sequence[str], source: str) -> Path:
    """What every training task of the fine-tune reads (beside the champion weights): the
    settings, the carried-over splits and where they came from."""
    write_json(list(splits), Path(folder) / FINETUNE_SPLITS)
    return write_json({"settings": settings.to_json(), "splits": list(splits), "champion_splits": list(champion_splits),
                       "new_cases": list(new_cases), "splits_source": source}, Path(folder) / FINETUNE_FILE)


def finetune_schedule(schedule, settings: FinetuneSettings):
    """The run schedule cut to the fine-tune's epochs (iterations per epoch kept)."""
    from kubeseg.training.schedule import Schedule, get_schedule

    s = get_schedule(schedule)
    epochs = min(int(settings.epochs), s.num_epochs)
    return Schedule(epochs, s.train_iterations, s.val_iterations, f"finetune-{epochs}x{s.train_iterations}")


def finetune_optimizer(settings: FinetuneSettings, base=None):
    """nnU-Net's optimiser settings with the fine-tune's learning rate and layer-wise scales."""
    from dataclasses import replace

    from kubeseg.training.schedule import OptimizerSettings

    return replace(base or OptimizerSettings(), initial_lr=float(settings.lr),
                   encoder_lr_scale=float(settings.encoder_lr_scale), decoder_lr_scale=float(settings.decoder_lr_scale))


def read_finetune_spec(folder: str | Path) -> Optional[dict]:
    """The fine-tune spec in ``folder`` (None when there is none: the folder is not a fine-tune's)."""
    f = Path(folder) / FINETUNE_FILE
    return read_json(f) if f.is_file() else None
