"""Class activation heatmaps of a job's views: run the job's model (with its `cam` output)
on the views and write each as an overlay PNG (drawn by bonexray.plots)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from bonexray.errors import BonexrayError
from bonexray.imaging import ImageError, decode_gray, load_view
from bonexray.modelmeta import INPUT_NAME, OUTPUT_CAM, OUTPUT_PROB
from bonexray.pipeline.inference import Classifier
from bonexray.plots import overlay_cam, score_caption
from bonexray.settings import get_settings

log = logging.getLogger(__name__)


class HeatmapError(BonexrayError, ValueError):
    """The job's model cannot give heatmaps (no `cam` output) or its file is unusable."""


def heatmap_name(view_path: str, root: str) -> str:
    """Where a view's overlay goes under the output folder: its path under the job root,
    as a PNG (a view outside the root keeps its path without the leading slash)."""
    rel = os.path.relpath(view_path, root)
    if rel.startswith(".."):
        rel = view_path.lstrip("/\\")
    return str(Path(rel).with_suffix("")) + "_cam.png"


def write_heatmaps(*, model_path: str, expected_sha256: str | None, views: Sequence[str],
                   root: str, out_dir: str | Path, batch_size: int = 8) -> dict[str, Any]:
    """Run the model on `views` and write an overlay PNG of its `cam` output for each one
    under `out_dir` (paths mirror the job's tree), at the view's own resolution, with its
    score written on it (and in the PNG's text chunks). Views that cannot be decoded are
    listed, not fatal. Returns {"written": [paths], "failed": {view: error}}."""
    classifier = Classifier(model_path, settings=get_settings(),
                            expected_sha256=expected_sha256)
    outputs = [o.name for o in classifier.session.get_outputs()]
    if OUTPUT_CAM not in outputs:
        raise HeatmapError(f"model {model_path} has no {OUTPUT_CAM!r} output (outputs: "
                           f"{', '.join(outputs)}); export it with a CAM to get heatmaps")
    size, rule = classifier.info.input_size, classifier.info.resize
    out = Path(out_dir)
    written: list[str] = []
    failed: dict[str, str] = {}
    threshold = classifier.info.threshold
    for start in range(0, len(views), batch_size):
        batch: list[tuple[str, np.ndarray]] = []
        inputs: list[np.ndarray] = []
        for view in views[start:start + batch_size]:
            try:
                # The model input decoded as the worker decodes it (so the score written on
                # the image is the worker's), the view itself at full resolution for display.
                inputs.append(load_view(view, size, rule))
                batch.append((view, decode_gray(view)))
            except (ImageError, OSError) as exc:
                failed[view] = str(exc)
                del inputs[len(batch):]
        if not batch:
            continue
        pixels = np.stack(inputs)[:, None, :, :]
        probs, cams = classifier.session.run([OUTPUT_PROB, OUTPUT_CAM], {INPUT_NAME: pixels})
        cams = np.asarray(cams, dtype=np.float32)
        if cams.ndim == 4 and cams.shape[1] == 1:
            cams = cams[:, 0]
        for (view, gray), cam, prob in zip(batch, cams, probs, strict=True):
            target = out / heatmap_name(view, root)
            target.parent.mkdir(parents=True, exist_ok=True)
            info = PngInfo()
            info.add_text("bonexray_score", f"{float(prob):.6f}")
            info.add_text("bonexray_caption", score_caption(float(prob), threshold))
            info.add_text("bonexray_cam_scale", "sigmoid(cam): 0 blue, 0.5 cyan-yellow, 1 red")
            Image.fromarray(overlay_cam(gray, cam, input_size=size, resize=rule,
                                        score=float(prob), threshold=threshold)
                            ).save(target, format="PNG", pnginfo=info)
            written.append(str(target))
    log.info("wrote %d heatmaps to %s (%d views failed)", len(written), out, len(failed))
    return {"written": written, "failed": failed}
