"""The generic "folder" format: your own images and masks, no conversion needed.

Layout::

    root/
      images/        x.png | x.jpg | x.jpeg        (any size; grayscale and 16-bit are fine)
      masks/         x.png                         (same stem as its image; PNG only)
      classes.txt    one class per line in class-id order: the first class is id 0, the next id 1, ...
                     (# comment lines are not classes; a blank line between classes is an error,
                     since it would silently shift every later id)
      train.txt      optional split lists: one stem per line (a file name or path also works)
      val.txt
      test.txt
      everseg.yaml   optional, see below

``classes.txt`` lines are either ``name`` or ``name R G B`` (a colour per class;
names may contain spaces: ``traffic light 250 170 30``). Duplicate names are an error.

Splits: without any list file, ``split="all"``, ``"train"`` and ``"trainval"`` all give
every image. With lists, ``split`` reads ``<split>.txt`` and asking for a split that has no
list is an error; ``"trainval"`` joins ``train.txt`` and ``val.txt``, whichever exist;
``"all"`` is always every image in ``images/``.

Mask encodings (``mask_format``):

- ``"index"``: single-channel PNGs (L, P or 16-bit) holding class ids; 255 = ignore.
  Palette ("P") PNGs are read as their indices, as VOC stores them.
- ``"values"``: raw values that stand for classes, mapped by an explicit table such as
  ``values: {0: 0, 255: 1}`` (a class may be named instead of numbered; 255 or
  ``ignore`` = ignore). Values not in the table are errors.
- ``"rgb"``: colour PNGs, each class one colour (from ``classes.txt`` or ``palette``).
  Colours not in the palette are errors unless listed in ``ignore_colors``.

Auto-detection, when neither the ``mask_format`` argument nor ``everseg.yaml`` says:
an explicit ``values`` table means "values"; class colours plus colour (RGB) mask
files mean "rgb" (colours with single-channel masks are just the display palette,
"index"); otherwise a few masks spread over the folder are decoded and, if there are
exactly 2 classes and the values seen are 0 and 255, the masks are read as binary
``{0: 0, 255: 1}``; everything else is "index". **Ambiguity:** a 2-class index
dataset whose sampled masks happen to hold only class 0 and ignore (255) looks binary
too; write ``mask_format: index`` in ``everseg.yaml`` to say which you mean.

``everseg.yaml`` keys (all optional; unknown keys are an error, to catch typos)::

    mask_format: index            # index | values | rgb
    values: {0: 0, 255: 1}        # raw value -> class id or name (values format)
    palette: [[0, 0, 0], ...]     # one colour per class, or {name: [r, g, b]} / "#rrggbb"
    ignore_values: [255]          # raw values that mean ignore (index format)
    ignore_colors: [[0, 0, 0]]    # colours that mean ignore (rgb format)
    group: '^([^_]+)_'            # regex on the file stem -> Sample.group (first group,
                                  # or the whole match); no match -> ""

Every image must have a mask and every mask an image; all such problems are
collected and raised together (:class:`~everseg.data.errors.DataProblems`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml
from PIL import Image

from everseg.data._layout import read_list, stems_in
from everseg.data.dataset import Sample, SegmentationDataset
from everseg.data.errors import DataError, raise_problems
from everseg.data.io import IMAGE_SUFFIXES, read_mask
from everseg.data.labelspace import IGNORE_INDEX, LabelSpace
from everseg.data.masks import MaskMapping

FOLDER_SPLITS = ("train", "val", "test", "trainval", "all")
FOLDER_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MASK_FORMATS = ("index", "values", "rgb")
CONFIG_NAME = "everseg.yaml"
CLASSES_NAME = "classes.txt"
_CONFIG_KEYS = ("mask_format", "values", "palette", "ignore_values", "ignore_colors", "group")
_SNIFF_MASKS = 8  # masks decoded to auto-detect the encoding

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class FolderConfig:
    """What ``everseg.yaml`` says (every field optional)."""

    mask_format: str | None = None  # "index" | "values" | "rgb"; None = auto-detect
    values: dict[int, int] | None = None  # raw value -> class id (255 = ignore)
    palette: tuple[RGB, ...] | None = None  # one colour per class (rgb masks / display)
    ignore_values: tuple[int, ...] = (IGNORE_INDEX,)  # raw values meaning ignore (index)
    ignore_colors: tuple[RGB, ...] = ()  # colours meaning ignore (rgb)
    group: str | None = None  # regex on the stem giving Sample.group


def natural_key(stem: str) -> list[Any]:
    """Sort key putting ``2`` before ``10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", stem)]


# -- classes.txt and everseg.yaml -----------------------------------------------------------
def read_classes(path: Path) -> tuple[list[str], list[RGB] | None]:
    """Class names (and colours, when every line gives ``name R G B``) from ``classes.txt``."""
    if not path.is_file():
        raise DataError(path, "missing: list one class name per line (line i = class id i)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read class list ({exc})") from exc
    names: list[str] = []
    colours: list[RGB | None] = []
    first_line: dict[str, int] = {}
    lines = text.splitlines()
    while lines and not lines[-1].strip():  # trailing blank lines shift nothing
        lines.pop()
    for lineno, line in enumerate(lines, 1):
        parts = line.split()
        if parts and parts[0].startswith("#"):
            continue
        if not parts:
            if names:
                raise DataError(path, f"line {lineno} is blank: class ids follow the lines, so a blank line "
                                      f"would shift every later class; remove it or name the class")
            continue  # blank lines before the first class shift nothing either
        colour = None
        if len(parts) >= 4 and all(re.fullmatch(r"\d+", p) for p in parts[-3:]):
            rgb = tuple(int(p) for p in parts[-3:])
            if max(rgb) > 255:
                raise DataError(path, f"line {lineno}: colour {rgb} has values above 255")
            colour, parts = rgb, parts[:-3]
        name = " ".join(parts)
        if name in first_line:
            raise DataError(path, f"line {lineno}: duplicate class name {name!r} "
                                  f"(already on line {first_line[name]})")
        first_line[name] = lineno
        names.append(name)
        colours.append(colour)  # type: ignore[arg-type]
    if not names:
        raise DataError(path, "lists no classes")
    if len(names) > 255:
        raise DataError(path, f"lists {len(names)} classes; at most 255 are supported")
    given = [c for c in colours if c is not None]
    if not given:
        return names, None
    if len(given) != len(names):
        bare = names[colours.index(None)]
        raise DataError(path, f"class {bare!r} has no colour: give 'name R G B' on every line or on none")
    _check_unique_colours(given, names, path)
    return names, given  # type: ignore[return-value]


def _check_unique_colours(colours: list[RGB], names: list[str], path: Path) -> None:
    seen: dict[RGB, str] = {}
    for c, n in zip(colours, names):
        if c in seen:
            raise DataError(path, f"classes {seen[c]!r} and {n!r} have the same colour {c}")
        seen[c] = n


def _colour(value: Any, path: Path, where: str) -> RGB:
    if isinstance(value, str) and re.fullmatch(r"#?[0-9a-fA-F]{6}", value.strip()):
        h = value.strip().lstrip("#")
        return (int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16))
    if (isinstance(value, (list, tuple)) and len(value) == 3
            and all(isinstance(v, int) and 0 <= v <= 255 for v in value)):
        return (int(value[0]), int(value[1]), int(value[2]))
    raise DataError(path, f"{where}: expected a colour [R, G, B] (0..255) or '#rrggbb', got {value!r}")


def _class_id(value: Any, names: list[str], path: Path, where: str) -> int:
    if isinstance(value, str):
        if value.strip().lower() == "ignore":
            return IGNORE_INDEX
        if value in names:
            return names.index(value)
        raise DataError(path, f"{where}: no class named {value!r} in {CLASSES_NAME}")
    if isinstance(value, int) and (0 <= value < len(names) or value == IGNORE_INDEX):
        return value
    raise DataError(path, f"{where}: class id {value!r} is not in 0..{len(names) - 1} "
                          f"(or {IGNORE_INDEX} = ignore)")


def read_config(path: Path, names: list[str]) -> FolderConfig:
    """Parse and validate ``everseg.yaml``; every problem names the file."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DataError(path, f"cannot read YAML ({exc})") from exc
    if data is None:
        return FolderConfig()
    if not isinstance(data, dict):
        raise DataError(path, "expected a mapping of keys at the top level")
    unknown = sorted(set(map(str, data)) - set(_CONFIG_KEYS))
    if unknown:
        raise DataError(path, f"unknown keys {unknown}; known keys are {list(_CONFIG_KEYS)}")
    cfg: dict[str, Any] = {}
    fmt = data.get("mask_format")
    if fmt is not None:
        if fmt not in MASK_FORMATS:
            raise DataError(path, f"mask_format {fmt!r} is not one of {list(MASK_FORMATS)}")
        cfg["mask_format"] = fmt
    if data.get("values") is not None:
        table = data["values"]
        if not isinstance(table, dict) or not table:
            raise DataError(path, "values: expected a mapping raw value -> class, e.g. {0: 0, 255: 1}")
        out = {}
        for raw, cls in table.items():
            if not isinstance(raw, int) or not 0 <= raw <= 65535:
                raise DataError(path, f"values: raw value {raw!r} must be an integer in 0..65535")
            out[raw] = _class_id(cls, names, path, f"values[{raw}]")
        cfg["values"] = out
    if data.get("palette") is not None:
        pal = data["palette"]
        if isinstance(pal, dict):
            missing = [n for n in names if n not in pal]
            extra = [k for k in pal if k not in names]
            if missing or extra:
                raise DataError(path, f"palette: classes without colour {missing}, unknown classes {extra}")
            colours = [_colour(pal[n], path, f"palette[{n}]") for n in names]
        elif isinstance(pal, list):
            if len(pal) != len(names):
                raise DataError(path, f"palette has {len(pal)} colours for {len(names)} classes")
            colours = [_colour(c, path, f"palette[{i}]") for i, c in enumerate(pal)]
        else:
            raise DataError(path, "palette: expected a list of colours or a mapping class -> colour")
        _check_unique_colours(colours, names, path)
        cfg["palette"] = tuple(colours)
    if data.get("ignore_values") is not None:
        iv = data["ignore_values"]
        iv = [iv] if isinstance(iv, int) else iv
        if not isinstance(iv, list) or not all(isinstance(v, int) and 0 <= v <= 65535 for v in iv):
            raise DataError(path, f"ignore_values: expected a list of integers, got {iv!r}")
        clash = [v for v in iv if v < len(names)]
        if clash:
            raise DataError(path, f"ignore_values {clash} are class ids (0..{len(names) - 1})")
        cfg["ignore_values"] = tuple(iv)
    if data.get("ignore_colors") is not None:
        ic = data["ignore_colors"]
        if not isinstance(ic, list):
            raise DataError(path, "ignore_colors: expected a list of colours")
        cfg["ignore_colors"] = tuple(_colour(c, path, f"ignore_colors[{i}]") for i, c in enumerate(ic))
    if data.get("group") is not None:
        try:
            re.compile(str(data["group"]))
        except re.error as exc:
            raise DataError(path, f"group: invalid regular expression ({exc})") from exc
        cfg["group"] = str(data["group"])
    return FolderConfig(**cfg)


# -- mask encoding --------------------------------------------------------------------------
def _sniff(masks: list[Path]) -> tuple[set[str], set[int], Path | None]:
    """Modes of, values in, and the first true-colour one of a few masks spread over ``masks``."""
    picks = sorted(set(np.linspace(0, len(masks) - 1, min(_SNIFF_MASKS, len(masks))).round().astype(int)))
    modes: set[str] = set()
    values: set[int] = set()
    colour_mask = None
    for i in picks:
        p = masks[i]
        try:
            with Image.open(p) as im:
                modes.add(im.mode)
            raw = read_mask(p)
        except (DataError, OSError):
            continue  # an unreadable mask is reported when it is loaded
        if raw.ndim == 3:
            colour_mask = colour_mask or p
        else:
            values.update(np.unique(raw).tolist())
    return modes, values, colour_mask


def _encoding(root: Path, names: list[str], colours: list[RGB] | None, cfg: FolderConfig,
              mask_format: str | None, values: Mapping[int, Any] | None,
              masks: list[Path]) -> MaskMapping:
    classes_txt, cfg_path = root / CLASSES_NAME, root / CONFIG_NAME
    n = len(names)
    if values is not None:
        table = {int(k): _class_id(v, names, root, f"values argument [{k}]") for k, v in values.items()}
    else:
        table = cfg.values
    fmt = mask_format or cfg.mask_format
    if fmt is not None and fmt not in MASK_FORMATS:
        raise ValueError(f"mask_format {fmt!r} is not one of {MASK_FORMATS}")
    how = "given"
    if fmt is None:
        how = "auto-detected"
        if table is not None:
            fmt = "values"
        else:
            modes, seen, colour_mask = _sniff(masks)
            if colours is not None and modes & {"RGB", "RGBA"}:
                fmt = "rgb"
            elif colour_mask is not None:
                raise DataError(colour_mask, f"mask is a colour (RGB) image but {CLASSES_NAME} gives no "
                                             f"colours: write 'name R G B' lines or a palette in {CONFIG_NAME}")
            elif n == 2 and IGNORE_INDEX in seen and seen <= {0, IGNORE_INDEX}:
                fmt, table = "values", {0: 0, IGNORE_INDEX: 1}
                how = ("auto-detected binary 0/255 masks: 0 -> class 0, 255 -> class 1; "
                       f"write 'mask_format: index' in {CONFIG_NAME} if 255 means ignore")
            else:
                fmt = "index"
    if fmt == "rgb":
        if colours is None:
            raise DataError(classes_txt, f"rgb masks need a colour per class: write 'name R G B' "
                                         f"lines or a palette in {CONFIG_NAME}")
        table_c = {c: i for i, c in enumerate(colours)}
        for c in cfg.ignore_colors:
            if c in table_c:
                raise DataError(cfg_path, f"ignore colour {c} is the colour of class {names[table_c[c]]!r}")
            table_c[c] = IGNORE_INDEX
        ignore = f", ignore colours {list(cfg.ignore_colors)}" if cfg.ignore_colors else ""
        return MaskMapping.from_colors(table_c, description=f"rgb masks, {how}: one colour per class"
                                                            f"{ignore}")
    if fmt == "values":
        if table is None:
            if n == 2:
                table = {0: 0, IGNORE_INDEX: 1}
            else:
                raise DataError(cfg_path, "mask_format 'values' needs a 'values:' table "
                                          "(raw value -> class), e.g. {0: 0, 255: 1}")
        desc = how if how.startswith("auto-detected binary") else f"values {table} ({how})"
        return MaskMapping.from_values(table, description=desc)
    mapping = MaskMapping.identity(n, ignore=cfg.ignore_values)
    desc = (f"index masks ({how}): class ids 0..{n - 1}, ignore {list(cfg.ignore_values)}; "
            f"map other values with 'values:' in {CONFIG_NAME}")
    return dataclasses.replace(mapping, description=desc)


# -- the reader -----------------------------------------------------------------------------
def load_folder(root: str | Path, split: str = "train", *, mask_format: str | None = None,
                values: Mapping[int, Any] | None = None,
                **dataset_kwargs: Any) -> SegmentationDataset:
    """Images and masks in the folder format described in this module's docstring.

    ``mask_format`` ("index", "values", "rgb") and ``values`` (raw value -> class id or
    name) override ``everseg.yaml``; ``dataset_kwargs`` go to :class:`SegmentationDataset`.
    """
    root = Path(root)
    if split not in FOLDER_SPLITS:
        raise ValueError(f"unknown split {split!r}; the folder format has {FOLDER_SPLITS}")
    if not root.is_dir():
        raise DataError(root, "dataset folder does not exist")
    img_dir, mask_dir = root / "images", root / "masks"
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise DataError(d, f"missing: the folder format needs images/, masks/ and {CLASSES_NAME}")
    names, colours = read_classes(root / CLASSES_NAME)
    cfg_path = root / CONFIG_NAME
    cfg = read_config(cfg_path, names) if cfg_path.is_file() else FolderConfig()
    if cfg.palette is not None:
        if colours is not None and list(cfg.palette) != colours:
            raise DataError(cfg_path, f"palette differs from the colours in {CLASSES_NAME}; give them once")
        colours = list(cfg.palette)

    problems: list[DataError] = []
    images = stems_in(img_dir, FOLDER_IMAGE_SUFFIXES, problems, "image")
    masks = stems_in(mask_dir, IMAGE_SUFFIXES, problems, "mask")
    for stem, m in list(masks.items()):
        if m.suffix.lower() != ".png":
            problems.append(DataError(m, "masks must be PNG files (lossy formats change label values)"))
            del masks[stem]
    for stem in sorted(set(images) - set(masks), key=natural_key):
        problems.append(DataError(images[stem], f"has no mask (expected masks/{stem}.png)"))
    for stem in sorted(set(masks) - set(images), key=natural_key):
        problems.append(DataError(masks[stem], f"has no image (expected images/{stem}.png or .jpg)"))

    lists = {s: root / f"{s}.txt" for s in ("train", "val", "test") if (root / f"{s}.txt").is_file()}
    parts = [s for s in ("train", "val") if s in lists] if split == "trainval" else [split]
    if split == "all" or (split in ("train", "trainval") and not lists):
        stems = sorted(images, key=natural_key)
    elif parts and all(p in lists for p in parts):
        stems = []
        for part in parts:
            first: dict[str, int] = {}
            for lineno, stem in read_list(lists[part], whole_line=True):
                if stem in first:
                    problems.append(DataError(lists[part], f"line {lineno}: {stem!r} is listed twice "
                                                           f"(also line {first[stem]})"))
                elif stem not in images:
                    problems.append(DataError(lists[part], f"line {lineno}: {stem!r} has no image in images/"))
                elif stem in masks and stem not in stems:
                    stems.append(stem)
                first.setdefault(stem, lineno)
    else:
        have = ", ".join(f"{s}.txt" for s in lists) or "no split lists"
        wanted = "train.txt or val.txt" if split == "trainval" else f"{split}.txt"
        raise DataError(root / f"{split}.txt", f"no '{split}' split: this folder has {have}; write {wanted} "
                                               "(one image stem per line) or choose another split")

    def build(kwargs: dict[str, Any]) -> SegmentationDataset:
        good = [s for s in stems if s in masks]
        if not good:
            raise DataError(lists.get(split, img_dir), f"split '{split}' has no images")
        mapping = _encoding(root, names, colours, cfg, mask_format, values,
                            [masks[s] for s in sorted(masks, key=natural_key)])
        label_space = LabelSpace(names=tuple(names), palette=tuple(colours) if colours else ())
        rx = re.compile(cfg.group) if cfg.group else None

        def group(stem: str) -> str:
            m = rx.search(stem) if rx else None
            if m is None:
                return ""
            return m.group(1) if rx.groups else m.group(0)  # type: ignore[union-attr]

        samples = [Sample(images[s], masks[s], s, group(s)) for s in good]
        return SegmentationDataset(samples, label_space, mapping, name=f"{root.name}/{split}", **kwargs)

    raise_problems(problems, lambda: build({**dataset_kwargs, "cache": "none"}))
    return build(dataset_kwargs)
