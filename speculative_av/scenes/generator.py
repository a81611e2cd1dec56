"""
Driving scenes with exact boxes, generated from a seed: single images and coherent drives.

Actors are composited far to near, so nearer objects hide farther ones; a box covers the
visible pixels of its object, and objects less than :data:`MIN_VISIBLE` visible (hidden or
outside the image) get no box. Each box also carries its object's visible fraction and each
scene its time of day, the conditions per-condition test sets are split by.
"""
from __future__ import annotations

from dataclasses import dataclass
import functools
from typing import Iterator

import cv2
import numpy as np
import numpy.typing as npt
from speculative_av.core.detections import Detections
from speculative_av.scenes import world as w
from speculative_av.scenes.painter import LABELLED, paint_actor, paint_background, Patch

CATEGORIES = ['__background__', 'car', 'pedestrian', 'cyclist', 'traffic_light', 'traffic_sign']
MIN_VISIBLE = 0.3  # share of an object's pixels that must show for it to get a box
_NOISE_MARGIN = 32  # the noise tile is this much larger than the image: offsets vary per frame

assert [CATEGORIES[i] for i in (w.CAR, w.PEDESTRIAN, w.CYCLIST, w.TRAFFIC_LIGHT,
                                w.TRAFFIC_SIGN)] == CATEGORIES[1:]


@dataclass(frozen=True)
class Scene:
    """
    An RGB image and the boxes of the objects it shows.

    ``image`` is (H, W, 3) uint8 RGB; ``boxes`` (N, 4) float32 ``x1, y1, x2, y2`` in pixels;
    ``labels`` (N,) int64 indices into :data:`CATEGORIES`; ``visible`` (N,) float32 the share
    of each object's pixels that show (the rest hidden by nearer objects or outside the
    image; at least :data:`MIN_VISIBLE`); ``period`` the time of day, one of
    :data:`~speculative_av.scenes.world.PERIODS`.
    """

    image: npt.NDArray[np.uint8]
    boxes: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int64]
    visible: npt.NDArray[np.float32]
    period: str

    def ground_truth(self) -> Detections:
        """Return the boxes as detections scoring 1.0."""
        return Detections(self.boxes, np.ones(len(self.labels), np.float32), self.labels)


def generate_scene(seed: int, width: int = 640, height: int = 480) -> Scene:
    """Return the scene of ``seed``: a random street, time of day and population."""
    rng = np.random.default_rng(seed)
    return _render(w.random_world(rng, width, height), rng)


def render_drive(seed: int, frames: int, width: int = 640, height: int = 480,
                 fps: float = 10.0) -> Iterator[Scene]:
    """Yield ``frames`` consecutive frames, ``1 / fps`` seconds apart, of one drive."""
    if fps <= 0:
        raise ValueError(f'fps must be positive, got {fps}')
    world = w.random_world(np.random.default_rng(seed), width, height)
    sensor_rng = np.random.default_rng([seed, 1])
    for _ in range(frames):
        yield _render(world, sensor_rng)
        world.step(1.0 / fps)


def _render(world: w.World, rng: np.random.Generator) -> Scene:
    camera = world.camera
    image = np.empty((camera.height, camera.width, 3), np.uint8)
    paint_background(image, world)
    owner = np.full((camera.height, camera.width), -1, np.int16)
    placed: list[tuple[int, Patch, int]] = []  # label, patch, labelled pixels
    for actor in sorted(world.actors, key=lambda a: -a.z):
        patch = paint_actor(world, actor)
        if patch is None:
            continue
        rows, cols = _clip(patch, camera)
        local = patch.rgbt[rows.start - patch.y0:rows.stop - patch.y0,
                           cols.start - patch.x0:cols.stop - patch.x0]
        tags = local[..., 3]
        drawn = (tags > 0).view(np.uint8)
        cv2.copyTo(local[..., :3], drawn, image[rows, cols])
        owners = np.where(tags == LABELLED, len(placed), -1).astype(np.int16)
        cv2.copyTo(owners, drawn, owner[rows, cols])
        placed.append((actor.kind, patch, int(np.count_nonzero(patch.rgbt[..., 3] == LABELLED))))
    boxes, labels, fractions = [], [], []
    for index, (label, patch, pixels) in enumerate(placed):
        rows, cols = _clip(patch, camera)
        visible = owner[rows, cols] == index
        shown = np.count_nonzero(visible)
        if label == w.SCENERY or shown < max(1.0, MIN_VISIBLE * pixels):
            continue
        ys, xs = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
        if ys[-1] - ys[0] >= 1 and xs[-1] - xs[0] >= 1:
            boxes.append((cols.start + xs[0], rows.start + ys[0], cols.start + xs[-1] + 1,
                          rows.start + ys[-1] + 1))
            labels.append(label)
            fractions.append(shown / pixels)
    _sensor(image, world.lighting, rng)
    return Scene(image, np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64),
                 np.array(fractions, np.float32), world.lighting.period)


def _clip(patch: Patch, camera: w.Camera) -> tuple[slice, slice]:
    """Return the rows and columns of the image a patch covers (possibly empty)."""
    height, width = patch.rgbt.shape[:2]
    rows = slice(max(patch.y0, 0), max(min(patch.y0 + height, camera.height), max(patch.y0, 0)))
    cols = slice(max(patch.x0, 0), max(min(patch.x0 + width, camera.width), max(patch.x0, 0)))
    return rows, cols


def _sensor(image: npt.NDArray[np.uint8], lighting: w.Lighting, rng: np.random.Generator) -> None:
    """Add the camera's noise and blur in place."""
    height, width = image.shape[:2]
    dy, dx = rng.integers(0, _NOISE_MARGIN, 2)
    noise = _noise_tile(height, width)[dy:dy + height, dx:dx + width]
    gain = lighting.noise / 32.0
    cv2.addWeighted(image, 1.0, noise, gain, -128.0 * gain, dst=image)
    if lighting.blur > 0:
        size = 3 if lighting.blur < 0.8 else 5  # the kernel covers +-2 sigma or more
        cv2.GaussianBlur(image, (size, size), lighting.blur, dst=image)


@functools.lru_cache(maxsize=4)
def _noise_tile(height: int, width: int) -> npt.NDArray[np.uint8]:
    """Return fixed Gaussian noise around 128 (sigma 32), a little larger than the image."""
    noise = np.random.default_rng(0).normal(
        128.0, 32.0, (height + _NOISE_MARGIN, width + _NOISE_MARGIN, 3))
    return np.clip(noise, 0, 255).astype(np.uint8)
