"""Dataset fingerprints and the defaults they choose for the fields a user leaves unset."""

import dataclasses
import json
import logging

import numpy as np
import pytest

from everseg.data.dataset import SegmentationDataset
from everseg.data.fingerprint import fingerprint, plan_defaults
from everseg.data.labelspace import LabelSpace
from everseg.learn import load_config
from everseg.learn.run import FITTED_FIELDS, fit_to_data

SPACE = LabelSpace(("road", "sign", "sky"))


def dataset(sizes, rare_share=0.2):
    """Images of the given (h, w) sizes; ``rare_share`` of each mask's rows are 'sign'."""
    images, masks = [], []
    for h, w in sizes:
        mask = np.zeros((h, w), np.uint8)
        mask[: h // 2] = 2
        mask[h - max(1, round(rare_share * h)):] = 1
        images.append(np.zeros((h, w, 3), np.uint8))
        masks.append(mask)
    return SegmentationDataset.from_arrays(images, masks, SPACE, name="photos")


def test_the_fingerprint_measures_sizes_and_class_shares():
    fp = fingerprint(dataset([(100, 200), (300, 400), (200, 300)]))
    assert fp.images == fp.measured == 3
    assert fp.median_size == (200, 300) and fp.min_size == (100, 200) and fp.max_size == (300, 400)
    assert sum(fp.class_fractions) == pytest.approx(1.0, abs=1e-5)
    assert fp.class_fractions[1] == pytest.approx(0.2, abs=0.01)
    # A large set is measured on evenly spaced images, the same ones every time.
    many = dataset([(40, 60)] * 30)
    assert fingerprint(many, max_images=10).measured == 10


def test_camvid_sized_images_get_the_tuned_camvid_recipe():
    camvid = dataclasses.replace(fingerprint(dataset([(360, 480)] * 4)), images=468)  # train+val
    plan = plan_defaults(camvid, set(FITTED_FIELDS))
    assert plan.values["data.crop_size"] == (288, 384)
    assert plan.values["data.scale"] == (0.6, 1.6)
    assert plan.values["train.batch_size"] == 8
    assert plan.values["optim.lr"] == 0.02 and plan.values["optim.warmup_epochs"] == 1.0
    assert set(plan.reasons) == set(FITTED_FIELDS)


def test_small_photos_get_crops_that_fit_them_and_the_recipes_batch():
    photos = dataclasses.replace(fingerprint(dataset([(180, 240)] * 4)), images=2000)
    plan = plan_defaults(photos, set(FITTED_FIELDS))
    h, w = plan.values["data.crop_size"]
    assert (h, w) == (128, 192) and h <= 180 and w <= 240
    # 8 images, not the recipe's pixels a step (32 of these crops): 47.1 against 36.3 on
    # CamVid at 180x240 in 6 minutes.
    assert plan.values["train.batch_size"] == 8
    low, high = plan.values["data.scale"]
    assert 0.5 <= low < 1 < high <= 2


def test_large_images_get_a_crop_within_the_cpu_budget_with_their_aspect():
    plan = plan_defaults(fingerprint(dataset([(1024, 2048)] * 4)), set(FITTED_FIELDS))
    h, w = plan.values["data.crop_size"]
    assert h * w <= 288 * 384 and w == 2 * h and h % 32 == 0
    assert plan.values["data.scale"] == (0.5, 1.5)
    assert plan.values["train.batch_size"] == 2  # at most half of 4 images
    assert "capped" in plan.reasons["data.crop_size"]


def test_a_batch_covers_at_most_a_twentieth_of_a_small_sets_pixels():
    # The ISBI membranes: 18 training images of 512x512, where the batch of 9 that keeps the
    # recipe's pixels a step scored 72.9 and a batch of 2 76.0 (6 minutes).
    plan = plan_defaults(fingerprint(dataset([(512, 512)] * 18)), set(FITTED_FIELDS))
    assert plan.values["data.crop_size"] == (320, 320)
    assert plan.values["train.batch_size"] == 2  # 5% of 18 x 512 x 512 pixels is 2.3 crops
    assert "at most 5% of the 18 training images' pixels" in plan.reasons["train.batch_size"]
    # 60 photos of 180x240 in 128x192 crops: 5% of their pixels is 5.3 crops.
    assert plan_defaults(fingerprint(dataset([(180, 240)] * 60)), {"data.crop_size", "train.batch_size"}
                         ).values["train.batch_size"] == 5


def test_the_warm_up_is_one_epoch_but_no_more_than_the_recipes_steps():
    many = fingerprint(dataset([(360, 480)] * 1000), max_images=5)
    plan = plan_defaults(many, {"data.crop_size", "train.batch_size", "optim.warmup_epochs"})
    assert plan.values["train.batch_size"] == 8
    assert plan.values["optim.warmup_epochs"] == pytest.approx(60 / 125)  # 125 steps an epoch
    # The user's batch counts: 1000 images in batches of 100 are 10 steps, under 60.
    assert plan_defaults(many, {"optim.warmup_epochs"}, batch_size=100).values == {"optim.warmup_epochs": 1.0}


def test_the_loss_follows_the_class_balance():
    rare = fingerprint(dataset([(100, 100)] * 4, rare_share=0.01))
    assert rare.imbalance >= 10
    plan = plan_defaults(rare, {"loss.kind", "loss.class_weights"})
    assert plan.values == {"loss.kind": "ce+dice", "loss.class_weights": "none"}
    # The user chose plain CE: imbalanced classes get the gentle weights.
    assert plan_defaults(rare, {"loss.class_weights"}, loss_kind="ce").values == {"loss.class_weights": "inverse_sqrt"}
    # Balanced classes get the Dice term too (ISBI membranes: ce+dice 69.9, ce 67.2), and a
    # user's plain CE on them no weights.
    balanced = fingerprint(dataset([(100, 100)] * 4, rare_share=0.3))
    assert plan_defaults(balanced, {"loss.kind", "loss.class_weights"}).values == {
        "loss.kind": "ce+dice", "loss.class_weights": "none"}
    assert plan_defaults(balanced, {"loss.class_weights"}, loss_kind="ce").values == {"loss.class_weights": "none"}


def test_fields_the_user_set_are_kept_and_fitting_can_be_switched_off(caplog):
    caplog.set_level(logging.INFO)
    photos = dataset([(180, 240)] * 10, rare_share=0.01)
    fitted, plan = fit_to_data(load_config(None, {"data.crop_size": [64, 64], "loss.kind": "ce"}), photos)
    assert fitted.data.crop_size == (64, 64) and fitted.loss.kind == "ce"
    assert fitted.loss.class_weights == "inverse_sqrt" and fitted.train.batch_size == 5
    assert set(plan.values) == {"data.scale", "train.batch_size", "optim.lr", "optim.warmup_epochs",
                                "loss.class_weights"}
    assert fitted.optim.lr == 0.02 and fitted.optim.warmup_epochs == 1.0
    # The scale range follows the user's crop: 64x64 is a third of a 180x240 photo.
    assert plan.values["data.scale"] == (0.5, 1.5)
    assert "fitted to photos" in caplog.text and "no pixels of" not in caplog.text
    # Fitted values count as set: the saved config.yaml replays them.
    assert "crop_size" in fitted.data.model_fields_set and "scale" in fitted.data.model_fields_set
    off = load_config(None, {"data.fit_to_data": False})
    assert fit_to_data(off, photos) == (off, None)
    recipe = load_config("configs/camvid.yaml")
    assert fit_to_data(recipe, photos) == (recipe, None)  # every fitted field is set by the recipe


def test_a_class_missing_from_the_training_images_is_named(caplog):
    caplog.set_level(logging.INFO)
    images = [np.zeros((64, 64, 3), np.uint8)] * 2
    masks = [np.zeros((64, 64), np.uint8), np.full((64, 64), 2, np.uint8)]
    fit_to_data(load_config(None), SegmentationDataset.from_arrays(images, masks, SPACE, name="two"))
    assert "two: no pixels of sign" in caplog.text


def test_training_with_defaults_records_what_it_chose(tiny_camvid, tmp_path):
    from everseg.learn import train

    cfg = load_config(None, {"data.path": str(tiny_camvid), "data.val_split": "none", "model.arch": "lraspp",
                             "model.pretrained": False, "train.epochs": 1, "train.bf16": "off"})
    train(cfg, tmp_path / "run", progress=False)
    chosen = json.loads((tmp_path / "run" / "fingerprint.json").read_text())
    assert chosen["chosen"]["data.crop_size"] == [32, 64]  # 0.8 of the 64x80 images
    assert chosen["fingerprint"]["median_size"] == [64, 80]
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.data.crop_size == (32, 64) and saved.train.batch_size == chosen["chosen"]["train.batch_size"]
