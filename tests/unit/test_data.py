import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import frames, write_npy, write_npz
from trainer.contract.labels import ALL_EMOTIONS
from trainer.ml.data import load_dataset
from trainer.ml.dataset import SkipReason, require_samples
from trainer.ml.errors import DataError

R = "ravdess_03-01-{code}-01-01-01-{actor}"
C = "cremad_{actor}_TSI_{emo}_XX"


def reasons(ds) -> dict[str, str]:
    return {s.rel: s.reason for s in ds.skipped}


@pytest.mark.parametrize("key", ["emb", "embedding", "features", "wav2vec"])
def test_known_keys_win_over_other_arrays(tmp_path: Path, key: str) -> None:
    # "aaa" sorts first: the loader must still take the known key.
    write_npz(tmp_path / "cremad_1001_TSI_HAP_XX.npz", aaa=frames(3, 8, value=9.0),
              **{key: frames(4, 8, value=1.0)})
    ds = load_dataset(tmp_path, use_cache=False)
    assert ds.scan.array_keys == {key: 1}
    np.testing.assert_array_equal(ds.sequence(0), np.ones((4, 8), np.float16))


def test_key_priority_order(tmp_path: Path) -> None:
    write_npz(tmp_path / "cremad_1001_TSI_HAP_XX.npz", wav2vec=frames(2, 8, value=4.0),
              features=frames(2, 8, value=3.0), embedding=frames(2, 8, value=2.0))
    ds = load_dataset(tmp_path, use_cache=False)
    assert ds.scan.array_keys == {"embedding": 1}
    assert float(ds.sequence(0)[0, 0]) == 2.0


def test_first_array_when_no_known_key_and_plain_npy(tmp_path: Path) -> None:
    write_npz(tmp_path / "cremad_1001_TSI_HAP_XX.npz", hidden=frames(3, 8, value=5.0))
    write_npy(tmp_path / "cremad_1001_TSI_SAD_XX.npy", frames(2, 8, value=6.0))
    ds = load_dataset(tmp_path, use_cache=False)
    assert ds.scan.array_keys == {"first:hidden": 1, "npy": 1}
    by_label = {s.label: ds.sequence(i) for i, s in enumerate(ds.samples)}
    assert by_label["happy"].shape == (3, 8) and float(by_label["happy"][0, 0]) == 5.0
    assert float(by_label["sad"][0, 0]) == 6.0


def test_shapes_one_frame_sequence_and_all_layers(tmp_path: Path) -> None:
    write_npy(tmp_path / "cremad_1001_TSI_HAP_XX.npy", np.arange(8, dtype=np.float32))
    write_npy(tmp_path / "cremad_1001_TSI_SAD_XX.npy", frames(6, 8))
    ds = load_dataset(tmp_path, use_cache=False)
    assert ds.feature_shape == (8,)
    assert {s.label: s.length for s in ds.samples} == {"happy": 1, "sad": 6}
    np.testing.assert_array_equal(ds.sequence([s.label for s in ds.samples].index("happy"))[0],
                                  np.arange(8, dtype=np.float16))

    layered = tmp_path / "layers"
    stack = np.random.default_rng(1).standard_normal((3, 5, 8)).astype(np.float32)  # (L, T, D)
    write_npy(layered / "cremad_1002_TSI_ANG_XX.npy", stack)
    ds = load_dataset(layered, use_cache=False)
    assert ds.feature_shape == (3, 8)
    # Stored frames-first: (T, L, D).
    np.testing.assert_allclose(ds.sequence(0), np.moveaxis(stack, 1, 0).astype(np.float16))


def test_every_skip_reason(tmp_path: Path) -> None:
    ok = [write_npz(tmp_path / f"cremad_100{i}_TSI_HAP_XX.npz", emb=frames(4, 8, seed=i)) for i in range(3)]
    (tmp_path / "cremad_1010_TSI_SAD_XX.npz").write_bytes(b"this is not a zip file")
    good = tmp_path / "cremad_1011_TSI_SAD_XX.npy"
    write_npy(good, frames(50, 8))
    truncated = tmp_path / "cremad_1012_TSI_SAD_XX.npy"
    truncated.write_bytes(good.read_bytes()[:300])
    good.unlink()
    write_npz(tmp_path / "cremad_1013_TSI_SAD_XX.npz")  # no array
    write_npy(tmp_path / "cremad_1014_TSI_SAD_XX.npy", np.array(["a", "b"]))  # not numeric
    write_npy(tmp_path / "cremad_1015_TSI_SAD_XX.npy", np.zeros((0, 8), np.float32))
    write_npy(tmp_path / "cremad_1016_TSI_SAD_XX.npy", np.zeros((2, 2, 2, 8), np.float32))
    nan = frames(4, 8)
    nan[1, 2] = np.nan
    write_npy(tmp_path / "cremad_1017_TSI_SAD_XX.npy", nan)
    inf = frames(4, 8)
    inf[0, 0] = np.inf
    write_npz(tmp_path / "cremad_1018_TSI_SAD_XX.npz", emb=inf)
    write_npy(tmp_path / "cremad_1019_TSI_SAD_XX.npy", frames(4, 8, value=1e6))  # > float16 max
    write_npy(tmp_path / "cremad_1020_TSI_SAD_XX.npy", frames(4, 16))
    write_npz(tmp_path / "cremad_1021_TSI_SAD_XX.npz", emb=frames(4, 8))
    (tmp_path / "cremad_1021_TSI_SAD_XX.npz").rename(tmp_path / "cremad_1021_TSI_SAD_XX.npy")
    write_npy(tmp_path / "notes_about_things.npy", frames(4, 8))
    write_npy(tmp_path / "ravdess_03-01-08-01-01-01-01.npy", frames(4, 8))  # surprise

    ds = load_dataset(tmp_path, use_cache=False)
    assert sorted(s.rel for s in ds.samples) == sorted(p.name for p in ok)
    assert reasons(ds) == {
        "cremad_1010_TSI_SAD_XX.npz": SkipReason.UNREADABLE,
        "cremad_1012_TSI_SAD_XX.npy": SkipReason.UNREADABLE,
        "cremad_1013_TSI_SAD_XX.npz": SkipReason.NO_ARRAY,
        "cremad_1014_TSI_SAD_XX.npy": SkipReason.NO_ARRAY,
        "cremad_1015_TSI_SAD_XX.npy": SkipReason.EMPTY,
        "cremad_1016_TSI_SAD_XX.npy": SkipReason.BAD_SHAPE,
        "cremad_1017_TSI_SAD_XX.npy": SkipReason.NON_FINITE,
        "cremad_1018_TSI_SAD_XX.npz": SkipReason.NON_FINITE,
        "cremad_1019_TSI_SAD_XX.npy": SkipReason.NON_FINITE,
        "cremad_1020_TSI_SAD_XX.npy": SkipReason.WRONG_DIM,
        "cremad_1021_TSI_SAD_XX.npy": SkipReason.UNREADABLE,  # a .npz archive named .npy
        "notes_about_things.npy": SkipReason.UNRECOGNIZED_NAME,
        "ravdess_03-01-08-01-01-01-01.npy": SkipReason.LABEL_NOT_IN_CLASSES,
    }
    # A skipped file's frames never leak into the samples.
    for i in range(len(ds)):
        assert np.isfinite(ds.sequence(i)).all()


def test_surprise_is_used_when_in_the_class_list(tmp_path: Path) -> None:
    write_npy(tmp_path / "ravdess_03-01-08-01-01-01-01.npy", frames(4, 8))
    write_npy(tmp_path / "ravdess_03-01-01-01-01-01-01.npy", frames(4, 8))
    ds = load_dataset(tmp_path, classes=ALL_EMOTIONS, use_cache=False)
    assert sorted(s.label for s in ds.samples) == ["neutral", "surprise"]


def test_stats_files_and_hidden_folders_are_not_samples(tmp_path: Path) -> None:
    write_npy(tmp_path / "wav2vec_mean.npy", np.zeros(8, np.float32))
    write_npy(tmp_path / "wav2vec_std.npy", np.ones(8, np.float32))
    write_npy(tmp_path / "other_MEAN.npy", np.zeros(8, np.float32))
    write_npy(tmp_path / ".cache" / "cremad_1001_TSI_HAP_XX.npy", frames(2, 8))
    write_npy(tmp_path / "cremad_1002_TSI_HAP_XX.npy", frames(2, 8))
    (tmp_path / "readme.txt").write_text("hi")
    ds = load_dataset(tmp_path, use_cache=False)
    assert [s.rel for s in ds.samples] == ["cremad_1002_TSI_HAP_XX.npy"]
    assert ds.skipped == []
    assert ds.scan.files_by_kind == {"stats": 3, "npy": 1, "other": 1}


def test_flat_and_label_folders_mixed(tmp_path: Path) -> None:
    write_npy(tmp_path / "cremad_1001_TSI_HAP_XX.npy", frames(2, 8))
    write_npy(tmp_path / "angry" / "clip1.npy", frames(2, 8))
    write_npz(tmp_path / "sets" / "calm" / "clip2.npz", emb=frames(2, 8))
    ds = load_dataset(tmp_path, use_cache=False)
    assert {s.rel: s.label for s in ds.samples} == {
        "cremad_1001_TSI_HAP_XX.npy": "happy", "angry/clip1.npy": "angry", "sets/calm/clip2.npz": "calm",
    }
    assert ds.scan.patterns == {"cremad": 1, "folder": 2}


def test_majority_decides_the_feature_dimension(tmp_path: Path) -> None:
    # The first file's dimension is the minority: the majority's frames are still all there.
    for i in range(2):
        write_npy(tmp_path / f"cremad_100{i}_TSI_HAP_XX.npy", frames(2, 16))
    for i in range(3):
        write_npy(tmp_path / f"cremad_101{i}_TSI_HAP_XX.npy", frames(2 + i, 8, value=i))
    ds = load_dataset(tmp_path, use_cache=False)
    assert ds.feature_shape == (8,)
    assert sorted(r.value for r in reasons(ds).values()) == ["wrong_dim", "wrong_dim"]
    assert [float(ds.sequence(i).max()) for i in range(len(ds))] == [0.0, 1.0, 2.0]
    assert ds.frames.shape == (9, 8)


def test_cache_hit_does_not_decode_again_and_gives_identical_arrays(tmp_path: Path) -> None:
    data = tmp_path / "data"
    paths = [write_npz(data / f"cremad_10{i:02d}_TSI_{e}_XX.npz", emb=frames(3 + i, 8, seed=i))
             for i, e in enumerate(["HAP", "SAD", "ANG", "FEA"])]
    cache = tmp_path / "cache"
    first = load_dataset(data, cache_dir=cache)
    assert first.cache == "miss"
    arrays = [np.array(first.sequence(i)) for i in range(len(first))]

    # Overwrite every file with garbage of the same size and mtime: only a decoder would notice.
    for p in paths:
        st = p.stat()
        p.write_bytes(b"\0" * st.st_size)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = load_dataset(data, cache_dir=cache)
    assert second.cache == "hit"
    assert [s.rel for s in second.samples] == [s.rel for s in first.samples]
    for i, a in enumerate(arrays):
        np.testing.assert_array_equal(second.sequence(i), a)
    assert second.frames.dtype == np.float16

    # A changed file list is a different cache entry: now the garbage is decoded and skipped.
    write_npz(data / "cremad_1099_TSI_HAP_XX.npz", emb=frames(2, 8))
    third = load_dataset(data, cache_dir=cache)
    assert third.cache == "miss"
    assert [s.rel for s in third.samples] == ["cremad_1099_TSI_HAP_XX.npz"]
    assert {r.value for r in reasons(third).values()} == {"unreadable"}
    # Older caches of the same folder are dropped.
    assert len([p for p in cache.iterdir()]) == 1


def test_no_cache_writes_nothing(tmp_path: Path) -> None:
    write_npy(tmp_path / "d" / "cremad_1001_TSI_HAP_XX.npy", frames(2, 8))
    ds = load_dataset(tmp_path / "d", cache_dir=tmp_path / "c", use_cache=False)
    assert ds.cache == "off" and not (tmp_path / "c").exists()


def test_one_copy_frames_are_contiguous_float16(tmp_path: Path) -> None:
    for i in range(5):
        write_npy(tmp_path / f"cremad_100{i}_TSI_HAP_XX.npy", frames(i + 1, 8, seed=i))
    ds = load_dataset(tmp_path, use_cache=False)
    assert ds.frames.shape == (15, 8) and ds.frames.dtype == np.float16
    offsets = sorted((s.offset, s.length) for s in ds.samples)
    assert offsets == [(0, 1), (1, 2), (3, 3), (6, 4), (10, 5)]


def test_unusable_directories_raise_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "missing")
    empty = load_dataset(tmp_path, use_cache=False)
    with pytest.raises(DataError, match="no .npz/.npy feature files found"):
        require_samples(empty)
    write_npy(tmp_path / "junk.npy", frames(2, 8))
    with pytest.raises(DataError, match=r"all 1 were skipped \(1 unrecognized_name\)"):
        require_samples(load_dataset(tmp_path, use_cache=False))


def test_worker_processes_give_the_same_dataset(tmp_path: Path) -> None:
    from trainer.ml.arrays import CHUNK

    for i in range(CHUNK + 40):  # more than one chunk, so the pool really is used
        write_npy(tmp_path / f"cremad_{1000 + i % 50}_TIE_{('HAP', 'SAD')[i % 2]}_XX_{i}.npy",
                  frames(2 + i % 5, 8, seed=i))
    (tmp_path / "cremad_1001_IEO_ANG_XX.npy").write_bytes(b"broken")
    serial = load_dataset(tmp_path, use_cache=False, workers=1)
    parallel = load_dataset(tmp_path, use_cache=False, workers=2)
    assert parallel.samples == serial.samples and parallel.skipped == serial.skipped
    np.testing.assert_array_equal(parallel.frames, serial.frames)
    assert len(serial) == CHUNK + 40 and serial.skipped[0].reason is SkipReason.UNREADABLE
