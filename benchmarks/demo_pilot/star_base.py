"""Pilot row Y's base (benchmarks/demo_pilot/README.md): the demo's data with every square replaced by a five-point
star (label 2, still named "square" in the config's metainfo and in pilot.csv), drawn by the same equal-area rule,
then make_base.py's MAE step. A one-off variant: it swaps harnesses.synthetic's polygon functions in this process
only, so the library keeps one shape set.

    python benchmarks/demo_pilot/star_base.py BASE [INNER_RATIO]
"""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_base  # noqa: E402

from harnesses import synthetic  # noqa: E402

POINTS = 5


def main(base: str, inner: str = "0.45") -> None:
    ratio = float(inner)
    polygon, reach = synthetic._polygon, synthetic._reach

    def star_reach(kind: str, r: float) -> float:
        if kind != "star":
            return reach(kind, r)
        # a star of 2 x POINTS corners at radii R and ratio x R covers POINTS ratio R^2 sin(pi / POINTS): equal to
        # the 24-gon of circumradius r
        return r * math.sqrt(12 * math.sin(math.pi / 12) / (POINTS * ratio * math.sin(math.pi / POINTS)))

    def star_polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
        if kind != "star":
            return polygon(kind, cx, cy, r, angle)
        big = star_reach(kind, r)
        return [(cx + big * (1 if k % 2 == 0 else ratio) * math.cos(-math.pi / 2 + angle + math.pi * k / POINTS),
                 cy + big * (1 if k % 2 == 0 else ratio) * math.sin(-math.pi / 2 + angle + math.pi * k / POINTS))
                for k in range(2 * POINTS)]

    synthetic.SHAPE_CLASSES = ("circle", "star", "triangle")
    synthetic._reach, synthetic._polygon = star_reach, star_polygon
    make_base.main(base, "0.08", "0.2", "plain+stripes+noise", "1", "4", "32", "320")


if __name__ == "__main__":
    main(*sys.argv[1:])
