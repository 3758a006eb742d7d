"""Cartoon identities, text-controllable attributes, and a vectorised anti-aliased rasteriser.

Geometry lives in a canonical 96-unit canvas centred at (0, 0), x to the right, y down; the
output size scales it (s = min(H, W) / 96 pixels per unit). Every shape is a soft signed-distance
mask with a one-pixel anti-aliasing ramp, composited back to front over a batch of frames and
restricted to the shape's bounding box over the batch.

The mouth interior has a fixed colour, `MOUTH_INTERIOR_RGB`, which no identity palette comes near
(in the `mouth_colour_distance2` metric, also for 50/50 blends of two palette colours), so its
visible area can be measured from pixels alone (`metrics.measure_mouth_open`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from livetalk_cli.world.raster import Canvas, background, below, ellipse, rotate, superellipse

if TYPE_CHECKING:
    import torch

RGB = tuple[float, float, float]
ArrayT = TypeVar("ArrayT", "np.ndarray", "torch.Tensor")

MOUTH_INTERIOR_RGB: RGB = (70.0, 12.0, 28.0)
HAIR_STYLES = ("short", "long", "bald", "fringe")
BACKGROUND_PATTERNS = ("plain", "vertical", "horizontal", "stripes")
_PUPIL: RGB = (22.0, 22.0, 30.0)
_EYE_WHITE: RGB = (242.0, 240.0, 236.0)
_OUTLINE: RGB = (45.0, 38.0, 40.0)
# Colour-distance scales of `mouth_colour_distance2`: luminance is tolerant, chroma is tight.
_SIGMA_L, _SIGMA_C = 40.0, 14.0
_MIN_D2_SINGLE, _MIN_D2_BLEND = 9.0, 4.0
_SKIN_SHADES = (0.82, 0.9, 0.95)  # nose shadow, ears and neck, eyelids
_LIP_LINE = 0.62  # the line between closed lips, as a fraction of the lip colour


def mouth_colour_distance2(rgb: ArrayT) -> ArrayT:
    """Squared distance (..., 3) -> (...) to the mouth-interior colour in (L, R-G, B-G) space.

    L = (R+G+B)/3 is scaled by 1/40 and both chroma axes by 1/14 (values on 0..255), so the
    measure tolerates brightness changes (blur into the lips, codec luma error) but not hue.
    A torch tensor stays a tensor (differentiable: the decoder stage's mouth loss uses it).
    """
    if isinstance(rgb, np.ndarray) or not hasattr(rgb, "dtype"):  # numpy or a colour tuple
        rgb = np.asarray(rgb, np.float32)
    ref = MOUTH_INTERIOR_RGB
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    dl = ((r + g + b) - (ref[0] + ref[1] + ref[2])) / (3.0 * _SIGMA_L)
    dc1 = ((r - g) - (ref[0] - ref[1])) / _SIGMA_C
    dc2 = ((b - g) - (ref[2] - ref[1])) / _SIGMA_C
    return dl * dl + dc1 * dc1 + dc2 * dc2


@dataclass(frozen=True)
class Identity:
    """Continuous appearance parameters; lengths in canonical units (the canvas is 96 wide)."""

    face_w: float  # half-width of the face
    aspect: float  # face half-height / half-width
    jaw_power: float  # superellipse exponent of the lower face: 2 round, larger squarer
    center: tuple[float, float]  # head centre offset from the canvas centre
    skin: RGB
    hair: RGB
    hair_style: str  # one of HAIR_STYLES
    hairline: float  # hairline height as a fraction of the face half-height above the centre
    eye_color: RGB
    eye_size: float
    eye_spacing: float  # eye centre distance from the face's vertical axis
    brow_color: RGB
    brow_thickness: float
    brow_tilt: float  # radians, positive raises the outer end
    lip_color: RGB
    mouth_size: float
    background: RGB
    background2: RGB
    background_pattern: str  # one of BACKGROUND_PATTERNS
    stripe_period: float
    shirt: RGB


@dataclass(frozen=True)
class Attributes:
    """Behaviour controlled by the text prompt."""

    smiling: bool = False
    nodding: bool = False
    looking_aside: bool = False
    raised_brows: bool = False


# Fixed vocabulary: one phrase per attribute, in this order.
_PHRASES = (
    ("smiling", "smiling"),
    ("nodding", "nodding"),
    ("looking_aside", "looking to the side"),
    ("raised_brows", "with raised eyebrows"),
)


def prompt_for(attrs: Attributes) -> str:
    """English prompt from a fixed vocabulary, e.g. 'a person talking, smiling, nodding'."""
    words = [phrase for name, phrase in _PHRASES if getattr(attrs, name)]
    return "a person talking, " + (", ".join(words) if words else "neutral expression")


def sample_attributes(rng: np.random.Generator) -> Attributes:
    """Each attribute on independently with probability 0.4."""
    on = rng.random(4) < 0.4
    return Attributes(smiling=bool(on[0]), nodding=bool(on[1]), looking_aside=bool(on[2]), raised_brows=bool(on[3]))


# --------------------------------------------------------------------------------------- palette

_SKIN_RAMP = np.array(
    [(255, 226, 200), (242, 198, 166), (226, 176, 136), (200, 146, 106), (168, 116, 84), (132, 90, 66)], np.float64
)
_HAIR_FAMILIES = np.array(
    [(26, 24, 28), (62, 44, 34), (110, 72, 44), (150, 96, 52), (196, 160, 100), (232, 212, 160), (120, 120, 124),
     (208, 208, 210), (60, 70, 120), (40, 110, 90)], np.float64
)


def _ok(colors: list[np.ndarray], accepted: list[np.ndarray]) -> bool:
    for c in colors:
        if mouth_colour_distance2(c) < _MIN_D2_SINGLE:
            return False
        if any(mouth_colour_distance2(0.5 * (c + other)) < _MIN_D2_BLEND for other in accepted):
            return False
    return True


def _pick(
    draw: Callable[[], np.ndarray], accepted: list[np.ndarray], fallback: RGB, shades: tuple[float, ...] = ()
) -> RGB:
    """Draw colours until one (and its darker `shades`) is far from the mouth interior, alone and in
    50/50 blends with every colour already `accepted`; after 64 failures use `fallback`."""
    for _ in range(64):
        c = np.clip(np.asarray(draw(), np.float64), 0.0, 255.0)
        family = [c] + [c * k for k in shades]
        if _ok(family, accepted):
            accepted.extend(family)
            return (float(c[0]), float(c[1]), float(c[2]))
    accepted.extend(np.asarray(fallback, np.float64) * k for k in (1.0, *shades))
    return fallback


def _jitter(rng: np.random.Generator, base: np.ndarray, amount: float) -> np.ndarray:
    return base + rng.normal(0.0, amount, 3)


def sample_identity(rng: np.random.Generator) -> Identity:
    """Draw a random identity; every palette colour keeps clear of MOUTH_INTERIOR_RGB."""
    accepted = [np.asarray(c, np.float64) for c in (_PUPIL, _EYE_WHITE, _OUTLINE)]

    def skin() -> np.ndarray:
        u = rng.uniform(0, len(_SKIN_RAMP) - 1)
        i = min(int(u), len(_SKIN_RAMP) - 2)
        return _jitter(rng, _SKIN_RAMP[i] * (1 - (u - i)) + _SKIN_RAMP[i + 1] * (u - i), 6.0)

    skin_c = _pick(skin, accepted, (226.0, 176.0, 136.0), shades=_SKIN_SHADES)
    hair_c = _pick(lambda: _jitter(rng, _HAIR_FAMILIES[rng.integers(len(_HAIR_FAMILIES))], 10.0),
                   accepted, (26.0, 24.0, 28.0))
    brow_c = _pick(lambda: np.asarray(hair_c) * rng.uniform(0.6, 0.9), accepted, (40.0, 36.0, 36.0))
    eye_c = _pick(lambda: rng.choice([(70, 110, 170), (90, 60, 40), (70, 130, 90), (120, 110, 80),
                                           (110, 140, 160)]) + rng.normal(0, 12, 3), accepted, (90.0, 60.0, 40.0))
    lip_c = _pick(lambda: np.asarray(skin_c) * rng.uniform(0.75, 0.95) + np.array([30.0, -12.0, -2.0])
                  + rng.normal(0, 6, 3), accepted, (190.0, 110.0, 110.0),
                  shades=(_LIP_LINE,))

    def saturated() -> np.ndarray:
        hue = rng.uniform(0, 2 * np.pi)
        light = rng.uniform(70, 220)
        sat = rng.uniform(10, 80)
        return light + sat * np.array([np.cos(hue), np.cos(hue - 2.094), np.cos(hue + 2.094)])

    bg1 = _pick(saturated, accepted, (120.0, 150.0, 170.0))
    bg2 = _pick(lambda: np.asarray(bg1) + rng.normal(0, 45, 3), accepted, (150.0, 170.0, 180.0))
    shirt = _pick(saturated, accepted, (60.0, 80.0, 130.0))
    face_w = float(rng.uniform(19.0, 25.0))
    style = HAIR_STYLES[int(rng.integers(len(HAIR_STYLES)))]
    return Identity(
        face_w=face_w,
        aspect=float(rng.uniform(1.12, 1.38)),
        jaw_power=float(rng.uniform(1.8, 3.2)),
        center=(float(rng.uniform(-4.0, 4.0)), float(rng.uniform(-5.0, 1.0))),
        skin=skin_c,
        hair=hair_c,
        hair_style=style,
        hairline=float(rng.uniform(0.25, 0.4) if style == "fringe" else rng.uniform(0.5, 0.7)),
        eye_color=eye_c,
        eye_size=float(rng.uniform(0.8, 1.25)),
        eye_spacing=float(face_w * rng.uniform(0.36, 0.46)),
        brow_color=brow_c,
        brow_thickness=float(rng.uniform(0.7, 2.0)),
        brow_tilt=float(rng.uniform(-0.25, 0.2)),
        lip_color=lip_c,
        mouth_size=float(rng.uniform(0.85, 1.2)),
        background=bg1,
        background2=bg2,
        background_pattern=BACKGROUND_PATTERNS[int(rng.integers(len(BACKGROUND_PATTERNS)))],
        stripe_period=float(rng.uniform(10.0, 30.0)),
        shirt=shirt,
    )


# ------------------------------------------------------------------------------------- rendering

_CHUNK = 64  # frames composited at once


def _shade(color: RGB, k: float) -> RGB:
    return (color[0] * k, color[1] * k, color[2] * k)


def render_frames(
    identity: Identity,
    attrs: Attributes,
    mouth_open: np.ndarray,
    mouth_wide: np.ndarray,
    blink: np.ndarray,
    head_xy: np.ndarray,
    height: int = 96,
    width: int = 96,
) -> np.ndarray:
    """Render T frames of `identity` with per-frame controls; returns uint8 (T, height, width, 3).

    mouth_open (T,): 0 closed (the lips meet in a line) .. 1 wide open; mouth_wide (T,): 0 rounded
    .. 1 spread; blink (T,): 0 eyes open .. 1 closed; head_xy (T, 2): head offset in canonical
    units (pixels at 96x96; the body follows at 40%).
    """
    mouth_open = np.clip(np.asarray(mouth_open, np.float32), 0.0, 1.0)
    mouth_wide = np.clip(np.asarray(mouth_wide, np.float32), 0.0, 1.0)
    blink = np.clip(np.asarray(blink, np.float32), 0.0, 1.0)
    head_xy = np.asarray(head_xy, np.float32)
    n = mouth_open.shape[0]
    if mouth_wide.shape != (n,) or blink.shape != (n,) or head_xy.shape != (n, 2):
        raise ValueError(
            f"controls must be (T,), (T,), (T,), (T, 2); got {mouth_open.shape}, {mouth_wide.shape}, "
            f"{blink.shape}, {head_xy.shape}"
        )
    bg = _background(identity, height, width)
    out = np.empty((n, height, width, 3), np.uint8)
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        canvas = Canvas(e - s, height, width)
        canvas.fill(bg)
        _draw(canvas, identity, attrs, mouth_open[s:e], mouth_wide[s:e], blink[s:e], head_xy[s:e])
        np.clip(canvas.img + 0.5, 0.0, 255.0, out=canvas.img)
        out[s:e] = canvas.img.astype(np.uint8)
    return out


def reference_image(
    identity: Identity, attrs: Attributes | None = None, height: int = 96, width: int = 96
) -> np.ndarray:
    """The identity portrait: neutral pose, mouth closed, eyes open; uint8 (height, width, 3).

    `attrs` defaults to neutral (no smile, gaze ahead, brows relaxed), as in every clip's reference.
    """
    one = np.zeros(1, np.float32)
    frames = render_frames(identity, attrs or Attributes(), one, one + 0.5, one, np.zeros((1, 2), np.float32),
                           height, width)
    return frames[0]


def _background(idn: Identity, height: int, width: int) -> np.ndarray:
    return background(height, width, idn.background, idn.background2, idn.background_pattern, idn.stripe_period)


def _draw(
    cv: Canvas,
    idn: Identity,
    attrs: Attributes,
    open_T: np.ndarray,
    wide_T: np.ndarray,
    blink_T: np.ndarray,
    head_T2: np.ndarray,
) -> None:
    px = cv.px
    a = idn.face_w
    b = idn.face_w * idn.aspect
    cx = idn.center[0] + head_T2[:, 0]
    cy = idn.center[1] - 2.0 + head_T2[:, 1]
    bx = idn.center[0] + 0.4 * head_T2[:, 0]
    by = 0.4 * head_T2[:, 1]
    skin = idn.skin

    # Hair behind the head.
    if idn.hair_style in ("short", "fringe"):
        if (box := cv.box(cx, cy - 0.08 * b, a * 1.12, b * 1.06)) is not None:
            cv.over(box, ellipse(box.x_Thw, box.y_Thw, a * 1.1, b * 1.04, px), idn.hair)
    elif idn.hair_style == "long":
        if (box := cv.box(cx, cy + 0.3 * b, a * 1.3, b * 1.45)) is not None:
            y = box.y_Thw + 0.3 * b  # relative to the head centre
            top = ellipse(box.x_Thw, y, a * 1.22, b * 1.1, px)
            low = ellipse(box.x_Thw, y - 0.6 * b, a * 1.25, b * 0.9, px)
            cv.over(box, np.maximum(top, low), idn.hair)

    # Neck and shirt.
    if (box := cv.box(cx, cy + b + 6.0, 0.45 * a, 14.0)) is not None:
        cv.over(box, ellipse(box.x_Thw, box.y_Thw, 0.42 * a, 13.0, px), _shade(skin, 0.9))
    if (box := cv.box(bx, by + 64.0, 2.1 * a, 27.0)) is not None:
        cv.over(box, ellipse(box.x_Thw, box.y_Thw, 2.0 * a, 26.0, px), idn.shirt)

    # Ears, face.
    for side in (-1.0, 1.0):
        if (box := cv.box(cx + side * 0.97 * a, cy + 0.02 * b, 4.5, 7.0)) is not None:
            cv.over(box, ellipse(box.x_Thw, box.y_Thw, 3.6, 6.0, px), _shade(skin, 0.9))
    if (box := cv.box(cx, cy, a + 1.0, b + 1.0)) is not None:
        cv.over(box, superellipse(box.x_Thw, box.y_Thw, a, b, idn.jaw_power, px), skin)

    _hair_front(cv, idn, cx, cy, a, b)
    _eyes(cv, idn, attrs, cx, cy, b, blink_T)

    # Nose shadow.
    if (box := cv.box(cx, cy + 0.22 * b, 3.5, 2.5)) is not None:
        cv.over(box, 0.8 * ellipse(box.x_Thw, box.y_Thw, 2.6, 1.5, px), _shade(skin, 0.82))

    _mouth(cv, idn, attrs, cx, cy + 0.56 * b, open_T, wide_T)


def _hair_front(cv: Canvas, idn: Identity, cx: np.ndarray, cy: np.ndarray, a: float, b: float) -> None:
    px = cv.px
    if idn.hair_style == "bald":
        for side in (-1.0, 1.0):
            if (box := cv.box(cx + side * 0.95 * a, cy - 0.12 * b, 4.0, 8.0)) is not None:
                cv.over(box, ellipse(box.x_Thw, box.y_Thw, 3.0, 7.0, px), idn.hair)
        return
    if (box := cv.box(cx, cy, a * 1.14, b * 1.1)) is None:
        return
    x, y = box.x_Thw, box.y_Thw
    cap = ellipse(x, y + 0.04 * b, a * 1.08, b * 1.06, px)
    line = -idn.hairline * b
    if idn.hair_style == "fringe":
        line = line + 1.5 * np.sin(x / 2.2)
    alpha = cap * below(-y, -line, px)  # above the hairline
    if idn.hair_style == "long":  # side locks down to the cheeks
        side = below(np.abs(x), 0.8 * a, px) * below(-y, -0.3 * b, px)
        alpha = np.maximum(alpha, ellipse(x, y, a * 1.12, b * 1.08, px) * side)
    cv.over(box, alpha, idn.hair)


def _eyes(
    cv: Canvas, idn: Identity, attrs: Attributes, cx: np.ndarray, cy: np.ndarray, b: float, blink_T: np.ndarray
) -> None:
    px = cv.px
    ew, eh = 4.6 * idn.eye_size, 3.0 * idn.eye_size
    ey = cy - 0.1 * b
    gaze = 0.45 * ew if attrs.looking_aside else 0.0
    iris_r = 0.92 * eh
    lid_y = (-eh - 0.8 + blink_T * (2.0 * eh + 1.6))[:, None, None]  # lid edge, relative to the eye centre
    lash = np.clip(blink_T * 5.0, 0.0, 1.0)[:, None, None]
    brow_lift = 2.5 if attrs.raised_brows else 0.0
    for side in (-1.0, 1.0):
        ex = cx + side * idn.eye_spacing
        if (box := cv.box(ex, ey, ew + 1.5, eh + 1.5)) is not None:
            x, y = box.x_Thw, box.y_Thw
            cv.over(box, ellipse(x, y, ew + 0.7, eh + 0.7, px), _OUTLINE)
            white = ellipse(x, y, ew, eh, px)
            cv.over(box, white, _EYE_WHITE)
            ix = x - gaze
            cv.over(box, white * ellipse(ix, y, iris_r, iris_r, px), idn.eye_color)
            cv.over(box, white * ellipse(ix, y, 0.5 * iris_r, 0.5 * iris_r, px), _PUPIL)
            cv.over(box, white * ellipse(ix - 0.35 * iris_r, y + 0.4 * iris_r, 0.6, 0.6, px), _EYE_WHITE)
            lid_region = ellipse(x, y, ew + 1.0, eh + 1.0, px)
            cv.over(box, lid_region * below(-y, -lid_y, px), _shade(idn.skin, 0.95))
            band = np.clip(0.5 + (0.6 - np.abs(y - lid_y)) / px, 0.0, 1.0)
            cv.over(box, lash * band * ellipse(x, y, ew + 0.7, eh + 0.7, px), _OUTLINE)
        brow_y = ey - eh - 3.0 - brow_lift
        if (box := cv.box(ex, brow_y, 6.0 * idn.eye_size + 2.0, 6.0)) is not None:
            x, y = rotate(box.x_Thw, box.y_Thw, side * idn.brow_tilt)
            cv.over(box, ellipse(x, y, 5.5 * idn.eye_size, idn.brow_thickness, px), idn.brow_color)


def _mouth(
    cv: Canvas, idn: Identity, attrs: Attributes, cx: np.ndarray, my: np.ndarray,
    open_T: np.ndarray, wide_T: np.ndarray,
) -> None:
    px = cv.px
    size = idn.mouth_size
    mw = (6.8 * size * (0.8 + 0.4 * wide_T) * (1.12 if attrs.smiling else 1.0))[:, None, None]
    ho = (4.6 * size * open_T)[:, None, None]
    curve = 2.2 if attrs.smiling else 0.3  # how far the corners rise
    if (box := cv.box(cx, my, 9.5 * size + 2.0, 7.0 * size + 3.0)) is None:
        return
    x = box.x_Thw
    y = box.y_Thw + curve * (x / mw) ** 2  # bend: the corners move up
    cv.over(box, ellipse(x, y - 0.2, mw + 1.0, ho + 1.6, px), idn.lip_color)
    cv.over(box, ellipse(x, y, 0.96 * mw, 0.55, px), _shade(idn.lip_color, _LIP_LINE))
    cv.over(box, ellipse(x, y, 0.88 * mw, ho, px), MOUTH_INTERIOR_RGB)
