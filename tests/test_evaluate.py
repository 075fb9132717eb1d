"""Evaluation of a job against its labels, MURA's predictions file, plots, heatmaps, and the
reporting commands (results filters, jobs, status --wait, evaluate, export-predictions)."""

from __future__ import annotations

import csv
import datetime as dt
import json
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bonexray.cli import cli, progress_line
from bonexray.db import query, store
from bonexray.db.session import open_database, session_scope
from bonexray.db.tables import Evaluation
from bonexray.evaluate import (
    NothingToEvaluateError,
    evaluate_job,
    mura_study_name,
    summarize_outcomes,
)
from bonexray.export.cheap import write_cheap_model
from bonexray.metrics import CI_METRICS, json_safe, metrics_with_ci
from bonexray.modelmeta import INPUT_NAME, OUTPUT_CAM, OUTPUT_PROB, build_metadata
from bonexray.modelstore import sha256_file
from bonexray.pipeline.records import StudyResult, ViewResult
from bonexray.settings import get_settings
from bonexray.studies import Study as FoundStudy

ROOT = "/data/MURA-v1.1"
# path under ROOT, body part, label, score (None: the study failed)
RNG = np.random.default_rng(42)
SPECS: list[tuple[str, str | None, int | None, float | None]] = [
    *[(f"valid/XR_WRIST/patient{i:05d}/study1_{'positive' if i % 2 else 'negative'}",
       "wrist", i % 2, float(np.round(RNG.random() * 0.6 + 0.35 * (i % 2), 2)))
      for i in range(30)],
    *[(f"valid/XR_HAND/patient{i:05d}/study1_{'positive' if i % 3 == 0 else 'negative'}",
       "hand", int(i % 3 == 0), float(np.round(RNG.random(), 2))) for i in range(100, 121)],
    ("valid/XR_HAND/patient00200/study1_positive", "hand", 1, None),  # labelled, failed
    ("valid/XR_HAND/patient00201/study1_negative", "hand", 0, None),
    ("valid/XR_ELBOW/patient00300/study1_positive", "elbow", 1, None),  # only unscored
    ("valid/XR_WRIST/patient00400/loose", "wrist", None, 0.9),  # unlabelled: skipped
    ("other/scan7", None, None, 0.2),
    ("other/scan8", None, 1, 0.7),  # labelled by a CSV, body part unknown
]


def make_job(session: Session, *, threshold: float = 0.5, model_path: str = "/m/net.onnx",
             sha256: str = "ab" * 32,
             specs: Sequence[tuple[str, str | None, int | None, float | None]] = SPECS,
             root: str = ROOT, views: dict[str, list[str]] | None = None) -> int:
    """A job whose studies have the given labels and scores (no model run)."""
    model = store.register_model(session=session, path=model_path, sha256=sha256,
                                 meta={"threshold": repr(threshold)})
    found = [FoundStudy(key=f"{root}/{p}",
                        views=tuple((views or {}).get(p, [f"{root}/{p}/image1.png"])),
                        body_part=part, label=label) for p, part, label, _ in specs]
    job = store.create_job(session=session, root=root, model_id=model.id, studies=found,
                           mode="embedded", options={})
    ids = {path: i for i, path in store.queued_studies(session=session, job_id=job.id)}
    results = []
    for study, (_, _, _, score) in zip(found, specs, strict=True):
        if score is None:
            vr = tuple(ViewResult(v, None, "cannot decode") for v in study.views)
            results.append(StudyResult(ids[study.key], study.key, "failed", None, None, vr,
                                       "no view could be scored"))
        else:
            vr = tuple(ViewResult(v, score) for v in study.views)
            results.append(StudyResult(ids[study.key], study.key, "done", score,
                                       "abnormal" if score >= threshold else "normal", vr))
    store.save_results(session=session, job_id=job.id, results=results, worker="w")
    store.finish_job_if_done(session=session, job_id=job.id)
    session.flush()
    return job.id


def direct(part: str | None, threshold: float, resamples: int, seed: int) -> dict:
    """metrics_with_ci of the labelled, scored studies of SPECS (of one body part), taken
    in path order as the job stores them (the bootstrap draws depend on the order)."""
    chosen = [(label, score) for _, p, label, score in
              sorted((s[0], s[1] or "unknown", s[2], s[3]) for s in SPECS)
              if label is not None and score is not None and (part is None or p == part)]
    labels = [c[0] for c in chosen]
    scores = [c[1] for c in chosen]
    return metrics_with_ci(labels, scores, threshold, resamples=resamples, seed=seed)


def test_evaluate_job_matches_a_direct_computation(session: Session) -> None:
    job_id = make_job(session, threshold=0.45)
    result = evaluate_job(session=session, job_id=job_id, resamples=300, seed=4)
    out = result.to_json()
    assert set(out) == {"overall", "by_body_part"}
    assert set(out["by_body_part"]) == {"elbow", "hand", "unknown", "wrist"}
    for part, figures in [(None, out["overall"]), *out["by_body_part"].items()]:
        expected = json_safe(direct(part, 0.45, 300, 4))
        for key in ("n", "positives", *CI_METRICS, *(f"{m}_ci" for m in CI_METRICS)):
            assert figures[key] == pytest.approx(expected[key], nan_ok=True), (part, key)
    overall = out["overall"]
    assert (overall["n"], overall["unscored"], overall["unlabelled"]) == (52, 3, 2)
    assert overall["threshold"] == 0.45
    assert (out["by_body_part"]["hand"]["n"], out["by_body_part"]["hand"]["unscored"]) == (21, 2)
    assert out["by_body_part"]["wrist"]["unlabelled"] == 1
    elbow = out["by_body_part"]["elbow"]
    assert (elbow["n"], elbow["unscored"], elbow["auroc"], elbow["auroc_ci"]) == (
        0, 1, None, [None, None])
    assert 0.5 < overall["auroc"] < 1 and overall["auroc_ci"][0] < overall["auroc"]
    json.dumps(out, allow_nan=False)  # strict JSON: no NaN anywhere

    # Stored: one row per group, the run number counting up.
    assert result.run == 1
    rows = query.latest_evaluation(session=session, job_id=job_id)
    assert [r.body_part for r in rows] == [None, "elbow", "hand", "unknown", "wrist"]
    assert rows[0].auroc == pytest.approx(overall["auroc"])
    assert rows[0].ci["kappa"] == pytest.approx(overall["kappa_ci"])
    assert (rows[0].n, rows[0].unscored, rows[0].unlabelled, rows[0].resamples) == (52, 3, 2,
                                                                                     300)
    again = evaluate_job(session=session, job_id=job_id, resamples=300, seed=4, threshold=0.8)
    assert again.run == 2 and again.figures["overall"]["threshold"] == 0.8
    assert again.figures["overall"]["auroc"] == pytest.approx(overall["auroc"])
    assert again.figures["overall"]["sensitivity"] < overall["sensitivity"]
    assert query.latest_evaluation(session=session, job_id=job_id)[0].threshold == 0.8
    assert session.scalar(select(func.count()).select_from(Evaluation)) == 10


def test_unlabelled_studies_are_never_scored_as_zero() -> None:
    outcomes: list[dict[str, Any]] = [{"body_part": "hand", "label": None, "score": 0.9},
                {"body_part": "hand", "label": 1, "score": 0.8},
                {"body_part": "hand", "label": 0, "score": 0.1},
                {"body_part": "hand", "label": 1, "score": None}]
    figures = summarize_outcomes(outcomes, threshold=0.5, resamples=50)
    hand = figures["by_body_part"]["hand"]
    assert (hand["n"], hand["unscored"], hand["unlabelled"]) == (2, 1, 1)
    assert hand["accuracy"] == 1.0 and hand["auroc"] == 1.0


def test_a_job_without_labels_is_refused(session: Session) -> None:
    job_id = make_job(session, specs=[("a/s1", "hand", None, 0.3), ("a/s2", None, None, 0.6)])
    with pytest.raises(NothingToEvaluateError, match="none of its 2 studies has a label"):
        evaluate_job(session=session, job_id=job_id)
    with pytest.raises(query.JobNotFoundError, match="4242"):
        evaluate_job(session=session, job_id=4242)


def test_mura_study_names() -> None:
    path = "/data/MURA-v1.1/valid/XR_WRIST/patient11185/study1_positive"
    assert mura_study_name(path, root="/data/MURA-v1.1") == (
        "MURA-v1.1/valid/XR_WRIST/patient11185/study1_positive/")
    assert mura_study_name(path, root="/data/MURA-v1.1/valid/XR_WRIST") == (
        "MURA-v1.1/valid/XR_WRIST/patient11185/study1_positive/")
    assert mura_study_name(path, root="/x", relative_to="/data") == (
        "MURA-v1.1/valid/XR_WRIST/patient11185/study1_positive/")
    assert mura_study_name("/archive/2026/case1", root="/archive/2026") == "2026/case1/"


# ---------------------------------------------------------------------------- commands


@pytest.fixture
def db_url(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The database the commands use, through the environment (restored after the test)."""
    monkeypatch.setenv("BONEXRAY_DATABASE_URL", sqlite_url)
    get_settings.cache_clear()
    yield sqlite_url
    get_settings.cache_clear()


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_evaluate_command_json_table_and_plots(db_url: str, tmp_path: Path) -> None:
    engine = open_database(db_url)
    with session_scope(engine) as s:
        job_id = make_job(s)
    code, out, err = invoke("evaluate", str(job_id), "--format", "json", "--resamples", "200",
                            "--plots", str(tmp_path / "plots"))
    assert code == 0, err
    figures = json.loads(out)
    expected = json_safe(direct(None, 0.5, 200, 0))
    assert figures["overall"]["auroc"] == pytest.approx(expected["auroc"])
    assert figures["overall"]["auroc_ci"] == pytest.approx(expected["auroc_ci"])
    assert figures["by_body_part"]["wrist"]["f1"] == pytest.approx(
        json_safe(direct("wrist", 0.5, 200, 0))["f1"])
    for name in ("roc.png", "confusion_matrix.png", "by_body_part.png"):
        png = tmp_path / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as img:
            img.verify()
        with Image.open(png) as img:
            assert img.size[0] > 300 and img.size[1] > 300
            # Not a blank canvas: a chart has many colours.
            assert len(img.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 20
    code, out, err = invoke("evaluate", str(job_id), "--resamples", "50")
    assert code == 0, err
    assert "wrist" in out and "elbow" in out and "n/a" in out  # elbow: nothing scored
    with session_scope(engine) as s:
        assert len(query.latest_evaluation(session=s, job_id=job_id)) == 5
        assert query.latest_evaluation(session=s, job_id=job_id)[0].run == 2
    # --no-save prints the same figures and stores nothing.
    code, out, err = invoke("evaluate", str(job_id), "--resamples", "50", "--no-save")
    assert code == 0, err
    assert "not stored (--no-save)" in out and "wrist" in out
    with session_scope(engine) as s:
        assert query.latest_evaluation(session=s, job_id=job_id)[0].run == 2


def test_export_predictions_in_mura_format(db_url: str, tmp_path: Path) -> None:
    with session_scope(open_database(db_url)) as s:
        job_id = make_job(s, threshold=0.5)
    target = tmp_path / "out" / "predictions.csv"
    code, out, err = invoke("export-predictions", str(job_id), str(target))
    assert code == 2 and "no such folder" in out + err  # a mistyped folder is not made
    target.parent.mkdir()
    code, out, err = invoke("export-predictions", str(job_id), str(target))
    assert code == 0, err
    # "-" is stdout (the summary line goes to stderr), not a file named "-".
    code, piped, summary = invoke("export-predictions", str(job_id), "-")
    assert code == 0 and piped == target.read_text() and "to stdout" in summary
    assert not Path("-").exists()
    assert "3 studies without a prediction left out" in err  # notes go to stderr
    rows = list(csv.reader(target.read_text().splitlines()))
    scored = sorted((f"{ROOT}/{p}", score) for p, _, _, score in SPECS if score is not None)
    assert len(rows) == len(scored) == 54
    assert rows[:2] == [["MURA-v1.1/other/scan7/", "0"], ["MURA-v1.1/other/scan8/", "1"]]
    by_name = dict((name, label) for name, label in rows)
    assert by_name["MURA-v1.1/valid/XR_WRIST/patient00001/study1_positive/"] == (
        "1" if SPECS[1][3] >= 0.5 else "0")  # type: ignore[operator]
    for name, label in rows:
        assert name.endswith("/") and not name.startswith("/") and label in ("0", "1")
    assert sum(label == "1" for _, label in rows) == sum(s >= 0.5 for _, s in scored)
    assert not target.read_text().startswith("Study")  # no header


def test_results_filters_and_jobs_command(db_url: str) -> None:
    with session_scope(open_database(db_url)) as s:
        job_id = make_job(s)
    code, out, err = invoke("results", str(job_id), "--format", "json", "--study", "xr_wrist",
                            "--min-score", "0.5", "--order", "-score", "--limit", "4")
    assert code == 0, err
    rows = json.loads(out)
    wrist = sorted((s for p, _, _, s in SPECS if "XR_WRIST" in p and s is not None
                    and s >= 0.5), reverse=True)
    assert [r["score"] for r in rows] == wrist[:4]
    assert all("XR_WRIST" in r["study"] for r in rows)
    code, out, _ = invoke("results", str(job_id), "--format", "csv", "--max-score", "0.2",
                          "--body-part", "hand", "--order", "score")
    lines = out.splitlines()
    scores = [float(line.split(",")[3]) for line in lines[1:]]
    assert scores == sorted(s for p, part, _, s in SPECS if part == "hand" and s is not None
                            and s <= 0.2)
    code, out, err = invoke("jobs", "--format", "json")
    assert code == 0, err
    (job,) = json.loads(out)
    assert (job["job"], job["done"], job["failed"], job["model"]) == (job_id, 54, 3, "net")
    assert job["duration_s"] is not None and job["duration_s"] >= 0
    code, out, _ = invoke("jobs")
    assert code == 0 and "net" in out


def test_status_wait_follows_then_exits_1_on_failures(db_url: str) -> None:
    engine = open_database(db_url)
    with session_scope(engine) as s:
        model = store.register_model(session=s, path="/m.onnx", sha256="cd" * 32, meta={})
        job = store.create_job(session=s, root="/r", model_id=model.id, mode="embedded",
                               options={}, studies=[
                                   FoundStudy(key="/r/a", views=("/r/a/1.png",)),
                                   FoundStudy(key="/r/b", views=("/r/b/1.png",))])
        s.flush()
        job_id = job.id
        (first, _), (second, _) = store.queued_studies(session=s, job_id=job_id)
        store.save_results(session=s, job_id=job_id, worker="w", results=[
            StudyResult(first, "/r/a", "done", 0.7, "abnormal",
                        (ViewResult("/r/a/1.png", 0.7),))])

    def finish_later() -> None:
        time.sleep(0.5)
        with session_scope(engine) as s:
            store.mark_failed(session=s, study_ids=[second], error="gave up", worker="w")

    worker = threading.Thread(target=finish_later)
    worker.start()
    code, out, err = invoke("status", str(job_id), "--wait", "--interval", "0.05",
                            "--timeout", "60")
    worker.join()
    assert code == 1, err
    assert "finished; 1 done, 1 failed" in out
    code, _, _ = invoke("status", str(job_id), "--json")
    assert code == 1


def test_progress_line() -> None:
    p = {"done": 30, "failed": 2, "queued": 68, "in_flight": 16, "views": 250,
         "views_scored": 75, "views_failed": 5, "images_per_s": 10.0, "finished": False}
    assert progress_line(p) == ("done 30 · failed 2 · queued 68 (16 in flight) · 10.0 img/s "
                                "· ETA 0:00:17")
    assert progress_line({**p, "images_per_s": None}).endswith("- img/s · ETA -:--:--")
    slow = progress_line({**p, "images_per_s": 0.01})
    assert slow.endswith("ETA 4:43:20")
    done = progress_line({**p, "queued": 0, "views_scored": 245, "finished": True})
    assert done.endswith("ETA 0:00:00")


# ---------------------------------------------------------------------------- heatmaps

CAM_POOL = 8


def write_cam_model(path: Path, size: int = 64) -> str:
    """A bonexray model with a `cam` output on the logit scale, as exports have: each 8x8
    patch's mean brightness mapped to -6 (black) .. +6 (white); the probability is the
    sigmoid of the map's mean."""
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "inv255"], ["unit"]),
        helper.make_node("Sub", ["unit", "half"], ["centred"]),
        helper.make_node("Mul", ["centred", "twelve"], ["logits"]),
        helper.make_node("ReduceMean", ["logits"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Sigmoid", ["mean"], [OUTPUT_PROB]),
        helper.make_node("AveragePool", ["logits"], ["pooled"], kernel_shape=[CAM_POOL] * 2,
                         strides=[CAM_POOL] * 2),
        helper.make_node("Squeeze", ["pooled", "axis1"], [OUTPUT_CAM]),
    ]
    h = size // CAM_POOL
    graph = helper.make_graph(
        nodes, "cam_test",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["N", 1, size, size])],
        [helper.make_tensor_value_info(OUTPUT_PROB, TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info(OUTPUT_CAM, TensorProto.FLOAT, ["N", h, h])],
        initializer=[helper.make_tensor("inv255", TensorProto.FLOAT, [], [1 / 255]),
                     helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
                     helper.make_tensor("twelve", TensorProto.FLOAT, [], [12.0]),
                     helper.make_tensor("axis1", TensorProto.INT64, [1], [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = build_metadata(architecture="patch-mean", input_size=size, resize="letterbox",
                          threshold=0.5, exported_at=dt.datetime.now(dt.timezone.utc)
                          .isoformat())
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def test_heatmaps_overlay_the_cam(db_url: str, tmp_path: Path) -> None:
    """Overlays at each view's own resolution (the letterbox padding not painted), on one
    fixed scale (a dark, normal view gets no hot spot), with the score written on them."""
    root = tmp_path / "archive"
    views = {}
    # (study, view size h x w, bright patch rows, columns)
    plans = {"XR_HAND/p1/study1_positive": ((64, 64), (0, 24), (0, 24)),
             "XR_HAND/p2/study1_negative": ((80, 160), (20, 60), (120, 160)),
             "XR_HAND/p3/study1_negative": ((64, 64), None, None)}
    for name, (shape, rows, cols) in plans.items():
        folder = root / name
        folder.mkdir(parents=True)
        pixels = np.full(shape, 10, dtype=np.uint8)
        if rows is not None and cols is not None:
            pixels[rows[0]:rows[1], cols[0]:cols[1]] = 255
        Image.fromarray(pixels).save(folder / "image1.png")
        Image.fromarray(pixels).save(folder / "image2.png")
        views[name] = [str(folder / "image1.png"), str(folder / "image2.png")]
    (root / "XR_HAND/p2/study1_negative/image2.png").write_bytes(b"not a png")
    model_path = write_cam_model(tmp_path / "cam.onnx")
    specs = [(n, "hand", 1, 0.6) for n in views]
    with session_scope(open_database(db_url)) as s:
        job_id = make_job(s, model_path=model_path, sha256=sha256_file(model_path),
                          specs=specs, root=str(root), views=views)
    out_dir = tmp_path / "heat"
    code, out, err = invoke("results", str(job_id), "--format", "json", "--heatmaps",
                            str(out_dir))
    assert code == 0, err
    assert len(json.loads(out)) == 3  # stdout stays JSON
    assert "heatmaps: 5 written" in err and "1 views could not be read" in err

    def heat(name: str) -> tuple[np.ndarray, dict[str, str]]:
        with Image.open(out_dir / name) as img:
            return np.asarray(img.convert("RGB")).astype(int), dict(img.text)

    first, text = heat("XR_HAND/p1/study1_positive/image1_cam.png")
    assert first.shape == (64, 64, 3)
    # Bright patch top-left: hot (red over the gray) there, cold (blue) in the far corner.
    assert first[20, 12, 0] - first[20, 12, 2] > 80
    assert first[56, 56, 2] > first[56, 56, 0]
    assert float(text["bonexray_score"]) == pytest.approx(
        1 / (1 + np.exp(-((24 * 24 * 245 + 64 * 64 * 10) / 64 / 64 / 255 - 0.5) * 12)),
        abs=1e-3)
    assert text["bonexray_caption"].startswith("normal p=")  # the caption burnt in
    # The caption is written on the image: a black band with white text, top-left.
    band = first[:8, :40]
    assert (band.max(axis=2) < 30).mean() > 0.3 and (band.min(axis=2) > 200).any()
    # A wide view keeps its size; its right-hand patch is hot, its left side cold, and no
    # row is left without the view's own gray (the padding was not painted over it).
    wide, _ = heat("XR_HAND/p2/study1_negative/image1_cam.png")
    assert wide.shape == (80, 160, 3)
    assert wide[40, 140, 0] - wide[40, 140, 2] > 80
    assert wide[70, 20, 2] > wide[70, 20, 0]
    # One fixed scale: the dark view is cold everywhere (per-view min-max scaling would
    # have made its least dark cell red).
    dark, _ = heat("XR_HAND/p3/study1_negative/image1_cam.png")
    below_caption = dark[20:]
    assert (below_caption[..., 0] - below_caption[..., 2] < 0).all()
    assert not (out_dir / "XR_HAND/p2/study1_negative/image2_cam.png").exists()
    # Only the selected studies.
    code, _, err = invoke("results", str(job_id), "--path", "p1/", "--heatmaps",
                          str(tmp_path / "heat2"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "heat2").rglob("*.png")) == [
        "image1_cam.png", "image2_cam.png"]


def test_heatmaps_need_a_cam_output(db_url: str, tmp_path: Path) -> None:
    model_path = write_cheap_model(tmp_path / "cheap.onnx")
    with session_scope(open_database(db_url)) as s:
        job_id = make_job(s, model_path=model_path, sha256=sha256_file(model_path),
                          specs=[("XR_HAND/p1/s1", "hand", 1, 0.6)], root=str(tmp_path))
    code, _, err = invoke("results", str(job_id), "--heatmaps", str(tmp_path / "h"))
    assert code != 0
    assert "has no 'cam' output" in err and len(err.strip().splitlines()) == 1


def test_partial_studies_are_counted_and_can_be_left_out(session: Session) -> None:
    from sqlalchemy import update

    from bonexray.db.tables import Study

    job_id = make_job(session)
    outcomes = query.study_outcomes(session=session, job_id=job_id)
    labelled = [o for o in outcomes if o["label"] is not None and o["score"] is not None]
    partial_path = labelled[0]["study"]
    session.execute(update(Study).where(Study.key == partial_path).values(partial=True))
    every = evaluate_job(session=session, job_id=job_id, resamples=50, save=False)
    assert every.figures["overall"]["partial"] == 1
    assert every.figures["overall"]["partial_excluded"] is False
    fewer = evaluate_job(session=session, job_id=job_id, resamples=50, save=False,
                         exclude_partial=True)
    assert fewer.figures["overall"]["n"] == every.figures["overall"]["n"] - 1
    assert fewer.figures["overall"]["partial"] == 1
    assert fewer.figures["overall"]["partial_excluded"] is True


def _flagged_job(session: Session, root: Path) -> tuple[int, list[Any], dict[str, int]]:
    """A job under `root` whose import manifest flags every fifth study with hardware."""
    specs = [(f"test/XR_HAND/patientIMG{i:07d}/study1_{'positive' if i % 2 else 'negative'}",
              "hand", i % 2, float(np.round(RNG.random() * 0.7 + 0.25 * (i % 2), 2)))
             for i in range(40)]
    hardware = {p: int(i % 5 == 1) for i, (p, *_) in enumerate(specs)}
    root.mkdir()
    with (root / "import_manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_id", "split", "body_part", "label", "group", "hardware",
                         "multiscan", "path"])
        for path, _, label, _ in specs:
            writer.writerow([Path(path).parent.name, "test", "hand", label, "g",
                             hardware[path], 0, f"{path}/image1.jpg"])
    return make_job(session, specs=specs, root=str(root)), specs, hardware


def test_breakdown_by_manifest_flags(session: Session, tmp_path: Path) -> None:
    """`evaluate --by hardware`: figures for studies with and without a flag of the import
    manifest, each equal to a direct computation on that subset."""
    job_id, specs, hardware = _flagged_job(session, tmp_path / "fa")
    result = evaluate_job(session=session, job_id=job_id, resamples=200, seed=1,
                          by_flags=["hardware"], save=False)
    by_flag = result.to_json()["by_flag"]["hardware"]
    assert set(by_flag) == {"0", "1"}
    for value in ("0", "1"):
        chosen = [(label, score) for path, _, label, score in sorted(specs)
                  if str(hardware[path]) == value]
        expected = json_safe(metrics_with_ci([c[0] for c in chosen], [c[1] for c in chosen],
                                             0.5, resamples=200, seed=1))
        assert by_flag[value]["n"] == len(chosen) == expected["n"]
        assert by_flag[value]["auroc"] == pytest.approx(expected["auroc"], nan_ok=True)
        assert by_flag[value]["accuracy"] == pytest.approx(expected["accuracy"])
    assert by_flag["1"]["n"] == 8 and result.to_json()["manifest"].endswith(
        "import_manifest.csv")
    from bonexray.evaluate import ManifestError
    with pytest.raises(ManifestError, match="no column oblique; its flags: hardware, multiscan"):
        evaluate_job(session=session, job_id=job_id, by_flags=["oblique"], save=False)
    other = make_job(session, model_path="/m/other.onnx")  # ROOT has no manifest
    with pytest.raises(ManifestError, match="no import_manifest.csv"):
        evaluate_job(session=session, job_id=other, by_flags=["hardware"], save=False)


def test_evaluate_command_breaks_down_by_flags(db_url: str, tmp_path: Path) -> None:
    engine = open_database(db_url)
    with session_scope(engine) as s:
        job_id, _, _ = _flagged_job(s, tmp_path / "fa")
    code, out, err = invoke("evaluate", str(job_id), "--resamples", "50", "--by", "hardware")
    assert code == 0, err
    assert "hardware=1" in out and "hardware=0" in out
    code, out, err = invoke("evaluate", str(job_id), "--by", "oblique")
    assert code == 2 and "ManifestError" in err and "Traceback" not in err


def test_plots_mark_undefined_figures_and_the_operating_point(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    import numpy as np
    from PIL import Image

    from bonexray.plots import plot_by_body_part, plot_roc

    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.6, 0.7, 0.9, 0.3, 0.4])
    with_point = plot_roc(tmp_path / "a.png", {"overall": (labels, scores)},
                          {"overall": 0.78}, threshold=0.5)
    without = plot_roc(tmp_path / "b.png", {"overall": (labels, scores)}, {"overall": 0.78})
    a = np.asarray(Image.open(with_point).convert("RGB"), dtype=np.int32)
    b = np.asarray(Image.open(without).convert("RGB"), dtype=np.int32)
    assert a.shape == b.shape and np.abs(a - b).sum() > 0  # the marker (and its legend entry)
    # A body part with one class has no AUROC: its bar is not drawn as a zero.
    by_part = {"hand": {"n": 4, "auroc": 0.75, "auroc_ci": (0.5, 1.0)},
               "hip": {"n": 3, "auroc": None, "auroc_ci": (None, None)}}
    import matplotlib.pyplot as plt

    texts: list[str] = []
    original = plt.Axes.text

    def spy(self, x, y, s, *args, **kwargs):  # type: ignore[no-untyped-def]
        texts.append(s)
        return original(self, x, y, s, *args, **kwargs)

    plt.Axes.text = spy  # type: ignore[method-assign]
    try:
        plot_by_body_part(tmp_path / "c.png", by_part, metrics=("auroc",))
    finally:
        plt.Axes.text = original  # type: ignore[method-assign]
    assert texts == ["n/a"]
