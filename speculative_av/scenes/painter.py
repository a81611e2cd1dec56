"""
Draw a :class:`~speculative_av.scenes.world.World` with cv2 primitives.

The background goes straight into the image. Each actor is drawn into its own patch whose fourth
channel tags every pixel: LABELLED for the object a box describes, UNLABELLED for parts that
hide what is behind but belong to no box (a sign's pole, a tree), so the generator can composite
actors far to near and measure how much of each stays visible.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import cv2
import numpy as np
import numpy.typing as npt
from speculative_av.scenes import world as w

LABELLED, UNLABELLED = 1, 2
MIN_HEIGHT_PX = 7.0  # actors smaller than this on screen are not drawn (nor labelled)
MIN_WIDTH_PX = 3.0
_SHIFT = 4  # cv2 fractional bits: sub-pixel vertices keep small objects in proportion
_ONE = 1 << _SHIFT
_DASH, _DASH_PERIOD, _MARKING_FAR = 3.0, 9.0, 90.0
_Pt = tuple[float, float]
_Color = tuple[int, int, int, int]


class Patch(NamedTuple):
    """An actor's pixels: RGB plus a tag channel, with the image position of its corner."""

    x0: int
    y0: int
    rgbt: npt.NDArray[np.uint8]


class _Op(NamedTuple):
    shape: str  # 'poly', 'circle' or 'line'
    points: list[_Pt]  # image pixels
    color: _Color
    size: float  # circle radius or line thickness in pixels
    thickness: float  # circle outline thickness in pixels; 0 = filled


class _Sketch:
    """Collect an actor's primitives in metres on the camera-facing plane through its base."""

    def __init__(self, world: w.World, x: float, z: float) -> None:
        self.camera, self.lighting = world.camera, world.lighting
        self.u0, self.v0 = world.camera.point(x, 0.0, z)
        self.scale = world.camera.focal / z  # pixels per metre
        self.ops: list[_Op] = []

    def at(self, dx: Sequence[float], dy: Sequence[float]) -> list[_Pt]:
        """Return pixels of points ``dx`` right of and ``dy`` above the base."""
        u0, v0, scale = self.u0, self.v0, self.scale
        return [(u0 + scale * a, v0 - scale * b) for a, b in zip(dx, dy)]

    def color(self, rgb: w.RGB, tag: int = LABELLED, emissive: bool = False) -> _Color:
        """Return the drawing colour of a surface (emissive ones ignore the lighting)."""
        r, g, b = rgb if emissive else self.lighting.shade(rgb)
        return r, g, b, tag

    def poly(self, points: list[_Pt], color: _Color) -> None:
        self.ops.append(_Op('poly', points, color, 0.0, 0.0))

    def rect(self, x0: float, y0: float, x1: float, y1: float, color: _Color) -> None:
        self.poly(self.at((x0, x1, x1, x0), (y0, y0, y1, y1)), color)

    def circle(self, dx: float, dy: float, radius: float, color: _Color,
               ring: float = 0.0) -> None:
        self.ops.append(_Op('circle', self.at((dx,), (dy,)), color, radius * self.scale,
                            ring * self.scale))

    def line(self, dx0: float, dy0: float, dx1: float, dy1: float, width: float,
             color: _Color) -> None:
        self.ops.append(_Op('line', self.at((dx0, dx1), (dy0, dy1)), color, width * self.scale,
                            0.0))

    def patch(self) -> Patch | None:
        """Rasterise the primitives into a patch; None when it misses the image."""
        us = [p[0] for op in self.ops for p in op.points]
        vs = [p[1] for op in self.ops for p in op.points]
        margin = max(op.size + op.thickness for op in self.ops) + 2.0
        x0, y0 = math.floor(min(us) - margin), math.floor(min(vs) - margin)
        x1, y1 = math.ceil(max(us) + margin), math.ceil(max(vs) + margin)
        if x1 < 0 or y1 < 0 or x0 >= self.camera.width or y0 >= self.camera.height:
            return None
        rgbt = np.zeros((y1 - y0 + 1, x1 - x0 + 1, 4), np.uint8)
        for op in self.ops:
            pts = [(round((u - x0) * _ONE), round((v - y0) * _ONE)) for u, v in op.points]
            if op.shape == 'poly':
                cv2.fillPoly(rgbt, [np.array(pts, np.int32)], op.color, cv2.LINE_8, _SHIFT)
            elif op.shape == 'circle':
                thickness = -1 if op.thickness == 0 else max(1, round(op.thickness))
                cv2.circle(rgbt, pts[0], round(op.size * _ONE), op.color, thickness, cv2.LINE_8,
                           _SHIFT)
            else:
                cv2.line(rgbt, pts[0], pts[1], op.color, max(1, round(op.size)), cv2.LINE_8,
                         _SHIFT)
        return Patch(x0, y0, rgbt)


def paint_actor(world: w.World, actor: w.Actor) -> Patch | None:
    """Draw ``actor`` into a patch; None when it is too small to see or outside the image."""
    pixels_per_metre = world.camera.focal / actor.z
    if actor.kind != w.SCENERY and (pixels_per_metre * actor.height < MIN_HEIGHT_PX
                                    or pixels_per_metre * actor.width < MIN_WIDTH_PX):
        return None
    sketch = _Sketch(world, actor.x, actor.z)
    _PAINTERS[actor.kind](sketch, actor, world)
    return sketch.patch()


def _car(sk: _Sketch, a: w.Actor, world: w.World) -> None:
    body, glass, trim = a.colors
    camera, hw, h, z1 = world.camera, a.width / 2, a.height, a.z + a.length
    tall = h > 2.1

    def face(x: float, ys: Sequence[float], zs: Sequence[float]) -> list[_Pt]:
        """Return pixels of a quad in the plane ``x`` (a side) or at height ``ys`` (roof)."""
        return [camera.point(x, y, z) for y, z in zip(ys, zs)]

    sk.poly([camera.point(x, 0.0, z) for x, z in ((a.x - hw - 0.2, a.z - 0.25),
                                                  (a.x + hw + 0.2, a.z - 0.25),
                                                  (a.x + hw + 0.2, z1), (a.x - hw - 0.2, z1))],
            sk.color(_scaled(world.road.asphalt, 0.45), UNLABELLED))
    side = a.x - hw if a.x - hw > 0.2 else a.x + hw if a.x + hw < -0.2 else None
    if side is not None:
        body_side = sk.color(_scaled(body, 0.8))
        length = a.length
        sk.poly(face(side, (0.15 * h, 0.6 * h, 0.6 * h, 0.15 * h), (a.z, a.z, z1, z1)),
                body_side)
        cabin_end = z1 if tall else z1 - 0.2 * length
        sk.poly(face(side, (0.6 * h, h, h, 0.6 * h),
                     (a.z + 0.1 * length, a.z + 0.12 * length, cabin_end, cabin_end)), body_side)
        if not tall:
            sk.poly(face(side, (0.63 * h, 0.92 * h, 0.92 * h, 0.63 * h),
                         (a.z + 0.18 * length, a.z + 0.2 * length, z1 - 0.28 * length,
                          z1 - 0.25 * length)), sk.color(glass))
        for wheel_z in (a.z + 0.18 * length, z1 - 0.18 * length):
            sk.ops.append(_Op('circle', [camera.point(side, 0.33, wheel_z)], sk.color(trim),
                              0.33 * camera.focal / wheel_z, 0.0))
    if camera.height_m > h:
        roof_end = z1 - 0.3 * a.length
        sk.poly([camera.point(x, h, z) for x, z in ((a.x - 0.8 * hw, a.z + 0.1),
                                                    (a.x + 0.8 * hw, a.z + 0.1),
                                                    (a.x + 0.8 * hw, roof_end),
                                                    (a.x - 0.8 * hw, roof_end))],
                sk.color(body))
    for sign in (-1.0, 1.0):
        sk.rect(sign * (hw - 0.05), 0.0, sign * (hw - 0.32), 0.32, sk.color(trim))
    sk.rect(-hw, 0.15 * h, hw, 0.6 * h if not tall else h, sk.color(body))
    if not tall:
        sk.poly(sk.at((-0.97 * hw, 0.97 * hw, 0.78 * hw, -0.78 * hw), (0.6 * h, 0.6 * h, h, h)),
                sk.color(body))
    if not tall or a.variant == 1:
        sk.poly(sk.at((-0.86 * hw, 0.86 * hw, 0.72 * hw, -0.72 * hw),
                      (0.63 * h, 0.63 * h, 0.93 * h, 0.93 * h)), sk.color(glass))
    sk.rect(-hw, 0.12 * h, hw, 0.24 * h, sk.color(trim))
    sk.rect(-0.25, 0.27 * h, 0.25, 0.27 * h + 0.11, sk.color((215, 215, 205)))
    night = world.lighting.night
    lamp = (255, 250, 225) if a.variant == 1 else (220, 25, 20)
    low, high = (0.45 * h, 0.53 * h) if not tall else (0.2 * h, 0.28 * h)
    for sign in (-1.0, 1.0):
        sk.rect(sign * (hw - 0.05), low, sign * (hw - 0.33), high, sk.color(lamp, emissive=night))
    if a.variant == 1:
        sk.rect(-0.45, 0.3 * h, 0.45, 0.44 * h, sk.color(trim))


def _pedestrian(sk: _Sketch, a: w.Actor, world: w.World) -> None:
    shirt, trousers, skin = a.colors
    h, half = a.height, a.width / 2
    moving = a.cadence > 0
    stride = 0.16 * h * math.sin(a.phase) * moving
    swing = 0.12 * h * math.sin(a.phase) * moving
    for sign in (-1.0, 1.0):
        sk.line(sign * 0.05 * h, 0.48 * h, sign * (0.05 * h + stride), 0.03 * h, 0.075 * h,
                sk.color(trousers))
    sk.poly(sk.at((-half, half, 0.8 * half, -0.8 * half), (0.8 * h, 0.8 * h, 0.46 * h, 0.46 * h)),
            sk.color(shirt))
    arm = sk.color(shirt if a.variant == 0 else skin)
    for sign in (-1.0, 1.0):
        sk.line(sign * 0.9 * half, 0.78 * h, sign * (0.95 * half - swing), 0.5 * h, 0.055 * h,
                arm)
    hair = (35, 25, 20) if a.variant == 0 else (190, 160, 100)
    sk.circle(0.0, 0.905 * h, 0.062 * h, sk.color(hair))
    sk.circle(0.0, 0.89 * h, 0.058 * h, sk.color(skin))


def _cyclist(sk: _Sketch, a: w.Actor, world: w.World) -> None:
    jacket, frame, skin = a.colors
    sy = a.height / 1.8
    legs, tyre = sk.color((40, 40, 50)), sk.color((25, 25, 25))
    if a.variant == 0:  # seen from behind
        sx = a.width / 0.6
        sk.rect(-0.04 * sx, 0.0, 0.04 * sx, 0.68 * sy, tyre)
        for sign in (-1.0, 1.0):
            pedal = 0.35 + 0.15 * math.sin(a.phase + (sign > 0) * math.pi)
            sk.line(sign * 0.11 * sx, 0.97 * sy, sign * 0.14 * sx, pedal * sy, 0.11 * sy, legs)
        sk.line(-0.3 * sx, 1.05 * sy, 0.3 * sx, 1.05 * sy, 0.04 * sy, sk.color(frame))
        sk.poly(sk.at((-0.22 * sx, 0.22 * sx, 0.25 * sx, -0.25 * sx),
                      (1.0 * sy, 1.0 * sy, 1.5 * sy, 1.5 * sy)), sk.color(jacket))
        for sign in (-1.0, 1.0):
            sk.line(sign * 0.23 * sx, 1.45 * sy, sign * 0.28 * sx, 1.06 * sy, 0.07 * sy,
                    sk.color(jacket))
        sk.circle(0.0, 1.66 * sy, 0.1 * sy, sk.color(frame))
        sk.circle(0.0, 1.6 * sy, 0.085 * sy, sk.color(skin))
        return
    d = a.variant * a.width / 1.7  # +-1 facing right/left, scaled to the bike's length
    for hub in (-0.55, 0.55):
        sk.circle(hub * d, 0.34 * sy, 0.31 * sy, tyre, ring=0.07 * sy)
    bracket, seat, head = (0.0, 0.3), (-0.2, 0.95), (0.42, 0.88)
    crank = (0.17 * math.cos(a.phase), 0.3 + 0.17 * math.sin(a.phase))
    knee = (0.2, 0.72 + 0.05 * math.sin(a.phase))
    bars = ((seat, bracket), (bracket, (-0.55, 0.34)), (seat, (-0.55, 0.34)), (seat, head),
            (bracket, head), (head, (0.55, 0.34)))
    for (px, py), (qx, qy) in bars:
        sk.line(px * d, py * sy, qx * d, qy * sy, 0.045 * sy, sk.color(frame))
    for (px, py), (qx, qy) in ((seat, knee), (knee, crank)):
        sk.line(px * d, py * sy, qx * d, qy * sy, 0.11 * sy, legs)
    sk.poly(sk.at((-0.3 * d, -0.08 * d, 0.25 * d, 0.05 * d),
                  (0.95 * sy, 0.98 * sy, 1.45 * sy, 1.5 * sy)), sk.color(jacket))
    sk.line(0.15 * d, 1.42 * sy, 0.45 * d, 1.05 * sy, 0.07 * sy, sk.color(jacket))
    sk.circle(0.2 * d, 1.63 * sy, 0.1 * sy, sk.color(frame))
    sk.circle(0.25 * d, 1.58 * sy, 0.085 * sy, sk.color(skin))


_LIT = ((255, 40, 30), (255, 185, 0), (40, 235, 120))
_UNLIT = ((70, 25, 20), (70, 60, 15), (15, 60, 35))


def _traffic_light(sk: _Sketch, a: w.Actor, world: w.World) -> None:
    housing, pole, _ = a.colors
    half, bottom, top = a.width / 2, a.elevation, a.elevation + a.height
    sk.rect(-0.06, 0.0, 0.06, bottom, sk.color(pole, UNLABELLED))
    sk.rect(-half, bottom, half, top, sk.color(housing))
    if a.variant == 3:  # seen from behind
        return
    for i in range(3):
        on = i == a.variant
        sk.circle(0.0, top - (i + 0.5) * a.height / 3, 0.33 * a.width,
                  sk.color(_LIT[i] if on else _UNLIT[i], emissive=on))


_OCTAGON = tuple((math.cos(k * math.pi / 4 + math.pi / 8), math.sin(k * math.pi / 4 + math.pi / 8))
                 for k in range(8))
_TRIANGLE = ((-1.0, -0.8), (1.0, -0.8), (0.0, 0.95))
_DIAMOND = ((-1.0, 0.0), (0.0, -1.0), (1.0, 0.0), (0.0, 1.0))


def _traffic_sign(sk: _Sketch, a: w.Actor, world: w.World) -> None:
    pole = a.colors[0]
    r, cy = a.width / 2, a.elevation + a.height / 2

    def shape(unit: Sequence[tuple[float, float]], scale: float, lift: float = 0.0) -> list[_Pt]:
        """Return pixels of a unit outline scaled to ``scale`` sign radii around the centre."""
        return sk.at([x * r * scale for x, _ in unit], [cy + (y * scale + lift) * r
                                                        for _, y in unit])

    sk.rect(-0.035, 0.0, 0.035, cy, sk.color(pole, UNLABELLED))
    red, white, blue = sk.color((200, 30, 30)), sk.color((235, 235, 235)), sk.color((30, 70, 170))
    black = sk.color((20, 20, 20))
    if a.variant == 0:  # prohibitory
        sk.circle(0.0, cy, r, red)
        sk.circle(0.0, cy, 0.75 * r, white)
        sk.rect(-0.35 * r, cy - 0.18 * r, 0.35 * r, cy + 0.18 * r, black)
    elif a.variant == 1:  # warning
        sk.poly(shape(_TRIANGLE, 1.0), red)
        sk.poly(shape(_TRIANGLE, 0.7, -0.05), white)
        sk.rect(-0.06 * r, cy - 0.3 * r, 0.06 * r, cy + 0.2 * r, black)
    elif a.variant == 2:  # stop
        sk.poly(shape(_OCTAGON, 1.0), red)
        sk.rect(-0.7 * r, cy - 0.15 * r, 0.7 * r, cy + 0.15 * r, white)
    elif a.variant == 3:  # mandatory direction
        sk.circle(0.0, cy, r, blue)
        sk.line(0.0, cy - 0.6 * r, 0.0, cy + 0.3 * r, 0.2 * r, white)
        sk.poly(sk.at((-0.4 * r, 0.4 * r, 0.0), (cy + 0.2 * r, cy + 0.2 * r, cy + 0.65 * r)),
                white)
    elif a.variant == 4:  # information
        sk.rect(-r, cy - r, r, cy + r, blue)
        sk.rect(-0.5 * r, cy - 0.6 * r, 0.5 * r, cy + 0.6 * r, white)
    elif a.variant == 5:  # priority road
        sk.poly(shape(_DIAMOND, 1.0), white)
        sk.poly(shape(_DIAMOND, 0.65), sk.color((240, 190, 20)))
    else:  # seen from behind
        sk.circle(0.0, cy, r, sk.color(pole))


def _scenery(sk: _Sketch, a: w.Actor, world: w.World) -> None:
    leaves, trunk, metal = a.colors
    h, r = a.height, a.width / 2
    if a.variant == w.TREE:
        sk.rect(-0.15, 0.0, 0.15, 0.5 * h, sk.color(trunk, UNLABELLED))
        for dx, dy, radius in ((0.0, 0.7, 1.0), (-0.45, 0.58, 0.75), (0.45, 0.6, 0.75)):
            sk.circle(dx * r, dy * h, radius * r, sk.color(leaves, UNLABELLED))
        return
    night = world.lighting.night
    toward_road = -1.0 if a.x > 0 else 1.0
    sk.rect(-0.07, 0.0, 0.07, h, sk.color(metal, UNLABELLED))
    sk.line(0.0, h, toward_road * 1.2, h + 0.15, 0.08, sk.color(metal, UNLABELLED))
    sk.rect(toward_road * 0.9, h, toward_road * 1.5, h + 0.18,
            sk.color((255, 230, 170) if night else metal, UNLABELLED, emissive=night))


_PAINTERS: dict[int, Callable[[_Sketch, w.Actor, w.World], None]] = {
    w.CAR: _car, w.PEDESTRIAN: _pedestrian, w.CYCLIST: _cyclist,
    w.TRAFFIC_LIGHT: _traffic_light, w.TRAFFIC_SIGN: _traffic_sign, w.SCENERY: _scenery}


def paint_background(image: npt.NDArray[np.uint8], world: w.World) -> None:
    """Draw sky, skyline, ground, sidewalks, road, markings and buildings into ``image``."""
    camera, light, road = world.camera, world.lighting, world.road
    horizon = int(np.clip(round(camera.horizon), 1, camera.height - 1))
    t = np.linspace(0.0, 1.0, horizon)[:, None, None]
    sky = ((1 - t) * light.sky_top + t * light.sky_bottom).astype(np.uint8)
    cv2.resize(sky, (camera.width, horizon), dst=image[:horizon], interpolation=cv2.INTER_NEAREST)
    band = min(horizon, int(np.ceil(world.skyline.max(initial=0.0))))
    if band:
        rows = np.arange(horizon - band, horizon)[:, None]
        image[horizon - band:horizon][rows >= camera.horizon - world.skyline[None]] = \
            light.shade(road.skyline)
    cv2.rectangle(image, (0, horizon), (camera.width, camera.height), light.shade(road.ground), -1)

    def ground(x0: float, x1: float, z0: float, z1: float) -> list[_Pt]:
        """Return the pixels of the ground rectangle ``x0..x1`` by ``z0..z1``."""
        return [camera.point(x, 0.0, z) for x, z in ((x0, z0), (x1, z0), (x1, z1), (x0, z1))]

    walk = w.SIDEWALK_WIDTH
    _fill(image, [ground(road.left - walk, road.left, w.NEAR, w.FAR),
                  ground(road.right, road.right + walk, w.NEAR, w.FAR)],
          light.shade(road.sidewalk))
    _fill(image, [ground(road.left, road.right, w.NEAR, w.FAR)], light.shade(road.asphalt))
    starts = np.arange(-(world.odometer % _DASH_PERIOD), _MARKING_FAR, _DASH_PERIOD)
    starts = starts[starts + _DASH > w.NEAR]
    near, far = np.maximum(starts, w.NEAR), starts + _DASH
    dash_x = np.asarray(road.dashed)[:, None, None] + [-0.07, 0.07, 0.07, -0.07]
    dash_z = np.stack([near, near, far, far], -1)[None]
    marks = [camera.project(dash_x, 0.0, dash_z).reshape(-1, 4, 2)]
    marks += [np.asarray([ground(x - 0.07, x + 0.07, w.NEAR, w.FAR)]) for x in road.solid]
    if world.crosswalk_z is not None and world.crosswalk_z > w.NEAR:
        z0, z1 = world.crosswalk_z, world.crosswalk_z + 3.0
        marks.append(np.asarray([ground(x, x + 0.5, z0, z1)
                                 for x in np.arange(road.left + 0.3, road.right - 0.5, 1.0)]))
    _fill(image, np.concatenate(marks), light.shade(road.marking))
    for building in sorted(world.buildings, key=lambda b: -b.z0):
        _building(image, world, building)


def _building(image: npt.NDArray[np.uint8], world: w.World, b: w.Building) -> None:
    camera, light = world.camera, world.lighting
    z0, z1 = max(b.z0, w.NEAR), min(b.z1, w.FAR)
    if z1 <= z0:
        return
    x, top = b.side * b.setback, b.height
    facade = [camera.point(x, y, z) for y, z in ((0.0, z0), (0.0, z1), (top, z1), (top, z0))]
    _fill(image, [facade], light.shade(_scaled(b.color, 0.8)))
    if b.z0 >= w.NEAR:
        outer = x + 12.0 * b.side
        corners = ((x, 0.0), (outer, 0.0), (outer, top), (x, top))
        end = [camera.point(xx, y, b.z0) for xx, y in corners]
        _fill(image, [end], light.shade(b.color))
    floors = np.arange(1.2, b.height - 1.5, 3.2)
    columns = b.z0 + 1.0 + 3.5 * np.arange(int((b.z1 - b.z0 - 2.5) // 3.5) + 1)
    shown = np.flatnonzero((columns >= max(w.NEAR, 3.0)) & (columns + 1.5 <= w.FAR))
    if not len(floors) or not len(shown):
        return
    ys = floors[:, None, None] + [0.0, 0.0, 1.6, 1.6]
    zs = columns[shown][None, :, None] + [0.0, 1.5, 1.5, 0.0]
    windows = camera.project(x, ys, zs).reshape(-1, 4, 2)
    if light.night:  # the same windows stay lit while the building passes by
        lit = np.random.default_rng(b.windows).random((len(floors), len(columns))) < 0.35
        on = lit[:, shown].reshape(-1)
        _fill(image, windows[~on], light.shade((40, 45, 55)))
        _fill(image, windows[on], (230, 200, 130))
    else:
        _fill(image, windows, light.shade((45, 55, 70)))


def _fill(image: npt.NDArray[np.uint8], polygons: npt.ArrayLike, color: w.RGB) -> None:
    """Fill (N, K, 2) pixel polygons with one colour."""
    pts = np.round(np.asarray(polygons, np.float64) * _ONE).astype(np.int32)
    if len(pts):
        cv2.fillPoly(image, list(pts), color, cv2.LINE_8, _SHIFT)


def _scaled(rgb: w.RGB, factor: float) -> w.RGB:
    return int(rgb[0] * factor), int(rgb[1] * factor), int(rgb[2] * factor)
