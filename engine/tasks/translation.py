"""Exo-to-ego translation: subtask 1, ego track prediction (``translation_exo_ego``), and subtask
2, ego frame generation (``translation_exo_ego_generation``, see ``TranslationGeneration``).

Subtask 1: given an object's mask in an exo view at a frame, its mask in the ego view at that frame. The
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

import base64
import dataclasses
import io

import numpy as np

from engine import params as P
from engine.release.masks import rle
from engine.tasks.base import Examples, Task, register
from engine.tasks.correspondence import (
    CONFIDENCE_THRESHOLD,
    CorrespondenceExoEgo,
    CorrespondenceOptions,
    coco_rle,
    decode_rle,
    overlay,
    panel_figure,
    pooled_scores,
    prior_logits,
)
from engine.tasks.ego_pose import view_frames
from engine.tasks.metrics import boundary_f, mask_extent, mask_iou

EVAL_SIZE = 256


def image_name(take_name: str, exo: str, obj: str, frame: int) -> str:
    return f"{take_name}-{exo}-{obj}-{frame}"


def resize_nearest(mask: np.ndarray) -> np.ndarray:
    """A mask at EVAL_SIZE x EVAL_SIZE, as the official script loads a PNG: PIL's nearest resize
    of the 0/255 image, then > 127."""
    from PIL import Image
    image = Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255)
    return np.asarray(image.resize((EVAL_SIZE, EVAL_SIZE), resample=Image.NEAREST)) > 127


def png_bytes(image: np.ndarray) -> bytes:
    """A PNG of an RGB uint8 image, or of a boolean mask (as 0 and 255)."""
    from PIL import Image
    image = np.asarray(image)
    buf = io.BytesIO()
    Image.fromarray(image.astype(np.uint8) * 255 if image.dtype == bool else image).save(buf, format="PNG")
    return buf.getvalue()


def read_png(data: bytes) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(data)).convert("L")) > 127


def _box(mask: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
    """(width, height) and (x, y) centre of a mask's box; an empty mask: (0, 0) and, as the
    official script has it, (height // 2, width // 2)."""
    if not mask.any():
        return (0, 0), (mask.shape[0] // 2, mask.shape[1] // 2)
    (top, bottom), (left, right) = mask_extent(mask)
    return (right - left + 1, bottom - top + 1), ((left + right) // 2, (top + bottom) // 2)


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

    def scored_images(self, release, split: str):
        """(image name, take uid, exo view, ego view, object, frame, the ego mask or None) of every
        image the split scores: each frame where the exo view has the object's mask and the ego
        view was annotated (the object shows in ego where it has a mask there)."""
        for uid, rel in sorted(release.relations(split).items()):
            take_name = release.take(uid).take_name
            for obj in sorted(rel.annotated_frames):
                for exo, ego in self.pairs(rel.annotated_frames[obj]):
                    for frame in sorted(rel.object_masks[obj].get(exo, {})):
                        if frame in rel.annotated_frames[obj].get(ego, ()):
                            yield (image_name(take_name, exo, obj, frame), uid, exo, ego, obj, frame,
                                   rel.object_masks[obj].get(ego, {}).get(frame))

    def truth(self, release, split: str) -> dict:
        """{"images": {name: the ego mask as COCO RLE at its own size, or None where the object
        does not show}}."""
        return {"images": {name: coco_rle(mask) if mask is not None else None
                           for name, *_, mask in self.scored_images(release, split)}}

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


# ----------------------------------------------------------------------------- subtask 2: ego frame generation

# The perceptual metrics of eval_subtask2.py, by the file of their network in the ``perceptual``
# folder, with what a missing prediction scores (the official values).
PERCEPTUAL = {"lpips": 1.0, "dists": 1.0, "clip_score": 0.0}


def load_image(data: bytes) -> np.ndarray:
    """uint8 [256, 256, 3] from a PNG's bytes, as eval_subtask2.py loads it: RGB, then PIL's
    default resize (bicubic) to 256 x 256."""
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((EVAL_SIZE, EVAL_SIZE)))


def ssim(truth: np.ndarray, predicted: np.ndarray) -> float:
    """The structural similarity of two uint8 RGB images as scikit-image's structural_similarity
    gives it with the official call's settings (its defaults): 7 x 7 uniform windows, sample
    covariances, K1 0.01 and K2 0.03, a data range of 255 (uint8); the mean over the windows
    that lie wholly inside the image, then over the channels."""
    a, b = (np.asarray(v, np.int64).transpose(2, 0, 1) for v in (truth, predicted))
    # Window means from integral images of a, b, a^2, b^2 and ab at once: exact sums in
    # integers, then one division.
    sums = np.zeros((5, 3, a.shape[1] + 1, a.shape[2] + 1), np.int64)
    np.cumsum(np.stack([a, b, a * a, b * b, a * b]), 2, out=sums[:, :, 1:, 1:])
    np.cumsum(sums[:, :, 1:, 1:], 3, out=sums[:, :, 1:, 1:])
    n = 7 * 7
    mean_a, mean_b, mean_aa, mean_bb, mean_ab = (sums[:, :, 7:, 7:] - sums[:, :, :-7, 7:] - sums[:, :, 7:, :-7]
                                                 + sums[:, :, :-7, :-7]) / n
    var_a, var_b = (mean_aa - mean_a ** 2) * n / (n - 1), (mean_bb - mean_b ** 2) * n / (n - 1)
    covariance = (mean_ab - mean_a * mean_b) * n / (n - 1)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    index = ((2 * mean_a * mean_b + c1) * (2 * covariance + c2)
             / ((mean_a ** 2 + mean_b ** 2 + c1) * (var_a + var_b + c2)))
    return float(index.mean(axis=(1, 2)).mean())


def psnr(truth: np.ndarray, predicted: np.ndarray) -> float:
    """10 log10(255^2 / mean squared error), as scikit-image's peak_signal_noise_ratio gives it on
    uint8 images: infinite for identical ones."""
    error = np.mean((np.asarray(truth, np.float64) - np.asarray(predicted, np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / error)) if error else float("inf")


@dataclasses.dataclass(frozen=True)
class GenerationOptions(CorrespondenceOptions):
    hidden: int = P.setting(64, "width of the frame code the generator decodes")
    perceptual: str = P.setting("", "folder of the perceptual metrics' networks, saved by torch.export (lpips.pt2, "
                                    "dists.pt2, clip_score.pt2; see engine/tasks/translation.py); a metric without "
                                    "one is reported under not_computed")


def generator(size: int, mean_image: np.ndarray, hidden: int):
    """Inputs [N, 4 size^2]: the exo frame (HWC, 0-255) and the object's exo mask; outputs
    [N, 3 size^2]: the ego frame (HWC, 0-255), as the train set's mean ego frame plus a
    correction decoded from a code of the whole exo frame. The ego camera sees the same scene
    from elsewhere, so there is no pixel to pixel map to learn: what the exo frame tells is
    global (the room's colours, where the demonstrator stands and looks)."""
    import torch
    from torch import nn

    area = size * size

    class Generator(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.as_tensor(mean_image, dtype=torch.float32).view(1, -1))
            self.encoder = nn.Sequential(
                nn.Conv2d(4, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(64, hidden, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.decoder = nn.Linear(hidden, 3 * area)
            # Starts as the mean frame, which the code then corrects.
            nn.init.zeros_(self.decoder.weight)
            nn.init.zeros_(self.decoder.bias)

        def forward(self, x):
            frame = x[:, :3 * area].view(len(x), size, size, 3).permute(0, 3, 1, 2) / 255.0
            mask = x[:, 3 * area:4 * area].view(len(x), 1, size, size)
            return self.mean + 255.0 * self.decoder(self.encoder(torch.cat([frame, mask], 1)))

    return Generator()


def pixel_loss():
    """Mean squared error on pixels scaled to [0, 1] (PSNR is its logarithm)."""
    from torch import nn

    class PixelLoss(nn.Module):
        def forward(self, predicted, target):
            return ((predicted - target) / 255.0).square().mean()

    return PixelLoss()


@register
class TranslationGeneration(TranslationExoEgo):
    """Exo-to-ego translation, subtask 2: ego frame generation (``translation_exo_ego_generation``).

    The images are subtask 1's (``scored_images``); each is the ego frame at that frame,
    generated from the exo frame and the object's exo mask. Exchange: one PNG frame per image,
    named as in subtask 1, in ``ground-truths`` and ``predictions``; the submission JSON holds
    the same PNGs in base64 (``{"task", "split", "images": {name: base64 PNG}}``).

    Scoring, as eval_subtask2.py: both images loaded as RGB and resized to 256 x 256 by PIL's
    default (bicubic); per image SSIM and PSNR (``ssim``, ``psnr``), means over all images; a
    missing prediction scores SSIM 0 and PSNR 0. The truth frames are the release's ego frames,
    decoded from its ``resolution`` videos (the model's inputs come from the shards cut from
    them, unless ``frames: release``); a run writes them, at 256 x 256, as the ground-truths
    folder.

    LPIPS, DISTS and the CLIP score need networks whose weights we do not ship: with the option
    ``perceptual`` naming a folder, each of ``lpips.pt2``, ``dists.pt2`` and ``clip_score.pt2``
    found there is loaded as a program saved by ``torch.export.save``, called on (truth,
    prediction) as uint8 tensors [1, 256, 256, 3], and returns the score; it does its own
    normalization (the official script feeds LPIPS and DISTS images scaled to [-1, 1], and CLIP
    its own preprocessing).
    A missing prediction scores LPIPS 1, DISTS 1, CLIP score 0. A metric without its network is
    listed under ``not_computed``, never estimated.
    """
    name = "translation_exo_ego_generation"
    metric = "psnr"
    Options = GenerationOptions

    def outputs(self, release) -> int:
        return 3 * self.options.size ** 2

    def head(self, scale: dict, outputs: int, hidden: int, dropout: float):
        return generator(self.options.size, scale["y"][0], hidden)

    def loss(self):
        return pixel_loss()

    def examples(self, release, features, split: str, train: bool) -> Examples:
        """Exo->ego correspondence examples of the scored images: inputs the exo frame and mask,
        target the ego frame."""
        pairs = super().examples(release, features, split, train)
        pairs = pairs.subset(np.isfinite(pairs.y[:, -1]))       # the ego view was annotated there
        area = self.options.size ** 2
        return Examples(pairs.x[:, :4 * area], pairs.x[:, 4 * area:], pairs.meta)

    def truth(self, release, split: str) -> dict:
        """{"images": {name: "<take uid>/<frame>"}, "frames": {"<take uid>/<frame>": uint8 [256,
        256, 3]}}: each ego frame once, however many objects and exo views show it."""
        images, wanted = {}, {}
        for name, uid, _, ego, _, frame, _ in self.scored_images(release, split):
            images[name] = f"{uid}/{frame}"
            wanted.setdefault((uid, ego), set()).add(frame)
        frames = {}
        for (uid, ego), numbers in sorted(wanted.items()):
            views = {v.key: v for v in release.take(uid).views(self.options.resolution)}
            decoded = view_frames(release, views[ego], numbers) if ego in views else {}
            if missing := sorted(numbers - set(decoded)):
                raise ValueError(f"take {uid}: relations annotate ego view {ego} at frame {missing[0]}, which its "
                                 f"{self.options.resolution} video does not have")
            frames.update({f"{uid}/{frame}": load_image(png_bytes(image)) for frame, image in decoded.items()})
        return {"images": images, "frames": frames}

    def submission(self, logits: np.ndarray, examples: Examples, split: str) -> dict:
        size = self.options.size
        frames = np.clip(np.rint(np.asarray(logits, np.float32)), 0, 255).astype(np.uint8).reshape(-1, size, size, 3)
        images = {image_name(m["take_name"], m["query"], m["object"], m["frame"]): base64.b64encode(png_bytes(frame)).decode()
                  for m, frame in zip(examples.meta, frames)}
        return {"task": self.name, "split": split, "size": [size, size], "images": images}

    def read_submission(self, url: str) -> dict:
        """The submission JSON, or a folder of ``<name>.png`` frames (the official predictions)."""
        from engine import storage

        fs, path = storage.filesystem(url)
        if not fs.isdir(path):
            return Task.read_submission(self, url)
        images = {}
        for file in fs.ls(path, detail=False):
            if file.endswith(".png"):
                with fs.open(file, "rb") as f:
                    images[file.rsplit("/", 1)[-1][:-4]] = base64.b64encode(f.read()).decode()
        return {"task": self.name, "images": images}

    def perceptual_networks(self) -> dict:
        """{metric: module} of the networks found in the ``perceptual`` folder."""
        import torch

        from engine import storage

        if not self.options.perceptual:
            return {}
        fs, folder = storage.filesystem(self.options.perceptual)
        if not fs.isdir(folder):
            raise ValueError(f"perceptual: {self.options.perceptual} is not a folder")
        networks = {}
        for metric in PERCEPTUAL:
            path = storage.join(folder, f"{metric}.pt2")
            if fs.exists(path):
                with fs.open(path, "rb") as f:
                    networks[metric] = torch.export.load(io.BytesIO(f.read())).module()
        return networks

    def evaluate(self, submission: dict, truth: dict, lenient: bool = False) -> dict:
        """As eval_subtask2.py; a missing prediction is scored as the official script scores it
        (so ``lenient`` changes nothing) and counted under ``missing``."""
        import torch

        images = submission.get("images")
        if not isinstance(images, dict):
            raise ValueError('submission has no "images" ({name: base64 PNG} or a folder of PNG frames)')
        if not truth["images"]:
            raise ValueError("no image is scored: the truth is empty")
        networks = self.perceptual_networks()
        scores: dict[str, list[float]] = {metric: [] for metric in ("ssim", "psnr", *networks)}
        missing = 0
        for name, key in truth["images"].items():
            expected = truth["frames"][key]
            if name not in images:
                missing += 1
                for metric, values in scores.items():
                    values.append(PERCEPTUAL.get(metric, 0.0))
                continue
            try:
                predicted = load_image(base64.b64decode(images[name]))
            except (ValueError, OSError) as e:
                raise ValueError(f"image {name}: not a readable PNG ({e})") from e
            scores["ssim"].append(ssim(expected, predicted))
            scores["psnr"].append(psnr(expected, predicted))
            with torch.no_grad():
                for metric, network in networks.items():
                    pair = [torch.from_numpy(np.array(v))[None] for v in (expected, predicted)]
                    scores[metric].append(float(network(*pair).reshape(-1)[0]))
        return {**{metric: float(np.mean(values)) for metric, values in scores.items()},
                "not_computed": sorted(set(PERCEPTUAL) - set(networks)),
                "images": len(truth["images"]), "missing": missing,
                "ignored": sum(name not in truth["images"] for name in images)}

    def baselines(self, train: Examples, evaluated: Examples, truth: dict, split: str) -> dict:
        """mean_ego_frame: the train set's mean ego frame, for every image; exo_frame_resized: the
        exo frame itself, as if the two cameras saw alike."""
        area = self.options.size ** 2
        mean = np.broadcast_to(train.y.mean(axis=0), evaluated.y.shape)
        return {name: self.evaluate(self.submission(frames, evaluated, split), truth)[self.metric]
                for name, frames in (("mean_ego_frame", mean), ("exo_frame_resized", evaluated.x[:, :3 * area]))}

    def showcase(self, submission: dict, release):
        """One val image: the exo frame with the object's mask, the true ego frame, the generated one."""
        images = submission.get("images") or {}
        chosen = next((image for image in self.scored_images(release, "val") if image[0] in images), None)
        if chosen is None:
            return None
        name, uid, exo, ego, obj, frame, _ = chosen
        views = {v.key: v for v in release.take(uid).views(self.options.resolution)}
        exo_frame, ego_frame = (view_frames(release, views[key], {frame})[frame] for key in (exo, ego))
        mask = release.relations("val")[uid].object_masks[obj][exo][frame].decode()
        generated = load_image(base64.b64decode(images[name]))
        truth = load_image(png_bytes(ego_frame))
        panels = [(overlay(exo_frame, mask), f"exo {exo}: {obj}"), (truth, f"ego {ego}: truth"),
                  (generated, f"generated (SSIM {ssim(truth, generated):.2f}, PSNR {psnr(truth, generated):.1f})")]
        figure = panel_figure(panels)
        caption = (f"Take {release.take(uid).take_name}, frame {frame}: the exo frame with the object's mask "
                   f"(outside it darkened), the true ego frame and the generated one, both at the scored 256 x 256.")
        return figure, caption

    def official_files(self, submission: dict, release, split: str) -> dict[str, dict | bytes]:
        """official_<split>/ground-truths and official_<split>/predictions, one PNG per image, as
        eval_subtask2.py reads them; the truth at 256 x 256, which its resize leaves as it is."""
        truth = self.truth(release, split)
        files: dict[str, dict | bytes] = {f"official_{split}/ground-truths/{name}.png": png_bytes(truth["frames"][key])
                                          for name, key in truth["images"].items()}
        for name, image in submission["images"].items():
            files[f"official_{split}/predictions/{name}.png"] = base64.b64decode(image)
        return files
