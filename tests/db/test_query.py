"""Reads: models by reference, jobs, progress and results, in their exact shapes."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from bonexray.db import query, store
from bonexray.db.tables import Job, Model
from bonexray.pipeline.records import StudyResult, ViewResult
from bonexray.studies import Study as FoundStudy

PROGRESS_KEYS = {"job", "studies", "queued", "done", "failed", "empty", "views",
                 "views_scored", "views_failed", "finished", "created_at", "finished_at",
                 "images_per_s", "state", "in_flight", "partial", "last_progress"}
RESULT_KEYS = {"study", "body_part", "label", "score", "prediction", "status", "partial",
               "error", "views"}


def _scored_job(session: Session, model: Model) -> Job:
    """Five studies: two scored (one view failed), one failed, one queued, one empty.

    Paths mix case and punctuation so that the order is checked as bytes, not by locale.
    """
    specs = [("/a/XR_HAND/p1/s_b", "hand", 1, 2), ("/a/XR_HAND/p1/S_a", "hand", 0, 2),
             ("/a/XR_WRIST/p2/s-1", "wrist", None, 1), ("/a/XR_WRIST/p3/s1", "wrist", 1, 3),
             ("/a/XR_ELBOW/p4/s1", "elbow", None, 0)]
    studies = [FoundStudy(key=p, views=tuple(f"{p}/v{j}.png" for j in (2, 1, 3)[:n]),
                          body_part=part, label=label) for p, part, label, n in specs]
    job = store.create_job(session=session, root="/a", model_id=model.id, studies=studies,
                           mode="celery", options={})
    ids = dict((path, i) for i, path in store.queued_studies(session=session, job_id=job.id))
    results = [
        StudyResult(ids["/a/XR_HAND/p1/s_b"], "/a/XR_HAND/p1/s_b", "done", 0.8, "abnormal",
                    (ViewResult("/a/XR_HAND/p1/s_b/v2.png", 0.8),
                     ViewResult("/a/XR_HAND/p1/s_b/v1.png", None, "truncated file")),
                    partial=True),
        StudyResult(ids["/a/XR_HAND/p1/S_a"], "/a/XR_HAND/p1/S_a", "done", 0.1, "normal",
                    (ViewResult("/a/XR_HAND/p1/S_a/v1.png", 0.1),
                     ViewResult("/a/XR_HAND/p1/S_a/v2.png", 0.1))),
        StudyResult(ids["/a/XR_WRIST/p2/s-1"], "/a/XR_WRIST/p2/s-1", "failed", None, None,
                    (ViewResult("/a/XR_WRIST/p2/s-1/v2.png", None, "cannot decode"),),
                    error="no view could be scored"),
    ]
    store.save_results(session=session, job_id=job.id, results=results, worker="w1")
    return job


def test_get_model_by_name_id_and_sha(session: Session) -> None:
    a = store.register_model(session=session, path="/m/net.onnx", sha256="ab12" * 16,
                             meta={})
    b = store.register_model(session=session, path="/m/other.onnx",
                             sha256="ab12cd34" + "0" * 56, meta={})
    assert query.get_model(session=session, ref="net") is a
    assert query.get_model(session=session, ref=str(b.id)) is b
    assert query.get_model(session=session, ref="ab12" * 16) is a
    assert query.get_model(session=session, ref="AB12AB12") is a
    assert query.get_model(session=session, ref="ab12cd34") is b
    assert query.get_model(session=session, ref="ab12") is None  # prefix under 8
    assert query.get_model(session=session, ref="ab12" * 16 + "f") is None
    assert query.get_model(session=session, ref="nothing") is None
    assert query.get_model(session=session, ref="99999999999") is None


def test_get_model_ambiguous_prefix_is_none(session: Session) -> None:
    store.register_model(session=session, path="/m/a.onnx", sha256="12345678" + "a" * 56,
                         meta={})
    store.register_model(session=session, path="/m/b.onnx", sha256="12345678" + "b" * 56,
                         meta={})
    assert query.get_model(session=session, ref="12345678") is None
    assert query.get_model(session=session, ref="12345678a").name == "a"  # type: ignore[union-attr]


def test_get_job_latest_job_and_list_jobs(session: Session, model: Model) -> None:
    assert query.latest_job(session=session) is None
    assert query.list_jobs(session=session) == []
    first = _scored_job(session, model)
    second = store.create_job(session=session, root="/b", model_id=model.id, studies=[],
                              mode="embedded", options={})
    assert query.get_job(session=session, job_id=first.id) is first
    assert query.get_job(session=session, job_id=10**6) is None
    assert query.latest_job(session=session) is second
    jobs = query.list_jobs(session=session)
    assert [j["job"] for j in jobs] == [second.id, first.id]
    assert jobs[1] == {
        "job": first.id, "root": "/a", "model_id": model.id, "model": model.name,
        "mode": "celery", "created_at": first.created_at.isoformat(), "finished_at": None,
        "studies": 5, "views": 8, "queued": 1, "done": 2, "failed": 1, "empty": 1,
        "finished": False,
    }
    assert (jobs[0]["studies"], jobs[0]["queued"], jobs[0]["finished"]) == (0, 0, True)
    assert len(query.list_jobs(session=session, limit=1)) == 1


def test_job_progress(session: Session, model: Model) -> None:
    job = _scored_job(session, model)
    progress = query.job_progress(session=session, job_id=job.id)
    assert set(progress) == PROGRESS_KEYS
    assert {k: progress[k] for k in PROGRESS_KEYS - {"images_per_s", "last_progress"}} == {
        "job": job.id, "state": "running", "studies": 5, "queued": 1, "in_flight": 0,
        "done": 2, "partial": 1, "failed": 1, "empty": 1, "views": 8, "views_scored": 3,
        "views_failed": 2, "finished": False, "created_at": job.created_at.isoformat(),
        "finished_at": None,
    }
    assert progress["images_per_s"] is None or progress["images_per_s"] > 0

    ((last_id, last_path),) = store.queued_studies(session=session, job_id=job.id)
    store.mark_failed(session=session, study_ids=[last_id], error="gave up", worker="w2")
    progress = query.job_progress(session=session, job_id=job.id)
    assert (progress["queued"], progress["failed"], progress["finished"]) == (0, 2, True)
    assert progress["finished_at"] is not None
    store.finish_job_if_done(session=session, job_id=job.id)
    assert query.job_progress(session=session, job_id=job.id)["finished_at"] == (
        progress["finished_at"])


def test_job_progress_of_a_new_job(session: Session, model: Model) -> None:
    job = store.create_job(session=session, root="/a", model_id=model.id,
                           studies=[FoundStudy(key="/a/s", views=("/a/s/1.png",))],
                           mode="embedded", options={})
    progress = query.job_progress(session=session, job_id=job.id)
    assert (progress["queued"], progress["views"], progress["views_scored"],
            progress["images_per_s"], progress["finished"]) == (1, 1, 0, None, False)
    with pytest.raises(query.JobNotFoundError, match="12345"):
        query.job_progress(session=session, job_id=12345)


def test_job_results_shape_and_order(session: Session, model: Model) -> None:
    job = _scored_job(session, model)
    results = query.job_results(session=session, job_id=job.id)
    assert all(set(r) == RESULT_KEYS for r in results)
    assert [r["study"] for r in results] == sorted(r["study"] for r in results)
    assert [r["study"] for r in results][:2] == ["/a/XR_ELBOW/p4/s1", "/a/XR_HAND/p1/S_a"]
    by_path = {r["study"]: r for r in results}
    assert by_path["/a/XR_HAND/p1/s_b"] == {
        "study": "/a/XR_HAND/p1/s_b", "body_part": "hand", "label": 1, "score": 0.8,
        "prediction": "abnormal", "status": "done", "partial": True, "error": None,
        "views": [{"source": "/a/XR_HAND/p1/s_b/v1.png", "prob": None,
                   "error": "truncated file"},
                  {"source": "/a/XR_HAND/p1/s_b/v2.png", "prob": 0.8, "error": None}],
    }
    assert by_path["/a/XR_WRIST/p3/s1"] == {
        "study": "/a/XR_WRIST/p3/s1", "body_part": "wrist", "label": 1, "score": None,
        "prediction": None, "status": "queued", "partial": False, "error": None,
        "views": [{"source": f"/a/XR_WRIST/p3/s1/v{j}.png", "prob": None, "error": None}
                  for j in (1, 2, 3)],
    }
    assert by_path["/a/XR_ELBOW/p4/s1"]["status"] == "empty"
    assert by_path["/a/XR_WRIST/p2/s-1"]["error"] == "no view could be scored"


def test_job_results_filters_and_limit(session: Session, model: Model) -> None:
    job = _scored_job(session, model)

    def paths(**filters: object) -> list[str]:
        return [r["study"] for r in query.job_results(session=session, job_id=job.id,
                                                      **filters)]  # type: ignore[arg-type]

    assert paths(body_part="HAND") == ["/a/XR_HAND/p1/S_a", "/a/XR_HAND/p1/s_b"]
    assert paths(prediction="abnormal") == ["/a/XR_HAND/p1/s_b"]
    assert paths(status="failed") == ["/a/XR_WRIST/p2/s-1"]
    assert paths(body_part="wrist", status="queued") == ["/a/XR_WRIST/p3/s1"]
    limited = query.job_results(session=session, job_id=job.id, limit=2)
    assert [r["study"] for r in limited] == ["/a/XR_ELBOW/p4/s1", "/a/XR_HAND/p1/S_a"]
    assert [len(r["views"]) for r in limited] == [0, 2]
    assert paths(body_part="knee") == []
    assert query.job_results(session=session, job_id=10**6) == []
    with pytest.raises(ValueError, match="normal, abnormal"):
        query.job_results(session=session, job_id=job.id, prediction="positive")
    with pytest.raises(ValueError, match="queued"):
        query.job_results(session=session, job_id=job.id, status="running")
