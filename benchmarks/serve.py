"""Service overhead: `bentoml serve` under bounded concurrent load vs the bare predictor, one run.

    python benchmarks/serve.py [--bundle DIR] [--clients 4] [--requests 25] [--tta]

Without ``--bundle`` a small model is trained first on synthetic CT (about a minute on 2 cores).
The same case is sent by ``clients`` threads, ``requests`` each, to ``POST /segment``; then the
same case goes through the engine directly (decode, :func:`segment_case`, encode) as many times,
in this process, with the same torch thread count. Printed: the service's latency with one
client against the bare call (the overhead: HTTP, multipart, temp files, metrics, drift; goal
under 10 %), and throughput and p50/p95 latency with ``clients`` at once (inference runs one
request at a time; decoding and encoding of the others overlap with it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path)
    p.add_argument("--case", type=Path, help="an image file (default: a test case of the training data)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=25, help="per client")
    p.add_argument("--tta", action="store_true", help="test-time mirroring on (off by default: faster)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count())
    p.add_argument("--work", type=Path)
    args = p.parse_args()

    import httpx
    import torch

    from tests.services.servers import bentoml_server

    work = args.work or Path(tempfile.mkdtemp(prefix="kubeseg-bench-serve-"))
    if args.bundle is None:
        from tests.services.helpers import served_bundle

        print("training a small model for the benchmark ...", flush=True)
        made = served_bundle(work / "model")
        args.bundle = made["bundle"]
        args.case = args.case or sorted((made["raw"] / "imagesTs").iterdir())[0]
    if args.case is None:
        p.error("--case is needed with --bundle")
    payload = args.case.read_bytes()
    total = args.clients * args.requests
    # concurrency limit with room: a client's next request can arrive before BentoML has released the
    # previous one's slot (the response is sent before the slot is freed), which would be answered 429
    env = {"KUBESEG_MODEL_BUNDLE": str(args.bundle), "KUBESEG_DEVICE": "auto", "KUBESEG_TTA": str(args.tta).lower(),
           "KUBESEG_MAX_CONCURRENCY": str(2 * max(args.clients, 1)), "OMP_NUM_THREADS": str(args.threads)}

    # -- the service: one client (latency), then `clients` at once (throughput) ----------------------------
    errors: list[str] = []

    def run_clients(url: str, n_clients: int) -> tuple[list[float], float]:
        latencies: list[float] = []

        def client():
            with httpx.Client(timeout=600) as c:
                for _ in range(args.requests):
                    t = time.perf_counter()
                    r = c.post(url, files=[("images", (args.case.name, payload))])
                    latencies.append(time.perf_counter() - t)
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text[:100]}")

        started = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(n_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return latencies, time.perf_counter() - started

    with bentoml_server(work, env) as server:
        url = f"{server.url}/segment"
        httpx.post(url, files=[("images", (args.case.name, payload))], timeout=600)  # warm-up
        sequential, _ = run_clients(url, 1)
        latencies, service_wall = run_clients(url, args.clients)

    # -- the bare predictor, same case, same work ------------------------------------------------------
    from kubeseg.imageio import write_image
    from kubeseg.inference.run import segment_case
    from services.decode import Limits, decode
    from services.model_source import load_served_model
    from services.settings import ServiceSettings

    torch.set_num_threads(args.threads)
    settings = ServiceSettings(model_bundle=args.bundle, use_mirroring=args.tta)
    model = load_served_model(args.bundle, settings, "bench", "0", "")
    limits = Limits(settings.max_voxels, settings.min_size, settings.max_request_bytes)
    bare: list[float] = []
    for i in range(args.requests + 1):
        d = work / f"bare{i}"
        d.mkdir()
        src = d / args.case.name
        src.write_bytes(payload)
        t = time.perf_counter()
        image = decode([(src.name, src)], model.spec, limits, d)
        result = segment_case(model.predictors, image.data, image.geometry, model.rule)
        write_image(result.segmentation, image.geometry, d / f"out{image.ending}")
        if i:  # the first call warms up, as the service's warm-up request did
            bare.append(time.perf_counter() - t)
        shutil.rmtree(d)

    bare_mean = statistics.fmean(bare)
    seq_mean = statistics.fmean(sequential)
    print(f"\ncase {args.case.name}, TTA {'on' if args.tta else 'off'}, {args.threads} torch thread(s), "
          f"device {model.predictors[0].device}")
    print(f"bare predictor (decode+predict+encode), {len(bare)} calls : mean {bare_mean:6.3f} s   "
          f"p50 {percentile(bare, 50):6.3f} s   p95 {percentile(bare, 95):6.3f} s")
    print(f"service, 1 client x {args.requests}            : mean {seq_mean:6.3f} s   "
          f"p50 {percentile(sequential, 50):6.3f} s   p95 {percentile(sequential, 95):6.3f} s")
    print(f"service, {args.clients} clients x {args.requests}           : {total / service_wall:6.2f} req/s   "
          f"p50 {percentile(latencies, 50):6.3f} s   p95 {percentile(latencies, 95):6.3f} s   "
          f"({service_wall / total:.3f} s/request; bare {bare_mean:.3f})   errors {len(errors)}")
    print(f"service overhead per request over the bare predictor: {100 * (seq_mean / bare_mean - 1):+.1f} % "
          "(goal < 10 %)")
    if errors:
        print("errors:", errors[:5])
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
