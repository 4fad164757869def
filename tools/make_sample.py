"""Build the bundled demo sample from clothing-small (train and validation folders only).

30 training and 10 validation images per class, picked with a fixed seed, downscaled so the shorter
side is 256 pixels (the resize step of EfficientNet-Lite0's preprocessing), JPEG quality 80.
Usage: python tools/make_sample.py ../shared/datasets/clothing-small edgetl/sample/clothing
"""

import random
import shutil
import sys
from pathlib import Path

from PIL import Image, ImageOps

PER_SPLIT = {"train": ("train", 30), "validation": ("val", 10)}  # never the source's test folder


def main(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    rng = random.Random(0)
    for src_split, (dst_split, n) in PER_SPLIT.items():
        for class_dir in sorted(p for p in (src / src_split).iterdir() if p.is_dir()):
            files = sorted(class_dir.iterdir())
            rng.shuffle(files)
            out_dir = dst / dst_split / class_dir.name
            out_dir.mkdir(parents=True)
            for f in files[:n]:
                img = ImageOps.exif_transpose(Image.open(f)).convert("RGB")
                scale = 256 / min(img.size)
                if scale < 1:
                    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
                img.save(out_dir / (f.stem + ".jpg"), quality=80, optimize=True)
    shutil.copy(src / "LICENSE", dst / "LICENSE")
    (dst / "README.md").write_text(
        "Demo sample for `edgetl demo`: 30 train and 10 validation images per class, chosen with a fixed\n"
        "seed from the train and validation folders of the clothing dataset (subset) by Alexey Grigorev\n"
        "(github.com/alexeygrigorev/clothing-dataset-small), downscaled to a shorter side of 256 pixels.\n"
        "Licence: CC0 1.0, see LICENSE. Rebuild with tools/make_sample.py.\n"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
