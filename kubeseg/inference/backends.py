"""Inference backends: the same sliding window on torch, ONNX Runtime or OpenVINO.

A backend is a callable ``network(x: torch.Tensor (N, C, *patch)) -> torch.Tensor (N, classes, *patch)``
(float32 logits); :func:`~kubeseg.inference.sliding_window.predict_logits` cannot tell them apart.

ONNX files: ``kubeseg export-onnx`` writes ``<model folder>/fold_<N>/network.onnx`` per fold, with
the input shape of the configuration's patch and a dynamic batch axis, and the sha256 of the
checkpoint it came from in the model's metadata. A predictor with an ONNX backend uses that file
when its checksum matches the checkpoint; otherwise (no file, stale file) it exports the fold to
a temporary file first (seconds, in a child process: torch's exporter holds the GIL, and a
service must keep answering health checks while it loads a model), so any model folder or bundle
works with any backend, and a downloaded (checksummed) bundle is never written to.

Why: on a CPU the same network runs in about 0.6 of eager torch's CPU time under ONNX Runtime
and about 0.4 under OpenVINO; eager torch allocates every activation afresh (page faults: a
third of its CPU time goes to the kernel). OpenVINO is asked for float32 inference: on CPUs with
bfloat16 units (AVX512-BF16, AMX) its CPU plugin picks bfloat16 by default, which is twice as
fast but moves the logits of a small U-Net by ~0.2 (float32: ~7e-4 at logits up to 7). Those
float32 differences flip about 0.25 % of the voxels of a random-weight model whose classes tie
everywhere, and under 0.01 % of a trained model's (benchmarks/predict.py --model).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from kubeseg.errors import KubesegError
from kubeseg.device import cpu_threads

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "openvino")
ONNX_NAME = "network.onnx"
CHECKSUM_KEY = "kubeseg.checkpoint_sha256"
OPSET = 17

Network = Callable[[torch.Tensor], torch.Tensor]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto``: on a CPU the fastest installed runtime that keeps parity, on a GPU torch
    (autocast, accumulation on the device). Any other name is returned as given. The one owner of
    this rule (the service's ``KUBESEG_BACKEND=auto`` and ``kubeseg predict --backend auto`` use it).

    Measured by benchmarks/predict.py on a trained model (README, Benchmarks): OpenVINO (float32)
    takes about half of nnunetv2's CPU time and agrees with nnunetv2 on >= 99.9 % of voxels, ONNX
    Runtime about two thirds, eager torch as much as nnunetv2. So: OpenVINO, else ONNX Runtime,
    else torch. (On a random-weight model, whose classes tie everywhere, OpenVINO's float32 kernels
    flip about 0.25 % of voxels; a trained model's logits are far from ties.)"""
    if backend != "auto":
        return backend
    if device.type == "cpu" and _has("onnx"):
        for runtime in ("openvino", "onnxruntime"):
            if _has(runtime):
                return runtime
    return "torch"


def check_backend(backend: str) -> None:
    """Refuse an unknown backend, or one whose runtime is not installed, naming what to install."""
    if backend not in BACKENDS:
        raise KubesegError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return
    modules = {"onnxruntime": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino")}[backend]
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            raise KubesegError(f"backend {backend!r} needs the Python package {module!r}, which is not installed "
                               f"(pip install 'kubeseg[onnx]')") from None


def export_onnx(network: torch.nn.Module, in_channels: int, patch_size: Sequence[int], path: Path,
                checkpoint_sha256: str = "") -> Path:
    """Write ``network`` (eval mode, deep supervision off, on the CPU) as ONNX: input ``(batch, C, *patch)``.

    Written to a temporary name and renamed, so a reader never sees half a file.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros((1, in_channels, *[int(p) for p in patch_size]), dtype=torch.float32)
    tmp = path.with_name(f".{path.name}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and instance-norm notices
        torch.onnx.export(network.cpu().eval(), (example,), str(tmp), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=OPSET,
                          dynamo=False)
    model = onnx.load(str(tmp))
    if checkpoint_sha256:
        entry = model.metadata_props.add()
        entry.key, entry.value = CHECKSUM_KEY, checkpoint_sha256
    onnx.save(model, str(tmp))
    tmp.replace(path)
    return path


def onnx_checksum(path: Path) -> str:
    """The checkpoint checksum recorded in an exported model ('' if none)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((p.value for p in model.metadata_props if p.key == CHECKSUM_KEY), "")


class OnnxRuntimeNetwork:
    """An ONNX model under ONNX Runtime's CPU (or CUDA, if that build is installed) provider."""

    def __init__(self, path: Path, num_threads: int, device: torch.device):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), options, providers=providers)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"input": np.ascontiguousarray(x.detach().cpu().float().numpy())})[0]
        return torch.from_numpy(out)


class OpenVINONetwork:
    """An ONNX model compiled by OpenVINO for the CPU, float32 inference precision.

    The model is compiled for one input at a time (a static shape: ~20 MiB less memory than the
    dynamic batch, same speed) as N streams of one thread each, N = ``num_threads``; a call's
    inputs are queued one per job and run N at a time. A stream per core scales where one stream
    over all cores does not: on this 2-core machine a tile of the small 3d_fullres network takes
    107 ms on one core, 100 ms over two cores in one stream, 53 ms each with two streams (torch:
    200 and 172 ms). The numbers do not depend on N: each input is computed whole by one stream.
    ``parallel_inputs`` tells the sliding window how many inputs per call keep every stream busy.
    """

    def __init__(self, path: Path, num_threads: int):
        import openvino as ov

        self.streams = max(1, int(num_threads))
        self.parallel_inputs = self.streams
        config = {"INFERENCE_NUM_THREADS": self.streams, "INFERENCE_PRECISION_HINT": "f32"}
        if self.streams > 1:
            config |= {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": self.streams}
        else:
            config["PERFORMANCE_HINT"] = "LATENCY"
        core = ov.Core()
        model = core.read_model(str(path))
        dims = list(model.input(0).get_partial_shape())
        if any(d.is_dynamic for d in dims[1:]):
            raise KubesegError(f"{path}: only the batch axis of the network's input may be dynamic")
        model.reshape([1, *[d.get_length() for d in dims[1:]]])
        self.compiled = core.compile_model(model, "CPU", config)
        self.queue = ov.AsyncInferQueue(self.compiled, self.streams)
        self.queue.set_callback(self._collect)
        self._outputs: dict[int, np.ndarray] = {}

    def _collect(self, request, index: int) -> None:
        self._outputs[index] = np.array(request.get_output_tensor(0).data, copy=True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        data = np.ascontiguousarray(x.detach().cpu().float().numpy())
        self._outputs = {}
        for i in range(len(data)):
            self.queue.start_async({0: data[i:i + 1]}, i)
        self.queue.wait_all()
        outputs, self._outputs = self._outputs, {}
        if len(outputs) != len(data):
            raise KubesegError(f"OpenVINO returned {len(outputs)} outputs for {len(data)} inputs")
        return torch.from_numpy(outputs[0] if len(data) == 1 else np.concatenate([outputs[i] for i in range(len(data))]))


def open_network(backend: str, path: Path, device: torch.device, num_threads: int | None = None) -> Network:
    """The runner of one exported fold."""
    threads = cpu_threads(num_threads)
    if backend == "onnxruntime":
        return OnnxRuntimeNetwork(path, threads, device)
    if backend == "openvino":
        if device.type != "cpu":
            raise KubesegError("the openvino backend runs on the CPU here; use --device cpu (or the torch backend)")
        return OpenVINONetwork(path, threads)
    raise KubesegError(f"backend {backend!r} does not run ONNX files")


class FoldNetworks:
    """One runner per fold of a model folder, from its ``network.onnx`` or exported on the fly."""

    def __init__(self, backend: str, folder: Path, folds: Sequence[str], weights: Sequence[dict],
                 network: torch.nn.Module, in_channels: int, patch_size: Sequence[int], device: torch.device,
                 num_threads: int | None = None):
        check_backend(backend)
        self.runners: list[Network] = []
        self._tmp = None
        for fold, state in zip(folds, weights):
            path = self._exported(folder, fold, state, network, in_channels, patch_size)
            self.runners.append(open_network(backend, path, device, num_threads))
        if self._tmp is not None:  # the runtimes hold the models in memory now
            self._tmp.cleanup()

    def _exported(self, folder: Path, fold: str, state: dict, network: torch.nn.Module, in_channels: int,
                  patch_size: Sequence[int]) -> Path:
        from kubeseg.inference.model import CHECKPOINT_NAME

        checkpoint = folder / f"fold_{fold}" / CHECKPOINT_NAME
        checksum = file_sha256(checkpoint) if checkpoint.is_file() else ""
        saved = folder / f"fold_{fold}" / ONNX_NAME
        if saved.is_file():
            if checksum and onnx_checksum(saved) == checksum:
                return saved
            log.warning("%s was not exported from this fold's checkpoint; exporting it again (in a temporary "
                        "folder)", saved)
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="kubeseg-onnx-")
        target = Path(self._tmp.name) / f"fold_{fold}.onnx"
        if checkpoint.is_file():  # in a child process: the exporter holds the GIL for seconds (a service's
            return _export_in_subprocess(folder, fold, target)  # health checks must not wait on it)
        network.load_state_dict(state)
        return export_onnx(network, in_channels, patch_size, target, checksum)


def _export_in_subprocess(folder: Path, fold: str, target: Path) -> Path:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "kubeseg.inference.backends", str(folder), str(fold), str(target)],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=1800)
    if done.returncode != 0 or not target.is_file():
        raise KubesegError(f"ONNX export of {folder} fold {fold} failed: {done.stderr[-2000:]}")
    return target


def _export_one(folder: Path, fold: str, target: Path) -> Path:
    """One fold of a model folder to ``target`` (the child process of :func:`_export_in_subprocess`)."""
    from kubeseg.inference.model import CHECKPOINT_NAME, load_trained_model
    from kubeseg.training.plans import num_input_channels

    model = load_trained_model(folder, [fold])
    network = model.build_network(torch.device("cpu"))
    return export_onnx(network, num_input_channels(model.view, model.labels),
                       [int(p) for p in model.config["patch_size"]], target,
                       file_sha256(Path(folder) / f"fold_{fold}" / CHECKPOINT_NAME))


def export_model_folder(folder: Path, folds: Sequence[str] | None = None) -> list[Path]:
    """Write ``fold_<N>/network.onnx`` for the folds of one trained-model folder (all finished folds by default)."""
    from kubeseg.inference.model import CHECKPOINT_NAME, load_trained_model
    from kubeseg.training.plans import num_input_channels

    model = load_trained_model(folder, folds)
    network = model.build_network(torch.device("cpu"))
    in_channels = num_input_channels(model.view, model.labels)
    patch = [int(p) for p in model.config["patch_size"]]
    written = []
    for fold, state in zip(model.folds, model.fold_weights):
        network.load_state_dict(state)
        checksum = file_sha256(Path(folder) / f"fold_{fold}" / CHECKPOINT_NAME)
        written.append(export_onnx(network, in_channels, patch, Path(folder) / f"fold_{fold}" / ONNX_NAME, checksum))
        log.info("exported %s fold %s -> %s", model.configuration, fold, written[-1])
    return written


def export_models(model_dir: Path, configurations: Sequence[str] | None = None,
                  folds: Sequence[str] | None = None) -> list[Path]:
    """``kubeseg export-onnx``: every configuration × fold that ``kubeseg predict -m model_dir`` would run
    (a bundle's members and their cascade first stages, a model folder, ...), as ONNX files."""
    from kubeseg.inference.model import load_trained_model
    from kubeseg.inference.run import previous_stage_folder, resolve_model

    check_backend("onnxruntime" if _has("onnxruntime") else "openvino")
    choice = resolve_model(model_dir, configurations, folds)
    folders: list[Path] = []
    for member in choice.members:
        folders.append(member)
        previous = load_trained_model(member, choice.folds).previous_stage
        if previous is not None:
            folders.append(previous_stage_folder(member, previous))
    written = []
    for folder in dict.fromkeys(folders):
        written += export_model_folder(folder, choice.folds)
    return written


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


if __name__ == "__main__":  # python -m kubeseg.inference.backends FOLDER FOLD TARGET
    import sys

    torch.set_num_threads(1)
    _export_one(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
