"""A base folder for the demo-pilot runs on a variant of the built-in shapes (benchmarks/demo_pilot/README.md):
the demo's data step with the shapes' size range, count per picture and set sizes given, then the demo's MAE step
(tools/pretrain.py, the tiny config, 12 epochs) on the unlabelled pool. run_pilot.py then trains on BASE.

    python benchmarks/demo_pilot/make_base.py BASE RADIUS_LO RADIUS_HI FILLS ROTATE MAX_SHAPES NUM_TRAIN POOL \
        [MAE_EPOCHS] [BY_CLASS]

FILLS: the fills shapes draw from, joined by '+' (plain+stripes+noise is the default style); ROTATE: 1 or 0;
BY_CLASS 1: the i-th fill is always the i-th class's (circle, square, triangle), its colour still random.
"""
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from harnesses.demo import NUM_VAL, PRETRAIN_CONFIG  # noqa: E402
from harnesses.synthetic import ShapeStyle, make_shapes_dataset, make_unlabeled_shapes  # noqa: E402


def main(base: str, lo: str, hi: str, fills: str, rotate: str, max_shapes: str, num_train: str, pool: str,
         epochs: str = "12", by_class: str = "0") -> None:
    out = Path(base)
    style = ShapeStyle((float(lo), float(hi)), tuple(fills.split("+")), rotate == "1", by_class == "1")
    start = time.time()
    make_shapes_dataset(out / "data" / "shapes", num_train=int(num_train), num_val=NUM_VAL, size=192,
                        max_shapes=int(max_shapes), style=style)
    make_unlabeled_shapes(out / "data" / "unlabeled", int(pool), size=192, max_shapes=int(max_shapes), style=style)
    print(f"data {time.time() - start:.1f} s", flush=True)
    start = time.time()
    subprocess.run([sys.executable, "tools/pretrain.py", "--config", PRETRAIN_CONFIG, "--data",
                    str(out / "data" / "unlabeled"), "--output-dir", str(out / "mae"), f"epochs={epochs}",
                    f"save_every={epochs}", "progress=False", "--resume"], check=True)
    print(f"pretrain {time.time() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
