"""Synthetic 3-class ordinal example for ``medfast train``: noisy 32x32 PNGs with one bright square whose
side (3-6, 8-11 or 13-16 pixels) is the class small < medium < large; a separate validation folder.

Usage::

    python scripts/classification_squares_example.py /tmp/squares
    medfast train /tmp/squares/cls.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

CONFIG = """task: classification
data: {{root: {root}/train, normalize: minmax, cache: none,
       dataset_args: {{classes: [small, medium, large], val_root: {root}/val}}}}
model: {{name: sononet, spatial_dims: 2, out_channels: 3, channels: [8],
        kwargs: {{encoding: ordinal, convs_per_block: [1, 1, 2, 2]}}}}
optim: {{lr: 0.003}}
trainer: {{batch_size: 16, max_steps: 150, val_every: 50, checkpoint_every: 150, progress: false,
          tensorboard: false, out_dir: {root}/run}}
"""


def main(root: str) -> None:
    out = Path(root)
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("val", 20)):
        for c, name in enumerate(["small", "medium", "large"]):
            d = out / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.normal(60, 25, (32, 32))
                s = int(rng.integers(3 + 5 * c, 7 + 5 * c))
                o = rng.integers(0, 32 - s + 1, 2)
                a[o[0]:o[0] + s, o[1]:o[1] + s] += 120
                Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(d / f"{i:03d}.png")
    (out / "cls.yaml").write_text(CONFIG.format(root=out.resolve()))
    print(f"wrote {out}/train, {out}/val and {out}/cls.yaml")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "squares")
