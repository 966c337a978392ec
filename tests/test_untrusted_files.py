"""Files we read are data, never code, and their headers cannot make us allocate unbounded memory.

Every crafted file here is refused with one clear error of the library's own types (DataFormatError,
CheckpointError, ImageLoadError) before anything it names runs or anything it claims is allocated.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct
import tracemalloc
import types
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from selfsup.cli import main
from selfsup.config import DataConfig
from selfsup.data.datasets import DataFormatError, ImageLoadError, build_dataset, read_idx
from selfsup.engine.checkpoint import CheckpointError, load_checkpoint

RNG = np.random.default_rng(7)
CIFAR10_FILES = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfsup: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def peak_python_memory(action) -> int:
    """Peak bytes that Python and numpy allocate while ``action()`` runs (it may raise)."""
    tracemalloc.start()
    try:
        action()
    except Exception:  # noqa: BLE001 (the callers check the error themselves)
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


# ---------------------------------------------------------------------------------------------
# CIFAR: genuine batches as every writer made them, and batches that carry code


class _LegacyNames(pickle._Pickler):
    """Pure-Python pickler that writes numpy < 2 module names (``numpy.core.*``), as older files have them."""

    def save_global(self, obj, name=None):
        module = pickle.whichmodule(obj, name or obj.__qualname__).replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[types.FunctionType] = save_global


class _Python2Style(_LegacyNames):
    """What cPickle wrote for the original CIFAR files (protocol 2): every str and byte string as a python-2
    ``str`` (SHORT_BINSTRING / BINSTRING, read back with encoding='latin1'), numpy.core names."""

    def save_string(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch = dict(_LegacyNames.dispatch)
    dispatch[str] = save_string
    dispatch[bytes] = save_string


def dump(obj, path: Path, writer: str) -> None:
    buffer = io.BytesIO()
    if writer == "python2":
        _Python2Style(buffer, protocol=2).dump(obj)
    elif writer == "numpy1-protocol5":
        _LegacyNames(buffer, protocol=5).dump(obj)
    else:  # "protocol-N": this python and numpy
        pickle.dump(obj, buffer, protocol=int(writer.split("-")[1]))
    path.write_bytes(buffer.getvalue())


def write_cifar10(root: Path, writer: str, per_file: int = 2, labels_as_array: bool = False) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    bytes_keys = writer in ("protocol-2", "protocol-4")  # python 3 scripts often write bytes keys
    for name in CIFAR10_FILES:
        images = RNG.integers(0, 256, size=(per_file, 32, 32, 3), dtype=np.uint8)
        labels = RNG.integers(0, 10, size=per_file)
        batch = {"batch_label": f"training batch of {name}", "filenames": [f"img_{i}.png" for i in range(per_file)],
                 "data": np.stack([x.transpose(2, 0, 1).reshape(-1) for x in images]),
                 "labels": labels.astype(np.int64) if labels_as_array else labels.tolist()}
        dump({k.encode() if bytes_keys else k: v for k, v in batch.items()}, folder / name, writer)
        written[name] = (images, labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    dump({"label_names": names, "num_cases_per_batch": per_file}, folder / "batches.meta", writer)
    return written


@pytest.mark.parametrize("writer", ["python2", "protocol-2", "protocol-4", "protocol-5", "numpy1-protocol5"])
def test_genuine_cifar_batches_of_every_writer_load(tmp_path, writer):
    written = write_cifar10(tmp_path, writer, labels_as_array=writer == "protocol-5")
    cfg = DataConfig(name="cifar10", path=str(tmp_path))
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert (len(train), len(test)) == (10, 2) and train.classes[1] == "automobile"
    expected = np.concatenate([written[f"data_batch_{k}"][0] for k in range(1, 6)])
    np.testing.assert_array_equal(train.targets, np.concatenate([written[f"data_batch_{k}"][1] for k in range(1, 6)]))
    for i in (0, 7):
        np.testing.assert_array_equal(np.asarray(train[i][0]), expected[i])
    np.testing.assert_array_equal(np.asarray(test[1][0]), written["test_batch"][0][1])


class _RunsShell:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


class _OpensFile(_RunsShell):
    def __reduce__(self):
        return open, (str(self.target), "w")


class _SavesWithNumpy(_RunsShell):  # a numpy function, but not array reconstruction
    def __reduce__(self):
        return np.save, (str(self.target), np.zeros(1))


@pytest.mark.parametrize("payload", [_RunsShell, _OpensFile, _SavesWithNumpy])
def test_crafted_cifar_batch_is_refused_and_runs_nothing(tmp_path, payload):
    write_cifar10(tmp_path, "protocol-4")
    target = tmp_path / "created_by_the_pickle"
    batch = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1], "note": payload(target)}
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps(batch))
    with pytest.raises(DataFormatError, match="contains code") as error:
        build_dataset(DataConfig(name="cifar10", path=str(tmp_path)), "train")
    assert "data_batch_1" in str(error.value) and "not loaded" in str(error.value)
    assert not target.exists() and not Path(f"{target}.npy").exists()


def test_crafted_cifar_batch_through_the_cli(tmp_path, capsys):
    write_cifar10(tmp_path, "protocol-4")
    target = tmp_path / "created_by_the_pickle"
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps({"data": _RunsShell(target)}))
    assert main(["train", "data.name=cifar10", f"data.path={tmp_path}", f"train.output_dir={tmp_path}/runs",
                 "train.progress_bar=false"]) == 2
    assert "contains code" in one_error_line(capsys) and not target.exists()


def pickle_ops(*ops: bytes) -> bytes:
    return b"\x80\x02" + b"".join(ops) + b"."


@pytest.mark.parametrize("name, raw", [
    # the memo index a C unpickler grows its memo array to (16 GiB of pointers)
    ("memo index 2**31", pickle_ops(b"]", b"r" + struct.pack("<I", 2**31 - 1))),
    # a byte string that claims 2**40 bytes in a file of 20
    ("bytes length 2**40", b"\x80\x04" + b"\x8e" + struct.pack("<Q", 2**40) + b"abc."),
    # numpy's reconstruction asked for a 10**12-element array directly
    ("array of 10**12 elements", b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
     + b"\x8a\x06" + (10**12).to_bytes(6, "little") + b"\x85U\x01b\x87R."),
    # an ndarray state whose shape claims far more than its 4 bytes of data
    ("state shape 10**10", pickle.dumps(np.zeros(4, np.uint8), protocol=2).replace(
        b"K\x04\x85", b"\x8a\x05" + (10**10).to_bytes(5, "little") + b"\x85", 1)),
])
def test_cifar_pickle_headers_cannot_allocate(tmp_path, name, raw):
    write_cifar10(tmp_path, "protocol-4")
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(raw)
    cfg = DataConfig(name="cifar10", path=str(tmp_path))
    with pytest.raises(DataFormatError, match="data_batch_1"):
        build_dataset(cfg, "train")
    assert peak_python_memory(lambda: build_dataset(cfg, "train")) < 8 * 2**20


def test_cifar_batch_with_object_arrays_or_odd_labels_is_refused(tmp_path):
    write_cifar10(tmp_path, "protocol-4")
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    cfg = DataConfig(name="cifar10", path=str(tmp_path))
    path.write_bytes(pickle.dumps({"data": np.array([object()] * 2, dtype=object), "labels": [0, 1]}))
    with pytest.raises(DataFormatError, match="contains code"):  # object arrays pickle their items' classes
        build_dataset(cfg, "train")
    path.write_bytes(pickle.dumps({"data": np.array([1, 2], dtype=object), "labels": [0, 1]}))
    with pytest.raises(DataFormatError, match="data_batch_1"):
        build_dataset(cfg, "train")
    nested: list = [0]
    for _ in range(60):  # 2**60 leaves through shared references: must not be walked
        nested = [nested, nested]
    path.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": nested}))
    with pytest.raises(DataFormatError, match="labels"):
        build_dataset(cfg, "train")


# ---------------------------------------------------------------------------------------------
# checkpoints


class _Plain:
    pass


def test_checkpoint_with_code_says_so_and_runs_nothing(tmp_path, capsys):
    target = tmp_path / "created_by_the_checkpoint"
    for name, payload in [("shell.pt", _RunsShell(target)), ("object.pt", _Plain())]:
        torch.save({"method": {"w": torch.zeros(2)}, "extra": payload}, tmp_path / name)
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(tmp_path / name)
        message = str(error.value)
        assert "contains code" in message and "does not execute" in message and "must not be loaded" in message
        assert "corrupt" not in message and "weights_only" not in message and "\n" not in message
        assert main(["eval", str(tmp_path / name)]) == 2
        assert "contains code" in one_error_line(capsys)
    legacy = tmp_path / "legacy.pt"  # the pre-1.6 format goes through the same refusal
    torch.save({"extra": _RunsShell(target)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="contains code"):
        load_checkpoint(legacy)
    assert not target.exists()


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint") as error:
        load_checkpoint(path)
    assert "weights_only" not in str(error.value) and "contains code" not in str(error.value)


def test_compressed_checkpoint_entries_are_refused_before_reading(tmp_path):
    big = io.BytesIO()
    torch.save({"w": torch.zeros(10_000_000)}, big)  # 40 MB of zeros
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(big) as source, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as out:
        for info in source.infolist():
            out.writestr(info.filename, source.read(info.filename))
    assert bomb.stat().st_size < 100_000
    with pytest.raises(CheckpointError, match="compressed"):
        load_checkpoint(bomb)
    # an entry whose declared size exceeds the whole file
    lying = tmp_path / "lying.pt"
    raw = bytearray(big.getvalue())
    directory = raw.rfind(b"PK\x01\x02")  # the last central-directory record: patch its uncompressed size
    raw[directory + 24:directory + 28] = struct.pack("<I", 2**31)
    lying.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="lying.pt"):
        load_checkpoint(lying)


def test_legacy_checkpoint_claiming_a_huge_storage_stays_small(tmp_path):
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(123_457)}, buffer, _use_new_zipfile_serialization=False)
    claim = struct.pack("<i", 250_000_000)  # 1 GB of float32 claimed by a 0.5 MB file
    (tmp_path / "claim.pt").write_bytes(buffer.getvalue().replace(b"J" + struct.pack("<i", 123_457), b"J" + claim))
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_checkpoint(tmp_path / "claim.pt")


# ---------------------------------------------------------------------------------------------
# idx files


def idx_header(*shape: int) -> bytes:
    return struct.pack(">BBBB", 0, 0, 8, len(shape)) + struct.pack(f">{len(shape)}I", *shape)


def test_idx_header_claiming_a_huge_shape_is_refused_without_reading(tmp_path):
    plain = tmp_path / "images"
    plain.write_bytes(idx_header(4_000_000_000, 60_000, 60_000) + bytes(100))
    with pytest.raises(DataFormatError, match="truncated"):
        read_idx(plain, 3)
    packed = tmp_path / "images.gz"
    packed.write_bytes(gzip.compress(idx_header(4_000_000_000, 60_000, 60_000) + bytes(100)))
    with pytest.raises(DataFormatError, match="images.gz") as error:
        read_idx(packed, 3)
    assert "header" in str(error.value)
    assert peak_python_memory(lambda: read_idx(packed, 3)) < 2**20


def test_gzip_bomb_stops_at_what_the_header_implies(tmp_path):
    bomb = tmp_path / "labels.gz"
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip container
    payload = compressor.compress(idx_header(1000))
    chunk = bytes(2**20)
    payload += b"".join(compressor.compress(chunk) for _ in range(64)) + compressor.flush()  # 64 MiB of zeros
    bomb.write_bytes(payload)
    assert bomb.stat().st_size < 200_000
    with pytest.raises(DataFormatError, match="more data than its header"):
        read_idx(bomb, 1)
    assert peak_python_memory(lambda: read_idx(bomb, 1)) < 4 * 2**20
    np.testing.assert_array_equal(read_idx_roundtrip(tmp_path), np.arange(10, dtype=np.uint8).reshape(2, 5))


def read_idx_roundtrip(tmp_path: Path) -> np.ndarray:
    path = tmp_path / "ok.gz"
    path.write_bytes(gzip.compress(idx_header(2, 5) + bytes(range(10))))
    return read_idx(path, 2)


# ---------------------------------------------------------------------------------------------
# safetensors and exported backbones


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def test_safetensors_header_length_is_checked_against_the_file(tmp_path):
    from selfsup.export import read_backbone

    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(CheckpointError, match="header") as error:
        read_backbone(path)
    assert "huge.safetensors" in str(error.value)
    path.write_bytes(struct.pack("<Q", 10**9) + b"{" + b" " * 100 + b"}")
    with pytest.raises(CheckpointError, match="header"):
        read_backbone(path)


def exported_vit(tmp_path: Path, **model_overrides) -> Path:
    from selfsup.config import ModelConfig
    from selfsup.export import BackboneInfo, save_backbone
    from selfsup.models import build_backbone

    model = ModelConfig(backbone="vit_tiny", patch_size=8, embed_dim=32, depth=2, num_heads=2, vit_image_size=16)
    module, feature_dim = build_backbone(model)
    info = BackboneInfo.from_model_config(model, feature_dim)
    info.model.update(model_overrides)
    return save_backbone(module.state_dict(), tmp_path / "vit.safetensors", info)


@pytest.mark.parametrize("overrides, message", [
    ({"embed_dim": 10**9}, "model.embed_dim"),
    ({"depth": 10**6}, "model.depth"),
    ({"embed_dim": 768, "depth": 12, "num_heads": 12}, "does not fit"),  # within bounds, but not this file's tensors
    ({"widths": "not a list"}, "model.widths"),
])
def test_backbone_metadata_is_checked_before_a_model_is_built(tmp_path, monkeypatch, overrides, message):
    import selfsup.export
    from selfsup.export import load_backbone

    path = exported_vit(tmp_path, **overrides)
    real_builds = []
    original = selfsup.export.build_backbone

    def recording(model):
        real_builds.append(torch.empty(0).device.type)  # "meta" while only shapes are checked
        return original(model)

    monkeypatch.setattr(selfsup.export, "build_backbone", recording)
    with pytest.raises(CheckpointError, match=message):
        load_backbone(path)
    assert "cpu" not in real_builds


def test_genuine_backbone_file_still_loads(tmp_path):
    from selfsup.export import load_backbone

    module = load_backbone(exported_vit(tmp_path))
    assert sum(p.numel() for p in module.parameters()) > 0


# ---------------------------------------------------------------------------------------------
# images and STL-10


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` RGB pixels, with a few bytes of image data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [50_000, 10_000])  # PIL errors beyond 2x its limit, and only warns below that
def test_image_claiming_too_many_pixels_is_refused_before_decoding(tmp_path, side):
    folder = tmp_path / "train" / "cat"
    folder.mkdir(parents=True)
    (folder / "bomb.png").write_bytes(png_header_only(side, side))
    dataset = build_dataset(DataConfig(name="imagefolder", path=str(tmp_path)), "train")
    with pytest.raises(ImageLoadError, match="pixels") as error:
        dataset[0]
    assert "bomb.png" in str(error.value)


def test_stl_label_file_of_the_wrong_size_is_refused_before_reading(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    (folder / "train_X.bin").write_bytes(bytes(2 * 3 * 96 * 96))
    (folder / "train_y.bin").write_bytes(bytes([1]) * 3)
    with pytest.raises(DataFormatError, match="train_y.bin"):
        build_dataset(DataConfig(name="stl10", path=str(tmp_path)), "train")
    (folder / "train_y.bin").write_bytes(bytes([1, 11]))
    with pytest.raises(DataFormatError, match="1..10"):
        build_dataset(DataConfig(name="stl10", path=str(tmp_path)), "train")
