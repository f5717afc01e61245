import gzip
import shutil

import pytest
import torch

from tests.conftest import FASHION_DIR
from toolkit.core.errors import ToolkitError
from toolkit.data.datasets import load_split, read_idx, shuffled_batches


def test_mnist_splits_load_whole_into_memory(mnist_dir):
    train = load_split("mnist", mnist_dir, train=True)
    test = load_split("mnist", mnist_dir, train=False)
    assert train.images.shape == (60_000, 28, 28) and train.images.dtype == torch.uint8
    assert len(test) == 10_000
    assert set(test.labels.unique().tolist()) == set(range(10))
    pixels = test.pixels()
    assert pixels.shape == (10_000, 1, 28, 28)
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0
    # MNIST's published mean pixel is 0.1307.
    assert abs(train.pixels().mean().item() - 0.1307) < 1e-3


@pytest.mark.skipif(not FASHION_DIR.exists(), reason="Debian package dataset-fashion-mnist")
def test_fashion_mnist_from_a_plain_folder_of_gzipped_idx_files():
    test = load_split("fashion-mnist", FASHION_DIR, train=False)
    assert test.images.shape == (10_000, 28, 28)
    assert test.labels.bincount().tolist() == [1000] * 10


@pytest.mark.skipif(not FASHION_DIR.exists(), reason="Debian package dataset-fashion-mnist")
def test_a_debian_dataset_package_is_found_without_a_data_dir(tmp_path):
    test = load_split("fashion-mnist", tmp_path / "empty", train=False, download=False)
    assert test.images.shape == (10_000, 28, 28)


def test_missing_data_offline_names_the_folder_and_the_fix(tmp_path):
    with pytest.raises(ToolkitError, match=f"{tmp_path}.*`data_dir`") as raised:
        load_split("mnist", tmp_path, train=False, download=False)
    assert "point --data-dir or $TOOLKIT_DATA_DIR at" in raised.value.for_command_line()


def test_truncated_idx_file_is_a_clear_error(tmp_path, mnist_dir):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copy(mnist_dir / "MNIST" / "raw" / name, raw / name)
    images = raw / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    with pytest.raises(ToolkitError, match="truncated or corrupt"):
        load_split("mnist", tmp_path, train=False)


def test_garbage_and_bad_gzip_are_clear_errors(tmp_path):
    junk = tmp_path / "x-idx3-ubyte"
    junk.write_bytes(b"\x89PNG not an idx file at all")
    with pytest.raises(ToolkitError, match="not an IDX file"):
        read_idx(junk, 3)
    bad_gz = tmp_path / "x-idx3-ubyte.gz"
    bad_gz.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 20)[:-6])
    with pytest.raises(ToolkitError, match="cannot read"):
        read_idx(bad_gz, 3)


def test_ranks_get_disjoint_equal_shards():
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    shards = [torch.cat(list(shuffled_batches(101, 8, gen(), rank=r, world_size=2))) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 50
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
