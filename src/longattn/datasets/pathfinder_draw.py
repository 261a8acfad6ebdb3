"""Pathfinder's drawing: contour paths grown dash by dash for many images at once, then rendered.

Split from ``pathfinder.py`` (the settings and the release layout) to keep each file to one concept;
``draw`` is the entry point.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .pathfinder import PathfinderSettings


# ---- geometry: a path is a chain of segments with half-widths, grown dash by dash, many images at once ------
# Points are (y, x) in pixels, pixel (i, j) centred at (i, j); a marker disc is a segment of length 0. As in the
# original, the two targets grow together, one paddle each in turn, every paddle turning by a draw from the
# continuity density among the turns that keep it inside the image and ``clearance`` away from what is drawn
# (so paths steer around obstacles); distractors follow, one at a time. Every image grows ``chains`` attempts
# at once; an attempt in a dead end continues as a copy of a live one (resampling, as in sequential Monte
# Carlo), where the original starts again. Clearance is exact for marker discs, within paddle_length / 4
# between the paddles of the paths growing together (three probes per paddle), and within a grid cell
# (``_cells_per_pixel``) against what was drawn before. Arrays carry a leading axis B (images) or B * chains.

def _gaps2(points: np.ndarray, a: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Squared distances (..., P, I) from points (..., P, 2) to segments a -> a + d, each (..., I, 2)."""
    ry = points[..., :, None, 0] - a[..., None, :, 0]
    rx = points[..., :, None, 1] - a[..., None, :, 1]
    dy, dx = d[..., None, :, 0], d[..., None, :, 1]
    t = np.minimum(np.maximum((ry * dy + rx * dx) / np.maximum(dy * dy + dx * dx, 1e-12), 0.0), 1.0)
    ey, ex = ry - t * dy, rx - t * dx
    return ey * ey + ex * ex


def _cells(points: np.ndarray, cells: int, side: int, radius: float = 0.0) -> np.ndarray:
    """Flat indices on a (side, side) grid of ``cells`` per pixel: the cell of each point (..., 2) (radius 0),
    or (..., T) the cells whose centres lie within ``radius`` pixels of the point's cell."""
    ij = np.floor((points + 0.5) * cells).astype(np.int64)
    if radius:
        c = math.floor(radius * cells)
        off = np.stack(np.meshgrid(np.arange(-c, c + 1), np.arange(-c, c + 1), indexing="ij"), -1).reshape(-1, 2)
        ij = ij[..., None, :] + off[(off * off).sum(-1) <= (radius * cells) ** 2]
    ij = np.clip(ij, 0, side - 1)
    return ij[..., 0] * side + ij[..., 1]


def _cells_per_pixel(resolution: int) -> int:
    return 2 if resolution <= 64 else 1


class _Scene:
    """What B images hold so far: items (B, N) with half-widths (-inf: none), and the grid cells that the centre
    line of a new paddle may not enter."""

    def __init__(self, s: PathfinderSettings, batch: int, rho: float):
        self.s, self.rho = s, rho
        self.cells = _cells_per_pixel(s.resolution)
        self.side = s.resolution * self.cells
        self.any = False  # whether anything was added
        self.a, self.d, self.r = np.zeros((batch, 0, 2)), np.zeros((batch, 0, 2)), np.zeros((batch, 0))
        self.blocked = np.zeros((batch, self.side * self.side), bool)

    def add(self, a: np.ndarray, d: np.ndarray, radius: np.ndarray, keep: np.ndarray, zones: bool = True) -> None:
        """Add items a -> a + d (B, I, 2) of half-widths ``radius`` (I,) to the images where ``keep`` (B,), and
        their zones to the grid unless ``zones`` is False (nothing grows after them)."""
        r = np.where(keep[:, None], radius, -np.inf)
        self.any |= bool(keep.any())
        self.a, self.d, self.r = (np.concatenate(p, 1) for p in ((self.a, a), (self.d, d), (self.r, r)))
        for value in np.unique(radius) if zones else ():
            # discs of radius R every <= 1 px along a line cover it to within 1 / (8 R) px
            length = np.abs(d[keep][:, radius == value]).max(initial=0.0) * math.sqrt(2)
            t = np.linspace(0.0, 1.0, math.ceil(length) + 1)[:, None]
            points = a[keep][:, radius == value, None] + t * d[keep][:, radius == value, None]  # (B', I', T, 2)
            zone = _cells(points, self.cells, self.side, value + self.rho + self.s.clearance)
            zone += (np.flatnonzero(keep) * self.side ** 2)[:, None, None, None]
            self.blocked.flat[zone.ravel()] = True

    def clear(self, points: np.ndarray, radius: float) -> np.ndarray:
        """(B, C) bool: whether points (B, C, 2) with radius ``radius`` keep ``clearance`` from all (exactly)."""
        need = np.maximum(radius + self.r + self.s.clearance, 0.0)[:, None]  # (B, 1, N)
        return (_gaps2(points, self.a, self.d) >= need * need).all(-1)


class _Grower:
    """Grows paths of ``paddles`` dashes ``gap`` apart, with marker discs at both ends when ``discs``."""

    def __init__(self, s: PathfinderSettings, paddles: int, gap: float, discs: bool, chains: int = 32,
                 turns: int = 3):
        self.s, self.paddles, self.gap, self.discs, self.chains, self.turns = s, paddles, gap, discs, chains, turns
        self.rho = max(s.paddle_width / 2, 0.75 / s.antialias)  # drawn half-width of a line (see _render)
        # samples along a paddle, <= 1 grid cell apart and odd in number (a middle one for the probes)
        self.t = np.linspace(0.0, 1.0, 2 * math.ceil(s.paddle_length * _cells_per_pixel(s.resolution) / 2) + 1)[:, None]
        self.lo = self.rho + 0.5  # drawn pixels stay one pixel off the border (the original's padding)
        self.hi = s.resolution - 1 - self.lo
        r = [s.marker_radius] * discs
        self.radius = np.array(r + [self.rho] * paddles + r)  # (I,) per item: [origin disc] paddles [end disc]
        # A path keeps ``clearance`` from its own items too, except from those that even a straight path brings
        # near that (neighbours along it; 1.25 lets them bend): paths neither touch nor cross themselves.
        # Item q keeps ``own_need2[q, j]`` (squared) from items j < mind[q] (0 for exempt ones among them).
        items = len(self.radius)
        along = np.arange(paddles + 1) * (s.paddle_length + gap)
        a, d = np.zeros((items, 2)), np.zeros((items, 2))
        a[:, 1] = np.concatenate([along[:1]] * discs + [along[:-1]] + [along[-1:] - gap] * discs)
        d[discs: discs + paddles, 1] = s.paddle_length
        need = self.radius[:, None] + self.radius[None, :] + s.clearance  # (I, I)
        straight = np.stack([_gaps2(a[q] + np.linspace(0, 1, 9)[:, None] * d[q], a, d).min(0) for q in range(items)])
        self.own_need2 = np.where(straight < (1.25 * need) ** 2, 0.0, need * need)
        self.mind = [int(np.flatnonzero(row[:q]).max(initial=-1)) + 1 for q, row in enumerate(self.own_need2)]
        grid = np.linspace(-1.0, 1.0, 257)  # inverse CDF of the turn density cos^2(90 deg * turn / max_turn)
        cdf = np.cumsum(np.cos(0.5 * math.pi * grid) ** 2)
        self.turn_cdf, self.turn_grid = (cdf - cdf[0]) / (cdf[-1] - cdf[0]), grid * math.radians(s.max_turn_deg)

    def grow(self, origins: np.ndarray | None, scene: _Scene, rng, first: np.ndarray | None = None,
             chains: int | None = None):
        """P paths per image, grown together paddle by paddle from ``origins`` (B, P, 2) (None: one path from
        anywhere), path ``first`` (B,) leading, clear of ``scene`` and of each other. Returns the items
        ``(a, d)`` (B, P, I, 2) (origin disc, paddles, end disc; discs have d = 0) and ``ok`` (B,): whether
        the image got them all."""
        s, k, n, r, f32 = self.s, chains or self.chains, self.turns, self.s.marker_radius, np.float32
        batch, paths, items = scene.blocked.shape[0], 1 if origins is None else origins.shape[1], len(self.radius)
        chains, side, at = batch * k, scene.side, np.arange(batch)
        image, rows = np.repeat(at, k), np.arange(chains)
        first = np.zeros(batch, np.int64) if first is None else first
        order = (first[:, None] + np.arange(paths)) % paths  # (B, P): slot j holds path order[:, j]
        done = np.ones(batch, bool)
        if origins is None:
            start = rng.uniform(self.lo, self.hi, (chains, 1, 2)).astype(f32)
        else:
            done &= scene.clear(origins, r).all(1)
            start = np.repeat(origins[at[:, None], order], k, 0).astype(f32)  # (C, P, 2), in slot order
        # float32 throughout (1e-5 px is precise enough); paths in slot order, so that indexing is by slices
        a, d = np.zeros((chains, paths, items, 2), f32), np.zeros((chains, paths, items, 2), f32)
        placed = np.full((chains, paths, items), -np.inf, f32)  # half-widths of the items placed so far
        if self.discs:
            a[:, :, 0], placed[:, :, 0] = start, r
        heading = np.zeros((chains, paths), f32)
        t, probe = self.t.astype(f32), [0, len(self.t) // 2, len(self.t) - 1]  # probes: ends and middle
        for step in range(self.paddles):
            q = step + self.discs  # item index of this paddle
            last = self.discs and step == self.paddles - 1
            for p in range(paths):
                other = 1 - p  # (two paths at most)
                here = start[:, p]
                if step == 0:
                    angles = rng.uniform(-math.pi, math.pi, (chains, n)).astype(f32)
                else:
                    # one draw per equal-mass stratum of the turn density: a uniform choice among those that
                    # fit is a draw from the density restricted to what fits, as the original's weighted choice
                    strata = (np.arange(n) + rng.random((chains, n), f32)) / n
                    angles = heading[:, p, None] + np.interp(strata, self.turn_cdf, self.turn_grid).astype(f32)
                    here = here + (self.gap / s.paddle_length) * d[:, p, q - 1]
                vec = s.paddle_length * np.stack([np.sin(angles), np.cos(angles)], -1)  # (C, n, 2)
                ends = here[:, None] + vec
                ok = ((ends >= self.lo) & (ends <= self.hi)).all(-1)
                ok &= ((here >= self.lo) & (here <= self.hi)).all(-1)[:, None]
                points = here[:, None, None] + t * vec[:, :, None]  # (C, n, m, 2)
                if scene.any:
                    cells = _cells(points, scene.cells, side) + (image * side * side)[:, None, None]
                    ok &= ~scene.blocked.ravel()[cells].any(-1)
                # Own earlier items (but neighbours) and the other path as far as it got, exactly, from the
                # probes; only items within reach of the paddle's start are measured.
                mind = self.mind[q]
                near_a, near_d, need2 = a[:, p, :mind], d[:, p, :mind], self.own_need2[q, :mind].astype(f32)[None]
                if paths > 1:
                    need = np.maximum(self.rho + placed[:, other, : q + 1] + s.clearance, 0.0)
                    near_a = np.concatenate([near_a, a[:, other, : q + 1]], 1)
                    near_d = np.concatenate([near_d, d[:, other, : q + 1]], 1)
                    need2 = np.concatenate([np.broadcast_to(need2, (chains, mind)), need * need], 1)
                reach = np.sqrt(need2) + s.paddle_length
                near = (_gaps2(here[:, None], near_a, near_d)[:, 0] < reach * reach) & (need2 > 0)  # (C, M)
                width = int(near.sum(1).max()) if near.size else 0
                if width:
                    take = np.argsort(~near, axis=1, kind="stable")[:, :width]  # the near ones first
                    need2 = np.where(np.take_along_axis(near, take, 1),
                                     np.take_along_axis(np.broadcast_to(need2, near.shape), take, 1), 0.0)
                    near_a, near_d = (np.take_along_axis(x, take[..., None], 1) for x in (near_a, near_d))
                    gaps2 = _gaps2(points[:, :, probe].reshape(chains, -1, 2), near_a, near_d)
                    ok &= (gaps2 >= need2[:, None]).reshape(chains, n, -1).all(-1)
                if last:  # the far end's marker disc comes with the last paddle: inside, clear of all but neighbours
                    ok &= ((ends >= r + 0.5) & (ends <= s.resolution - 1.5 - r)).all(-1)
                    if scene.any:
                        ok &= scene.clear(ends.reshape(batch, k * n, 2), r).reshape(chains, n)
                    ok &= (_gaps2(ends, a[:, p, :-1], d[:, p, :-1]) >= self.own_need2[-1, :-1]).all(-1)
                    if paths > 1:
                        need = np.maximum(r + placed[:, other] + s.clearance, 0.0)[:, None]
                        ok &= (_gaps2(ends, a[:, other], d[:, other]) >= need * need).all(-1)
                alive = ok.any(1).reshape(batch, k)
                done &= alive.any(1)
                if not alive.all():
                    # A chain in a dead end continues as a copy of a random live chain of its image (resampling,
                    # as in sequential Monte Carlo), where the original starts the image again.
                    src = np.where(alive[:, None, :], rng.random((batch, k, k)), -1.0).argmax(-1)
                    src = (src + at[:, None] * k).ravel()
                    dead = np.flatnonzero(~alive.ravel())
                    for arr in (a, d, placed, heading, start, here, angles, vec, ok):
                        arr[dead] = arr[src[dead]]
                pick = np.where(ok, rng.random((chains, n), f32), -1.0).argmax(1)
                a[:, p, q], d[:, p, q], placed[:, p, q] = here, vec[rows, pick], self.rho
                heading[:, p], start[:, p] = angles[rows, pick], here + vec[rows, pick]
                if last:
                    a[:, p, -1], placed[:, p, -1] = start[:, p], r
        best = at * k  # every chain of a finished image is complete: take the first
        slots = np.empty_like(order)
        slots[at[:, None], order] = np.arange(paths)  # back from slot order to path order
        return a[best[:, None], slots].astype(np.float64), d[best[:, None], slots].astype(np.float64), done


@lru_cache(maxsize=64)
def _grower(s: PathfinderSettings, paddles: int, gap: float, discs: bool) -> _Grower:
    # distractors start anywhere: many cheap attempts find the free space left
    return _Grower(s, paddles, gap, discs) if discs else _Grower(s, paddles, gap, discs, chains=64, turns=6)


def draw(s: PathfinderSettings, labels: np.ndarray, gap: float, rng, attempts: int = 200):
    """Images for ``labels`` (B,) with dashes ``gap`` apart: ``(pixels (B, res, res) uint8, markers (B, 2, 2),
    distractors drawn (B,))``. The first marker sits on the origin of target 0, the second on the far end of
    target 0 (label 1) or of target 1 (label 0)."""
    batch, r = len(labels), s.marker_radius
    target = _grower(s, s.contour_length, gap, True)
    a, d = np.zeros((2, batch, 2, len(target.radius), 2))  # items of the two targets
    origins = np.zeros((batch, 2, 2))
    lo, hi = r + 0.5, s.resolution - 1.5 - r  # marker discs stay inside the image
    # The original seeds the first origin at least 2 * seed_distance from the border (near the centre).
    band = max(lo, min(2 * s.seed_distance, (s.resolution - 1) / 2 - 1)) if s.seed_distance else lo
    todo = np.arange(batch)
    for attempt in range(attempts):  # the two targets grow together, alternately, as in the original
        n = len(todo)
        o = rng.uniform(band, s.resolution - 1 - band, (n, 2, 2))
        if s.seed_distance is not None:  # the second origin on a circle around the first
            phi = rng.uniform(0, 2 * math.pi, n)
            o[:, 1] = o[:, 0] + s.seed_distance * np.stack([np.sin(phi), np.cos(phi)], -1)
        ok = ((o[:, 1] >= lo) & (o[:, 1] <= hi)).all(-1) & (np.hypot(*(o[:, 1] - o[:, 0]).T) >= 2 * r + s.clearance)
        first = rng.integers(0, 2, n)  # which target leads is independent of the label
        ta, td, grown = target.grow(o, _Scene(s, n, target.rho), rng, first, 8 << min(attempt, 3))
        ok &= grown
        a[todo[ok]], d[todo[ok]], origins[todo[ok]] = ta[ok], td[ok], o[ok]
        todo = todo[~ok]
        if not len(todo):
            break
    else:
        raise RuntimeError(f"could not fit two paths of {s.contour_length} paddles of {s.paddle_length} px in a "
                           f"{s.resolution} x {s.resolution} image in {attempts} attempts; shorten them")
    scene = _Scene(s, batch, target.rho)
    scene.add(a.reshape(batch, -1, 2), d.reshape(batch, -1, 2), np.tile(target.radius, 2), np.ones(batch, bool),
              zones=s.distractors > 0)
    drawn = np.zeros(batch, np.int64)
    if s.distractors:
        distractor = _grower(s, s.distractor_length, gap, False)
        for j in range(s.distractors):  # one round of attempts each; a distractor that does not fit is left out
            da, dd, ok = distractor.grow(None, scene, rng)
            scene.add(da[:, 0], dd[:, 0], distractor.radius, ok, zones=j < s.distractors - 1)
            drawn += ok
    markers = np.stack([origins[:, 0], a[np.arange(batch), 1 - labels, -1]], 1)
    return _render(s, scene, markers), markers, drawn


def _render(s: PathfinderSettings, scene: _Scene, markers: np.ndarray) -> np.ndarray:
    """Draw the paddles and the two markers of B images on an ``antialias``-times finer grid, then average it
    down: (B, res, res) uint8. A fine cell is on when its centre lies within the half-width of a line."""
    aa, res, batch = s.antialias, s.resolution, len(markers)
    size = res * aa
    canvas = np.zeros(batch * size * size, np.float32)
    line = (scene.d != 0).any(-1) & (scene.r > -np.inf)  # (B, N) paddles (marker discs have length 0)
    rho = max(s.paddle_width / 2, 0.75 / aa)  # at least 1.5 fine cells wide, so that a line stays connected
    steps = math.ceil(s.paddle_length * aa * 2) + 1  # samples <= 0.5 fine cells apart
    t = np.linspace(0.0, 1.0, steps)[:, None]
    lines = (scene.a[line][:, None] + t * scene.d[line][:, None], np.nonzero(line)[0], rho, s.path_intensity)
    dots = (markers.reshape(-1, 1, 2), np.repeat(np.arange(batch), 2), s.marker_radius, s.marker_intensity)
    for points, image, radius, value in (lines, dots):
        fine = (points + 0.5) * aa - 0.5  # (S, P, 2) fine-grid coordinates
        c = math.ceil(radius * aa) + 1
        off = np.stack(np.meshgrid(np.arange(-c, c + 1), np.arange(-c, c + 1), indexing="ij"), -1).reshape(-1, 2)
        cells = np.rint(fine)[:, :, None].astype(np.int64) + off  # (S, P, T, 2)
        on = (((cells - fine[:, :, None]) ** 2).sum(-1) <= (radius * aa) ** 2) & ((cells >= 0) & (cells < size)).all(-1)
        flat = (cells[..., 0] * size + cells[..., 1] + (image * size * size)[:, None, None])[on]
        canvas[flat] = np.maximum(canvas[flat], value)
    pixels = canvas.reshape(batch, res, aa, res, aa).mean(axis=(2, 4))
    return np.rint(pixels).astype(np.uint8)


__all__ = ["draw"]
