"""Synthetic radiograph studies with known labels, in MURA's layout (demos, tests, benchmarks)."""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from bonexray.errors import InvalidValueError

log = logging.getLogger(__name__)

BODY_PARTS = ("ELBOW", "FINGER", "FOREARM", "HAND", "HUMERUS", "SHOULDER", "WRIST")
SIGNS = ("fracture", "cortical_break", "hardware")
SPLITS = ("train", "valid")

# Views per study, 1 to 4, roughly as in MURA (most studies have two or three).
_VIEW_COUNTS = (1, 2, 3, 4)
_VIEW_WEIGHTS = (0.15, 0.4, 0.35, 0.1)
# Studies per patient: most patients have one, some two or three (study1, study2, ...).
_STUDIES_PER_PATIENT = (1, 2, 3)
_PATIENT_WEIGHTS = (0.7, 0.2, 0.1)
_PLAN_STREAM = 2**32 - 1  # keeps the plan's RNG apart from every study's RNG

# 5x7 bitmaps of the side markers ("L", "R") that radiographers put on films; they appear in
# normal and abnormal views alike, so that "a very bright patch" alone means nothing.
_MARKERS = {
    "L": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
    "R": ("11110", "10001", "10001", "11110", "10100", "10010", "10001"),
}


@dataclass(frozen=True)
class SynthSummary:
    """What write_synthetic_mura wrote."""

    root: str  # absolute path of the written tree
    studies: int
    views: int
    abnormal: int
    by_split: dict[str, int]  # studies per split


@dataclass(frozen=True)
class _Rod:
    """A tube seen in projection: bone (hollow: cortex and canal) or soft tissue (solid)."""

    x0: float  # start point, pixels
    y0: float
    angle: float  # direction, radians, image coordinates (x right, y down)
    length: float  # pixels; 0 makes a disk (carpal bones, humeral head)
    radius: float  # pixels
    flare: float = 0.0  # extra radius at both ends (epiphyses), as a fraction of radius
    canal: float = 0.0  # canal radius / outer radius; 0 = solid
    density: float = 1.0  # attenuation of the wall per radius of path
    marrow: float = 0.3  # attenuation of the canal, relative to the wall
    signable: bool = False  # a long bone that can carry a fracture, break or hardware


@dataclass(frozen=True)
class _Fracture:
    rod: int
    at: float  # along the rod, pixels from its start
    tilt: float  # radians off perpendicular
    half_width: float  # of the dark line, pixels
    shift: float  # sideways displacement of the far fragment, pixels
    jag: float  # amplitude of the line's zigzag, pixels
    jag_freq: float
    jag_phase: float


@dataclass(frozen=True)
class _Break:
    rod: int
    at: float
    half_length: float  # of the gap along the bone, pixels
    depth: float  # fraction of the radius cut from the surface inwards
    side: float  # +1 or -1: which cortex
    both: bool  # both cortices broken


@dataclass(frozen=True)
class _Metal:
    bars: tuple[tuple[float, float, float, float, float], ...]  # x0, y0, angle, length, half width
    level: float


@dataclass(frozen=True)
class _Look:
    background: float
    span: float
    gain: float
    haze: np.ndarray  # small grid of low-frequency exposure variation
    blur: float
    noise: float
    marker: tuple[str, int, int, int, float] | None  # letter, x, y, cell, level


def _unit(angle: float) -> tuple[float, float]:
    return math.cos(angle), math.sin(angle)


class _Frame:
    """Maps the limb frame (units of the short side, limb axis pointing down) to pixels."""

    def __init__(self, rng: np.random.Generator, height: int, width: int) -> None:
        self.base = min(height, width)
        self.zoom = float(rng.uniform(0.85, 1.15))
        self.theta = float(rng.uniform(-0.45, 0.45))
        if rng.random() < 0.15:
            self.theta += math.pi / 2  # some views come turned sideways
        if rng.random() < 0.5:
            self.theta += math.pi  # and upside down
        self.cx = width / 2 + float(rng.uniform(-0.08, 0.08)) * self.base
        self.cy = height / 2 + float(rng.uniform(-0.08, 0.08)) * self.base

    def rod(self, cx: float, cy: float, phi: float, length: float, radius: float,
            **kwargs: object) -> _Rod:
        """A rod centred at (cx, cy) in the limb frame, pointing phi radians off the axis."""
        c, s = math.cos(self.theta), math.sin(self.theta)
        k = self.base * self.zoom
        px = self.cx + k * (cx * c - cy * s)
        py = self.cy + k * (cx * s + cy * c)
        angle = self.theta + math.pi / 2 - phi
        ux, uy = _unit(angle)
        half = 0.5 * length * k
        return _Rod(px - half * ux, py - half * uy, angle, length * k, radius * k,
                    **kwargs)  # type: ignore[arg-type]


def _bone(frame: _Frame, cx: float, cy: float, phi: float, length: float, radius: float,
          rng: np.random.Generator, *, flare: float = 0.5, signable: bool = True) -> _Rod:
    return frame.rod(cx, cy, phi, length, radius, flare=flare,
                     canal=float(rng.uniform(0.5, 0.68)), density=float(rng.uniform(1.0, 1.3)),
                     marrow=float(rng.uniform(0.2, 0.35)), signable=signable)


def _disk(frame: _Frame, cx: float, cy: float, radius: float, rng: np.random.Generator) -> _Rod:
    return frame.rod(cx, cy, 0.0, 0.0, radius, canal=float(rng.uniform(0.3, 0.55)),
                     density=float(rng.uniform(0.55, 0.8)), marrow=0.5)


def _tissue(frame: _Frame, cx: float, cy: float, phi: float, length: float, radius: float,
            rng: np.random.Generator) -> _Rod:
    return frame.rod(cx, cy, phi, length, radius, density=float(rng.uniform(0.25, 0.45)))


def _chain(frame: _Frame, rng: np.random.Generator, x: float, y: float, phi: float,
           segments: list[tuple[float, float]], bend: float, gap: float) -> list[_Rod]:
    """Bones end to end (phalanges), each bent a little further than the last."""
    rods = []
    for length, radius in segments:
        dx, dy = math.sin(phi), math.cos(phi)
        rods.append(_bone(frame, x + dx * length / 2, y + dy * length / 2, phi, length, radius,
                          rng, flare=0.35))
        x, y = x + dx * (length + gap), y + dy * (length + gap)
        phi += bend
    return rods


def _layout(part: str, frame: _Frame, rng: np.random.Generator, lateral: bool) -> list[_Rod]:
    """Soft tissue first, then bones, of one body part in one view."""
    j = lambda scale=0.02: float(rng.uniform(-scale, scale))  # noqa: E731
    if part == "FOREARM":
        sep = 0.03 if lateral else 0.085
        return [
            _tissue(frame, 0, 0, 0, 1.4, 0.28 + j(), rng),
            _bone(frame, -sep + j(), 0, 0.03 + j(), 1.3, 0.055 + j(0.008), rng),
            _bone(frame, sep + j(), 0, -0.03 + j(), 1.3, 0.05 + j(0.008), rng),
        ]
    if part == "HUMERUS":
        return [
            _tissue(frame, 0, 0, 0, 1.4, 0.33 + j(), rng),
            _bone(frame, j(), 0.05, j(0.05), 1.0, 0.085 + j(0.01), rng, flare=0.6),
            _disk(frame, 0.03 + j(), -0.5, 0.16 + j(), rng),
        ]
    if part == "ELBOW":
        bend = float(rng.uniform(1.2, 1.9)) if lateral else j(0.15)
        dx, dy = math.sin(bend), math.cos(bend)
        px, py = -dy * 0.06, dx * 0.06  # perpendicular to the forearm
        jx, jy = 0.0, 0.1
        return [
            _tissue(frame, 0, -0.3, 0, 0.8, 0.3 + j(), rng),
            _tissue(frame, jx + dx * 0.4, jy + dy * 0.4, bend, 0.8, 0.26 + j(), rng),
            _bone(frame, j(), -0.35, j(0.05), 0.7, 0.08 + j(0.01), rng, flare=0.9),
            _bone(frame, jx + dx * 0.42 + px, jy + dy * 0.42 + py, bend, 0.75,
                  0.05 + j(0.008), rng),
            _bone(frame, jx + dx * 0.42 - px, jy + dy * 0.42 - py, bend, 0.75,
                  0.047 + j(0.008), rng),
        ]
    if part == "WRIST":
        rods = [
            _tissue(frame, 0, 0, 0, 1.4, 0.3 + j(), rng),
            _bone(frame, -0.07 + j(), -0.35, j(0.05), 0.6, 0.06 + j(0.008), rng, flare=0.8),
            _bone(frame, 0.08 + j(), -0.37, j(0.05), 0.55, 0.045 + j(0.008), rng),
        ]
        for row, y in enumerate((0.05, 0.15)):
            for i in range(4 - row):
                x = -0.12 + i * 0.08 + row * 0.04
                rods.append(_disk(frame, x + j(0.01), y + j(0.01), 0.045 + j(0.008), rng))
        for i in range(4):
            x = -0.12 + i * 0.08
            rods.append(_bone(frame, x + j(0.01), 0.5, (i - 1.5) * 0.06, 0.5,
                              0.032 + j(0.005), rng, flare=0.4))
        return rods
    if part == "HAND":
        rods = [_tissue(frame, 0, 0.05, 0, 1.1, 0.38 + j(), rng)]
        for i in range(5):
            rods.append(_disk(frame, -0.12 + i * 0.06 + j(0.01), -0.42 + j(0.01),
                              0.035 + j(0.005), rng))
        for i in range(4):
            phi = (i - 1.5) * 0.09 + j(0.03)
            x = -0.15 + i * 0.1
            rods.append(_bone(frame, x, -0.12, phi, 0.4, 0.038 + j(0.005), rng, flare=0.35))
            tip_x, tip_y = x + math.sin(phi) * 0.23, -0.12 + math.cos(phi) * 0.23
            rods.extend(_chain(frame, rng, tip_x, tip_y, phi, [(0.24, 0.03)],
                               bend=0.0, gap=0.0))
        rods.append(_bone(frame, -0.3, -0.15, 0.75 + j(0.1), 0.3, 0.035, rng, flare=0.35))
        return rods
    if part == "FINGER":
        bend = float(rng.uniform(0.1, 0.35)) if lateral else j(0.06)
        return [
            _tissue(frame, 0, 0.05, bend, 1.1, 0.17 + j(), rng),
            _bone(frame, 0, -0.55, 0, 0.35, 0.08 + j(0.01), rng, flare=0.4, signable=False),
            *_chain(frame, rng, 0, -0.33, j(0.05), [(0.38, 0.07), (0.26, 0.06), (0.17, 0.05)],
                    bend=bend, gap=0.035),
        ]
    if part == "SHOULDER":
        return [
            _tissue(frame, 0, 0.1, 0, 1.2, 0.45 + j(), rng),
            frame.rod(-0.22 + j(), 0.0, 0.3 + j(0.1), 0.5, 0.13, canal=0.3, density=0.6,
                      marrow=0.6),
            _bone(frame, 0.1 + j(), 0.3, 0.15 + j(0.05), 0.8, 0.1 + j(0.01), rng),
            _disk(frame, 0.04 + j(), -0.1, 0.18 + j(), rng),
            _bone(frame, -0.05, -0.38 + j(), 1.45 + j(0.1), 0.9, 0.045 + j(0.006), rng),
        ]
    raise InvalidValueError(f"unknown body part {part!r}; choose one of {', '.join(BODY_PARTS)}")


def _point(rod: _Rod, at: float, off: float = 0.0) -> tuple[float, float]:
    ux, uy = _unit(rod.angle)
    return rod.x0 + ux * at - uy * off, rod.y0 + uy * at + ux * off


def _place(rng: np.random.Generator, rods: list[_Rod], height: int, width: int,
           margin: float) -> tuple[int, float]:
    """A signable rod and a point along it that lies well inside the image."""
    candidates = [i for i, r in enumerate(rods) if r.signable]
    for _ in range(40):
        i = candidates[int(rng.integers(len(candidates)))]
        at = float(rng.uniform(0.2, 0.8)) * rods[i].length
        x, y = _point(rods[i], at)
        if margin <= x <= width - margin and margin <= y <= height - margin:
            return i, at
    # Nothing drawn landed inside: take the point of any signable rod nearest the centre.
    best = None
    for i in candidates:
        for at in np.linspace(0.1, 0.9, 17) * rods[i].length:
            x, y = _point(rods[i], float(at))
            d = (x - width / 2) ** 2 + (y - height / 2) ** 2
            if best is None or d < best[0]:
                best = (d, i, float(at))
    assert best is not None
    return best[1], best[2]


def _plan_sign(rng: np.random.Generator, sign: str, rods: list[_Rod], height: int,
               width: int, scale: float) -> _Fracture | _Break | _Metal:
    i, at = _place(rng, rods, height, width, margin=0.15 * min(height, width))
    rod = rods[i]
    if sign == "fracture":
        return _Fracture(
            rod=i, at=at, tilt=float(rng.uniform(-0.5, 0.5)),
            half_width=float(rng.uniform(0.014, 0.02)) * scale,
            shift=float(rng.choice((-1, 1))) * float(rng.uniform(0.5, 0.9)) * rod.radius,
            jag=float(rng.uniform(0.006, 0.012)) * scale,
            jag_freq=float(rng.uniform(0.5, 1.2)) * 6.0 / max(rod.radius, 1.0),
            jag_phase=float(rng.uniform(0, 2 * math.pi)),
        )
    if sign == "cortical_break":
        return _Break(
            rod=i, at=at, half_length=float(rng.uniform(0.06, 0.09)) * scale,
            depth=float(rng.uniform(0.6, 0.85)), side=float(rng.choice((-1, 1))),
            both=bool(rng.random() < 0.5),
        )
    ux, uy = _unit(rod.angle)
    bars = []
    kind = rng.random()
    if kind < 0.6:  # plate on one side of the bone, screws through it
        plate_len = float(rng.uniform(0.28, 0.42)) * scale
        side = float(rng.choice((-1, 1)))
        off = side * rod.radius * 1.05
        x, y = _point(rod, at - plate_len / 2, off)
        bars.append((x, y, rod.angle, plate_len, float(rng.uniform(0.018, 0.025)) * scale))
        n = int(rng.integers(3, 6))
        for k in range(n):
            along = at - plate_len / 2 + plate_len * (k + 0.5) / n
            sx, sy = _point(rod, along, off)
            bars.append((sx, sy, rod.angle - side * math.pi / 2, 2.2 * rod.radius,
                         float(rng.uniform(0.01, 0.014)) * scale))
    elif kind < 0.8:  # intramedullary nail
        nail_len = float(rng.uniform(0.35, 0.5)) * scale
        x, y = _point(rod, at - nail_len / 2)
        bars.append((x, y, rod.angle, nail_len, max(0.35 * rod.radius, 0.01 * scale)))
    else:  # two or three screws across the bone
        for _ in range(int(rng.integers(2, 4))):
            along = at + float(rng.uniform(-0.08, 0.08)) * scale
            tilt = rod.angle + math.pi / 2 + float(rng.uniform(-0.5, 0.5))
            tx, ty = _unit(tilt)
            cx, cy = _point(rod, along)
            half = 1.4 * rod.radius
            bars.append((cx - tx * half, cy - ty * half, tilt, 2 * half,
                         float(rng.uniform(0.012, 0.016)) * scale))
    del ux, uy
    return _Metal(bars=tuple(bars), level=float(rng.uniform(0.93, 1.0)))


def _window(rod: _Rod, pad: float, height: int, width: int) -> tuple[int, int, int, int] | None:
    x1, y1 = _point(rod, rod.length)
    reach = rod.radius * (1 + rod.flare) + pad + 2
    bx0 = max(0, math.floor(min(rod.x0, x1) - reach))
    bx1 = min(width, math.ceil(max(rod.x0, x1) + reach) + 1)
    by0 = max(0, math.floor(min(rod.y0, y1) - reach))
    by1 = min(height, math.ceil(max(rod.y0, y1) + reach) + 1)
    if bx0 >= bx1 or by0 >= by1:
        return None
    return by0, by1, bx0, bx1


def _draw_rod(acc: np.ndarray, rod: _Rod, sign: _Fracture | _Break | None) -> None:
    """Add the rod's projected attenuation to acc, cut by a fracture or cortical break."""
    height, width = acc.shape
    pad = abs(sign.shift) if isinstance(sign, _Fracture) else 0.0
    box = _window(rod, pad, height, width)
    if box is None:
        return
    by0, by1, bx0, bx1 = box
    c, s = _unit(rod.angle)
    dx = np.arange(bx0, bx1, dtype=np.float32) - np.float32(rod.x0)
    dy = np.arange(by0, by1, dtype=np.float32)[:, None] - np.float32(rod.y0)
    u = dx * np.float32(c) + dy * np.float32(s)  # along the rod
    v = dy * np.float32(c) - dx * np.float32(s)  # across it
    cut = None
    if isinstance(sign, _Fracture):
        ct, st = math.cos(sign.tilt), math.sin(sign.tilt)
        w = (u - np.float32(sign.at)) * np.float32(ct) + v * np.float32(st)
        w += np.float32(sign.jag) * np.sign(np.sin(v * np.float32(sign.jag_freq)
                                                   + np.float32(sign.jag_phase)))
        far = w > 0
        v = np.where(far, v - np.float32(sign.shift), v)
        cut = np.exp(-np.square(w / np.float32(sign.half_width)))
    uc = np.clip(u, 0, rod.length)
    d2 = np.square(u - uc) + np.square(v)
    big_r: np.ndarray | np.float32 = np.float32(rod.radius)
    if rod.flare and rod.length > 0:
        ends = np.float32(0.12 * rod.length)
        prof = np.exp(-np.square(uc / ends)) + np.exp(-np.square((rod.length - uc) / ends))
        big_r = big_r * (1 + np.float32(rod.flare) * prof)
    outer = np.sqrt(np.maximum(np.square(big_r) - d2, 0))
    if rod.canal:
        small_r = big_r * np.float32(rod.canal)
        inner = np.sqrt(np.maximum(np.square(small_r) - d2, 0))
        att = outer - inner + np.float32(rod.marrow) * inner
    else:
        att = outer
    att *= np.float32(rod.density / rod.radius)
    if cut is not None:
        att *= 1 - np.float32(0.92) * cut
    if isinstance(sign, _Break):
        near = np.abs(u - np.float32(sign.at)) < sign.half_length
        depth = np.abs(v) > big_r * np.float32(1 - sign.depth)
        side = (v * np.float32(sign.side) > 0) | sign.both
        att = np.where(near & depth & side, att * np.float32(0.08), att)
    acc[by0:by1, bx0:bx1] += att


def _draw_bar(mask: np.ndarray, bar: tuple[float, float, float, float, float]) -> None:
    """Antialiased capsule of full opacity, kept as the maximum with what is there."""
    x0, y0, angle, length, half = bar
    rod = _Rod(x0, y0, angle, length, half)
    height, width = mask.shape
    box = _window(rod, 1.0, height, width)
    if box is None:
        return
    by0, by1, bx0, bx1 = box
    c, s = _unit(angle)
    dx = np.arange(bx0, bx1, dtype=np.float32) - np.float32(x0)
    dy = np.arange(by0, by1, dtype=np.float32)[:, None] - np.float32(y0)
    u = dx * np.float32(c) + dy * np.float32(s)
    v = dy * np.float32(c) - dx * np.float32(s)
    uc = np.clip(u, 0, length)
    dist = np.sqrt(np.square(u - uc) + np.square(v))
    cover = np.clip(np.float32(half + 0.5) - dist, 0, 1)
    np.maximum(mask[by0:by1, bx0:bx1], cover, out=mask[by0:by1, bx0:bx1])


def _plan_look(rng: np.random.Generator, height: int, width: int) -> _Look:
    base = min(height, width)
    marker = None
    if rng.random() < 0.5:
        letter = "L" if rng.random() < 0.5 else "R"
        cell = max(1, round(base * float(rng.uniform(0.008, 0.013))))
        mx = int(rng.integers(2, max(3, width // 5)))
        my = int(rng.integers(2, max(3, height // 5)))
        if rng.random() < 0.5:
            mx = width - mx - 5 * cell
        if rng.random() < 0.5:
            my = height - my - 7 * cell
        marker = (letter, mx, my, cell, float(rng.uniform(0.85, 1.0)))
    return _Look(
        background=float(rng.uniform(0, 55)),
        span=float(rng.uniform(150, 250)),
        gain=float(rng.uniform(0.7, 1.4)),
        haze=rng.uniform(-18, 18, size=(4, 4)).astype(np.float32),
        blur=float(rng.uniform(0.5, 1.1)) * base / 256,
        noise=float(rng.uniform(2.0, 6.0)),
        marker=marker,
    )


def render_view(rng: np.random.Generator, *, body_part: str, abnormal: bool,
                sign: str | None, size: int) -> np.ndarray:
    """One synthetic radiograph, uint8 [H, W], each side 0.75x to 1.25x `size`.

    An abnormal view carries `sign` (one of SIGNS; drawn at random when None). Every random
    draw about the anatomy comes before any draw about the sign, and pixel noise comes from
    its own stream, so the same RNG state renders the same view with and without the sign.
    """
    part = body_part.upper()
    if part not in BODY_PARTS:
        raise InvalidValueError(f"unknown body part {body_part!r}; choose one of "
                                f"{', '.join(BODY_PARTS)}")
    if sign is not None and sign not in SIGNS:
        raise InvalidValueError(f"unknown sign {sign!r}; choose one of {', '.join(SIGNS)}")
    if sign is not None and not abnormal:
        raise InvalidValueError(f"a normal view cannot carry the sign {sign!r}")
    if size < 16:
        raise InvalidValueError(f"image size {size} is too small; use at least 16 pixels")

    height = round(size * float(rng.uniform(0.75, 1.25)))
    width = round(size * float(rng.uniform(0.75, 1.25)))
    frame = _Frame(rng, height, width)
    lateral = bool(rng.random() < 0.5)
    rods = _layout(part, frame, rng, lateral)
    look = _plan_look(rng, height, width)
    noise_rng = np.random.default_rng(rng.integers(0, 2**63, size=2))

    lesion: _Fracture | _Break | _Metal | None = None
    if abnormal:
        chosen = sign if sign is not None else SIGNS[int(rng.integers(len(SIGNS)))]
        lesion = _plan_sign(rng, chosen, rods, height, width, frame.base * frame.zoom)

    acc = np.zeros((height, width), dtype=np.float32)
    for i, rod in enumerate(rods):
        cut = lesion if isinstance(lesion, _Fracture | _Break) and lesion.rod == i else None
        _draw_rod(acc, rod, cut)

    haze = Image.fromarray(look.haze, mode="F").resize((width, height), Image.Resampling.BICUBIC)
    img = look.background + np.asarray(haze) + look.span * (1 - np.exp(-look.gain * acc))
    if look.marker is not None:
        letter, mx, my, cell, level = look.marker
        glyph = np.array([[ch == "1" for ch in row] for row in _MARKERS[letter]])
        glyph = np.kron(glyph, np.ones((cell, cell), dtype=bool))
        region = img[my : my + glyph.shape[0], mx : mx + glyph.shape[1]]
        region[glyph[: region.shape[0], : region.shape[1]]] = 255 * level
    if isinstance(lesion, _Metal):
        mask = np.zeros((height, width), dtype=np.float32)
        for bar in lesion.bars:
            _draw_bar(mask, bar)
        img += mask * (255 * lesion.level - img).clip(0)

    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L")
    pil = pil.filter(ImageFilter.GaussianBlur(look.blur))
    noisy = np.asarray(pil, dtype=np.float32) + noise_rng.standard_normal(
        (height, width), dtype=np.float32) * np.float32(look.noise)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class _Planned:
    index: int
    part: str
    split: str
    patient: int
    study_number: int
    abnormal: bool


def _split_counts(n: int, fraction: float) -> int:
    """Studies of one body part that go to valid: both splits get some whenever n >= 2."""
    if fraction <= 0:
        return 0
    if fraction >= 1:
        return n
    k = round(n * fraction)
    return min(max(k, 1), n - 1) if n >= 2 else k


def _plan(studies: int, seed: int, valid_fraction: float,
          abnormal_fraction: float) -> list[_Planned]:
    rng = np.random.default_rng([seed, _PLAN_STREAM])
    parts = [BODY_PARTS[i % len(BODY_PARTS)] for i in range(studies)]
    split = ["train"] * studies
    for part in BODY_PARTS:
        mine = [i for i in range(studies) if parts[i] == part]
        for i in rng.permutation(mine)[: _split_counts(len(mine), valid_fraction)]:
            split[int(i)] = "valid"
    abnormal = [False] * studies
    for name in SPLITS:
        mine = [i for i in range(studies) if split[i] == name]
        k = round(len(mine) * abnormal_fraction)
        if len(mine) >= 2 and 0 < abnormal_fraction < 1:
            k = min(max(k, 1), len(mine) - 1)
        for i in rng.permutation(mine)[:k]:
            abnormal[int(i)] = True
    # Patients never cross splits or body parts; some have several studies.
    plan: list[_Planned] = []
    patient = 0
    for name in SPLITS:
        for part in BODY_PARTS:
            mine = [i for i in range(studies) if split[i] == name and parts[i] == part]
            pos = 0
            while pos < len(mine):
                patient += 1
                k = int(rng.choice(_STUDIES_PER_PATIENT, p=_PATIENT_WEIGHTS))
                for number, i in enumerate(mine[pos : pos + k], start=1):
                    plan.append(_Planned(i, part, name, patient, number, abnormal[i]))
                pos += k
    plan.sort(key=lambda p: p.index)
    return plan


def write_synthetic_mura(out: str | Path, *, studies: int, seed: int = 0,
                         valid_fraction: float = 0.2, image_size: int = 256,
                         abnormal_fraction: float = 0.4,
                         signs: tuple[str, ...] = SIGNS) -> SynthSummary:
    """Write `studies` synthetic studies in MURA-v1.1's layout, with its four CSVs, under `out`.

    Byte-identical for the same arguments: study i draws from numpy.random.default_rng(
    [seed, i]). `out` must be missing or an empty folder; nothing is overwritten.
    `signs`: the signs an abnormal study may carry (one drawn per study; default all).
    """
    if studies < 1:
        raise InvalidValueError(f"studies must be at least 1, got {studies}")
    if not 0 <= valid_fraction <= 1:
        raise InvalidValueError(f"valid_fraction must be within [0, 1], got {valid_fraction}")
    if not 0 <= abnormal_fraction <= 1:
        raise InvalidValueError(f"abnormal_fraction must be within [0, 1], got {abnormal_fraction}")
    if image_size < 16:
        raise InvalidValueError(f"image_size {image_size} is too small; use at least 16 pixels")
    unknown = [x for x in signs if x not in SIGNS] if signs else ["(none)"]
    if unknown:
        raise InvalidValueError(f"unknown signs {unknown}; choose from {', '.join(SIGNS)}")
    root = Path(out).expanduser().absolute()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise InvalidValueError(f"refusing to write into {root}: it exists and is not an "
                                "empty folder")
    root.mkdir(parents=True, exist_ok=True)

    image_rows: dict[str, list[str]] = {name: [] for name in SPLITS}
    study_rows: dict[str, list[tuple[str, int]]] = {name: [] for name in SPLITS}
    n_views = 0
    for planned in _plan(studies, seed, valid_fraction, abnormal_fraction):
        rng = np.random.default_rng([seed, planned.index])
        views = int(rng.choice(_VIEW_COUNTS, p=_VIEW_WEIGHTS))
        sign = signs[int(rng.integers(len(signs)))] if planned.abnormal else None
        outcome = "positive" if planned.abnormal else "negative"
        rel = (f"{planned.split}/XR_{planned.part}/patient{planned.patient:05d}/"
               f"study{planned.study_number}_{outcome}")
        folder = root / rel
        folder.mkdir(parents=True)
        for k in range(1, views + 1):
            pixels = render_view(rng, body_part=planned.part, abnormal=planned.abnormal,
                                 sign=sign, size=image_size)
            Image.fromarray(pixels, mode="L").save(folder / f"image{k}.png", format="PNG",
                                                   compress_level=1)
            image_rows[planned.split].append(f"{root.name}/{rel}/image{k}.png")
        study_rows[planned.split].append((f"{root.name}/{rel}/", int(planned.abnormal)))
        n_views += views
        log.debug("study %d: %s, %d views, sign %s", planned.index, rel, views, sign)

    for name in SPLITS:
        with (root / f"{name}_image_paths.csv").open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerows([row] for row in sorted(image_rows[name]))
        with (root / f"{name}_labeled_studies.csv").open("w", newline="",
                                                          encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerows(sorted(study_rows[name]))

    summary = SynthSummary(
        root=str(root),
        studies=studies,
        views=n_views,
        abnormal=sum(label for name in SPLITS for _, label in study_rows[name]),
        by_split={name: len(study_rows[name]) for name in SPLITS},
    )
    log.debug("wrote %d synthetic studies (%d views, %d abnormal) to %s",
             summary.studies, summary.views, summary.abnormal, summary.root)
    return summary
