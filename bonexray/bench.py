"""Throughput benchmark: one run, same files and model, every stage from decode to SQL."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bonexray.errors import BonexrayError

log = logging.getLogger(__name__)


class BenchError(BonexrayError, RuntimeError):
    """The benchmark cannot make its inputs."""


@dataclass(frozen=True)
class BenchConfig:
    quick: bool = False
    image_size: int = 224
    batch: int = 16
    images: int = 0  # 0: 192 (quick 96)
    views_per_study: int = 2
    source_side: int = 760  # ~0.58 megapixels, as MEASURED.md's decode figures
    control_studies: int = 0  # 0: 4000 (quick 1500)
    control_processes: int = 2
    repeats: int = 0  # 0: 5 (quick 3)
    dicom_decode: int = 0  # 2000x2500 objects per codec for dicom_decode_ips; 0: 6 (quick 3)
    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    broker_url: str = "redis://127.0.0.1:6379/14"
    workdir: str | None = None

    @property
    def n_images(self) -> int:
        return self.images or (96 if self.quick else 192)

    @property
    def n_control(self) -> int:
        return self.control_studies or (1500 if self.quick else 4000)

    @property
    def dicom_decode_images(self) -> int:
        return self.dicom_decode or (3 if self.quick else 6)

    @property
    def n_repeats(self) -> int:
        return self.repeats or (3 if self.quick else 5)


def _median_rate(samples: list[float], items: int) -> float:
    return items / statistics.median(samples)


# ---------------------------------------------------------------------------- inputs


def write_views(root: Path, *, images: int, per_study: int, side: int, seed: int = 0) -> Path:
    """Radiograph-like grayscale PNGs of about side x side, `per_study` views a study."""
    from bonexray.synth import render_view

    rng = np.random.default_rng(seed)
    parts = ("wrist", "elbow", "hand", "shoulder")
    for i in range(images):
        study = root / f"study{i // per_study:05d}"
        study.mkdir(parents=True, exist_ok=True)
        pixels = render_view(rng, body_part=parts[i % len(parts)], abnormal=bool(i % 3 == 0),
                             sign=None, size=side)
        Image.fromarray(pixels).save(study / f"image{i % per_study + 1}.png", compress_level=6)
    return root


# ---------------------------------------------------------------------------- DICOM inputs

JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"  # process 14, selection value 1: CR/DX's usual
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"


def dicom_available() -> bool:
    """pydicom and its codecs (the dicom extra) are installed: DICOM figures can be made."""
    try:
        import gdcm  # noqa: F401
        import pydicom  # noqa: F401
    except ImportError:
        return False
    return True


def write_dicom_view(path: Path, pixels: np.ndarray, *, syntax: str, study_uid: str) -> Path:
    """A CR object (MONOCHROME1, 12 bits stored in 16, no VOI: the robust window) holding
    `pixels` (uint16), compressed with `syntax`: JPEG Lossless by GDCM, JPEG 2000 by
    pydicom's encoders."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    from bonexray.dicom import CR

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CR)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CR, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality, ds.BodyPartExamined = "CR", "WRIST"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (4095 - pixels.astype(np.uint16)).astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if syntax == JPEG_LOSSLESS:
        import gdcm

        raw = path.with_suffix(".raw.dcm")
        ds.save_as(raw, enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(raw))
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        writer = gdcm.ImageWriter()
        if not reader.Read():
            raise BenchError(f"GDCM cannot read {raw}")
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise BenchError("GDCM cannot encode JPEG Lossless")
        writer.SetFileName(str(path))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        if not writer.Write():
            raise BenchError(f"GDCM cannot write {path}")
        raw.unlink()
    else:
        ds.compress(syntax)
        ds.save_as(path, enforce_file_format=True)
    return path


def radiograph_12bit(rng: np.random.Generator, *, rows: int, cols: int, part: str,
                     abnormal: bool) -> np.ndarray:
    """A synthetic radiograph at rows x cols, 12-bit, with detector-like noise."""
    from bonexray.synth import render_view

    side = min(760, max(rows, cols))
    base = render_view(rng, body_part=part, abnormal=abnormal, sign=None, size=side)
    big = np.asarray(Image.fromarray(base).resize((cols, rows), Image.Resampling.BILINEAR),
                     dtype=np.float64)
    noisy = big * 16.0 + rng.normal(0.0, 6.0, big.shape)
    return np.clip(noisy, 0, 4095).astype(np.uint16)


def write_dicom_archive(root: Path, *, images: int, per_study: int, side: int,
                        syntax: str = JPEG_LOSSLESS, seed: int = 0) -> Path:
    """The benchmark's views as a DICOM archive: CR objects by StudyInstanceUID."""
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    parts = ("wrist", "elbow", "hand", "shoulder")
    uid = ""
    for i in range(images):
        if i % per_study == 0:
            uid = generate_uid()
        pixels = radiograph_12bit(rng, rows=side, cols=side, part=parts[i % len(parts)],
                                  abnormal=i % 3 == 0)
        write_dicom_view(root / f"IM{i:05d}", pixels, syntax=syntax, study_uid=uid)
    return root


def measure_dicom_decode(work: Path, *, size: int, threads: int, repeats: int,
                         images: int) -> dict[str, float]:
    """Views per second through load_view (decode, VOI, letterbox to `size`) of 2,000 x
    2,500 12-bit CR objects, JPEG Lossless and JPEG 2000 (lossless)."""
    out = {}
    for name, syntax in (("jpeg_lossless", JPEG_LOSSLESS), ("jpeg2000", JPEG2000_LOSSLESS)):
        rng = np.random.default_rng(7)
        paths = [str(write_dicom_view(work / f"decode-{name}" / f"IM{i}", radiograph_12bit(
            rng, rows=2500, cols=2000, part="wrist", abnormal=False), syntax=syntax,
            study_uid="1.2.3")) for i in range(images)]
        out[name] = round(measure_decode(paths, size, threads, repeats), 3)
    return out


def write_tiny_studies(root: Path, *, studies: int, side: int = 48) -> Path:
    """Many one-view studies of tiny images: for the control-plane figure."""
    rng = np.random.default_rng(1)
    for i in range(studies):
        study = root / f"s{i:06d}"
        study.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).save(
            study / "v.png", compress_level=1)
    return root


def export_untrained_densenet(workdir: Path, image_size: int) -> tuple[str, Any]:
    """A DenseNet-169 with seeded random weights, exported through the real export path."""
    import torch

    from bonexray.export.onnx import export_model
    from bonexray.trainer.network import ARCHITECTURE, BoneXRayNet

    torch.manual_seed(0)
    net = BoneXRayNet().eval()
    checkpoint = workdir / "bench.pt"
    torch.save({"format": 1, "model": net.state_dict(), "architecture": ARCHITECTURE,
                "image_size": image_size, "resize": "letterbox", "threshold": 0.5,
                "head": dict(net.head_config), "config": {"note": "benchmark, untrained"},
                "metrics": {}, "epoch": 0}, checkpoint)
    path = workdir / "densenet169.onnx"
    export_model(str(checkpoint), str(path))
    return str(path), net


# ---------------------------------------------------------------------------- stages


def measure_decode(paths: list[str], size: int, threads: int, repeats: int) -> float:
    from bonexray.imaging import load_view

    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda p: load_view(p, size), paths))
        samples.append(time.perf_counter() - start)
    return _median_rate(samples, len(paths))


def measure_interleaved(runners: dict[str, Callable[[], object]], items: int,
                        repeats: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Rates of several runners, each repeat running them all in turn, so that the machine's
    noise hits them all alike: (median rate by name, every repeat's rate by name)."""
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for run in runners.values():
        run()  # warm-up
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    rates = {name: [items / t for t in s] for name, s in samples.items()}
    return {name: _median_rate(s, items) for name, s in samples.items()}, rates


def pipeline_runner(folder: Path, model_path: str, workdir: Path,
                    batch: int) -> Callable[[], None]:
    """`bonexray run`'s code path, files -> SQLite, one new job over `folder` per call."""
    from bonexray.db.session import open_database
    from bonexray.jobs import prepare_job, run_embedded
    from bonexray.modelstore import resolve_model
    from bonexray.pipeline.chunks import get_classifier
    from bonexray.settings import get_settings

    engine = open_database(f"sqlite:///{workdir / 'pipeline.db'}")
    model = resolve_model(engine=engine, ref=model_path)
    settings = get_settings().replace(batch_size=batch)
    get_classifier(model, settings)  # steady state: the model is loaded once per process

    def run() -> None:
        job = prepare_job(engine=engine, root=str(folder), model=model, mode="embedded")
        run_embedded(engine=engine, job=job, settings=settings)

    return run


@contextlib.contextmanager
def private_database(admin_url: str) -> Iterator[str]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"bonexray_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        from bonexray.db import session as db_session

        for engine in list(db_session._engines.values()):
            engine.dispose()
        db_session._engines.clear()
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = :n AND pid <> pg_backend_pid()"), {"n": name})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@contextlib.contextmanager
def running_worker(env: dict[str, str], args: list[str], log_path: Path) -> Iterator[None]:
    """A real `bonexray worker` subprocess, ready (answering pings) when the block starts."""
    from bonexray.settings import load_settings
    from bonexray.worker.app import create_app

    node = f"bench-{uuid.uuid4().hex[:6]}@{platform.node()}"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "bonexray.cli", "worker", "--hostname",
                                 node, *args], env={**os.environ, **env}, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    app = create_app(load_settings({**os.environ, **env}))
    try:
        deadline = time.monotonic() + 120
        while not any(node in reply for reply in app.control.ping(timeout=0.5) or []):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BonexrayError(f"worker did not start; see {log_path}")
        yield
    finally:
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        app.close()


@contextlib.contextmanager
def celery_runner(folder: Path, model_path: str, *, db_url: str, broker_url: str,
                  worker_args: list[str], log_path: Path,
                  extra_env: dict[str, str] | None = None
                  ) -> Iterator[Callable[[], tuple[int, int]]]:
    """A warm `bonexray worker` and a call that enqueues `folder` as a new job and returns
    (views, studies) once its last study row is in Postgres."""
    from bonexray.db.query import job_progress
    from bonexray.db.session import open_database, session_scope
    from bonexray.jobs import check_broker, prepare_job, send_job
    from bonexray.modelstore import resolve_model
    from bonexray.settings import load_settings
    from bonexray.studies import find_studies

    queue = f"bench-{uuid.uuid4().hex[:8]}"
    env = {"BONEXRAY_DATABASE_URL": db_url, "BONEXRAY_BROKER_URL": broker_url,
           "BONEXRAY_QUEUE": queue, **(extra_env or {})}
    settings = load_settings({**os.environ, **env})
    check_broker(settings)
    engine = open_database(db_url)
    model = resolve_model(engine=engine, ref=model_path)

    def run_job(studies: list[Any] | None = None) -> tuple[int, int]:
        job = prepare_job(engine=engine, root=str(folder), model=model, mode="celery",
                          studies=studies)
        send_job(engine=engine, job=job, settings=settings)
        while True:
            with session_scope(engine) as session:
                progress = job_progress(session=session, job_id=job.job_id)
            if progress["finished"]:
                break
            time.sleep(0.05)
        if progress["failed"]:
            raise BonexrayError(f"benchmark job {job.job_id} had {progress['failed']} failed "
                                f"studies; see {log_path}")
        return job.views, job.studies

    with running_worker(env, worker_args, log_path):
        # Warm-up: every worker process loads the model once, outside the timing.
        run_job(find_studies(folder)[: 4 * settings.chunk_size])
        yield run_job


def measure_celery(folder: Path, model_path: str, **kwargs: Any) -> tuple[float, int]:
    """Enqueue -> Redis -> worker -> Postgres, once: (studies/s, studies), timed from the
    first enqueue to the last study row."""
    with celery_runner(folder, model_path, **kwargs) as run_job:
        start = time.perf_counter()
        _, studies = run_job()
        elapsed = time.perf_counter() - start
    return studies / elapsed, studies


# ---------------------------------------------------------------------------- the run


def run_benchmark(config: BenchConfig) -> dict[str, Any]:
    """Measure every figure in one run and return them (see benchmarks/RESULTS.md)."""
    import onnxruntime as ort
    import torch

    from bonexray.export.cheap import write_cheap_model
    from bonexray.imaging import load_view
    from bonexray.pipeline.inference import Classifier
    from bonexray.settings import get_settings

    settings = get_settings()
    tmp = tempfile.TemporaryDirectory(prefix="bonexray-bench-", dir=config.workdir)
    work = Path(tmp.name)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "quick": config.quick, "image_size": config.image_size,
        "batch": config.batch, "images": config.n_images,
        "onnxruntime": ort.__version__, "torch": torch.__version__,
    }
    try:
        log.info("writing %d views of ~%d px", config.n_images, config.source_side)
        folder = write_views(work / "views", images=config.n_images,
                             per_study=config.views_per_study, side=config.source_side)
        paths = sorted(str(p) for p in folder.rglob("*.png"))
        log.info("exporting DenseNet-169 at %d px", config.image_size)
        model_path, net = export_untrained_densenet(work, config.image_size)
        clf = Classifier(model_path, settings=settings)
        result["provider"] = clf.provider

        # Every view pre-decoded: the model-only runners see the same images as the
        # pipeline, in the same batches, without decoding (their ceiling).
        pixels = np.stack([load_view(p, config.image_size) for p in paths])[:, None]
        batches = [pixels[i:i + config.batch] for i in range(0, len(pixels), config.batch)]
        torch.set_num_threads(os.cpu_count() or 1)
        torch_batches = [torch.from_numpy(b) for b in batches]

        def torch_eager() -> None:
            with torch.no_grad():
                for b in torch_batches:
                    net(b)

        def ort_run(classifier: Classifier) -> Callable[[], None]:
            def run() -> None:
                for b in batches:
                    classifier.predict(b)
            return run

        runners: dict[str, Callable[[], object]] = {
            "torch_eager_ips": torch_eager,
            "ort_ips": ort_run(clf),
        }
        int8_path = quantize_for_bench(model_path, folder, work)
        if int8_path is not None:
            runners["ort_int8_ips"] = ort_run(Classifier(int8_path, settings=settings))
        runners["pipeline_ips"] = pipeline_runner(folder, model_path, work, config.batch)
        result["decode_ips"] = measure_decode(paths, config.image_size,
                                              settings.decode_threads, config.n_repeats)
        if dicom_available():
            log.info("DICOM: %d views as JPEG Lossless CR, and 2000x2500 decode figures",
                     config.n_images)
            archive = write_dicom_archive(work / "dicom", images=config.n_images,
                                          per_study=config.views_per_study,
                                          side=config.source_side)
            runners["pipeline_dicom_ips"] = pipeline_runner(archive, model_path, work,
                                                            config.batch)
            result["dicom_decode_ips"] = measure_dicom_decode(
                work, size=config.image_size, threads=settings.decode_threads,
                repeats=config.n_repeats, images=config.dicom_decode_images)
        else:
            log.warning("the dicom extra is not installed: no DICOM figures")
            result["dicom_decode_ips"] = None

        with private_database(config.database_url) as db_url:
            with celery_runner(folder, model_path, db_url=db_url, broker_url=config.broker_url,
                               worker_args=["--pool", "solo"], log_path=work / "worker.log",
                               extra_env={"BONEXRAY_BATCH_SIZE": str(config.batch)}
                               ) as run_job:
                runners["celery_ips"] = run_job
                log.info("%s over the same %d views, interleaved, %d repeats",
                         ", ".join(runners), len(paths), config.n_repeats)
                rates, samples = measure_interleaved(runners, len(paths), config.n_repeats)
            result.update(rates)
            result.setdefault("ort_int8_ips", None)
            result.setdefault("pipeline_dicom_ips", None)
            result["repeats"] = {k: [round(r, 2) for r in v] for k, v in samples.items()}

            log.info("control plane: %d one-view studies, cheap model", config.n_control)
            cheap = write_cheap_model(work / "cheap.onnx", image_size=32)
            tiny = write_tiny_studies(work / "tiny", studies=config.n_control)
            sps, studies = measure_celery(
                tiny, cheap, db_url=db_url, broker_url=config.broker_url,
                worker_args=["--pool", "prefork", "--concurrency",
                             str(config.control_processes)],
                log_path=work / "control.log",
                extra_env={"BONEXRAY_CHUNK_SIZE": "64", "BONEXRAY_DECODE_THREADS": "1"})
            result["control_plane_sps"] = sps
            result["control_plane_studies"] = studies
    finally:
        tmp.cleanup()
    ort_ips = result["ort_ips"]
    result["ratios"] = {
        "pipeline_over_ort": result["pipeline_ips"] / ort_ips,
        "pipeline_dicom_over_ort": (result["pipeline_dicom_ips"] / ort_ips
                                    if result["pipeline_dicom_ips"] else None),
        "celery_over_ort": result["celery_ips"] / ort_ips,
        "ort_over_torch_eager": ort_ips / result["torch_eager_ips"],
        "int8_over_ort": (result["ort_int8_ips"] / ort_ips
                          if result["ort_int8_ips"] else None),
    }
    result["ratios"] = {k: (round(v, 3) if v is not None else None)
                        for k, v in result["ratios"].items()}
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}


def quantize_for_bench(model_path: str, calibration: Path, work: Path) -> str | None:
    """The int8 (static QDQ) model for the CPU figure, calibrated on the benchmark's views."""
    try:
        from bonexray.export.quantize import quantize_int8
    except ImportError:
        log.warning("int8 export not available; ort_int8_ips not measured")
        return None
    out = work / "densenet169-int8.onnx"
    quantize_int8(model_path, str(out), calibration_dir=str(calibration))
    return str(out)


def format_result(result: dict[str, Any]) -> str:
    return json.dumps(result, sort_keys=False)
