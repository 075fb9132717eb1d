"""The pipeline: batching across studies, per-view failures, aggregation, decode overlap."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bonexray.metrics import aggregate
from bonexray.pipeline.batching import PipelineOptions, classify_studies
from bonexray.pipeline.records import DONE, EMPTY, FAILED, StudyTask

SIZE = 32


def mean_prob(pixels: np.ndarray) -> np.ndarray:
    """A deterministic stand-in model: probability = mean brightness."""
    return (pixels.reshape(len(pixels), -1).mean(axis=1) / 255.0).astype(np.float32)


def write_png(path: Path, value: int, shape: tuple[int, int] = (40, 50)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode="L").save(path)
    return str(path)


@pytest.fixture
def tasks(tmp_path: Path) -> list[StudyTask]:
    rng = np.random.default_rng(0)
    out = []
    for s in range(7):
        views = []
        for v in range(int(rng.integers(1, 5))):
            views.append(write_png(tmp_path / f"s{s}" / f"v{v}.png", int(rng.integers(0, 256))))
        out.append(StudyTask(id=s + 1, key=str(tmp_path / f"s{s}"), views=tuple(views)))
    return out


def run(tasks: list[StudyTask], **opts: object):
    return classify_studies(tasks, predict=mean_prob, input_size=SIZE, resize="stretch",
                            threshold=0.5, options=PipelineOptions(**opts))  # type: ignore[arg-type]


@pytest.mark.parametrize("batch_size", [1, 3, 16, 64])
def test_results_do_not_depend_on_batch_size_or_chunking(tasks, batch_size):
    reference, _ = run(tasks, batch_size=5)
    whole, stats = run(tasks, batch_size=batch_size, decode_threads=2, prefetch_views=4)
    assert whole == reference
    n_views = sum(len(t.views) for t in tasks)
    assert sum(s.n_views for s in stats) == n_views
    assert all(s.n_views <= batch_size for s in stats)
    # Batches are full except the last: views of different studies share a batch.
    assert [s.n_views for s in stats[:-1]] == [batch_size] * (len(stats) - 1)
    pieces = []
    for part in (tasks[:2], tasks[2:3], tasks[3:]):
        pieces.extend(run(part, batch_size=batch_size)[0])
    assert pieces == reference


def test_study_score_is_mean_of_views_and_threshold_decides(tmp_path):
    views = (write_png(tmp_path / "a.png", 255), write_png(tmp_path / "b.png", 0),
             write_png(tmp_path / "c.png", 204))
    task = StudyTask(id=1, key=str(tmp_path), views=views)
    (result,), _ = run([task])
    assert result.status == DONE
    assert result.score == pytest.approx((1.0 + 0.0 + 0.8) / 3, abs=1e-6)
    assert result.prediction == "abnormal"
    (by_max,), _ = classify_studies([task], predict=mean_prob, input_size=SIZE,
                                    resize="stretch", threshold=0.99, aggregation="max")
    assert by_max.score == pytest.approx(1.0) and by_max.prediction == "abnormal"
    assert aggregate([0.2, 0.4], "mean") == pytest.approx(0.3)
    with pytest.raises(ValueError, match="choose one of mean, max"):
        aggregate([0.2], "median")


def test_bad_view_fails_alone_and_study_goes_on(tmp_path):
    good = write_png(tmp_path / "s1" / "good.png", 100)
    empty = tmp_path / "s1" / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "s1" / "text.png"
    text.write_text("not an image")
    missing = str(tmp_path / "s1" / "gone.png")
    only_bad = tmp_path / "s2" / "bad.jpg"
    only_bad.parent.mkdir()
    only_bad.write_bytes(b"\xff\xd8\xff garbage")
    tasks = [
        StudyTask(1, str(tmp_path / "s1"), (good, str(empty), str(text), missing)),
        StudyTask(2, str(tmp_path / "s2"), (str(only_bad),)),
        StudyTask(3, str(tmp_path / "s3"), ()),
    ]
    (s1, s2, s3), _ = run(tasks, batch_size=2)
    assert s1.status == DONE and s1.score == pytest.approx(100 / 255, abs=1e-6)
    errors = {Path(v.source).name: v.error for v in s1.views}
    assert errors["good.png"] is None
    assert "empty" in errors["empty.png"]
    assert "not a decodable image" in errors["text.png"]
    assert "not found" in errors["gone.png"]
    assert all("\n" not in (e or "") for e in errors.values())
    assert s2.status == FAILED and s2.score is None and "no view could be scored" in s2.error
    assert s2.views[0].error
    assert s3.status == EMPTY and s3.views == ()


def test_decoding_runs_ahead_of_inference(tasks, monkeypatch):
    """Instrumented, not timed: while the model runs batch k, views of batch k+1 decode."""
    import bonexray.pipeline.batching as pipeline

    in_predict = threading.Event()
    decoded_during_predict = []
    original = pipeline.load_view

    def tracking_load_view(*args, **kwargs):
        pixels = original(*args, **kwargs)
        decoded_during_predict.append(in_predict.is_set())
        return pixels

    def slow_predict(pixels):
        in_predict.set()
        try:
            threading.Event().wait(0.05)  # give the decode threads a chance to run
            return mean_prob(pixels)
        finally:
            in_predict.clear()

    monkeypatch.setattr(pipeline, "load_view", tracking_load_view)
    classify_studies(tasks, predict=slow_predict, input_size=SIZE, resize="stretch",
                     threshold=0.5, options=PipelineOptions(batch_size=2, prefetch_views=8))
    assert any(decoded_during_predict)


def test_model_output_of_wrong_shape_is_an_error(tasks):
    with pytest.raises(RuntimeError, match="model returned"):
        classify_studies(tasks, predict=lambda p: np.zeros(1, np.float32), input_size=SIZE,
                         resize="stretch", threshold=0.5, options=PipelineOptions(batch_size=4))


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_studies_are_handed_over_as_soon_as_settled(tmp_path, tasks, batch_size):
    bad = tmp_path / "bad" / "v.png"
    bad.parent.mkdir()
    bad.write_bytes(b"")
    tasks = [StudyTask(100, str(tmp_path / "e"), ()), *tasks[:3],
             StudyTask(101, str(bad.parent), (str(bad),)), StudyTask(102, "x", ()), *tasks[3:]]
    handed: list[tuple[int, list[int]]] = []
    calls = {"n": 0}

    def counting_predict(pixels):
        calls["n"] += 1
        return mean_prob(pixels)

    handed_results: list[tuple[int, list]] = []

    def on_ready(results):
        handed.append((calls["n"], [r.study_id for r in results]))
        handed_results.append((calls["n"], list(results)))

    results, stats = classify_studies(tasks, predict=counting_predict, input_size=SIZE,
                                      resize="stretch", threshold=0.5, on_ready=on_ready,
                                      options=PipelineOptions(batch_size=batch_size))
    # Every study exactly once, in order, complete: what was handed over is what a run
    # without hand-over returns (every view has its probability or its error).
    assert [i for _, ids in handed for i in ids] == [t.id for t in tasks]
    reference, _ = run(tasks, batch_size=batch_size)
    assert [r for _, part in handed_results for r in part] == reference == results
    assert all((v.prob is None) != (v.error is None)
               for _, part in handed_results for r in part for v in r.views)
    # A study is handed over once its last view's batch has run, not at the end of the chunk.
    ends, flat = [], 0
    for t in tasks:
        flat += len(t.views)
        ends.append(flat)
    for calls_before, ids in handed:
        for sid in ids:
            end = ends[[t.id for t in tasks].index(sid)]
            assert calls_before <= -(-end // batch_size) or end == 0
    if len(stats) > 1:
        assert len(handed) > 1
