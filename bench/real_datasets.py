"""Real labeled image sets that install here, written as a folder per class (what `lancetag demo --data` reads).

- ``digits``: scikit-learn's 1,797 handwritten digits (8x8, written 56x56 by ``ray_jobs.demo``).
- ``elpv``: PyPI ``elpv-dataset`` (pinned in requirements/core.in): 300x300 greyscale
  electroluminescence images of solar cells with an expert's defect probability (0, 1/3, 2/3, 1).
  The classes are the sure ones: ``functional`` (probability 0, 1,508 cells) and ``defective``
  (probability 1, 715 cells); the 401 cells the experts were unsure about are left out.
- ``tuxpaint``: Debian ``tuxpaint-stamps-default`` (``apt-get install tuxpaint-stamps-default``):
  clip-art stamps, a class per top-level category with at least :data:`MIN_STAMPS` PNGs (8 classes,
  about 700 images), as they ship: transparent PNGs (RGBA, grey with alpha, palette), whose hidden
  pixels store black, white or other colours. The model sees them over white
  (``lance_io.image_size.model_image``), in training and labeling alike.
- ``tuxpaint_subcategories``: the same stamps, a class per subcategory (``animals/birds``,
  ``symbols/alphabets``) with at least :data:`MIN_SUBCATEGORY_STAMPS` PNGs: 22 classes, 608 images.
  A closed-set prompt listing 22 labels, as a hotel or shop task with dozens of classes has.

None of these sets is used to choose anything in the training recipe by hand: the recipe is chosen
from each set's own training rows (``llamafactory_ext.recipe``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

TUXPAINT_STAMPS = Path("/usr/share/tuxpaint/stamps")
MIN_STAMPS = 30
MIN_SUBCATEGORY_STAMPS = 10


def write_elpv(folder: Path) -> Path:
    """Write the ELPV cells with a sure label as PNGs under ``folder/functional`` and ``folder/defective``."""
    import elpv_dataset

    data = Path(elpv_dataset.__file__).parent / "data"
    with (data / "labels.csv").open() as f:
        rows = [line.split() for line in f if line.strip()]
    for path, probability, _cell_type in rows:
        label = {0.0: "functional", 1.0: "defective"}.get(float(probability))
        if label is None:
            continue
        out = folder / label
        out.mkdir(parents=True, exist_ok=True)
        (out / Path(path).name).write_bytes((data / path).read_bytes())
    return folder


def write_tuxpaint(folder: Path, stamps: Path = TUXPAINT_STAMPS) -> Path:
    """Copy Tux Paint's stamps of each category with >= MIN_STAMPS PNGs, as they ship, a folder per category."""
    return _copy_stamps(folder, stamps, "*", MIN_STAMPS)


def write_tuxpaint_subcategories(folder: Path, stamps: Path = TUXPAINT_STAMPS) -> Path:
    """Copy Tux Paint's stamps of each subcategory (``animals/birds``) with >= MIN_SUBCATEGORY_STAMPS
    PNGs, as they ship, a folder per subcategory (``animals_birds``): 22 classes, 608 images."""
    return _copy_stamps(folder, stamps, "*/*", MIN_SUBCATEGORY_STAMPS)


def _copy_stamps(folder: Path, stamps: Path, classes: str, minimum: int) -> Path:
    """Copy the PNGs under each folder of ``stamps`` matching ``classes`` (a glob) that holds at least
    ``minimum``, into a folder named by its path below ``stamps``, parts joined by ``_``."""
    import shutil

    if not stamps.is_dir():
        raise FileNotFoundError(f"{stamps} not found: apt-get install tuxpaint-stamps-default")
    for source in sorted(p for p in stamps.glob(classes) if p.is_dir()):
        files = sorted(source.rglob("*.png"))
        if len(files) < minimum:
            continue
        out = folder / "_".join(source.relative_to(stamps).parts)
        out.mkdir(parents=True, exist_ok=True)
        for k, path in enumerate(files):
            shutil.copyfile(path, out / f"{k:04d}-{path.stem}.png")
    return folder


def write_digits(folder: Path) -> Path:
    """Write scikit-learn's digits as the demo does (56x56 PNGs, a folder per digit)."""
    from ray_jobs.demo import write_digits as write

    return write(folder)


WRITERS: dict[str, Callable[[Path], Path]] = {
    "digits": write_digits,
    "elpv": write_elpv,
    "tuxpaint": write_tuxpaint,
    "tuxpaint_subcategories": write_tuxpaint_subcategories,
}


def available() -> list[str]:
    """The names of the sets that can be written on this machine."""
    names = ["digits"]
    try:
        import elpv_dataset  # noqa: F401

        names.append("elpv")
    except ImportError:
        pass
    if TUXPAINT_STAMPS.is_dir():
        names += ["tuxpaint", "tuxpaint_subcategories"]
    return names


def class_counts(folder: Path) -> dict[str, int]:
    """Return {class folder: image count} of a written set."""
    return {p.name: sum(1 for _ in p.iterdir()) for p in sorted(folder.iterdir()) if p.is_dir()}
