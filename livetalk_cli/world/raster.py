"""Soft-edged 2-D shapes composited over a batch of frames (numpy, vectorised over frames).

Coordinates are canonical units: the canvas spans 96 units along its shorter side, centred at 0,
x to the right, y down. A shape's coverage is clip(0.5 - d / px, 0, 1), where d is a first-order
signed distance to its outline (g / |grad g| for an implicit g) and px is the size of one pixel in
canonical units: a one-pixel anti-aliasing ramp. Shapes thinner than a pixel fade with their
thickness, so a mouth of zero height leaves no trace.

Shape names below use the suffixes _T (per frame), _Thw (frames x box rows x box columns).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Color = tuple[float, float, float]


@dataclass
class Box:
    """A rectangle of the canvas and the local coordinates of its pixels for each frame."""

    rows: slice
    cols: slice
    x_Thw: np.ndarray  # (T, 1, w): x relative to the shape's centre
    y_Thw: np.ndarray  # (T, h, 1): y relative to the shape's centre


class Canvas:
    """A batch of frames (T, H, W, 3) float32 on 0..255, composited back to front."""

    def __init__(self, frames: int, height: int, width: int) -> None:
        self.scale = min(height, width) / 96.0  # pixels per canonical unit
        self.px = 1.0 / self.scale  # canonical units per pixel
        self.height, self.width = height, width
        self.xs = ((np.arange(width) + 0.5 - width / 2) * self.px).astype(np.float32)
        self.ys = ((np.arange(height) + 0.5 - height / 2) * self.px).astype(np.float32)
        self.img = np.empty((frames, height, width, 3), np.float32)

    def fill(self, background_HW3: np.ndarray) -> None:
        self.img[:] = background_HW3[None]

    def box(self, cx_T: np.ndarray, cy_T: np.ndarray, rx: float, ry: float) -> Box | None:
        """Pixels within (rx, ry) units (+1 pixel) of the centres over all frames; None if off-canvas."""
        c0 = int(np.floor((float(cx_T.min()) - rx) * self.scale + self.width / 2)) - 1
        c1 = int(np.ceil((float(cx_T.max()) + rx) * self.scale + self.width / 2)) + 1
        r0 = int(np.floor((float(cy_T.min()) - ry) * self.scale + self.height / 2)) - 1
        r1 = int(np.ceil((float(cy_T.max()) + ry) * self.scale + self.height / 2)) + 1
        c0, c1 = max(c0, 0), min(c1, self.width)
        r0, r1 = max(r0, 0), min(r1, self.height)
        if c0 >= c1 or r0 >= r1:
            return None
        x_Thw = self.xs[None, None, c0:c1] - cx_T.astype(np.float32)[:, None, None]
        y_Thw = self.ys[None, r0:r1, None] - cy_T.astype(np.float32)[:, None, None]
        return Box(slice(r0, r1), slice(c0, c1), x_Thw, y_Thw)

    def over(self, box: Box, alpha_Thw: np.ndarray, color: Color | np.ndarray) -> None:
        """Composite `color` with coverage `alpha` into the box: img += alpha * (color - img)."""
        region = self.img[:, box.rows, box.cols]
        col = np.asarray(color, np.float32).reshape(1, 1, 1, 3)
        region += alpha_Thw[..., None] * (col - region)


def coverage(d: np.ndarray, px: float) -> np.ndarray:
    """Signed distance (negative inside) -> anti-aliased coverage in [0, 1]."""
    return np.clip(0.5 - d / px, 0.0, 1.0)


def ellipse(x: np.ndarray, y: np.ndarray, a: float | np.ndarray, b: float | np.ndarray, px: float) -> np.ndarray:
    """Coverage of the ellipse (x/a)^2 + (y/b)^2 <= 1; a, b scalars or broadcastable per frame."""
    a = np.maximum(a, 1e-3)
    b = np.maximum(b, 1e-3)
    u, v = x / a, y / b
    g = u * u + v * v - 1.0
    grad = 2.0 * np.sqrt((u / a) ** 2 + (v / b) ** 2) + 1e-6
    alpha = coverage(g / grad, px)
    thin = np.clip(2.0 * np.minimum(a, b) / px, 0.0, 1.0)  # sub-pixel shapes fade with thickness
    return alpha * thin


def superellipse(x: np.ndarray, y: np.ndarray, a: float, b: float, power_low: float, px: float) -> np.ndarray:
    """A head outline: an ellipse above y = 0 and a superellipse of exponent `power_low` below."""
    p = np.where(y > 0, np.float32(power_low), np.float32(2.0))
    ua, vb = np.abs(x) / a + 1e-6, np.abs(y) / b + 1e-6
    up, vp = ua**p, vb**p
    g = up + vp - 1.0
    grad = p * np.sqrt((up / ua / a) ** 2 + (vp / vb / b) ** 2) + 1e-6
    return coverage(g / grad, px)


def below(y: np.ndarray, y0: float | np.ndarray, px: float) -> np.ndarray:
    """Coverage of the half-plane y >= y0 (below the line, since y points down)."""
    return coverage(y0 - y, px)


def rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in a frame rotated by `angle` radians."""
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    return x * c + y * s, y * c - x * s


def background(
    height: int, width: int, c1: Color, c2: Color, pattern: str, period: float
) -> np.ndarray:
    """Static background (H, W, 3) float32: plain, vertical/horizontal gradient or soft stripes."""
    px = 96.0 / min(height, width)
    xs = (np.arange(width) + 0.5 - width / 2) * px
    ys = (np.arange(height) + 0.5 - height / 2) * px
    x, y = np.meshgrid(xs, ys)
    if pattern == "plain":
        t = np.zeros_like(x)
    elif pattern == "vertical":
        t = np.clip((y + 48.0) / 96.0, 0.0, 1.0)
    elif pattern == "horizontal":
        t = np.clip((x + 48.0) / 96.0, 0.0, 1.0)
    elif pattern == "stripes":
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (x + 0.6 * y) / period)
    else:
        raise ValueError(f"unknown background pattern {pattern!r}")
    c1a, c2a = np.asarray(c1, np.float32), np.asarray(c2, np.float32)
    return (c1a + t[..., None].astype(np.float32) * (c2a - c1a)).astype(np.float32)
