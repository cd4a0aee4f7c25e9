"""Exo-to-ego translation, subtask 1: ego track prediction (``translation_exo_ego``).

Given an object's mask in an exo view at a frame, its mask in the ego view at that frame. The
examples and the model are those of exo->ego correspondence (``engine.tasks.correspondence``);
what differs is the exchange format and the scoring, as the official
translation/evaluation/eval_subtask1.py has them.

Exchange: one PNG mask per image, named ``<take_name>-<exo cam>-<object>-<frame>.png``, in a
``ground-truths`` and a ``predictions`` folder. The images are the frames exo->ego
correspondence scores: the exo view has the object's mask and the ego view was annotated; the
ground truth is the ego mask there, empty where the object does not show. A run writes both
folders under ``official_<split>/``; ``ee4d evaluate translation_exo_ego --predictions`` takes
the predictions folder or the submission JSON (the same masks as COCO RLE at 256x256).

Scoring: both masks resized to 256x256 (nearest, as PIL does it; foreground > 127). The object
exists where a mask has any pixel. Over all images, the balanced accuracy of existence. Where
the truth exists: IoU and boundary F after registration (both masks cut around their box
centres to the larger box's size; ``registered``) and the distance between the box centres over
the 256x256 diagonal. A missing prediction counts as not existing, with IoU 0, boundary F 0 and
location error 1. Baseline: the mean ego mask of the object's class over training (its name
without the ``_<n>`` suffix), cut to its mean area, always present.
"""
from __future__ import annotations

import io

import numpy as np

from engine.release.masks import rle
from engine.tasks.base import Examples, register
from engine.tasks.correspondence import (
    CONFIDENCE_THRESHOLD,
    CorrespondenceExoEgo,
    decode_rle,
    pooled_scores,
    prior_logits,
)
from engine.tasks.metrics import boundary_f, mask_iou

EVAL_SIZE = 256


def image_name(take_name: str, exo: str, obj: str, frame: int) -> str:
    return f"{take_name}-{exo}-{obj}-{frame}"


def resize_nearest(mask: np.ndarray) -> np.ndarray:
    """A mask at EVAL_SIZE x EVAL_SIZE, as the official script loads a PNG: PIL's nearest resize
    of the 0/255 image, then > 127."""
    from PIL import Image
    image = Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255)
    return np.asarray(image.resize((EVAL_SIZE, EVAL_SIZE), resample=Image.NEAREST)) > 127


def png_bytes(mask: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def read_png(data: bytes) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(data)).convert("L")) > 127


def _box(mask: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
    """(width, height) and (x, y) centre of a mask's box; an empty mask: (0, 0) and, as the
    official script has it, (height // 2, width // 2)."""
    if not mask.any():
        return (0, 0), (mask.shape[0] // 2, mask.shape[1] // 2)
    ys, xs = np.nonzero(mask)
    return ((int(xs.max()) - int(xs.min()) + 1, int(ys.max()) - int(ys.min()) + 1),
            ((int(xs.min()) + int(xs.max())) // 2, (int(ys.min()) + int(ys.max())) // 2))


def registered(truth: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Both masks padded by their height on every side and cut around their own box centres to
    the larger box's size (odd sides), and the distance between the two centres in pixels."""
    pad = truth.shape[0]
    masks = [np.pad(m.astype(bool), pad) for m in (truth, predicted)]
    (size_a, centre_a), (size_b, centre_b) = _box(masks[0]), _box(masks[1])
    width, height = max(size_a[0], size_b[0]), max(size_a[1], size_b[1])
    crops = [m[y - height // 2:y + height // 2 + 1, x - width // 2:x + width // 2 + 1]
             for m, (x, y) in zip(masks, (centre_a, centre_b))]
    return crops[0], crops[1], float(np.hypot(centre_a[0] - centre_b[0], centre_a[1] - centre_b[1]))


@register
class TranslationExoEgo(CorrespondenceExoEgo):
    name = "translation_exo_ego"
    metric = "registered_iou"

    def truth(self, release, split: str) -> dict:
        """{"images": {name: the ego mask as COCO RLE at its own size, or None where the object
        does not show}}."""
        images = {}
        for uid, gt in super().truth(release, split).items():
            take_name = release.take(uid).take_name
            for obj, views in gt["masks"].items():
                for exo, ego in self.pairs(views):
                    for frame in views[exo]:
                        if int(frame) in gt["annotated_frames"][obj].get(ego, ()):
                            images[image_name(take_name, exo, obj, int(frame))] = views[ego].get(frame)
        return {"images": images}

    def submission(self, logits: np.ndarray, examples: Examples, split: str) -> dict:
        """{"task", "split", "size": [256, 256], "masks": {name: COCO RLE}}: the predicted mask
        where the visibility confidence passes 0.5, else an empty one."""
        import torch

        size = self.options.size
        logits = torch.from_numpy(np.asarray(logits, np.float32))
        masks = {}
        for m, row in zip(examples.meta, logits):
            probability = torch.sigmoid(row[:-1].view(1, 1, size, size))
            mask = torch.nn.functional.interpolate(probability, size=(EVAL_SIZE, EVAL_SIZE), mode="bilinear",
                                                   align_corners=False)[0, 0].numpy() > 0.5
            if float(torch.sigmoid(row[-1])) <= CONFIDENCE_THRESHOLD:
                mask[:] = False
            masks[image_name(m["take_name"], m["query"], m["object"], m["frame"])] = rle(mask)
        return {"task": self.name, "split": split, "size": [EVAL_SIZE, EVAL_SIZE], "masks": masks}

    def read_submission(self, url: str) -> dict:
        """The submission JSON, or a folder of ``<name>.png`` masks (the official predictions)."""
        from engine import storage

        fs, path = storage.filesystem(url)
        if not fs.isdir(path):
            return super().read_submission(url)
        masks = {}
        for file in fs.ls(path, detail=False):
            if file.endswith(".png"):
                with fs.open(file, "rb") as f:
                    masks[file.rsplit("/", 1)[-1][:-4]] = rle(read_png(f.read()))
        return {"task": self.name, "masks": masks}

    def evaluate(self, submission: dict, truth: dict, lenient: bool = False) -> dict:
        """As eval_subtask1.py; a missing prediction is scored as the official script scores it
        (so ``lenient`` changes nothing) and counted under ``missing``."""
        masks = submission.get("masks")
        if not isinstance(masks, dict):
            raise ValueError('submission has no "masks" ({name: COCO RLE} or a folder of PNG masks)')
        exists_truth, exists_predicted, iou, boundary, location, missing = [], [], [], [], [], 0
        for name, gt in truth["images"].items():
            expected = resize_nearest(decode_rle(gt)) if gt else np.zeros((EVAL_SIZE, EVAL_SIZE), bool)
            predicted = resize_nearest(decode_rle(masks[name])) if name in masks else None
            missing += predicted is None
            exists_truth.append(int(expected.any()))
            exists_predicted.append(int(predicted is not None and predicted.any()))
            if not expected.any():
                continue
            scores = (0.0, 0.0, 1.0)
            if predicted is not None:
                a, b, distance = registered(expected, predicted)
                scores = (mask_iou(a, b), boundary_f(a, b), distance / np.hypot(EVAL_SIZE, EVAL_SIZE))
            for values, score in zip((iou, boundary, location), scores):
                values.append(score)
        if not exists_truth:
            raise ValueError("no image is scored: the truth is empty")
        scores = pooled_scores(iou, boundary, location, exists_truth, exists_predicted)
        return {"registered_iou": scores.pop("iou"), "registered_boundary_f": scores.pop("boundary_f"), **scores,
                "images": len(exists_truth), "visible_images": len(iou), "missing": missing,
                "ignored": sum(name not in truth["images"] for name in masks)}

    def baselines(self, train: Examples, evaluated: Examples, truth: dict, split: str) -> dict:
        def object_class(m: dict) -> str:
            return m["object"].rsplit("_", 1)[0]

        prior = prior_logits(train, evaluated, [object_class])
        return {"class_prior": self.evaluate(self.submission(prior, evaluated, split), truth)[self.metric]}

    def official_files(self, submission: dict, release, split: str) -> dict[str, dict | bytes]:
        """official_<split>/ground-truths and official_<split>/predictions, one PNG per image, as
        eval_subtask1.py reads them (its --results_dir is official_<split>)."""
        files: dict[str, dict | bytes] = {}
        for name, gt in self.truth(release, split)["images"].items():
            files[f"official_{split}/ground-truths/{name}.png"] = png_bytes(
                decode_rle(gt) if gt else np.zeros((EVAL_SIZE, EVAL_SIZE), bool))
        for name, mask in submission["masks"].items():
            files[f"official_{split}/predictions/{name}.png"] = png_bytes(decode_rle(mask))
        return files
