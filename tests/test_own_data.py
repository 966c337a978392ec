"""Data you have: ``data.name=folder`` (any folder of images, labelled by class sub-folders or not) and
``data.name=filelist`` (a text or CSV list), their seeded held-out split, and a label-free run through training,
``selfsup eval`` and ``selfsup report``, all on tiny files the tests write."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from conftest import TINY
from selfsup.cli import main
from selfsup.config import ConfigError, DataConfig, load_config
from selfsup.data.datasets import (
    CorruptImageWarning,
    DataFormatError,
    ImageLoadError,
    build_dataset,
    held_out,
    natural_sorted,
)
from selfsup.engine.checkpoint import load_checkpoint
from selfsup.engine.trainer import Trainer
from selfsup.eval.report import find_chromium, render_in_chromium

WEBP = features.check("webp")
FORMATS = ["png", "jpg", *(["webp"] if WEBP else [])]


def write_image(path: Path, seed: int, size: tuple[int, int] = (12, 12), mode: str = "RGB", **save) -> Path:
    """A small random image (a distinct colour per seed, so rows can be told apart) saved by its suffix."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path, **save)
    return path


def flat_folder(root: Path, n: int = 30) -> list[Path]:
    return [write_image(root / f"img{i:03d}.{FORMATS[i % len(FORMATS)]}", i) for i in range(n)]


def classes_folder(root: Path, counts: dict[str, int]) -> None:
    """``root/<class>/...`` with ``counts[class]`` images, some of them one folder deeper."""
    seed = 0
    for name, count in counts.items():
        for i in range(count):
            sub = "deeper/" if i % 3 == 0 else ""
            write_image(root / name / f"{sub}{name}_{i}.png", seed)
            seed += 1


def folder(path: Path, split: str = "train", **keys) -> object:
    return build_dataset(DataConfig(name="folder", path=str(path), **keys), split)


# ---------------------------------------------------------------------------------------------- folder


def test_flat_folder_is_unlabelled_with_a_seeded_held_out_split(tmp_path):
    files = flat_folder(tmp_path / "photos", 30)
    (tmp_path / "photos" / ".hidden.png").write_bytes(files[0].read_bytes())  # hidden files and folders are skipped
    write_image(tmp_path / "photos" / ".thumbnails" / "t.png", 99)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    train, val = folder(tmp_path / "photos"), folder(tmp_path / "photos", "val")
    assert (len(train), len(val)) == (27, 3)  # round(0.1 * 30) held out
    assert set(train.paths) | set(val.paths) == {str(f) for f in files} and not set(train.paths) & set(val.paths)
    assert train.paths == sorted(train.paths)
    assert train.classes == [] and (train.targets == -1).all() and (val.targets == -1).all()
    image, label = train[0]
    assert image.mode == "RGB" and image.size == (12, 12) and label == -1
    assert train.describe(0) == train.paths[0]
    everything = folder(tmp_path / "photos", "all")
    assert len(everything) == 30
    # the split follows the names, not the training seed or where the folder lives
    moved = tmp_path / "elsewhere" / "copy"
    moved.mkdir(parents=True)
    for f in files:
        (moved / f.name).write_bytes(f.read_bytes())
    assert [Path(p).name for p in folder(moved, "val").paths] == [Path(p).name for p in val.paths]
    other = folder(tmp_path / "photos", "val", split_seed=1)
    assert len(other) == 3 and other.paths != val.paths  # data.split_seed picks another split
    assert len(folder(tmp_path / "photos", "val", val_fraction=0.5)) == 15


def test_class_sub_folders_are_labels_with_auto_and_not_with_none(tmp_path):
    classes_folder(tmp_path / "data", {"cat": 20, "dog": 10, "owl": 10})
    train, val = folder(tmp_path / "data"), folder(tmp_path / "data", "val")
    assert train.classes == val.classes == ["cat", "dog", "owl"]
    assert Counter(val.targets.tolist()) == {0: 2, 1: 1, 2: 1}  # stratified: 10% of each class
    assert Counter(train.targets.tolist()) == {0: 18, 1: 9, 2: 9}
    for ds in (train, val):  # every label is the image's class folder (deeper files included)
        assert all(Path(p).relative_to(tmp_path / "data").parts[0] == ds.classes[y]
                   for p, y in zip(ds.paths, ds.targets, strict=True))
    unlabelled = folder(tmp_path / "data", labels="none")
    assert unlabelled.classes == [] and (unlabelled.targets == -1).all() and len(unlabelled) == 36
    assert folder(tmp_path / "data", labels="folders").classes == ["cat", "dog", "owl"]
    # one loose image: auto gives an unlabelled set, folders refuses and names it
    write_image(tmp_path / "data" / "loose.png", 7)
    assert folder(tmp_path / "data").classes == []
    with pytest.raises(DataFormatError, match=r"1 image\(s\) .* lie in no class sub-folder \(e\.g\. .*loose\.png\)"):
        folder(tmp_path / "data", labels="folders")
    # a single sub-folder is a place, not a class
    flat_folder(tmp_path / "one" / "images", 10)
    assert folder(tmp_path / "one").classes == []


def test_a_folder_with_train_and_val_uses_them(tmp_path):
    classes_folder(tmp_path / "ds" / "train", {"a": 6, "b": 4})
    classes_folder(tmp_path / "ds" / "val", {"a": 2, "b": 3})
    train, val = folder(tmp_path / "ds"), folder(tmp_path / "ds", "val")
    assert (len(train), len(val)) == (10, 5) and train.classes == val.classes == ["a", "b"]
    assert Counter(val.targets.tolist()) == {0: 2, 1: 3}
    assert all("/val/" in p for p in val.paths)
    with pytest.raises(ConfigError, match=r"data.val_split='test'.*'train', 'val'"):
        folder(tmp_path / "ds", "test", val_split="test")
    classes_folder(tmp_path / "ds" / "val", {"zebra": 1})  # a class the training split lacks
    with pytest.raises(DataFormatError, match="zebra"):
        folder(tmp_path / "ds", "val")
    flat_folder(tmp_path / "unlabelled" / "train", 8)  # unlabelled splits
    flat_folder(tmp_path / "unlabelled" / "val", 3)
    val = folder(tmp_path / "unlabelled", "val")
    assert len(val) == 3 and val.classes == [] and (val.targets == -1).all()


def test_held_out_counts_and_stability():
    keys = [f"k{i}" for i in range(100)]
    targets = np.array([0] * 50 + [1] * 30 + [2] * 19 + [3])
    mask = held_out(keys, targets, 0.1, seed=0)
    assert [int(mask[targets == c].sum()) for c in range(4)] == [5, 3, 2, 0]  # a single image stays in train
    assert (held_out(keys, targets, 0.1, seed=0) == mask).all()
    assert not held_out(keys, targets, 0.0, seed=0).any()
    assert held_out(keys[:2], np.array([-1, -1]), 0.01, seed=0).sum() == 1  # at least one of two
    # adding an image moves at most one other image between the splits
    grown = held_out([*keys[:50], "new"], np.zeros(51), 0.1, seed=0)
    before = set(np.flatnonzero(held_out(keys[:50], np.zeros(50), 0.1, seed=0)))
    assert len(before ^ set(np.flatnonzero(grown[:50]))) <= 1
    # and the seed matters
    assert (held_out(keys, targets, 0.5, seed=1) != held_out(keys, targets, 0.5, seed=0)).any()


def test_bad_folder_keys_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.name='folder' needs data.path"):
        build_dataset(DataConfig(name="folder"), "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        folder(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        folder(tmp_path / "empty")
    flat_folder(tmp_path / "few", 5)
    with pytest.raises(ConfigError, match=r"data.val_fraction.*\[0, 1\)"):
        folder(tmp_path / "few", val_fraction=1.5)
    with pytest.raises(ConfigError, match="holds out no image"):
        folder(tmp_path / "few", "val", val_fraction=0.0)
    with pytest.raises(ConfigError, match=r"data.labels='yes'"):
        folder(tmp_path / "few", labels="yes")
    with pytest.raises(ConfigError, match="data.labels=folders reads class sub-folders"):
        build_dataset(DataConfig(name="digits", labels="folders"), "train")


def test_labels_none_makes_any_data_set_unlabelled():
    digits = build_dataset(DataConfig(name="digits", labels="none"), "train")
    assert len(digits) == 1347 and digits.classes == [] and (digits.targets == -1).all()
    assert digits[0][1] == -1


def test_mixed_formats_modes_and_exif_orientation_load_as_upright_rgb(tmp_path):
    root = tmp_path / "mixed"
    write_image(root / "grey.png", 1, mode="L")
    write_image(root / "alpha.png", 2, mode="RGBA")
    write_image(root / "palette.png", 3, mode="P")
    write_image(root / "photo.jpg", 4, size=(20, 10), quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated by 90 degrees
    write_image(root / "rotated.jpg", 5, size=(20, 10), exif=exif.tobytes())
    if WEBP:
        write_image(root / "lossless.webp", 6, lossless=True)
    ds = folder(root, "all")
    assert len(ds) == 5 + WEBP
    sizes = {Path(p).name: ds[i][0].size for i, p in enumerate(ds.paths)}
    assert all(ds[i][0].mode == "RGB" for i in range(len(ds)))
    assert sizes["photo.jpg"] == (20, 10) and sizes["rotated.jpg"] == (10, 20)
    if WEBP:
        index = [Path(p).name for p in ds.paths].index("lossless.webp")
        expected = np.random.default_rng(6).integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
        np.testing.assert_array_equal(np.asarray(ds[index][0]), expected)


def test_corrupt_images_stop_with_their_path_or_are_skipped_and_counted(tmp_path):
    flat_folder(tmp_path / "f", 4)
    (tmp_path / "f" / "img000.png").write_bytes(b"not a png")
    strict = folder(tmp_path / "f", "all")
    with pytest.raises(ImageLoadError, match=r"img000\.png.*data.skip_corrupt=true"):
        strict[0]
    lenient = folder(tmp_path / "f", "all", skip_corrupt=True)
    with pytest.warns(CorruptImageWarning, match="img000.png"):
        image, _ = lenient[0]
    assert image.size == (12, 12) and lenient.skipped == 1


# ---------------------------------------------------------------------------------------------- filelist


def test_text_filelist_with_relative_paths_comments_and_missing_files(tmp_path):
    files = flat_folder(tmp_path / "images", 20)
    lists = tmp_path / "lists"
    lists.mkdir()
    lines = ["# my images", "", *(f"../images/{f.name}" for f in files[:19]), str(files[19])]  # one absolute
    (lists / "all.txt").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(name="filelist", path=str(lists / "all.txt"))
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert (len(train), len(val)) == (18, 2) and train.classes == [] and (train.targets == -1).all()
    assert {Path(p).resolve() for p in train.paths + val.paths} == {f.resolve() for f in files}
    assert np.asarray(train[0][0]).shape == (12, 12, 3)
    (lists / "missing.txt").write_text(f"../images/{files[0].name}\n../images/gone.png\n../images/{files[1].name}\n")
    with pytest.raises(FileNotFoundError, match=r"1 file\(s\) that do not exist, e\.g\. .*gone\.png.*relative to the"):
        build_dataset(DataConfig(name="filelist", path=str(lists / "missing.txt")), "all")
    with pytest.warns(CorruptImageWarning, match="leaving out 1"):
        kept = build_dataset(DataConfig(name="filelist", path=str(lists / "missing.txt"), skip_corrupt=True), "all")
    assert [Path(p).name for p in kept.paths] == [files[0].name, files[1].name]


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_csv_filelist_with_labels_splits_and_without_labels(tmp_path):
    files = flat_folder(tmp_path / "img", 24)
    labels = ["10", "2", "2", ""] * 6  # integer names sort as numbers; an empty cell is unlabelled
    listed = write_csv(tmp_path / "labelled.csv", ["path", "label"], [[f"img/{f.name}", y] for f, y in
                                                                      zip(files, labels, strict=True)])
    cfg = DataConfig(name="filelist", path=str(listed))
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert train.classes == ["2", "10"]
    assert Counter(val.targets.tolist()) == {1: 1, 0: 1, -1: 1}  # stratified: 10% of 6, 12 and 6
    row = {f"img/{f.name}": y for f, y in zip(files, labels, strict=True)}
    for ds in (train, val):
        for path, target in zip(ds.paths, ds.targets, strict=True):
            name = row[f"img/{Path(path).name}"]
            assert target == (train.classes.index(name) if name else -1)
    assert build_dataset(DataConfig(name="filelist", path=str(listed), labels="none"), "train").classes == []
    # a split column decides the splits
    splits = write_csv(tmp_path / "split.csv", ["Path", "label", "split"],
                       [[f"img/{f.name}", "a" if i % 2 else "b", "val" if i < 4 else "train"]
                        for i, f in enumerate(files)])
    cfg = DataConfig(name="filelist", path=str(splits))
    val = build_dataset(cfg, "val")
    assert [Path(p).name for p in val.paths] == [f.name for f in files[:4]] and val.classes == ["a", "b"]
    assert val.targets.tolist() == [1, 0, 1, 0] and len(build_dataset(cfg, "train")) == 20
    with pytest.raises(ConfigError, match=r"data.val_split='test'"):
        build_dataset(DataConfig(name="filelist", path=str(splits), val_split="test"), "test")
    # no label column: unlabelled
    plain = write_csv(tmp_path / "plain.csv", ["path", "comment"], [[f"img/{f.name}", "x"] for f in files])
    assert build_dataset(DataConfig(name="filelist", path=str(plain)), "train").classes == []
    bad = write_csv(tmp_path / "bad.csv", ["file", "label"], [["img/img000.png", "a"]])
    with pytest.raises(DataFormatError, match=r"'path' column.*\['file', 'label'\]"):
        build_dataset(DataConfig(name="filelist", path=str(bad)), "train")
    with pytest.raises(ConfigError, match="data.labels=folders reads class sub-folders"):
        build_dataset(DataConfig(name="filelist", path=str(plain), labels="folders"), "train")


def test_natural_class_order():
    assert natural_sorted({"10", "2", "1"}) == ["1", "2", "10"]
    assert natural_sorted({"b", "a", "10"}) == ["10", "a", "b"]


# ---------------------------------------------------------------------------------------------- label-free runs


@pytest.fixture(scope="module")
def unlabelled_run(tmp_path_factory):
    """MoCo for 2 steps on a flat folder of digit PNGs/JPEGs, then ``selfsup eval`` and ``selfsup report``."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("own")
    (root / "digits").mkdir()
    for i, image in enumerate(load_digits().images[:80]):
        pixels = np.round(image * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels).resize((16, 16)).save(root / "digits" / f"{i:02d}.{FORMATS[i % 2]}")
    words = [w for w in TINY if not w.startswith(("data.name=", "data.subset="))]
    assert main(["train", "quickstart", *words, "data.name=folder", f"data.path={root / 'digits'}",
                 f"train.output_dir={root}", "train.max_steps=2", "train.threads=1", "method.queue_size=64"]) == 0
    run = root / "run"
    assert main(["eval", str(run), "--protocol", "knn,nn,rankme,duplicates", "--device", "cpu"]) == 0
    assert main(["report", str(run), "--max-points", "60", "--device", "cpu", "--retrieval-queries", "4"]) == 0
    return run


def test_an_unlabelled_folder_trains_evaluates_and_reports(unlabelled_run, capsys):
    state = load_checkpoint(unlabelled_run)
    assert state["step"] == 2 and state["config"]["data"]["name"] == "folder"
    scores = json.loads((unlabelled_run / "eval.json").read_text())["trained"]
    assert set(scores) == {"rankme", "feature_std", "feature_std_x_sqrt_d", "duplicate_pairs",
                           "duplicates_val_in_train"}  # knn and nn were skipped with a note
    page = (unlabelled_run / "report.html").read_text()
    shown = re.sub(r'src="data:[^"]*"', "", re.sub(r"<pre>.*?</pre>", "", page, flags=re.S))
    for label_based in ("Purest clusters", "purity", "coloured by class", "share the query", "knn"):
        assert label_based not in shown
    assert "<h3>Tightest clusters</h3>" in page and "coloured by k-means cluster" in page
    grid = re.search(r'alt="retrieval grid: validation queries and their neighbours" src="data:image/png;base64,'
                     r'([^"]+)"', page)
    with Image.open(io.BytesIO(base64.b64decode(grid.group(1)))) as picture:
        assert picture.height > 4 * 16  # 4 queries (--retrieval-queries 4), a row each
    assert "4 random validation images" in page and "among all 72 training images" in page


@pytest.mark.skipif(find_chromium() is None, reason="no Chromium on this machine (Debian: apt-get install chromium)")
def test_the_unlabelled_report_renders_in_headless_chromium(unlabelled_run):
    dom = render_in_chromium(unlabelled_run / "report.html")
    assert re.search(r'<img[^>]*alt="retrieval grid: validation queries and their neighbours"', dom)
    assert "<h2>Nearest-neighbour retrieval</h2>" in dom and "Purest clusters" not in dom


def test_msf_trains_two_steps_on_an_unlabelled_folder_with_batched_augmentation(tmp_path):
    flat_folder(tmp_path / "imgs", 40)
    words = [w for w in TINY if not w.startswith(("data.name=", "data.subset=", "method."))]
    cfg = load_config(None, ["method=msf", *words, "data.name=folder", f"data.path={tmp_path / 'imgs'}",
                             "data.augment=batch", "method.bank_size=64", "method.topk=2", "train.max_steps=2",
                             "train.batch_size=16", f"train.output_dir={tmp_path}"])
    trainer = Trainer(cfg)
    assert trainer.targets is None and trainer.pipeline.route == "two_stage"
    with warnings.catch_warnings():
        warnings.simplefilter("error", CorruptImageWarning)
        trainer.fit()
    assert trainer.step == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses)) and not any("purity" in r for r in records)


def test_the_skip_note_is_one_line_even_beside_random_init(unlabelled_run, capsys):
    assert main(["eval", str(unlabelled_run), "--protocol", "knn,rankme", "--random-init", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("note: knn skipped") == 1 and "--protocol rankme,duplicates" in out
    scores = json.loads((unlabelled_run / "eval.json").read_text())
    assert "rankme" in scores["random_init"] and "knn20_T0.07" not in scores["trained"]
