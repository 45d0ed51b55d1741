"""Small helpers the dataset readers share: finding a dataset's root folder,
listing files by stem and reading split lists. Not public API."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from everseg.data.errors import DataError
from everseg.data.io import IMAGE_SUFFIXES


def find_root(root: str | Path, candidates: Iterable[str], is_root: Callable[[Path], bool],
              what: str, expected: str) -> Path:
    """The first of ``root / c`` (for c in ``candidates``; "" = root itself) that ``is_root``.

    Raises a DataError naming ``root`` and describing the ``expected`` layout otherwise.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(root, f"{what} folder does not exist")
    if not root.is_dir():
        raise DataError(root, f"expected a {what} folder, found a file")
    for c in candidates:
        p = root / c if c else root
        if p.is_dir() and is_root(p):
            return p
    raise DataError(root, f"does not look like {what}: expected {expected}")


def stems_in(folder: Path, suffixes: Iterable[str], problems: list[DataError],
             kind: str) -> dict[str, Path]:
    """``stem -> file`` for files in ``folder`` with one of ``suffixes`` (case-insensitive).

    Hidden files are skipped. Two files with the same stem (``a.png`` and ``a.jpg``)
    are a problem, appended to ``problems``.
    """
    suffixes = tuple(s.lower() for s in suffixes)
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower() not in suffixes:
            continue
        if p.stem in found:
            problems.append(DataError(p, f"two {kind} files share the stem {p.stem!r} "
                                         f"({found[p.stem].name} and {p.name})"))
            continue
        found[p.stem] = p
    return found


def list_entry_stem(entry: str) -> str:
    """``"a/b/x.png" -> "x"``, ``"x" -> "x"``; only image suffixes are stripped (stems may hold dots)."""
    name = entry.replace("\\", "/").rsplit("/", 1)[-1]
    suffix = Path(name).suffix
    return name[: -len(suffix)] if suffix.lower() in IMAGE_SUFFIXES else name


def read_list(path: Path, *, whole_line: bool = False) -> list[tuple[int, str]]:
    """``(line number, stem)`` for each entry of a split list.

    Blank lines and ``#`` comments are skipped. An entry may be a stem, a file name or
    a path. With ``whole_line`` the stripped line is the entry (names may hold spaces);
    otherwise the first column is (lists of ``image mask`` pairs, as VOC setups use).
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read split list ({exc})") from exc
    entries = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        entries.append((lineno, list_entry_stem(line if whole_line else line.split()[0])))
    return entries
