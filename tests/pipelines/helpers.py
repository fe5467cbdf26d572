"""Tiny synthetic data and a tiny trained bundle for the pipeline, tracking and registry tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

TINY_SHAPE = (16, 40, 40)


def tiny_raw(root: Path, cases: int = 6, test_cases: int = 1) -> Path:
    from kubeseg.synth import SynthSettings, synthesize

    name = "Dataset001_SynthCT"
    raw = root / "raw" / name
    if not (raw / "dataset.json").is_file():
        synthesize(raw, SynthSettings(kind="ct", num_cases=cases, num_test_cases=test_cases, shape=TINY_SHAPE,
                                      seed=0, dataset_name=name))
    return raw


def new_cases(root: Path, cases: int = 2, loose: bool = False, prefix: str = "new", seed: int = 7) -> Path:
    """Labelled cases shaped like :func:`tiny_raw`'s, named ``<prefix>_NNN``: an nnU-Net-format folder
    (``imagesTr``/``labelsTr``, no dataset.json) or, with ``loose``, all files in one folder."""
    from kubeseg.synth import SynthSettings, synthesize

    src = synthesize(root / f".{prefix}_src", SynthSettings(kind="ct", num_cases=cases, shape=TINY_SHAPE, seed=seed))
    out = root / (f"{prefix}_loose" if loose else f"{prefix}_cases")
    for sub, dst in (("imagesTr", "" if loose else "imagesTr"), ("labelsTr", "" if loose else "labelsTr")):
        (out / dst).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / sub).glob("synth_*")):
            f.rename(out / dst / f.name.replace("synth_", f"{prefix}_"))
    return out


_TRAINED: dict[tuple[int, int, int], Path] = {}  # schedule -> a pristine trained copy, per test process


def tiny_bundle(root: Path, schedule: tuple[int, int, int] = (2, 4, 1)) -> dict:
    """Raw dataset → plans (small preset) → 3d_fullres fold 0 trained for ``schedule`` (epochs,
    iterations, validation iterations; 2 x 4 by default, about 20 s on 2 cores) → selection → bundle.

    The work is deterministic for a schedule, so it is done once per test process and schedule and
    copied into ``root`` for each caller (callers may change their copy; the pristine one stays)."""
    import atexit
    import shutil
    import tempfile

    schedule = tuple(schedule)
    if schedule not in _TRAINED:
        cache = Path(tempfile.mkdtemp(prefix="kubeseg-tiny-bundle-"))
        atexit.register(shutil.rmtree, cache, True)
        _train_tiny_bundle(cache, schedule)
        _TRAINED[schedule] = cache
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(_TRAINED[schedule], root, dirs_exist_ok=True, symlinks=True)
    from kubeseg.jsonio import read_json

    raw = root / "raw" / "Dataset001_SynthCT"
    return {"raw": raw, "pre": root / "pre", "bundle": root / "bundle", "fingerprint": root / "fingerprint.json",
            "plans": read_json(root / "plans.json")}


def _train_tiny_bundle(root: Path, schedule: tuple[int, int, int]) -> None:
    from kubeseg.bundle import make_bundle
    from kubeseg.dataset import load_dataset_json
    from kubeseg.fingerprint import extract_fingerprint, write_fingerprint
    from kubeseg.jsonio import write_json
    from kubeseg.planning.planner import plan_experiment, planner_settings
    from kubeseg.preprocessing.preprocess import preprocess_dataset
    from kubeseg.training.schedule import Schedule
    from kubeseg.training.trainer import TrainSettings, train_fold
    from kubeseg.workflow import model_folder_name, select_from_folds

    raw = tiny_raw(root)
    fp = extract_fingerprint(raw, 1, progress=False)
    fp_path = write_fingerprint(fp, root / "fingerprint.json")
    plans = plan_experiment(load_dataset_json(raw), fp, planner_settings("small"), dataset_name=raw.name)
    write_json(plans, root / "plans.json")
    pre = root / "pre"
    preprocess_dataset(raw, plans, "3d_fullres", pre, fp_path, 1, progress=False)
    fold_out = root / "train_out"
    train_fold(pre, pre / "plans.json", "3d_fullres", 0, fold_out / model_folder_name(plans, "3d_fullres"),
               TrainSettings(device="cpu", schedule=Schedule(*schedule, "test"), num_workers=0,
                             validation_mirroring=False, progress_bar=False, log_to_console=False))
    select_from_folds([fold_out], pre, root / "selection")
    make_bundle(root / "selection", root / "bundle", fp_path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on a free port of 127.0.0.1: SQLite and a local artifact folder by default,
    or ``backend`` (a database URI) and ``artifacts`` (e.g. ``s3://bucket/prefix``) with ``env``
    added to its environment (S3 credentials and endpoint). Artifacts are proxied (clients need no
    S3 credentials). ``port``: reuse one (a restarted server keeps its address)."""

    def __init__(self, root: Path, backend: str | None = None, artifacts: str | None = None,
                 env: dict | None = None, port: int | None = None):
        self.root = root
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.backend = backend or f"sqlite:///{root / 'mlflow.db'}"
        self.artifacts = artifacts or str(root / "artifacts")
        self.env = env or {}

    def __enter__(self) -> "MlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        mlflow = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow) if mlflow.exists() else "mlflow", "server",
               "--backend-store-uri", self.backend, "--artifacts-destination", self.artifacts,
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        self.log = open(self.root / "server.log", "a")
        import os
        # as the chart runs it: without MLflow 3's job runner (about eight huey consumers per server)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self.env}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)  # its own group: uvicorn and the job runner stop with it
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("mlflow server exited:\n" + (self.root / "server.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise RuntimeError("mlflow server did not become healthy in 120 s")

    def __exit__(self, *exc) -> None:
        import os
        import signal

        if self.proc is not None and self.proc.poll() is None:
            try:  # SIGTERM to the CLI alone waits for its children for ~20 s; the group stops at once
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def tiny_preprocessed(root: Path, configurations=("2d",)) -> Path:
    """:func:`tiny_raw` fingerprinted, planned (small preset) and preprocessed for ``configurations``."""
    from kubeseg.dataset import load_dataset_json
    from kubeseg.fingerprint import extract_fingerprint, write_fingerprint
    from kubeseg.planning.planner import plan_experiment, planner_settings
    from kubeseg.preprocessing.preprocess import preprocess_dataset

    raw = tiny_raw(root)
    fp = extract_fingerprint(raw, 1, progress=False)
    fp_path = write_fingerprint(fp, root / "fingerprint.json")
    plans = plan_experiment(load_dataset_json(raw), fp, planner_settings("small"), dataset_name=raw.name)
    pre = root / "pre"
    for c in configurations:
        preprocess_dataset(raw, plans, c, pre, fp_path, 1, progress=False)
    return pre


def _stop(proc: subprocess.Popen, log=None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if log is not None:
        log.close()


def _wait_http(url: str, proc: subprocess.Popen, what: str, logfile: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited:\n" + logfile.read_text()[-3000:])
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{what} did not answer at {url} in {timeout} s")


class MotoS3:
    """A real S3-protocol server (``moto_server``) on a free port of 127.0.0.1, with one bucket;
    ``env`` holds the variables boto3 (and MLflow) need to reach it."""

    def __init__(self, root: Path, bucket: str = "kubeseg"):
        self.root, self.bucket = root, bucket
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint,
                    "MLFLOW_S3_ENDPOINT_URL": self.endpoint}
        self.proc = None
        self.log = None

    def __enter__(self) -> "MotoS3":
        self.root.mkdir(parents=True, exist_ok=True)
        exe = Path(sys.executable).with_name("moto_server")
        self.log = open(self.root / "moto.log", "w")
        self.proc = subprocess.Popen([str(exe) if exe.exists() else "moto_server", "-H", "127.0.0.1",
                                      "-p", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT)
        try:
            _wait_http(self.endpoint + "/", self.proc, "moto_server", self.root / "moto.log")
            self.client().create_bucket(Bucket=self.bucket)
        except BaseException:
            self.__exit__()
            raise
        return self

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def keys(self, prefix: str = "") -> list[str]:
        out = self.client().list_objects_v2(Bucket=self.bucket, Prefix=prefix).get("Contents", [])
        return sorted(o["Key"] for o in out)

    def __exit__(self, *exc) -> None:
        _stop(self.proc, self.log)


class Postgres:
    """A throwaway PostgreSQL cluster (Debian's binaries: ``initdb``/``pg_ctl`` on PATH or in
    /usr/lib/postgresql/*/bin) in a temporary folder, on a free port of 127.0.0.1, trust auth.
    PostgreSQL refuses to run as root: as root it runs as the ``postgres`` user (Debian's package
    creates it), else ``nobody``. ``uri(db)`` creates database ``db`` and names it."""

    def __init__(self):
        self.port = free_port()
        self.dir = None

    @staticmethod
    def bindir() -> Path | None:
        import glob
        import shutil

        found = shutil.which("initdb")
        if found and Path(found).resolve().with_name("pg_ctl").exists():
            return Path(found).resolve().parent
        dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
        return Path(dirs[-1]).parent if dirs else None

    def _run(self, *cmd: str) -> None:
        res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=120, **self._as_user)
        if res.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")

    def __enter__(self) -> "Postgres":
        import os
        import pwd
        import tempfile

        bindir = self.bindir()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL's initdb is not installed (Debian: apt-get install postgresql)")
        self._as_user = {}
        self.dir = Path(tempfile.mkdtemp(prefix="kubeseg-pg-"))  # under /tmp: reachable by the server's user
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    pw = pwd.getpwnam(name)
                    break
                except KeyError:
                    continue
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._as_user = {"user": pw.pw_uid, "group": pw.pw_gid, "cwd": str(self.dir)}
        self.data = self.dir / "data"
        self.pg_ctl = str(bindir / "pg_ctl")
        try:
            self._run(str(bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                      "-E", "UTF8", "--no-sync")
            self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w", "-t", "60",
                      "-o", f"-p {self.port} -h 127.0.0.1 -k {self.dir} -c fsync=off", "start")
        except BaseException:
            self.__exit__()
            raise
        return self

    def uri(self, db: str) -> str:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{db}"')
        conn.close()
        # the driver named, as the chart does: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{db}"

    def query(self, db: str, sql: str) -> list:
        import psycopg2

        with psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=db) as conn:
            with conn.cursor() as cur:
                cur.execute(sql)
                rows = cur.fetchall()
        conn.close()
        return rows

    def __exit__(self, *exc) -> None:
        import shutil

        if self.dir is None:
            return
        if (self.data / "postmaster.pid").exists():
            try:
                self._run(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except RuntimeError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
