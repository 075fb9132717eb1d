"""The throughput benchmark runs end to end (tiny sizes; its figures are not judged here).

It runs as a `bonexray bench` subprocess, as a user runs it: the benchmark talks to the
broker through an in-process Celery app, and a pytest process that later forks (the
trainer's DataLoader workers) must not inherit that app's connections.
"""

from __future__ import annotations

import json

import pytest

from tests.cli_helpers import bonexray
from tests.conftest import PG_ADMIN_URL

FIGURES = ("torch_eager_ips", "ort_ips", "ort_int8_ips", "decode_ips", "pipeline_ips",
           "pipeline_dicom_ips", "celery_ips", "control_plane_sps")


@pytest.mark.slow
def test_benchmark_measures_every_figure_in_one_run(redis_url, tmp_path):
    out = tmp_path / "bench.json"
    work = tmp_path / "work"
    work.mkdir()
    run = bonexray("bench", "--image-size", "32", "--batch-size", "4", "--images", "12",
                   "--control-studies", "40", "--repeats", "2", "--dicom-decode", "1",
                   "--pg-admin-url", PG_ADMIN_URL,
                   "--broker", redis_url, "--out", str(out), env={"TMPDIR": str(work)})
    result = json.loads(run.stdout.strip().splitlines()[-1])  # the last line is the JSON
    assert json.loads(out.read_text()) == result
    for name in FIGURES:
        assert isinstance(result[name], float) and result[name] > 0, name
    assert result["provider"] == "CPUExecutionProvider"
    assert result["images"] == 12 and result["batch"] == 4 and result["image_size"] == 32
    assert result["control_plane_studies"] == 40
    # Each interleaved figure is the median of its repeats, kept beside it.
    for name in ("torch_eager_ips", "ort_ips", "ort_int8_ips", "pipeline_ips",
                 "pipeline_dicom_ips", "celery_ips"):
        assert len(result["repeats"][name]) == 2
        low, high = min(result["repeats"][name]), max(result["repeats"][name])
        assert low - 0.01 <= result[name] <= high + 0.01
    ratios = result["ratios"]
    assert ratios["pipeline_over_ort"] == pytest.approx(
        result["pipeline_ips"] / result["ort_ips"], rel=0.01)
    assert ratios["pipeline_dicom_over_ort"] == pytest.approx(
        result["pipeline_dicom_ips"] / result["ort_ips"], rel=0.01)
    # 2000 x 2500 CR objects through load_view, in the two common lossless codecs.
    assert set(result["dicom_decode_ips"]) == {"jpeg_lossless", "jpeg2000"}
    assert all(v > 0 for v in result["dicom_decode_ips"].values())
    assert not list(work.glob("bonexray-bench-*"))  # its files are removed
