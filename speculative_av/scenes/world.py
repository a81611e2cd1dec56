"""
The 3D street a scene shows: camera, lighting, road, buildings and actors, sampled per seed.

Coordinates are metres in the camera's frame: ``x`` to the right, ``y`` up from the ground,
``z`` ahead. The ego vehicle drives along +z; :meth:`World.step` moves everything else.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

# Label ids: the index in speculative_av.scenes.CATEGORIES. SCENERY actors are drawn, unlabelled.
SCENERY, CAR, PEDESTRIAN, CYCLIST, TRAFFIC_LIGHT, TRAFFIC_SIGN = range(6)
TREE, LAMP_POST = 0, 1  # variants of SCENERY

LANE_WIDTH = 3.5
SIDEWALK_WIDTH = 3.5
NEAR = 1.0  # metres: the closest ground line drawn
FAR = 150.0  # metres: the farthest road and building drawn
MIN_ACTOR_Z = 2.5  # an actor closer than this has been passed

RGB = tuple[int, int, int]

PERIODS = ('day', 'dusk', 'night')  # times of day, the conditions test sets are split by

# Spawn distance range (metres) and count range per kind; far objects make the small boxes.
_Z_RANGE = {CAR: (4.0, 95.0), PEDESTRIAN: (3.5, 65.0), CYCLIST: (4.0, 70.0),
            TRAFFIC_LIGHT: (8.0, 90.0), TRAFFIC_SIGN: (5.0, 75.0), SCENERY: (4.0, 90.0)}
_COUNT = {CAR: (2, 12), PEDESTRIAN: (0, 9), CYCLIST: (0, 4), TRAFFIC_LIGHT: (0, 5),
          TRAFFIC_SIGN: (0, 5), SCENERY: (0, 8)}
_CAR_COLORS = ((235, 235, 235), (25, 25, 28), (160, 165, 170), (180, 30, 30), (30, 60, 150),
               (30, 90, 50), (220, 180, 30), (120, 70, 40), (90, 95, 105), (200, 90, 30))
_SKIN = ((240, 200, 170), (200, 150, 110), (150, 100, 70), (90, 60, 40))


@dataclass(frozen=True)
class Camera:
    """A pinhole camera ``height_m`` above flat ground, looking along +z."""

    width: int
    height: int
    focal: float
    cx: float
    horizon: float
    height_m: float

    def point(self, x: float, y: float, z: float) -> tuple[float, float]:
        """Return the pixel position of the point ``(x, y, z)``."""
        return self.cx + self.focal * x / z, self.horizon + self.focal * (self.height_m - y) / z

    def project(self, x: npt.ArrayLike, y: npt.ArrayLike,
                z: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Return the (..., 2) pixel positions of broadcast arrays of points ``(x, y, z)``."""
        zs = np.asarray(z, np.float64)
        u = self.cx + self.focal * np.asarray(x, np.float64) / zs
        v = self.horizon + self.focal * (self.height_m - np.asarray(y, np.float64)) / zs
        out = np.empty(np.broadcast_shapes(u.shape, v.shape) + (2,))
        out[..., 0], out[..., 1] = u, v
        return out


@dataclass(frozen=True)
class Lighting:
    """Time of day: a per-channel gain on reflecting surfaces, sky colours and sensor noise."""

    gain: tuple[float, float, float]
    sky_top: RGB
    sky_bottom: RGB
    period: str  # one of PERIODS
    noise: float  # grey levels, standard deviation
    blur: float  # Gaussian sigma in pixels; 0 = sharp

    @property
    def night(self) -> bool:
        """Whether lamps, lit windows and headlights glow (they ignore the gain)."""
        return self.period == 'night'

    def shade(self, rgb: RGB) -> RGB:
        """Return how a surface of colour ``rgb`` looks under this light."""
        return (min(255, int(rgb[0] * self.gain[0])), min(255, int(rgb[1] * self.gain[1])),
                min(255, int(rgb[2] * self.gain[2])))


@dataclass(frozen=True)
class Road:
    """The road between ``left`` and ``right`` with its lane lines and surface colours."""

    left: float
    right: float
    divider: float  # between oncoming lanes (left) and the ego's direction (right)
    dashed: tuple[float, ...]  # x of dashed lane lines
    solid: tuple[float, ...]  # x of solid lines
    asphalt: RGB
    sidewalk: RGB
    ground: RGB
    marking: RGB
    skyline: RGB


@dataclass
class Building:
    """A facade parallel to the road on ``side`` (-1 left, 1 right) from ``z0`` to ``z1``."""

    side: int
    z0: float
    z1: float
    setback: float
    height: float
    color: RGB
    windows: int  # seed of the lit-window pattern


@dataclass
class Actor:
    """One object; ``x`` is its centre, ``z`` its nearest face, ``elevation`` its lowest point."""

    kind: int
    variant: int
    x: float
    z: float
    vx: float  # m/s over the ground
    vz: float
    width: float
    height: float
    length: float
    elevation: float
    colors: tuple[RGB, RGB, RGB]
    phase: float = 0.0  # walking / pedalling cycle, radians
    cadence: float = 0.0  # radians per second


@dataclass
class World:
    """Everything a frame shows, plus the random stream that respawns what drives out of view."""

    camera: Camera
    lighting: Lighting
    road: Road
    ego_speed: float
    buildings: list[Building]
    actors: list[Actor]
    rng: np.random.Generator
    odometer: float = 0.0
    crosswalk_z: float | None = None
    skyline: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))

    def step(self, dt: float) -> None:
        """Advance ``dt`` seconds: the ego drives on, actors move, passed ones are replaced."""
        travel = self.ego_speed * dt
        self.odometer += travel
        if self.crosswalk_z is not None:
            self.crosswalk_z = self.crosswalk_z - travel if self.crosswalk_z > travel else None
        for building in self.buildings:
            building.z0 -= travel
            building.z1 -= travel
        self.buildings = [b for b in self.buildings if b.z1 > NEAR]
        for side in (-1, 1):
            _extend_buildings(self.rng, self.buildings, side, self.road)
        for i, actor in enumerate(self.actors):
            actor.x += actor.vx * dt
            actor.z += actor.vz * dt - travel
            actor.phase += actor.cadence * dt
            low, high = _Z_RANGE[actor.kind]
            if actor.z < MIN_ACTOR_Z or actor.z > high + 25.0 or abs(actor.x) > 40.0:
                far = (low + 0.75 * (high - low), high)
                self.actors[i] = spawn(self.rng, actor.kind, self.road, self.ego_speed, far)


def random_world(rng: np.random.Generator, width: int, height: int) -> World:
    """Sample a camera, time of day, street layout and a population of actors."""
    camera = Camera(width, height, focal=width * rng.uniform(0.7, 1.0),
                    cx=width * rng.uniform(0.45, 0.55), horizon=height * rng.uniform(0.36, 0.5),
                    height_m=rng.uniform(1.3, 1.8))
    road = _random_road(rng)
    ego_speed = rng.uniform(4.0, 14.0)
    buildings: list[Building] = []
    for side in (-1, 1):
        _extend_buildings(rng, buildings, side, road, start=rng.uniform(-20.0, 5.0))
    actors = [spawn(rng, kind, road, ego_speed, _Z_RANGE[kind])
              for kind, (low, high) in _COUNT.items()
              for _ in range(rng.integers(low, high + 1))]
    crosswalk = rng.uniform(12.0, 60.0) if rng.random() < 0.3 else None
    skyline = _random_skyline(rng, width, camera.horizon)
    return World(camera, _random_lighting(rng), road, ego_speed, buildings, actors, rng,
                 crosswalk_z=crosswalk, skyline=skyline)


def spawn(rng: np.random.Generator, kind: int, road: Road, ego_speed: float,
          z_range: tuple[float, float]) -> Actor:
    """Return a new actor of ``kind`` with random appearance, placed ``z_range`` metres ahead."""
    z = z_range[0] + (z_range[1] - z_range[0]) * rng.random() ** 1.5  # denser near the ego
    right_walk = rng.uniform(road.right + 0.6, road.right + SIDEWALK_WIDTH - 0.4)
    left_walk = rng.uniform(road.left - SIDEWALK_WIDTH + 0.4, road.left - 0.6)
    kerb = road.right + 0.4 if rng.random() < 0.6 else road.left - 0.4
    if kind == CAR:
        return _car(rng, road, ego_speed, z)
    if kind == PEDESTRIAN:
        return _pedestrian(rng, road, z, right_walk if rng.random() < 0.55 else left_walk)
    if kind == CYCLIST:
        return _cyclist(rng, road, ego_speed, z)
    if kind == TRAFFIC_LIGHT:
        housing = ((35, 35, 35), (40, 40, 40), (200, 170, 30))[rng.integers(3)]
        return Actor(kind, int(rng.integers(4)), kerb, z, 0.0, 0.0, rng.uniform(0.28, 0.42),
                     rng.uniform(0.85, 1.15), 0.3, rng.uniform(2.2, 3.8),
                     (housing, (110, 110, 110), (0, 0, 0)))
    if kind == TRAFFIC_SIGN:
        size = rng.uniform(0.55, 0.95)
        return Actor(kind, int(rng.integers(7)), kerb, z, 0.0, 0.0, size, size, 0.05,
                     rng.uniform(1.7, 2.6), ((120, 120, 120), (0, 0, 0), (0, 0, 0)))
    variant = TREE if rng.random() < 0.6 else LAMP_POST
    green = (int(rng.integers(30, 80)), int(rng.integers(90, 150)), int(rng.integers(30, 70)))
    return Actor(SCENERY, variant, right_walk if rng.random() < 0.5 else left_walk, z, 0.0, 0.0,
                 rng.uniform(1.5, 4.0), rng.uniform(4.0, 8.0), 0.3, 0.0,
                 (green, (90, 60, 35), (130, 130, 135)))


def _car(rng: np.random.Generator, road: Road, ego_speed: float, z: float) -> Actor:
    lanes = np.arange(road.left + LANE_WIDTH / 2, road.right, LANE_WIDTH)
    lane = float(rng.choice(lanes))
    oncoming = lane < road.divider and rng.random() < 0.9
    parked = not oncoming and rng.random() < 0.15
    shape = rng.random()
    if shape < 0.6:  # sedan, hatchback
        width, height, length = rng.uniform(1.6, 1.9), rng.uniform(1.35, 1.6), rng.uniform(3.8, 5)
    elif shape < 0.85:  # SUV
        width, height, length = rng.uniform(1.8, 2.0), rng.uniform(1.65, 1.95), rng.uniform(4, 5)
    else:  # van, truck, bus
        width, height, length = rng.uniform(2.0, 2.55), rng.uniform(2.2, 3.3), rng.uniform(5, 12)
    if parked:
        lane, speed = road.right - width / 2 - 0.2, 0.0
    elif oncoming:
        speed = -rng.uniform(6.0, 14.0)
    elif abs(lane) < LANE_WIDTH / 2:  # ahead in the ego's lane: never driven into
        speed = ego_speed + rng.uniform(0.0, 3.0)
    else:
        speed = ego_speed + rng.uniform(-4.0, 2.0)
    body = _jitter(rng, _CAR_COLORS[rng.integers(len(_CAR_COLORS))], 18)
    glass = _jitter(rng, (35, 45, 55), 10)
    trim = _jitter(rng, (30, 30, 30), 8)
    return Actor(CAR, int(oncoming), lane + rng.uniform(-0.35, 0.35), z, 0.0, speed, width,
                 height, length, 0.0, (body, glass, trim))


def _pedestrian(rng: np.random.Generator, road: Road, z: float, sidewalk_x: float) -> Actor:
    crossing = rng.random() < 0.15
    x = rng.uniform(road.left, road.right) if crossing else sidewalk_x
    speed = rng.uniform(0.8, 1.8) * rng.choice((-1.0, 1.0)) * (rng.random() < 0.7)
    vx, vz = (speed, 0.0) if crossing else (0.0, speed)
    height = rng.uniform(1.05, 1.35) if rng.random() < 0.12 else rng.uniform(1.5, 1.98)
    shirt = (int(rng.integers(20, 240)), int(rng.integers(20, 240)), int(rng.integers(20, 240)))
    trousers = _jitter(rng, ((40, 45, 70), (30, 30, 30), (110, 100, 80))[rng.integers(3)], 20)
    skin = _SKIN[rng.integers(len(_SKIN))]
    return Actor(PEDESTRIAN, int(rng.integers(2)), x, z, vx, vz, height * rng.uniform(0.24, 0.32),
                 height, 0.3, 0.0, (shirt, trousers, skin), phase=rng.uniform(0, 2 * np.pi),
                 cadence=5.5 * abs(speed))


def _cyclist(rng: np.random.Generator, road: Road, ego_speed: float, z: float) -> Actor:
    side_view = rng.random() < 0.35  # crossing: seen from the side
    if side_view:
        vx, vz = rng.uniform(3.0, 6.0) * rng.choice((-1.0, 1.0)), 0.0
        x = rng.uniform(road.left, road.right)
        width = rng.uniform(1.6, 1.8)
    else:
        vx, vz = 0.0, min(ego_speed, rng.uniform(3.0, 7.0))
        x = road.right - rng.uniform(0.5, 1.2)
        width = rng.uniform(0.55, 0.7)
    frame = (int(rng.integers(20, 230)), int(rng.integers(20, 230)), int(rng.integers(20, 230)))
    jacket = (int(rng.integers(20, 240)), int(rng.integers(20, 240)), int(rng.integers(20, 240)))
    return Actor(CYCLIST, int(side_view) * (1 if vx >= 0 else -1), x, z, vx, vz, width,
                 rng.uniform(1.65, 1.9), 1.7, 0.0, (jacket, frame, _SKIN[rng.integers(4)]),
                 phase=rng.uniform(0, 2 * np.pi), cadence=rng.uniform(4.0, 7.0))


def _random_road(rng: np.random.Generator) -> Road:
    lanes_left, lanes_right = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    shift = rng.uniform(-0.5, 0.5)
    divider = -LANE_WIDTH / 2 + shift
    left = divider - lanes_left * LANE_WIDTH
    right = divider + lanes_right * LANE_WIDTH
    boundaries = np.arange(left + LANE_WIDTH, right - 0.1, LANE_WIDTH)
    solid_divider = rng.random() < 0.5
    dashed = tuple(float(b) for b in boundaries if not (solid_divider and abs(b - divider) < 0.1))
    solid = (left + 0.3, right - 0.3) + ((divider,) if solid_divider else ())
    grey = int(rng.integers(55, 105))
    return Road(left, right, divider, dashed, solid,
                asphalt=_jitter(rng, (grey, grey, grey + 4), 6),
                sidewalk=_jitter(rng, (150, 148, 140), 20),
                ground=_jitter(rng, ((80, 110, 60), (120, 110, 90))[rng.integers(2)], 20),
                marking=_jitter(rng, ((235, 235, 230), (230, 200, 60))[int(rng.random() < 0.1)],
                                10),
                skyline=_jitter(rng, (110, 115, 130), 25))


def _random_lighting(rng: np.random.Generator) -> Lighting:
    time = rng.random()
    period = PERIODS[int(time >= 0.6) + int(time >= 0.85)]
    if time < 0.6:  # day
        gain, cast = rng.uniform(0.8, 1.2), np.array([1.0, 1.0, 1.0])
        sky_top, sky_bottom, noise = (70, 130, 215), (180, 210, 240), rng.uniform(1, 5)
    elif time < 0.85:  # dusk
        gain, cast = rng.uniform(0.5, 0.8), np.array([1.12, 0.92, 0.78])
        sky_top, sky_bottom, noise = (70, 70, 130), (240, 150, 90), rng.uniform(3, 7)
    else:  # night
        gain, cast = rng.uniform(0.25, 0.42), np.array([0.85, 0.92, 1.1])
        sky_top, sky_bottom, noise = (5, 8, 20), (25, 30, 50), rng.uniform(4, 9)
    cast = cast * rng.uniform(0.9, 1.1, 3)
    blur = rng.uniform(0.5, 1.4) if rng.random() < 0.5 else 0.0
    r, g, b = (gain * cast).tolist()
    return Lighting((r, g, b), _jitter(rng, sky_top, 15), _jitter(rng, sky_bottom, 15),
                    period, noise, blur)


def _random_skyline(rng: np.random.Generator, width: int, horizon: float) -> npt.NDArray[
        np.float64]:
    """Return per-column heights in pixels of distant buildings and hills above the horizon."""
    blocks = rng.integers(8, 40)
    edges = np.sort(rng.integers(0, width, blocks))
    heights = rng.uniform(0.0, 0.12 * horizon, blocks + 1) * (rng.random(blocks + 1) < 0.7)
    return np.asarray(heights[np.searchsorted(edges, np.arange(width))], np.float64)


def _extend_buildings(rng: np.random.Generator, buildings: list[Building], side: int, road: Road,
                      start: float | None = None) -> None:
    """Add buildings on ``side`` until they reach FAR."""
    ends = [b.z1 for b in buildings if b.side == side]
    z = max(ends) if ends else (start if start is not None else NEAR)
    kerb = road.right + SIDEWALK_WIDTH if side > 0 else -(road.left - SIDEWALK_WIDTH)
    while z < FAR:
        length = rng.uniform(8.0, 35.0)
        gap = rng.uniform(0.0, 12.0) if rng.random() < 0.4 else 0.0
        color = _jitter(rng, ((160, 150, 135), (120, 80, 60), (190, 185, 175), (90, 95, 110),
                              (170, 120, 90))[rng.integers(5)], 25)
        buildings.append(Building(side, z + gap, z + gap + length, kerb + rng.uniform(0.0, 3.0),
                                  rng.uniform(6.0, 30.0), color, int(rng.integers(2**31))))
        z += gap + length


def _jitter(rng: np.random.Generator, rgb: RGB, amount: int) -> RGB:
    dr, dg, db = rng.integers(-amount, amount + 1, 3).tolist()
    return (min(255, max(0, rgb[0] + dr)), min(255, max(0, rgb[1] + dg)),
            min(255, max(0, rgb[2] + db)))
