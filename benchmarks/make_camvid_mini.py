"""Build the embedded CamVid sample: 60 train + 20 test images at 240x180."""
import numpy as np
from pathlib import Path
from PIL import Image
import sys
src = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/camvid")
dst = Path("src/everseg/samples/camvid-mini")
(dst / "images").mkdir(parents=True, exist_ok=True)
(dst / "masks").mkdir(parents=True, exist_ok=True)
def pick(split, seqs, n_each):
    names = sorted(p.stem for p in (src / split).glob("*.png"))
    out = []
    for s, n in zip(seqs, n_each):
        group = [x for x in names if x.startswith(s)]
        idx = np.linspace(0, len(group) - 1, n).round().astype(int)
        out += [group[i] for i in idx]
    return out
train = pick("train", ["0001TP", "0006R0", "0016E5"], [16, 20, 24])
test = pick("test", ["0001TP", "Seq05VD"], [8, 12])
for split, stems in (("train", train), ("test", test)):
    for s in stems:
        img = Image.open(src / split / f"{s}.png").convert("RGB").resize((240, 180), Image.BICUBIC)
        img.save(dst / "images" / f"{s}.jpg", quality=90)
        m = np.array(Image.open(src / f"{split}annot" / f"{s}.png"))
        m = np.where(m == 11, 255, m).astype(np.uint8)
        Image.fromarray(m).resize((240, 180), Image.NEAREST).save(dst / "masks" / f"{s}.png", optimize=True)
    (dst / f"{split}.txt").write_text("\n".join(stems) + "\n")
names = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist"]
(dst / "classes.txt").write_text("\n".join(names) + "\n")
print(len(train), len(test))
