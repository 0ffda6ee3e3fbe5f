"""Tests of score_sde/datasets/ on data the tests write themselves.

IDX files follow the format on LeCun's MNIST page (magic 0x0000 + type code + rank, big-endian
uint32 dims, big-endian data); CIFAR-10 batches follow the "python version" description on the
CIFAR page (pickled dict, b"data" uint8 [n, 3072] channel-major rows, b"labels" list). Expected
values come from those specs, not from the loaders. The only test of real files is skipped
unless Debian's dataset-fashion-mnist is installed.
"""
import gzip
import math
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from score_sde.datasets import (DATASETS, FASHION_MNIST_DIR, BatchOrder, DataInfo,
                                dataset_files, from_model_range, load_dataset, read_idx,
                                to_model_range, toy_log_prob)

STAT_LEVEL = 1e-3  # significance level of the statistical tests
TOYS = ["toy_8gaussians", "toy_checkerboard", "toy_swissroll", "toy_moons"]
IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D,
             np.float64: 0x0E}
FASHION_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


# --- writers following the file-format specs ----------------------------------------------------

def idx_bytes(arr):
    arr = np.asarray(arr)
    header = bytes([0, 0, IDX_CODES[arr.dtype.type], arr.ndim])
    header += struct.pack(">" + "I" * arr.ndim, *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write(path, payload, *, gz):
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(payload)
    return path


def fashion_arrays(n, seed):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n, dtype=np.uint8))


def make_fashion_dir(root, *, gz=True, sizes=(5, 3)):
    root.mkdir(exist_ok=True)
    arrays = {}
    for (split, (img, lab)), n in zip(FASHION_STEMS.items(), sizes):
        arrays[split] = fashion_arrays(n, seed=n)
        suffix = ".gz" if gz else ""
        write(root / (img + suffix), idx_bytes(arrays[split][0]), gz=gz)
        write(root / (lab + suffix), idx_bytes(arrays[split][1]), gz=gz)
    return arrays


def cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"batch", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, n)]}


def make_cifar_dir(root, n=7):
    root.mkdir(parents=True, exist_ok=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batches[name] = cifar_batch(n, seed=i)
        (root / name).write_bytes(pickle.dumps(batches[name], protocol=2))
    return batches


def chw_from_rows(data):
    """pixel [c, y, x] = row[c * 1024 + y * 32 + x], by explicit index arithmetic."""
    c, y, x = np.indices((3, 32, 32))
    return data[:, c * 1024 + y * 32 + x]


# --- IDX / Fashion-MNIST ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(IDX_CODES))
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, dtype, gz):
    arr = (np.arange(24).reshape(2, 3, 4) - (0 if dtype == np.uint8 else 5)).astype(dtype)
    out = read_idx(write(tmp_path / "a.idx", idx_bytes(arr), gz=gz))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("split", ["train", "test"])
def test_fashion_mnist_round_trip(tmp_path, gz, split):
    arrays = make_fashion_dir(tmp_path / "fm", gz=gz)
    ds, info = load_dataset("fashion_mnist", split=split, data_dir=str(tmp_path / "fm"))
    x, y = ds.tensors
    images, labels = arrays[split]
    assert x.dtype == torch.uint8 and x.shape == (len(images), 1, 28, 28)
    assert y.dtype == torch.int64 and y.shape == (len(images),)
    np.testing.assert_array_equal(x[:, 0].numpy(), images)
    np.testing.assert_array_equal(y.numpy(), labels)
    assert info == DataInfo("fashion_mnist", (1, 28, 28), True, 256, (-1.0, 1.0), 10)
    assert info.num_dims == 784


def test_fashion_mnist_num_samples_keeps_first_items(tmp_path):
    arrays = make_fashion_dir(tmp_path, sizes=(5, 3))
    x, y = load_dataset("fashion_mnist", data_dir=str(tmp_path), num_samples=2)[0].tensors
    np.testing.assert_array_equal(x[:, 0].numpy(), arrays["train"][0][:2])
    assert len(load_dataset("fashion_mnist", split="test", data_dir=str(tmp_path),
                            num_samples=50)[0]) == 3


def _corrupt(kind, images):
    good = idx_bytes(images)
    return {"magic": b"\x01" + good[1:], "type_code": good[:2] + b"\x07" + good[3:],
            "truncated": good[:-1], "trailing": good + b"\x00", "short": good[:2],
            "header": good[:9]}[kind]


@pytest.mark.parametrize("kind, match", [
    ("magic", "not an IDX file"), ("type_code", "not an IDX file"),
    ("truncated", r"need 3920 \(truncated\)"), ("trailing", r"trailing bytes"),
    ("short", "not an IDX file"), ("header", "truncated IDX header"),
])
def test_fashion_mnist_malformed_idx(tmp_path, kind, match):
    arrays = make_fashion_dir(tmp_path)
    write(tmp_path / "train-images-idx3-ubyte.gz", _corrupt(kind, arrays["train"][0]), gz=True)
    with pytest.raises(ValueError, match=match):
        load_dataset("fashion_mnist", data_dir=str(tmp_path))


def test_fashion_mnist_corrupt_gzip(tmp_path):
    make_fashion_dir(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-6])
    with pytest.raises(ValueError, match="corrupt gzip data"):
        load_dataset("fashion_mnist", data_dir=str(tmp_path))


def test_fashion_mnist_damaged_deflate_stream(tmp_path):
    """A damaged compressed block raises zlib.error, neither OSError nor EOFError."""
    make_fashion_dir(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.compress(gzip.decompress(path.read_bytes()), compresslevel=0))
    raw[14] ^= 0xFF  # the stored block's length field
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupt gzip data"):
        load_dataset("fashion_mnist", data_dir=str(tmp_path))


@pytest.mark.parametrize("which, arr, match", [
    (0, np.zeros((5, 27, 28), np.uint8), r"expected uint8 images \[N, 28, 28\]"),
    (0, np.zeros((5, 28, 28), np.int16), r"expected uint8 images \[N, 28, 28\]"),
    (1, np.zeros(4, np.uint8), r"expected uint8 labels \[5\]"),
    (1, np.full(5, 10, np.uint8), r"labels must lie in 0\.\.9"),
])
def test_fashion_mnist_wrong_content(tmp_path, which, arr, match):
    make_fashion_dir(tmp_path)
    write(tmp_path / (FASHION_STEMS["train"][which] + ".gz"), idx_bytes(arr), gz=True)
    with pytest.raises(ValueError, match=match):
        load_dataset("fashion_mnist", data_dir=str(tmp_path))


def test_fashion_mnist_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not a directory.*apt-get install "
                                                r"dataset-fashion-mnist.*--data_dir"):
        load_dataset("fashion_mnist", data_dir=str(tmp_path / "nowhere"))
    make_fashion_dir(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    load_dataset("fashion_mnist", split="train", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\]; "
                                                r"install Debian's dataset-fashion-mnist"):
        load_dataset("fashion_mnist", split="test", data_dir=str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_real_files():
    for split, n in (("train", 60000), ("test", 10000)):
        x, y = load_dataset("fashion_mnist", split=split)[0].tensors
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.uint8
        assert torch.equal(torch.bincount(y, minlength=10), torch.full((10,), n // 10))


# --- CIFAR-10 -----------------------------------------------------------------------------------

@pytest.mark.parametrize("subdir", [False, True])
def test_cifar10_layout_and_labels(tmp_path, subdir):
    batches = make_cifar_dir(tmp_path / "cifar-10-batches-py" if subdir else tmp_path)
    ds, info = load_dataset("cifar10", data_dir=str(tmp_path))
    x, y = ds.tensors
    assert x.dtype == torch.uint8 and x.shape == (35, 3, 32, 32) and y.dtype == torch.int64
    for k in range(5):  # batches 1..5 in order
        batch = batches[f"data_batch_{k + 1}"]
        np.testing.assert_array_equal(x[7 * k:7 * (k + 1)].numpy(), chw_from_rows(batch[b"data"]))
        assert y[7 * k:7 * (k + 1)].tolist() == batch[b"labels"]
    assert x[3, 2, 5, 7] == batches["data_batch_1"][b"data"][3, 2 * 1024 + 5 * 32 + 7]
    assert info == DataInfo("cifar10", (3, 32, 32), True, 256, (-1.0, 1.0), 10)
    xt, yt = load_dataset("cifar10", split="test", data_dir=str(tmp_path))[0].tensors
    np.testing.assert_array_equal(xt.numpy(), chw_from_rows(batches["test_batch"][b"data"]))
    assert yt.tolist() == batches["test_batch"][b"labels"]


def test_cifar10_python2_numpy_names_and_str_keys(tmp_path):
    make_cifar_dir(tmp_path)
    # Batches written by Python 2 name numpy.core.multiarray; numpy 2 calls it numpy._core.
    raw = pickle.dumps(cifar_batch(4, seed=9), protocol=2)
    (tmp_path / "test_batch").write_bytes(raw.replace(b"numpy._core.", b"numpy.core."))
    x, _ = load_dataset("cifar10", split="test", data_dir=str(tmp_path))[0].tensors
    np.testing.assert_array_equal(x.numpy(), chw_from_rows(cifar_batch(4, seed=9)[b"data"]))
    batch = {k.decode(): v for k, v in cifar_batch(4, seed=9).items()}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch))
    assert len(load_dataset("cifar10", split="test", data_dir=str(tmp_path))[0]) == 4


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("payload, match", [
    (pickle.dumps(_Evil()), "refusing to load global"),
    (b"not a pickle", "not a CIFAR-10 python batch"),
    (pickle.dumps([1, 2]), "expected a pickled dict"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.int64), b"labels": [0, 1]}),
     r"expected uint8 data \[n, 3072\]"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}),
     "expected 2 integer labels"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 11]}),
     r"labels must lie in 0\.\.9"),
    # A frame longer than memory can hold (OverflowError) and an unknown text encoding
    # (LookupError) of damaged files.
    (b"\x80\x04\x95" + struct.pack("<Q", 2 ** 63 + 5) + b"}", "not a CIFAR-10 python batch"),
    (pickle.dumps({b"data": b"x"}, protocol=2).replace(b"latin1", b"latiX1"),
     "not a CIFAR-10 python batch"),
])
def test_cifar10_malformed_batch(tmp_path, payload, match):
    make_cifar_dir(tmp_path)
    (tmp_path / "test_batch").write_bytes(payload)
    with pytest.raises(ValueError, match=match):
        load_dataset("cifar10", split="test", data_dir=str(tmp_path))


def test_cifar10_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no default location; download the CIFAR-10"):
        load_dataset("cifar10")
    make_cifar_dir(tmp_path)
    os.remove(tmp_path / "data_batch_4")
    load_dataset("cifar10", split="test", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"missing data_batch_4; download .*"
                                                r"cifar-10-python\.tar\.gz"):
        load_dataset("cifar10", data_dir=str(tmp_path))


# --- user arrays --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_array_npy(tmp_path, dtype):
    arr = np.random.default_rng(0).normal(size=(6, 2)).astype(dtype)
    np.save(tmp_path / "a.npy", arr)
    ds, info = load_dataset("array", data_path=str(tmp_path / "a.npy"))
    np.testing.assert_array_equal(ds.tensors[0].numpy(), arr)
    assert ds.tensors[0].dtype == torch.from_numpy(arr).dtype
    assert info == DataInfo("array", (2,), False, None, None, None)


@pytest.mark.parametrize("arrays, key", [
    ({"a": np.zeros(3), "x": np.ones((4, 3)), "data": np.zeros((2, 2))}, "x"),
    ({"a": np.zeros(3), "data": np.ones((4, 3))}, "data"),
    ({"arr_0": np.ones((4, 3))}, "arr_0"),
    ({"samples": np.ones((4, 3)), "labels": np.zeros(4)}, "samples"),  # tools/sample.py's
    ({"only": np.ones((4, 3))}, "only"),
])
def test_array_npz_key_choice(tmp_path, arrays, key):
    np.savez(tmp_path / "a.npz", **arrays)
    x = load_dataset("array", data_path=str(tmp_path / "a.npz"))[0].tensors[0]
    np.testing.assert_array_equal(x.numpy(), arrays[key])


def test_array_npz_with_several_unnamed_arrays_is_refused(tmp_path):
    # Which of test / train is the data? Taking the first would train on the wrong one.
    np.savez(tmp_path / "a.npz", test=np.full((5, 2), 100.0), train=np.zeros((50, 2)))
    with pytest.raises(ValueError, match=r"holds the arrays \['test', 'train'\] and none is "
                                         r"named x, data, arr_0, samples"):
        load_dataset("array", data_path=str(tmp_path / "a.npz"))


def test_array_damaged_files_give_one_line_errors(tmp_path):
    np.savez_compressed(tmp_path / "z.npz", x=np.random.default_rng(0).normal(size=(400, 2)))
    raw = bytearray((tmp_path / "z.npz").read_bytes())
    raw[200:260] = bytes(60)  # inside the compressed stream: zlib fails
    (tmp_path / "z.npz").write_bytes(bytes(raw))
    np.save(tmp_path / "h.npy", np.zeros((4, 2), np.float32))
    raw = (tmp_path / "h.npy").read_bytes()
    (tmp_path / "h.npy").write_bytes(raw.replace(b"(4, 2)", b"(4, 2 "))  # header unclosed
    for name in ("z.npz", "h.npy"):
        with pytest.raises(ValueError, match=f"could not read .*{name} as a numeric array"):
            load_dataset("array", data_path=str(tmp_path / name))


def test_array_file_without_permission_is_not_called_damaged(tmp_path, monkeypatch):
    # The tools report a file they may not read as a file system failure (exit 4), not as
    # malformed data.
    import score_sde.datasets.arrays as arrays

    np.save(tmp_path / "x.npy", np.zeros((4, 2), np.float32))

    def no_permission(path, mode="r"):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(arrays, "open", no_permission, raising=False)
    with pytest.raises(PermissionError, match="Permission denied"):
        load_dataset("array", data_path=str(tmp_path / "x.npy"))


def test_array_big_endian_and_images(tmp_path):
    arr = np.arange(24, dtype=">f4").reshape(2, 3, 4)
    np.save(tmp_path / "a.npy", arr)
    ds, info = load_dataset("array", data_path=str(tmp_path / "a.npy"), num_samples=1)
    np.testing.assert_array_equal(ds.tensors[0].numpy(), arr[:1])
    assert info.shape == (3, 4)


def _nan_array():
    arr = np.zeros((8, 2), np.float32)
    arr[3, 1] = arr[5, 0] = np.nan
    arr[4, 0] = -np.inf
    return arr


@pytest.mark.parametrize("arr, match", [
    (np.zeros((4, 2), np.int64), r"dtype int64 is not supported; expected float16, float32"),
    (np.zeros((4, 2), bool), "dtype bool is not supported"),
    (np.zeros((4, 2), np.complex64), "dtype complex64 is not supported"),
    (np.zeros(4, np.float32), r"shape \(4,\) must be \[N, D, \.\.\.\] with rank >= 2"),
    (np.zeros((0, 2), np.float32), r"shape \(0, 2\) must be .*no empty dimension"),
    (np.zeros((3, 0), np.float32), r"shape \(3, 0\) must be"),
    (_nan_array(), r"2 NaN and 1 inf values; first at index \(3, 1\)"),
])
def test_array_rejects(tmp_path, arr, match):
    np.save(tmp_path / "a.npy", arr)
    with pytest.raises(ValueError, match=match):
        load_dataset("array", data_path=str(tmp_path / "a.npy"))


def test_array_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("array", data_path=str(tmp_path / "missing.npy"))
    with pytest.raises(ValueError, match=r"must end in \.npy or \.npz, got '.*a\.txt'"):
        load_dataset("array", data_path=str(tmp_path / "a.txt"))
    with pytest.raises(ValueError, match="needs data_path"):
        load_dataset("array")
    np.save(tmp_path / "obj.npy", np.array([[1, "a"]], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="could not read .*obj.npy as a numeric array"):
        load_dataset("array", data_path=str(tmp_path / "obj.npy"))
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(ValueError, match="could not read"):
        load_dataset("array", data_path=str(tmp_path / "junk.npy"))
    np.savez(tmp_path / "cut.npz", x=np.ones((50, 2)))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "cut.npz").read_bytes()[:-30])
    with pytest.raises(ValueError, match="could not read .*cut.npz"):
        load_dataset("array", data_path=str(tmp_path / "cut.npz"))
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(ValueError, match="holds no arrays"):
        load_dataset("array", data_path=str(tmp_path / "empty.npz"))


# --- toys ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TOYS)
def test_toy_shapes_and_seeding(name):
    x = load_dataset(name, num_samples=500, seed=3)[0].tensors[0]
    assert x.shape == (500, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.equal(x, load_dataset(name, num_samples=500, seed=3)[0].tensors[0])
    assert not torch.equal(x, load_dataset(name, num_samples=500, seed=4)[0].tensors[0])
    test = load_dataset(name, split="test", num_samples=500, seed=3)[0].tensors[0]
    assert not torch.equal(x, test)
    assert load_dataset(name)[1] == DataInfo(name, (2,), False, None, None, None)


def test_toy_default_sizes():
    assert len(load_dataset("toy_moons")[0]) == 100_000
    assert len(load_dataset("toy_moons", split="test")[0]) == 10_000


def midpoints(n=1200, half_width=6.0):
    """Midpoint-rule nodes on [-6, 6] (cell edges of the checkerboard fall between nodes)."""
    h = 2 * half_width / n
    return (torch.arange(n, dtype=torch.float64) + 0.5) * h - half_width, h


@pytest.mark.parametrize("name", ["toy_8gaussians", "toy_checkerboard"])
def test_toy_log_prob_normalised(name):
    g, h = midpoints()
    grid = torch.cartesian_prod(g, g)
    integral = toy_log_prob(name, grid).exp().sum().item() * h * h
    assert integral == pytest.approx(1.0, abs=1e-9)


def test_8gaussians_samples_match_density():
    # E_p[log p] from samples vs the grid integral of p log p, within 5 standard errors.
    g, h = midpoints()
    logp_grid = toy_log_prob("toy_8gaussians", torch.cartesian_prod(g, g))
    neg_entropy = (logp_grid.exp() * logp_grid).sum().item() * h * h
    x = load_dataset("toy_8gaussians", num_samples=20_000)[0].tensors[0].double()
    logp = toy_log_prob("toy_8gaussians", x)
    assert abs(logp.mean().item() - neg_entropy) < 5 * logp.std().item() / math.sqrt(len(x))
    # The 8 components are equally likely: chi-square over the nearest centre.
    angle = torch.remainder(torch.atan2(x[:, 1], x[:, 0]) + math.pi / 8, 2 * math.pi)
    counts = torch.bincount((angle // (math.pi / 4)).long(), minlength=8).numpy()
    assert stats.chisquare(counts).pvalue > STAT_LEVEL


def test_checkerboard_samples_match_density():
    x = load_dataset("toy_checkerboard", num_samples=20_000)[0].tensors[0]
    assert torch.all(toy_log_prob("toy_checkerboard", x) == -math.log(32))
    cells = (torch.floor(x / 2) + 2).long()
    counts = torch.bincount(cells[:, 0] * 4 + cells[:, 1], minlength=16).numpy()
    occupied = counts[counts > 0]
    assert len(occupied) == 8 and stats.chisquare(occupied).pvalue > STAT_LEVEL


def test_toy_log_prob_gradcheck_and_errors():
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True,
                    generator=torch.Generator().manual_seed(0))
    assert torch.autograd.gradcheck(lambda v: toy_log_prob("toy_8gaussians", v), (x,))
    assert toy_log_prob("toy_checkerboard", torch.tensor([[4.0, 0.0], [0.5, 2.5]])).tolist() \
        == [-math.inf, -math.inf]
    with pytest.raises(ValueError, match="'toy_8gaussians', 'toy_checkerboard'"):
        toy_log_prob("toy_swissroll", x)
    with pytest.raises(ValueError, match=r"floating-point tensor \[B, 2\], got torch.float64 "
                                         r"\(5, 2, 1\)"):
        toy_log_prob("toy_8gaussians", x[..., None])
    with pytest.raises(ValueError, match="floating-point tensor"):
        toy_log_prob("toy_8gaussians", torch.zeros(5, 2, dtype=torch.long))


# --- load_dataset argument checks ---------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(name="mnist"), "unknown dataset 'mnist'; accepted: 'fashion_mnist', 'cifar10'"),
    (dict(name="toy_moons", split="val"), "unknown split 'val'; accepted: 'train', 'test'"),
    (dict(name="toy_moons", seed=-1), "seed must be an integer >= 0"),
    (dict(name="toy_moons", num_samples=0), "num_samples must be an integer >= 1"),
    (dict(name="toy_moons", data_dir="/tmp"), "dataset 'toy_moons' does not use data_dir"),
    (dict(name="toy_moons", data_path="a.npy"), "does not use data_path"),
    (dict(name="fashion_mnist", data_path="a.npy"), "does not use data_path"),
    (dict(name="cifar10", data_path="a.npy"), "does not use data_path"),
    (dict(name="array", data_dir="/tmp", data_path="a.npy"), "does not use data_dir"),
])
def test_load_dataset_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_dataset(**kwargs)


def test_datasets_table():
    assert set(DATASETS) == {"fashion_mnist", "cifar10", "array", *TOYS}


# --- 8-bit <-> model range ----------------------------------------------------------------------

ALL_LEVELS = torch.arange(256, dtype=torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_to_model_range_interval(dtype):
    k = ALL_LEVELS.repeat(500)
    y = to_model_range(k, generator=torch.Generator().manual_seed(0), dtype=dtype)
    assert y.dtype == dtype and y.min() >= -1 and y.max() < 1
    # In float16, (255 + u) / 128 - 1 rounds to 1 for u > 31/32: the clamp keeps [-1, 1).
    assert to_model_range(torch.full((4000,), 255, dtype=torch.uint8), dtype=dtype,
                          generator=torch.Generator().manual_seed(1)).max() < 1


def test_to_model_range_dequantization_statistics():
    reps = 4000
    y = to_model_range(ALL_LEVELS.repeat(reps, 1), generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64)
    centres = (ALL_LEVELS.double() + 0.5) / 128 - 1
    se = (1 / 128) / math.sqrt(12 * reps)  # std of U/128 over sqrt(reps)
    assert torch.all((y.mean(0) - centres).abs() < 5 * se)
    # Each value stays inside its own bin [k, k + 1) / 128 - 1.
    assert torch.all((y >= ALL_LEVELS / 128 - 1) & (y < (ALL_LEVELS + 1.0) / 128 - 1))
    assert torch.equal(from_model_range(y), ALL_LEVELS.repeat(reps, 1))


def test_to_model_range_bin_centres_and_round_trip():
    y = to_model_range(ALL_LEVELS, dequantize=False)
    assert torch.equal(y, ((torch.arange(256) + 0.5) / 128 - 1).float())
    assert torch.equal(from_model_range(y), ALL_LEVELS)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(to_model_range(ALL_LEVELS, generator=g1),
                       to_model_range(ALL_LEVELS, generator=g2))


@pytest.mark.parametrize("data_range", [(-1.0, 1.0), (0.0, 1.0), (-1.0, 2.0), (0.1, 0.7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_offsets_next_to_one_stay_in_their_bin(monkeypatch, data_range, dtype):
    """u = 1 - 2^-24 (the largest float32 below 1) would round k + u onto k + 1, the next
    bin's lower edge, which reads back as k + 1."""
    largest = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()
    monkeypatch.setattr(torch, "rand", lambda shape, generator=None, **kw: torch.full(
        shape, largest, **kw))
    y = to_model_range(ALL_LEVELS, dtype=dtype, data_range=data_range)
    lo, hi = data_range
    edges = lo + (ALL_LEVELS.double() + 1) * ((hi - lo) / 256)
    assert torch.all(y.double() < edges)
    assert torch.equal(from_model_range(y, data_range), ALL_LEVELS)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_unit_interval_range(dtype):
    """data_range (0, 1) (the paper's VE models): y = (k + u) / 256, bins [k, k + 1) / 256."""
    reps = 400
    k = ALL_LEVELS.repeat(reps, 1)
    y = to_model_range(k, generator=torch.Generator().manual_seed(0), dtype=dtype,
                       data_range=(0.0, 1.0))
    assert y.dtype == dtype and y.min() >= 0 and y.max() < 1
    y64 = y.double()
    if dtype != torch.float16:  # float16 rounds values near the bin edges across them
        assert torch.all((y64 >= ALL_LEVELS / 256) & (y64 < (ALL_LEVELS + 1.0) / 256))
        assert torch.equal(from_model_range(y, (0.0, 1.0)), k)
    centres = to_model_range(ALL_LEVELS, dequantize=False, dtype=dtype, data_range=(0, 1))
    assert torch.equal(centres, ((torch.arange(256) + 0.5) / 256).to(dtype))
    assert torch.equal(from_model_range(centres, (0.0, 1.0)), ALL_LEVELS)
    assert to_model_range(torch.full((4000,), 255, dtype=torch.uint8), dtype=dtype,
                          generator=torch.Generator().manual_seed(1), data_range=(0, 1)).max() < 1
    x = torch.tensor([-1.0, 0.0, 0.5, 0.999, 1.0, 3.0])
    assert from_model_range(x, (0.0, 1.0)).tolist() == [0, 0, 128, 255, 255, 255]


def test_from_model_range_saturates_and_warns():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 5.0, math.inf, -math.inf])
    assert from_model_range(x).tolist() == [0, 0, 128, 255, 255, 255, 255, 0]
    with pytest.warns(UserWarning, match="1 NaN values mapped to 0"):
        assert from_model_range(torch.tensor([math.nan, 0.0])).tolist() == [0, 128]


def test_model_range_errors():
    with pytest.raises(ValueError, match="x must be a uint8 tensor of 8-bit data, got "
                                         "torch.float32"):
        to_model_range(torch.zeros(3))
    with pytest.raises(ValueError, match="dtype must be a floating-point dtype"):
        to_model_range(ALL_LEVELS, dtype=torch.int32)
    with pytest.raises(ValueError, match="x must be a floating-point tensor, got torch.uint8"):
        from_model_range(ALL_LEVELS)
    for bad in [(1.0, 0.0), (0.0, math.inf), (0.0,), None]:
        with pytest.raises(ValueError, match="data_range"):
            to_model_range(ALL_LEVELS, data_range=bad)
        with pytest.raises(ValueError, match="data_range"):
            from_model_range(torch.zeros(2), bad)


# --- BatchOrder ---------------------------------------------------------------------------------

def test_batch_order_each_item_once_per_epoch():
    order = BatchOrder(60, 12, seed=0)
    assert order.steps_per_epoch == 5
    epochs = [torch.cat([order.indices(e * 5 + j) for j in range(5)]) for e in range(3)]
    for seen in epochs:
        assert torch.equal(seen.sort().values, torch.arange(60))
    assert not torch.equal(epochs[0], epochs[1])


def test_batch_order_uneven_epochs():
    dropped = BatchOrder(10, 4, seed=1)
    assert dropped.steps_per_epoch == 2
    seen = torch.cat([dropped.indices(j) for j in range(2)])
    assert len(seen.unique()) == 8
    assert torch.equal(seen, dropped.permutation(0)[:8])
    wrapped = BatchOrder(10, 4, seed=1, drop_last=False)
    assert wrapped.steps_per_epoch == 3
    perm = wrapped.permutation(0)
    assert torch.equal(wrapped.indices(2), perm[torch.tensor([8, 9, 0, 1])])
    assert torch.equal(wrapped.indices(3), wrapped.permutation(1)[:4])


def test_batch_order_is_a_pure_function_of_seed_and_step():
    walked = BatchOrder(50, 8, seed=7)
    history = [walked.indices(s) for s in range(40)]  # 6 steps per epoch: 6+ epochs
    for s in (0, 5, 6, 23, 39):
        assert torch.equal(BatchOrder(50, 8, seed=7).indices(s), history[s])
    assert torch.equal(walked.indices(3), history[3])  # going back after the cache moved on
    assert not torch.equal(BatchOrder(50, 8, seed=8).indices(0), history[0])
    # Nearby seeds are unrelated, not shifted by an epoch.
    assert not torch.equal(BatchOrder(50, 8, seed=1).permutation(0),
                           BatchOrder(50, 8, seed=0).permutation(1))


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("drop_last", [True, False])
def test_batch_order_ranks_partition_the_global_batch(world_size, drop_last):
    single = BatchOrder(30, 8, seed=2, drop_last=drop_last)
    ranks = [BatchOrder(30, 8, seed=2, drop_last=drop_last, rank=r, world_size=world_size)
             for r in range(world_size)]
    for step in range(12):
        shards = [o.indices(step) for o in ranks]
        assert all(s.shape == (8 // world_size,) and s.dtype == torch.int64 for s in shards)
        assert torch.equal(torch.cat(shards), single.indices(step))
        assert torch.equal(single.global_indices(step), single.indices(step))


@pytest.mark.parametrize("args, kwargs, match", [
    ((10, 11), dict(seed=0), "batch_size must be <= num_items=10, got 11"),
    ((10, 6), dict(seed=0, world_size=4), "batch_size must be divisible by world_size=4"),
    ((10, 4), dict(seed=0, world_size=2, rank=2), "rank must be < world_size=2, got 2"),
    ((10, 4), dict(seed=0, rank=-1), "rank must be an integer >= 0"),
    ((10, 4), dict(seed=-1), "seed must be an integer >= 0"),
    ((10, 4), dict(seed=1.0), "seed must be an integer >= 0"),
    ((0, 4), dict(seed=0), "num_items must be an integer >= 1"),
    ((10, 0), dict(seed=0), "batch_size must be an integer >= 1"),
    ((10, 4), dict(seed=0, world_size=0), "world_size must be an integer >= 1"),
])
def test_batch_order_validation(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchOrder(*args, **kwargs)


def test_batch_order_step_validation():
    with pytest.raises(ValueError, match="step must be an integer >= 0, got -1"):
        BatchOrder(10, 2, seed=0).indices(-1)


def test_dataset_files_lists_what_the_loaders_read(tmp_path):
    fashion = tmp_path / "fm"
    fashion.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "unrelated.txt"):
        (fashion / name).write_bytes(b"")
    assert sorted(Path(p).name for p in dataset_files("fashion_mnist", data_dir=str(fashion))) \
        == ["t10k-images-idx3-ubyte", "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte"]
    cifar = tmp_path / "c" / "cifar-10-batches-py"  # the archive's own subfolder
    cifar.mkdir(parents=True)
    for name in ("data_batch_1", "test_batch", "batches.meta"):
        (cifar / name).write_bytes(b"")
    assert sorted(Path(p).name for p in dataset_files("cifar10", data_dir=str(cifar.parent))) \
        == ["data_batch_1", "test_batch"]
    assert dataset_files("cifar10") == []  # no default folder
    link = tmp_path / "link.npy"
    (tmp_path / "x.npy").write_bytes(b"")
    link.symlink_to(tmp_path / "x.npy")
    assert dataset_files("array", data_path=str(link)) == [str((tmp_path / "x.npy").resolve())]
    assert dataset_files("toy_moons") == []
    with pytest.raises(ValueError, match="dataset"):
        dataset_files("imagenet")
