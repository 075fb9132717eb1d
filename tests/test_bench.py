"""The throughput benchmark runs end to end (tiny sizes; its figures are not judged here)."""

from __future__ import annotations

import json

import pytest

from bonexray.bench import BenchConfig, format_result, run_benchmark
from tests.conftest import PG_ADMIN_URL

FIGURES = ("torch_eager_ips", "ort_ips", "ort_int8_ips", "decode_ips", "pipeline_ips",
           "celery_ips", "control_plane_sps")


@pytest.mark.slow
def test_benchmark_measures_every_figure_in_one_run(redis_url, tmp_path):
    config = BenchConfig(image_size=32, batch=4, images=12, views_per_study=2,
                         source_side=96, control_studies=40, repeats=2,
                         database_url=PG_ADMIN_URL, broker_url=redis_url,
                         workdir=str(tmp_path))
    result = json.loads(format_result(run_benchmark(config)))
    for name in FIGURES:
        assert isinstance(result[name], float) and result[name] > 0, name
    assert result["provider"] == "CPUExecutionProvider"
    assert result["images"] == 12 and result["batch"] == 4 and result["image_size"] == 32
    assert result["control_plane_studies"] == 40
    # Each interleaved figure is the median of its repeats, kept beside it.
    for name in ("torch_eager_ips", "ort_ips", "ort_int8_ips", "pipeline_ips", "celery_ips"):
        assert len(result["repeats"][name]) == 2
        low, high = min(result["repeats"][name]), max(result["repeats"][name])
        assert low - 0.01 <= result[name] <= high + 0.01
    ratios = result["ratios"]
    assert ratios["pipeline_over_ort"] == pytest.approx(
        result["pipeline_ips"] / result["ort_ips"], rel=0.01)
    assert list(tmp_path.iterdir()) == []  # its files are removed
