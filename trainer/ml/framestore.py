"""Where decoded frames go: one float16 array per per-frame shape, each file's frames cast
straight into its slice (no per-file piece, no second copy when the dataset is assembled).

Each array is reserved at the size the files' byte counts promise (``np.empty``: pages that
are never written cost no memory) and grows by doubling only when that promise was short
(compressed archives, mixed dtypes). The loader keeps the array of the majority shape.
"""

from __future__ import annotations

import numpy as np

from trainer.ml.dataset import STORE_DTYPE

Part = tuple[tuple[int, ...], int, np.ndarray]  # per-frame shape, source bytes per frame, frames

class FrameStore:
    """A (frames, *frame_shape) float16 array written at its end; ``source_frame_bytes``: the
    size of one frame in the files it was reserved for."""

    def __init__(self, frame_shape: tuple[int, ...], capacity: int, source_frame_bytes: int) -> None:
        self._array = np.empty((max(capacity, 1), *frame_shape), STORE_DTYPE)
        self.length = 0
        self.source_frame_bytes = source_frame_bytes

    def slot(self, frames: int) -> np.ndarray:
        """The next ``frames`` rows, to write into; they become part of the data on ``commit``."""
        if self.length + frames > len(self._array):
            grown = np.empty((max(2 * len(self._array), self.length + frames), *self._array.shape[1:]),
                             STORE_DTYPE)
            grown[: self.length] = self._array[: self.length]
            self._array = grown
        return self._array[self.length : self.length + frames]

    def commit(self, frames: int) -> int:
        """Keep the last slot's rows; returns their offset."""
        offset = self.length
        self.length += frames
        return offset

    def append(self, frames: np.ndarray) -> int:
        self.slot(len(frames))[...] = frames
        return self.commit(len(frames))

    def array(self) -> np.ndarray:
        return self._array[: self.length]


class FrameStores:
    """One FrameStore per per-frame shape, each reserved from the bytes still to be decoded."""

    def __init__(self, bytes_left: int) -> None:
        self.by_shape: dict[tuple[int, ...], FrameStore] = {}
        self.bytes_left = bytes_left  # the caller lowers it as files are decoded

    def store(self, frame_shape: tuple[int, ...], source_frame_bytes: int) -> FrameStore:
        """The store for this shape; a new one holds as many frames as the remaining bytes
        would give in this source format (headers make that a slight overestimate)."""
        store = self.by_shape.get(frame_shape)
        if store is None:
            capacity = self.bytes_left // max(source_frame_bytes, 1)
            store = self.by_shape[frame_shape] = FrameStore(frame_shape, capacity, source_frame_bytes)
        return store

    def array(self, frame_shape: tuple[int, ...]) -> np.ndarray:
        """The frames of this shape (none when no file had it)."""
        store = self.by_shape.get(frame_shape)
        return store.array() if store is not None else np.empty((0, *frame_shape), STORE_DTYPE)

    def parts(self) -> list[Part]:
        """Each shape's frames, to send to another process's stores."""
        return [(shape, store.source_frame_bytes, store.array()) for shape, store in self.by_shape.items()]
