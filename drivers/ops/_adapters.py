"""The kernels of ``_text``, ``_image`` and ``_detect`` in the form a chain runs them: one
array in, on a batch, one row (or one row of each part) out per row in.

``text.db_boxes`` finds a variable number of boxes in each image; on a batch it gives them
padded to a fixed ``max_candidates`` rows per image, with each image's count, so that a
batch's result splits into its requests' rows and a request's result does not depend on
the batch it ran in (as ``post.decode_yolo`` pads to ``max_detections``).  ``text.ctc_greedy``
gives the decoded text as Unicode code points, uint32 ``[N, L]`` zero-padded (the wire
carries numbers only; ``drivers.ops.texts`` / ``protocols.decode_text`` read them back).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import _image, _text
from ._catalog import vocabulary
from ._exceptions import OpInputError
from ._registry import Ref

__all__ = ["resize_pad_images", "to_tensor", "db_boxes_batch", "prepare_ctc", "ctc_text"]


def resize_pad_images(images: np.ndarray, height: int, width: int, pad: int = 0, *,
                      out: np.ndarray | None = None) -> np.ndarray:
    """``_text.resize_pad``'s images (the widths it used are not the model's input)."""
    return _text.resize_pad(images, height, width, pad, out=out)[0]


def to_tensor(images: np.ndarray, scale: bool = True, *, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 HWC (NHWC) to float32 CHW (NCHW), divided by 255 if ``scale``."""
    return _image.normalize(images, (0.0,), (1.0,), scale, out=out)


def db_boxes_batch(prob: np.ndarray, thresh: float = 0.3, box_thresh: float = 0.6, unclip_ratio: float = 1.5,
                   max_candidates: int = 1000, min_size: float = 3.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_text.db_boxes`` on each map of a batch ``[N, 1, H, W]`` or ``[N, H, W]``: boxes
    float32 ``[N, max_candidates, 4, 2]``, scores float32 ``[N, max_candidates]`` (zeros after
    each image's last box) and counts int32 ``[N]``."""
    p = np.asarray(prob)
    if p.ndim == 4 and p.shape[1] == 1:
        maps = p[:, 0]
    elif p.ndim == 3:
        maps = p
    else:
        raise OpInputError(_text.DB_BOXES, f"needs probability maps [N, 1, H, W] or [N, H, W], not {p.dtype} "
                                           f"{list(p.shape)}")
    n = len(maps)
    boxes = np.zeros((n, max_candidates, 4, 2), np.float32)
    scores = np.zeros((n, max_candidates), np.float32)
    counts = np.zeros(n, np.int32)
    for i, one in enumerate(maps):
        b, s = _text.db_boxes(one, thresh, box_thresh, unclip_ratio, max_candidates, min_size)
        boxes[i, :len(b)] = b
        scores[i, :len(s)] = s
        counts[i] = len(b)
    return boxes, scores, counts


def prepare_ctc(params: dict[str, Any]) -> dict[str, Any]:
    """``text.ctc_greedy``'s parameters as ``ctc_text`` takes them: the vocabulary (a text,
    read from the bundle, or a list) split into its entries once, the space appended."""
    p = dict(params)
    value = p.pop("vocabulary")
    assert not isinstance(value, Ref), "resources are read before prepare"
    p["vocabulary"] = tuple(vocabulary(value, p.pop("space", True)))
    return p


def ctc_text(probs: np.ndarray, vocabulary: Sequence[str], blank: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Greedy CTC decoding (``_text.ctc_greedy``) spelt with ``vocabulary``
    (``_text.labels_to_text``, the vocabulary checked against the model's classes): the text
    as uint32 code points ``[N, T * longest entry]``, zero-padded, and the confidence float32
    ``[N]``."""
    labels, lengths, confidence = _text.ctc_greedy(probs, blank)
    texts = _text.labels_to_text(labels, lengths, vocabulary, blank, classes=np.shape(probs)[2])
    width = labels.shape[1] * max(map(len, vocabulary), default=0)
    codes = np.zeros((len(texts), width), np.uint32)
    if width and texts:
        codes[:] = np.array(texts, dtype=f"<U{width}").view(np.uint32).reshape(len(texts), width)
    return codes, confidence
