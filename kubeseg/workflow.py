"""Small engine helpers that a distributed run of the steps needs (the pipeline components and
the CLI share them): schedule strings, the (configuration, fold) fan-out, gathering per-fold
training outputs into one model folder per configuration, and human-readable reports.

Nothing here knows about Kubeflow or MLflow: inputs and outputs are paths and plain values.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
import html
import json
import math
import shutil
from pathlib import Path
from typing import Iterable, Optional, Sequence

from kubeseg.errors import KubesegError
from kubeseg.jsonio import read_json
from kubeseg.planning.plans import configuration as resolve_configuration
from kubeseg.training.schedule import Schedule, get_schedule

from kubeseg.model_folder import TRAINER_NAME, configuration_of, model_folder_name, parse_model_folder_name  # noqa: F401


def parse_schedule(text: str) -> Schedule:
    """:func:`~kubeseg.training.schedule.get_schedule` with a user-facing error."""
    try:
        return get_schedule(str(text).strip())
    except ValueError as e:
        raise KubesegError(f"invalid schedule: {e}") from None


ALL_FOLDS = (0, 1, 2, 3, 4)


def training_items(plans: dict, configurations: Sequence[str], folds: Sequence[int | str]) -> tuple[list, list]:
    """The training fan-out: ``(first_wave, cascade_wave)``, each a list of
    ``{"configuration": c, "fold": f}``. Cascade stages (``previous_stage`` in the plans) need the
    first wave's predictions, so they form the second wave. Unknown configurations are refused.

    A cascade stage trains on its first stage's *out-of-fold* predictions of every case
    (:mod:`kubeseg.cascade`), so when one is requested its first stage is trained on all five
    folds (plus any other requested fold), whichever folds and configurations were asked for."""
    known = plans.get("configurations", {})
    unknown = [c for c in configurations if c not in known]
    if unknown:
        raise KubesegError(f"configuration(s) {unknown} are not in the plans; planned: {sorted(known)}")
    if not configurations:
        raise KubesegError("no configuration to train")
    folds = [f if str(f) == "all" else int(f) for f in folds]
    if not folds:
        raise KubesegError("no fold to train")
    bad = [f for f in folds if f != "all" and not 0 <= f < 5]
    if bad:
        raise KubesegError(f"fold(s) {bad} out of range: folds are 0-4 (nnU-Net's 5-fold split) or 'all'")
    first, cascade = {}, {}
    for c in dict.fromkeys(configurations):
        prev = resolve_configuration(plans, c).get("previous_stage")
        if prev is None:
            first.setdefault(c, dict.fromkeys(folds))
            continue
        if prev not in known:
            raise KubesegError(f"{c!r} cascades from {prev!r}, which is not in the plans")
        if resolve_configuration(plans, prev).get("previous_stage"):
            raise KubesegError(f"{c!r} cascades from {prev!r}, itself a cascade stage: only two stages are supported")
        cascade[c] = dict.fromkeys(folds)
        first[prev] = dict.fromkeys([*(first.get(prev) or {}), *ALL_FOLDS, *folds])
    order = lambda fs: sorted(fs, key=lambda f: (f == "all", f if f != "all" else 0))  # noqa: E731
    return ([{"configuration": c, "fold": f} for c, fs in first.items() for f in order(fs)],
            [{"configuration": c, "fold": f} for c, fs in cascade.items() for f in order(fs)])


def preprocess_configurations(plans: dict, configurations: Sequence[str]) -> list[str]:
    """The configurations whose arrays training needs: the requested ones and their first stages,
    one per data identifier (``3d_cascade_fullres`` shares ``3d_fullres``'s arrays)."""
    wanted: list[str] = []
    for c in configurations:
        prev = resolve_configuration(plans, c).get("previous_stage")
        wanted += [prev, c] if prev else [c]
    out, seen = [], set()
    for c in dict.fromkeys(wanted):
        ident = resolve_configuration(plans, c)["data_identifier"]
        if ident not in seen:
            seen.add(ident)
            out.append(c)
    return out


def training_groups(plans: dict, items: Sequence[dict]) -> list[dict]:
    """The training items grouped by the arrays they read: one group per data identifier, as
    ``{"preprocess": c, "configurations": [...], "items": [...]}``, in the items' order. Each group is
    preprocessed on its own, so a training task downloads only its configuration's arrays.

    ``preprocess`` names the configuration to preprocess: the first one in the plans with that data
    identifier (``3d_fullres`` for ``3d_cascade_fullres``, which shares its arrays), so a cascade
    group asks for exactly what the ``3d_fullres`` group did and a cached step serves both."""
    items = normalized_items(items)
    if not items:
        raise KubesegError("no training item to group")
    ident = lambda c: resolve_configuration(plans, c)["data_identifier"]  # noqa: E731
    canonical: dict[str, str] = {}
    for name in plans.get("configurations", {}):
        canonical.setdefault(ident(name), name)
    groups: dict[str, dict] = {}
    for item in items:
        d = ident(item["configuration"])
        g = groups.setdefault(d, {"preprocess": canonical.get(d, item["configuration"]), "configurations": [],
                                  "items": []})
        if item["configuration"] not in g["configurations"]:
            g["configurations"].append(item["configuration"])
        g["items"].append(item)
    return list(groups.values())


ARRAY_SUFFIX = ".npy"
GT_FOLDER = "gt_segmentations"


def copy_reference(preprocessed_dir: str | Path, out_dir: str | Path) -> list[str]:
    """The small part of a preprocessed folder that selection needs besides the models: the
    dataset files (plans, dataset.json, fingerprint, content hash), the reference segmentations
    (``gt_segmentations/``) and every case's preprocessing geometry (``<data_identifier>/<case>.json``
    without ``class_locations``, the training sampler's foreground voxels: about 150 kB a case, most
    of the file), without the arrays. Returns the data identifiers copied."""
    from kubeseg.jsonio import write_json

    pre, out = Path(preprocessed_dir), Path(out_dir)
    if not (pre / "plans.json").is_file():
        raise KubesegError(f"{pre} has no plans.json; is it a preprocessed dataset folder?")
    gt = (pre / GT_FOLDER).resolve()

    def skipped(folder: str, names: list[str]) -> list[str]:
        if Path(folder).resolve() == gt:
            return []
        if Path(folder).resolve() == pre.resolve():
            return []
        return [n for n in names if n.endswith(ARRAY_SUFFIX) or n.endswith(".json")]

    shutil.copytree(pre, out, ignore=skipped, dirs_exist_ok=True)
    idents = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != GT_FOLDER)
    for ident in idents:
        for props in sorted((pre / ident).glob("*.json")):
            data = read_json(props)
            data.pop("class_locations", None)
            write_json(data, out / ident / props.name, indent=None)
    return idents


def merge_references(references: Iterable[str | Path], out_dir: str | Path) -> Path:
    """Merge reference folders (:func:`copy_reference`) of several configuration groups into
    ``out_dir``: a file present in two must be the same file (one plans, one dataset, one
    split), else the groups came from different plans and selection would compare apples and pears."""
    import filecmp

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for ref in map(Path, references):
        for src in sorted(p for p in ref.rglob("*") if p.is_file()):
            dst = out / src.relative_to(ref)
            if dst.exists():
                if src.suffix == ".json" and dst.parent == out and not filecmp.cmp(src, dst, shallow=False):
                    raise KubesegError(f"{src.name} differs between the configuration groups ({ref} and an "
                                       "earlier one): they were not planned together")
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        n += 1
    if not n or not (out / "plans.json").is_file():
        raise KubesegError("no preprocessed reference to merge (plans.json missing)")
    return out


def cascade_wave_inputs(models_root: str | Path, preprocessed_dir: str | Path, cascade_items: Sequence[dict],
                        out_dir: str | Path, num_workers: int | None = None) -> list[dict]:
    """Before the cascade wave: for every cascade configuration among ``cascade_items``, export its
    first stage's out-of-fold segmentations (the first stage's model folder in ``models_root``, as
    :func:`gather_folds` made it) to ``out_dir/<configuration>`` and check that every requested
    cascade fold has all its cases; returns ``cascade_items``."""
    from kubeseg.cascade import check_cascade_inputs, export_cascade_inputs, previous_stage

    pre = Path(preprocessed_dir)
    plans = read_json(pre / "plans.json")
    models_root, out_dir = Path(models_root), Path(out_dir)
    cascade_items = normalized_items(cascade_items)
    for c in dict.fromkeys(i["configuration"] for i in cascade_items):
        prev = previous_stage(plans, c)
        if prev is None:
            raise KubesegError(f"{c!r} is not a cascade stage")
        folder = models_root / model_folder_name(plans, prev)
        if not folder.is_dir():
            raise KubesegError(f"{c!r} needs the trained {prev!r} folds in {folder}, which is missing")
        export_cascade_inputs(folder, pre, c, out_dir / c, num_workers)
        for item in cascade_items:
            if item["configuration"] == c:
                check_cascade_inputs(out_dir / c, pre, c, item["fold"])
    return cascade_items


def gather_folds(fold_outputs: Iterable[str | Path], out_dir: str | Path) -> list[Path]:
    """Merge per-fold training outputs (each a folder holding ``<Trainer>__<Plans>__<conf>/fold_N``)
    into one model folder per configuration under ``out_dir``; returns those folders, sorted."""
    out_dir = Path(out_dir)
    merged: dict[str, Path] = {}
    for src in fold_outputs:
        src = Path(src)
        models = [p for p in sorted(src.iterdir()) if p.is_dir() and parse_model_folder_name(p)] if src.is_dir() else []
        if not models:
            raise KubesegError(f"{src} holds no training output folder (<Trainer>__<Plans>__<configuration>)")
        for model in models:
            target = out_dir / model.name
            target.mkdir(parents=True, exist_ok=True)
            for item in sorted(model.iterdir()):
                dst = target / item.name
                if item.is_dir():
                    if dst.exists():
                        raise KubesegError(f"{item.name} of {model.name} comes from two training outputs")
                    shutil.copytree(item, dst)
                elif not dst.exists():
                    shutil.copy2(item, dst)
            merged[model.name] = target
    if not merged:
        raise KubesegError("no training outputs to gather")
    return [merged[k] for k in sorted(merged)]


def gather_training_outputs(fold_outputs: Sequence[str | Path], out_dir: str | Path,
                            ref_name: str = "mlflow_run.json") -> list[Path]:
    """:func:`gather_folds` into ``out_dir``, keeping each output's run reference file (``ref_name``,
    beside its model folder) as ``out_dir/run_refs/<i>.json``. The result is itself a valid
    training output for :func:`gather_folds` and :func:`run_refs`."""
    out_dir = Path(out_dir)
    merged = gather_folds(fold_outputs, out_dir)
    for i, src in enumerate(fold_outputs):
        for j, ref in enumerate(run_refs([src], ref_name)):
            (out_dir / "run_refs").mkdir(exist_ok=True)
            shutil.copy2(ref, out_dir / "run_refs" / f"{i:04d}_{j:04d}.json")
    return merged


def run_refs(fold_outputs: Iterable[str | Path], ref_name: str = "mlflow_run.json") -> list[Path]:
    """The run reference files of training outputs: ``ref_name`` beside the model folder, or the
    ones a gathered output keeps in ``run_refs/``."""
    out = []
    for src in map(Path, fold_outputs):
        if (src / ref_name).is_file():
            out.append(src / ref_name)
        out += sorted((src / "run_refs").glob("*.json"))
    return out


def normalized_items(items: Sequence[dict]) -> list[dict]:
    """``{"configuration", "fold"}`` items with integer folds (JSON through KFP turns 0 into 0.0)."""
    return [{"configuration": str(i["configuration"]),
             "fold": "all" if str(i["fold"]) == "all" else int(float(i["fold"]))} for i in items]


def waves_markdown(first: Sequence[dict], cascade: Sequence[dict]) -> str:
    """The training fan-out in a few Markdown lines (the plan step's summary)."""
    def line(items) -> str:
        by: dict[str, list] = {}
        for i in items:
            by.setdefault(i["configuration"], []).append(str(i["fold"]))
        return "; ".join(f"`{c}` folds {', '.join(f)}" for c, f in by.items())

    out = f"{len(first)} training task(s) in the first wave: {line(first)}"
    if cascade:
        out += (f"\n\n{len(cascade)} cascade task(s) after it: {line(cascade)} (on the first stage's "
                "out-of-fold predictions of every case)")
    return out


def pretrained_checkpoint(models_dir: str | Path, configuration: str, fold: int | str) -> Path | None:
    """Fine-tuning: the ``checkpoint_final.pth`` of ``configuration`` in ``models_dir`` (a bundle or a
    folder of training outputs) for the same fold, else its first fold; None if ``models_dir``
    holds no such configuration (that configuration then trains from scratch)."""
    root = Path(models_dir)
    folders = [p for p in sorted(root.iterdir()) if p.is_dir() and configuration_of(p) == configuration] \
        if root.is_dir() else []
    for folder in folders:
        ckpts = {p.parent.name.removeprefix("fold_"): p for p in sorted(folder.glob("fold_*/checkpoint_final.pth"))}
        if not ckpts:
            continue
        fold = "all" if str(fold) == "all" else str(int(float(fold)))
        numbered = sorted((k for k in ckpts if k.isdigit()), key=int)
        return ckpts.get(fold) or ckpts[numbered[0] if numbered else sorted(ckpts)[0]]
    return None


def task_inputs(preprocessed_dir: str | Path, configuration: str, fold: int | str,
                previous_stage_root: str | Path | None = None,
                pretrained_root: str | Path | None = None) -> tuple[Path | None, Path | None]:
    """One training task's optional inputs: the cascade's previous-stage folder
    (``previous_stage_root/<configuration>``, checked against the fold's cases) and the
    fine-tuning checkpoint (:func:`pretrained_checkpoint`)."""
    prev = None
    if previous_stage_root is not None:
        from kubeseg.cascade import check_cascade_inputs
        prev = Path(previous_stage_root) / configuration
        check_cascade_inputs(prev, preprocessed_dir, configuration, fold)
    weights = pretrained_checkpoint(pretrained_root, configuration, fold) if pretrained_root is not None else None
    return prev, weights


def fold_dice(fold_dir: str | Path) -> dict[str, float]:
    """Validation Dice per foreground label (and ``mean``) of one trained fold."""
    s = read_json(Path(fold_dir) / "validation" / "summary.json")
    out = {str(k): _num(v.get("Dice")) for k, v in s.get("mean", {}).items()}
    out["mean"] = _num(s.get("foreground_mean", {}).get("Dice"))
    return out


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def cv_table_rows(selection: dict, label_names: Optional[dict] = None) -> tuple[list[str], list[list[str]]]:
    """Cross-validation Dice per candidate and label (header, rows); the selected one is marked.
    ``label_names``: dataset.json's ``labels`` (name -> value), to head the columns by name."""
    labels = sorted({k for c in selection["candidates"] for k in c["dice"]}, key=int)
    names = {str(v): str(k) for k, v in (label_names or {}).items()}
    chosen = " + ".join(m["configuration"] for m in selection["members"])
    header = ["candidate"] + [f"{names[lab]} ({lab})" if lab in names else f"Dice {lab}" for lab in labels] \
        + ["foreground mean"]
    rows = [[c["name"] + (" (selected)" if c["name"] == chosen else "")]
            + [_fmt(c["dice"].get(lab)) for lab in labels] + [_fmt(c["foreground_dice"])]
            for c in selection["candidates"]]
    return header, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _label_names(model_dirs: Sequence[str | Path]) -> Optional[dict]:
    """dataset.json's ``labels`` of the first model folder that has one."""
    for d in model_dirs:
        f = Path(d) / "dataset.json"
        if f.is_file():
            return read_json(f).get("labels")
    return None


def summary_html(plans: dict, selection: dict, model_dirs: Sequence[str | Path]) -> str:
    """One self-contained HTML page: plans at a glance, the CV table, per-fold Dice and training
    curves (``progress.png`` embedded)."""
    from kubeseg.planning.summary import COLUMNS, plans_rows

    def table(header, rows) -> str:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in r) + "</tr>" for r in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    parts = ["<html><head><meta charset='utf-8'><style>body{font-family:sans-serif}"
             "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px}"
             "img{max-width:900px}</style></head><body>",
             f"<h2>{html.escape(str(plans.get('dataset_name', '')))} — {html.escape(str(plans.get('plans_name', '')))}</h2>",
             "<h3>Plans</h3>", table(COLUMNS, plans_rows(plans)),
             "<h3>Cross-validation (mean Dice over out-of-fold cases, image geometry)</h3>",
             table(*cv_table_rows(selection, _label_names(model_dirs))),
             f"<p>selected: <b>{html.escape(' + '.join(m['configuration'] for m in selection['members']))}</b>, "
             f"foreground Dice {_fmt(selection['expected_foreground_dice'])} "
             f"({_fmt(selection.get('expected_foreground_dice_after_postprocessing'))} after postprocessing), "
             f"{selection.get('num_cases')} cases</p>"]
    fold_rows, curves = [], []
    for model in map(Path, model_dirs):
        for fold in sorted(model.glob("fold_*")):
            if (fold / "validation" / "summary.json").is_file():
                d = fold_dice(fold)
                fold_rows.append([configuration_of(model) or model.name, fold.name.removeprefix("fold_")]
                                 + [f"{k}: {_fmt(v)}" for k, v in d.items() if k != "mean"] + [_fmt(d["mean"])])
            png = fold / "progress.png"
            if png.is_file():
                data = base64.b64encode(png.read_bytes()).decode()
                curves.append(f"<h4>{html.escape(configuration_of(model) or model.name)} {fold.name}</h4>"
                              f"<img src='data:image/png;base64,{data}'/>")
    if fold_rows:
        width = max(len(r) for r in fold_rows)
        fold_rows = [r[:-1] + [""] * (width - len(r)) + r[-1:] for r in fold_rows]
        parts += ["<h3>Validation Dice per fold (preprocessed geometry)</h3>",
                  table(["configuration", "fold"] + ["label"] * (width - 3) + ["foreground mean"], fold_rows)]
    parts += ["<h3>Training curves</h3>"] + curves + ["</body></html>"]
    return "\n".join(parts)


def select_from_folds(fold_outputs: Sequence[str | Path], preprocessed_dir: str | Path, out_dir: str | Path,
                      allow_ensembles: bool = True, configurations: Sequence[str] | None = None) -> dict:
    """Gather per-fold training outputs into ``out_dir/models/`` and run the selection into ``out_dir``
    (:func:`kubeseg.selection.select_model`). ``selection.json`` names its member folders relative to
    ``out_dir``, so the folder can be moved (KFP artifacts are mounted at different paths per pod).

    ``configurations``: the candidates (default: every configuration gathered). A cascade's first
    stage that was trained only to feed the cascade stays in ``models/`` (the bundle ships it with
    the cascade) without being a candidate itself."""
    from kubeseg.jsonio import write_json
    from kubeseg.inference.run import SELECTION_FILENAME
    from kubeseg.selection import SelectSettings, select_model

    out_dir = Path(out_dir)
    models = gather_folds(fold_outputs, out_dir / "models")
    if configurations is not None:
        wanted = set(configurations)
        models = [m for m in models if configuration_of(m) in wanted]
        if not models:
            raise KubesegError(f"none of the configurations {sorted(wanted)} was trained")
    selection = select_model(models, preprocessed_dir, out_dir,
                             SelectSettings(allow_ensembles=allow_ensembles, progress=False))
    for m in selection["members"]:
        m["folder"] = str(Path(m["folder"]).resolve().relative_to(out_dir.resolve()))
    write_json(selection, out_dir / SELECTION_FILENAME)
    return selection


def training_checkpoints(preprocessed_dir: str | Path, configuration: str, fold: int | str, schedule: str,
                         fold_dir: str | Path, uri: str, interval_s: float, pretrained: str | Path | None = None,
                         run_key: str = ""):
    """A training task's durable checkpoints (:mod:`kubeseg.training.checkpoint_store`): restores
    ``fold_dir`` from the store at ``uri`` when it is empty and returns the uploader callback (None
    when ``uri`` is empty). The key's run part is ``run_key``, else a digest of the task's inputs
    (plans, fingerprint, dataset content hash, schedule, pretrained weights), so that a retried pod
    and a re-run with the same inputs both find it."""
    from kubeseg.dataset_hash import DATASET_HASH_FILE
    from kubeseg.training.checkpoint_store import CheckpointSettings, checkpoint_callback, inputs_run_key

    if not uri:
        return None
    pre = Path(preprocessed_dir)
    key = run_key or inputs_run_key(pre / "plans.json", pre / "dataset_fingerprint.json", pre / DATASET_HASH_FILE,
                                    Path(pretrained) if pretrained else None,
                                    extra={"schedule": str(schedule), "configuration": configuration,
                                           "fold": str(fold)})
    return checkpoint_callback(CheckpointSettings(uri=uri, interval_s=interval_s, run_key=key), configuration,
                               fold, Path(fold_dir))


@dataclass(frozen=True)
class TrainingTask:
    """One (configuration, fold) training task, ready to run: where it writes, its settings, its
    durable checkpoint store (None when off) and its fine-tuning weights (None when none)."""

    out_dir: Path
    settings: object  # kubeseg.training.trainer.TrainSettings
    store: object = None
    weights: Optional[Path] = None


def prepare_training_task(preprocessed_dir: str | Path, configuration: str, fold: int | str, schedule: str,
                          device: str, num_workers: int, torch_threads: int, validation_tta: bool,
                          out_root: str | Path, previous_stage_root: str | Path | None = None,
                          pretrained_root: str | Path | None = None, checkpoint_uri: str = "",
                          checkpoint_interval_s: float = 300.0, callbacks: Sequence = ()) -> TrainingTask:
    """What the pipeline's train step runs, from its inputs: the model folder under ``out_root``,
    the cascade input and fine-tuning weights (:func:`task_inputs`), the durable checkpoints
    (:func:`training_checkpoints`, restored first into an empty fold folder) and the trainer's
    settings (``num_workers`` < 0: the default; ``torch_threads`` 0: the default)."""
    from kubeseg.training.finetune import (FINETUNE_SPLITS, FinetuneSettings, finetune_optimizer, finetune_schedule,
                                           read_finetune_spec)
    from kubeseg.training.schedule import OptimizerSettings
    from kubeseg.training.trainer import TrainSettings

    pre = Path(preprocessed_dir)
    plans = read_json(pre / "plans.json")
    prev_dir, weights = task_inputs(pre, configuration, fold, previous_stage_root, pretrained_root)
    out_dir = Path(out_root) / model_folder_name(plans, configuration)
    # an incremental fine-tune (the retraining plan wrote its spec beside the champion's weights):
    # its epochs, learning rates and the champion's splits with the new cases in training only
    spec = read_finetune_spec(pretrained_root) if pretrained_root is not None else None
    sched, optimizer, splits_file, key = parse_schedule(schedule), OptimizerSettings(), None, str(schedule)
    if spec is not None:
        if weights is None:
            raise KubesegError(f"fine-tuning {configuration} fold {fold}: the champion in {pretrained_root} has no "
                               "weights for this configuration")
        ft = FinetuneSettings.from_json(spec["settings"])
        sched, optimizer = finetune_schedule(sched, ft), finetune_optimizer(ft)
        splits_file = Path(pretrained_root) / FINETUNE_SPLITS
        key = f"{schedule}|finetune {json.dumps(ft.to_json(), sort_keys=True)} {json.dumps(spec['splits'])}"
    store = training_checkpoints(pre, configuration, fold, key, out_dir / f"fold_{fold}", checkpoint_uri,
                                 checkpoint_interval_s, weights)
    settings = TrainSettings(device=device, schedule=sched, optimizer=optimizer, splits_file=splits_file,
                             callbacks=([store] if store else []) + list(callbacks),
                             num_workers=None if num_workers < 0 else num_workers, deterministic_workers=True,
                             torch_threads=torch_threads or None, progress_bar=False, log_to_console=False,
                             validation_mirroring=validation_tta, previous_stage_dir=prev_dir,
                             pretrained_weights=weights)
    return TrainingTask(out_dir, settings, store, weights)
