"""Training and inference speed: the everseg loop against a plain PyTorch loop, side by side.

Same model (DeepLabV3+ / MobileNetV2, 11 classes), same crops, same augmentation, same
batch size. The plain loop is what a straightforward script does: float32, NCHW, PNGs
decoded from disk every step. everseg uses its defaults: decoded-image cache,
channels-last, bfloat16 autocast when the CPU has native bf16.

    python benchmarks/speed.py            # writes results/speed.json and a table in README.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from common import SHARED_DATA, machine_info, update_readme_section, write_json
from everseg.data import AugmentConfig, load_camvid, train_transform
from everseg.evaluate import predict
from everseg.devices import cpu_has_native_bf16
from everseg.learn import Trainer, load_config
from everseg.models import create_model


def plain_training(dataset, crop, batch, epochs, seed) -> float:
    """Images/second of the last epoch of a textbook loop."""
    torch.manual_seed(seed)
    model = create_model(arch="deeplabv3plus", backbone="mobilenet_v2", num_classes=11, pretrained=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True)
    model.train()
    rate = 0.0
    for _ in range(epochs):
        start, n = time.perf_counter(), 0
        for item in loader:
            x = item["image"].float() / 255.0
            loss = F.cross_entropy(model(x), item["mask"], ignore_index=255)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += x.shape[0]
        rate = n / (time.perf_counter() - start)
    return rate


def everseg_training(dataset, crop, batch, epochs, seed, bf16: str) -> float:
    cfg = load_config(None, {"data.crop_size": list(crop), "train.batch_size": batch, "train.epochs": epochs,
                             "train.seed": seed, "train.bf16": bf16, "model.pretrained": False,
                             "data.val_split": None, "optim.lr": 0.01})
    torch.manual_seed(seed)
    model = create_model(arch="deeplabv3plus", backbone="mobilenet_v2", label_space=dataset.label_space,
                         pretrained=False)
    with tempfile.TemporaryDirectory() as tmp:
        result = Trainer(model, dataset, None, cfg, tmp, progress=False).fit()
    return result.history[-1]["images_per_second"]


def plain_inference(images) -> float:
    model = create_model(arch="deeplabv3plus", backbone="mobilenet_v2", num_classes=11, pretrained=False).eval()
    with torch.no_grad():
        model(images[0][None].float() / 255)
        start = time.perf_counter()
        for img in images:
            model(img[None].float() / 255).argmax(1)
    return len(images) / (time.perf_counter() - start)


def everseg_inference(images, bf16: bool) -> float:
    model = create_model(arch="deeplabv3plus", backbone="mobilenet_v2", num_classes=11, pretrained=False)
    model = model.eval().to(memory_format=torch.channels_last)
    predict(model, images[0][None], autocast_bf16=bf16, channels_last=True)
    start = time.perf_counter()
    for img in images:
        predict(model, img[None], autocast_bf16=bf16, channels_last=True)
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "camvid")
    parser.add_argument("--images", type=int, default=64, help="training images per epoch")
    parser.add_argument("--crop", type=int, nargs=2, default=(288, 384), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2, help="the last epoch is timed")
    parser.add_argument("--infer-images", type=int, default=20)
    args = parser.parse_args()
    crop = tuple(args.crop)
    augment = train_transform(AugmentConfig(crop_size=crop, scale=(0.75, 1.25)))
    subset = list(range(args.images))
    from_disk = load_camvid(args.data, "train", cache="none").subset(subset).with_transform(augment)
    cached = load_camvid(args.data, "train", cache="none").subset(subset)
    cache_bytes = cached.cache_in_memory()
    cached = cached.with_transform(augment)
    bf16 = cpu_has_native_bf16()

    results = {"machine": machine_info(), "settings": {
        "model": "deeplabv3plus/mobilenet_v2", "crop": list(crop), "batch": args.batch,
        "train_images_per_epoch": args.images, "timed_epoch": args.epochs, "cpu_native_bf16": bf16,
        "cache_megabytes": round(cache_bytes / 1e6, 1)}}
    print("plain training ...", flush=True)
    results["plain_train_ips"] = plain_training(from_disk, crop, args.batch, args.epochs, 0)
    print("everseg training (fp32, cache + channels-last) ...", flush=True)
    results["everseg_fp32_train_ips"] = everseg_training(cached, crop, args.batch, args.epochs, 0, "off")
    print("everseg training (defaults) ...", flush=True)
    results["everseg_train_ips"] = everseg_training(cached, crop, args.batch, args.epochs, 0, "auto")
    test = load_camvid(args.data, "test", cache="none").subset(range(args.infer_images))
    images = [test[i]["image"] for i in range(len(test))]
    print("inference ...", flush=True)
    results["plain_infer_ips"] = plain_inference(images)
    results["everseg_infer_ips"] = everseg_inference(images, bf16)
    results["train_speedup"] = results["everseg_train_ips"] / results["plain_train_ips"]
    results["infer_speedup"] = results["everseg_infer_ips"] / results["plain_infer_ips"]
    write_json("speed", results)

    m, s = results["machine"], results["settings"]
    table = (
        f"## Speed (`python benchmarks/speed.py`)\n\n"
        f"{m['date']}, {m['cpu']}, {m['cores']} cores, torch {m['torch']}, commit {m['commit']}. "
        f"DeepLabV3+ / MobileNetV2, {crop[0]}x{crop[1]} crops, batch {args.batch}, "
        f"{args.images} training images, epoch {args.epochs} timed; inference on "
        f"{args.infer_images} CamVid test images at 360x480, batch 1.\n\n"
        "| loop | training img/s | inference img/s |\n|---|---:|---:|\n"
        f"| plain PyTorch (fp32, NCHW, PNG decoded each step) | {results['plain_train_ips']:.2f} | "
        f"{results['plain_infer_ips']:.2f} |\n"
        f"| everseg, fp32 (decoded cache, channels-last) | {results['everseg_fp32_train_ips']:.2f} | |\n"
        f"| everseg defaults (+ bf16 autocast: {bf16}) | {results['everseg_train_ips']:.2f} | "
        f"{results['everseg_infer_ips']:.2f} |\n"
        f"| **speed-up** | **{results['train_speedup']:.2f}x** | **{results['infer_speedup']:.2f}x** |\n")
    update_readme_section("speed", table)
    print(table)


if __name__ == "__main__":
    main()
