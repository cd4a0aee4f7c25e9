"""Ego-exo correspondence, both ways: given an object's mask in one view at a frame, its mask in
the other view at that frame, and whether it shows there at all.

``correspondence_ego_exo``: the query is the ego (Aria) view, the target each exo camera;
``correspondence_exo_ego`` the reverse. Views are the relations annotations' keys
(``aria01_214-1``, ``cam01``); a view whose key contains ``aria`` is the ego one, as in the
official scripts.

Frames scored, as the official evaluate_egoexo.py / evaluate_exoego.py score them: every frame
where the query view has the object's mask and the target view was annotated (listed in its
``annotated_frames``). The object is visible in the target when the target has a mask at that
frame. Metrics (``engine.tasks.metrics``): visibility balanced accuracy over all scored frames
(predicted visible: confidence > 0.5); where the target is visible, IoU, boundary F and location
error against the true mask resized to a longest side of 480; pooled means over frames.

Examples: one per (object, query view, target view, query frame with a mask). Inputs: the query
frame, the query mask and the target frame, each at ``size`` x ``size`` (frames decoded from the
shards the features were computed from, each sample read once, or with ``frames: release`` from
the release's videos; masks, from the release's annotations, area-averaged). Targets: the
target mask at that size and the visibility (NaN where the target view was not annotated:
such frames are predicted, as the official scorer requires of a submission, but neither
trained on nor scored).

Model (``siamese``): one full-resolution encoder for both frames; the query mask pools the
query's feature map into an object descriptor, which is correlated with the target's feature
map; a small decoder turns the target features, the descriptor, the correlation and each
pixel's distance to the object's mean colour into mask logits (starting from the correlation
itself); a visibility head reads the best correlation, the strongest logit and the nearest
colour to the object's in the target frame.

Submission (official): ``{"ego-exo": {"version", "challenge", "results": {take_uid: {"masks":
{object: {"<query>_<target>": {"<frame>": {"pred_mask": COCO RLE {size, counts}, "confidence":
float}}}}, "subsample_idx": [frames]}}}}``, keyed ``exo-ego`` the other way. Predicted masks
have the evaluated shape: the target view's mask size with its longest side resized to 480.
Ground truth: ``{take_uid: {"masks": {object: {view: {"<frame>": COCO RLE}}}, "annotated_frames":
{object: {view: [frames]}}}}``, the takes of the official correspondence-gt.json; a run writes
that file beside its val submission for the official scripts.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from engine import params as P
from engine.release.masks import lz_decompress, rle
from engine.tasks.base import Examples, Task, TrainConfig, register
from engine.tasks.ego_pose import view_frames
from engine.tasks.metrics import (
    EVAL_MAX_SIDE,
    balanced_accuracy,
    boundary_f,
    location_error,
    longest_side_shape,
    mask_iou,
    resize_longest_side,
)

CONFIDENCE_THRESHOLD = 0.5      # predicted visible above it (official CONF_THRESH)


def is_ego(view: str) -> bool:
    return "aria" in view


def coco_rle(mask) -> dict:
    """An ``EncodedMask`` of the release as plain COCO RLE ({"size": [h, w], "counts"})."""
    return {"size": [mask.height, mask.width], "counts": lz_decompress(mask.encoded)}


def decode_rle(entry: dict) -> np.ndarray:
    from pycocotools import mask as coco_mask
    return coco_mask.decode({"size": list(entry["size"]), "counts": entry["counts"].encode()}).astype(bool)


def area_resize(mask: np.ndarray, size: int) -> np.ndarray:
    """[size, size] share of each cell the mask covers (float32)."""
    import torch
    return torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(mask.astype(np.float32))[None, None],
                                                   size)[0, 0].numpy()


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """An rgb image darkened outside a mask of any size (scaled to it, nearest)."""
    h, w = image.shape[:2]
    rows = (np.arange(h) * mask.shape[0] / h).astype(int)
    cols = (np.arange(w) * mask.shape[1] / w).astype(int)
    inside = mask[rows][:, cols].astype(bool)
    return np.where(inside[:, :, None], image, image // 4)


def panel_figure(panels: list[tuple[np.ndarray, str]]):
    """A matplotlib figure of images side by side, each with its title."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (image, title) in zip(axes, panels):
        ax.imshow(image)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    figure.tight_layout()
    return figure


@dataclasses.dataclass(frozen=True)
class CorrespondenceOptions(TrainConfig):
    epochs: int = P.setting(20, "epochs at most")
    batch_size: int = P.setting(32, "global batch, split across workers")
    hidden: int = P.setting(32, "hidden units of the visibility head")
    size: int = P.setting(64, "side of the square frames and masks the model sees, pixels")
    frames: str = P.setting("shards", "where the frames come from: the shards the features were computed from, or "
                                      "the release's videos (at resolution)", choices=("shards", "release"))
    resolution: str = P.setting("448", "with frames: release, which video files the frames are decoded from",
                                choices=("448", "full"))


def siamese(size: int, hidden: int, dropout: float):
    """Inputs [N, 7 size^2]: query frame (HWC, 0-255), query mask, target frame; outputs
    [N, size^2 + 1]: the target's mask logits and a visibility logit."""
    import torch
    from torch import nn

    area = size * size

    class Siamese(nn.Module):
        def __init__(self):
            super().__init__()
            # Full resolution: the objects of an exo frame at this size are a few pixels wide.
            self.encoder = nn.Sequential(nn.Conv2d(3, 32, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
            self.fuse = nn.Sequential(nn.Conv2d(32 + 32 + 2, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
            self.to_mask = nn.Conv2d(16, 1, 1)
            # The mask starts as the correlation itself (a logit rising with the similarity),
            # which the decoder then corrects.
            self.similarity_scale = nn.Parameter(torch.tensor(10.0))
            self.similarity_bias = nn.Parameter(torch.tensor(-8.0))
            self.visibility = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, hidden), nn.ReLU(), nn.Dropout(dropout),
                                            nn.Linear(hidden, 1))

        def forward(self, x):
            query_rgb, target_rgb = (x[:, part].view(len(x), size, size, 3).permute(0, 3, 1, 2) / 255.0
                                     for part in (slice(0, 3 * area), slice(4 * area, None)))
            query, target = self.encoder(query_rgb), self.encoder(target_rgb)
            weight = x[:, 3 * area:4 * area].view(len(x), 1, size, size)

            def pooled(v):
                return ((v * weight).sum((2, 3)) / (weight.sum((2, 3)) + 1e-6))[:, :, None, None]

            descriptor = pooled(query).expand_as(target)
            similarity = nn.functional.cosine_similarity(descriptor, target, dim=1)[:, None]
            # Objects keep their colour across views: the distance of each target pixel to the
            # query object's mean colour is given to the decoder as it is.
            colour_distance = (target_rgb - pooled(query_rgb)).square().sum(1, keepdim=True)
            hidden_map = self.fuse(torch.cat([target, descriptor, similarity, colour_distance], 1))
            mask = (self.to_mask(hidden_map) + self.similarity_scale * similarity + self.similarity_bias).flatten(1)
            # Visibility from three summaries of the target frame: the best correlation, the
            # strongest mask logit and the nearest colour to the object's (which tells, before any
            # training, whether the object can be there at all). Normalized, as their scales
            # differ; detached, as its rare negatives would otherwise pull the shared features around.
            strongest = torch.cat([similarity.amax((2, 3)), mask.amax(1, keepdim=True),
                                   torch.log(colour_distance.amin((2, 3)) + 1e-3)], 1)
            return torch.cat([mask, self.visibility(strongest.detach())], 1)

    return Siamese()


def mask_and_visibility_loss():
    """Binary cross-entropy of visibility on the annotated examples, each class weighing half;
    plus cross-entropy and soft Dice of the mask on the visible ones (objects cover a few
    pixels: Dice keeps them from vanishing into the background)."""
    import torch
    from torch import nn

    class MaskAndVisibility(nn.Module):
        def forward(self, logits, target):
            known = torch.isfinite(target[:, -1])
            logits, target = logits[known], target[known]
            if not len(target):
                return logits.sum() * 0
            visible = target[:, -1] > 0.5
            # The metric is balanced accuracy: each class weighs half, however rare it is.
            per_example = nn.functional.binary_cross_entropy_with_logits(logits[:, -1], target[:, -1], reduction="none")
            loss = sum(per_example[group].mean() for group in (visible, ~visible) if group.any()) / 2
            if visible.any():
                predicted, truth = logits[visible, :-1], target[visible, :-1]
                probability = torch.sigmoid(predicted)
                dice = 1 - (2 * (probability * truth).sum(1) + 1) / (probability.sum(1) + truth.sum(1) + 1)
                loss = loss + nn.functional.binary_cross_entropy_with_logits(predicted, truth) + dice.mean()
            return loss

    return MaskAndVisibility()


def pooled_scores(iou: list, boundary: list, location: list, visible_truth: list, visible_predicted: list) -> dict:
    """Means over the frames where the object shows (0, 0 and 1 when it shows nowhere), and the
    balanced accuracy of visibility over all scored frames."""
    return {"iou": float(np.mean(iou)) if iou else 0.0, "boundary_f": float(np.mean(boundary)) if boundary else 0.0,
            "location_error": float(np.mean(location)) if location else 1.0,
            "visibility_balanced_accuracy": balanced_accuracy(visible_truth, visible_predicted)}


def prior_logits(train: Examples, evaluated: Examples, groups: list) -> np.ndarray:
    """Head outputs that predict, for every evaluated example, "visible" and the mean of the
    visible train target masks of its group, cut to their mean area (the mean of masks that
    move is a faint cloud; cut at 0.5 it would be empty). ``groups`` are functions of an
    example's meta, tried in turn until one has train examples of the evaluated one's group;
    all train examples are the last resort."""
    visible = train.labelled() & (np.nan_to_num(train.y[:, -1]) > 0.5)
    masks, meta = train.y[visible, :-1], [m for m, keep in zip(train.meta, visible) if keep]
    cache: dict = {}

    def prior(group, key) -> np.ndarray | None:
        if (group, key) not in cache:
            chosen = [i for i, m in enumerate(meta) if group is None or group(m) == key]
            cache[group, key] = None
            if chosen:
                mean, area = masks[chosen].mean(axis=0), int(round(masks[chosen].sum(axis=1).mean()))
                out = np.full(masks.shape[1], -10.0, np.float32)
                out[np.argsort(-mean, kind="stable")[:max(area, 1)]] = 10.0
                cache[group, key] = out
        return cache[group, key]

    rows = []
    for m in evaluated.meta:
        mask = next(p for p in (prior(g, g(m) if g else None) for g in [*groups, None]) if p is not None)
        rows.append(np.append(mask, 10.0))
    return np.asarray(rows, np.float32).reshape(len(evaluated), -1)


class Correspondence(Task):
    metric = "iou"
    reads_features = False
    Options = CorrespondenceOptions
    direction = ""          # the submission's key: "ego-exo" or "exo-ego"

    def outputs(self, release) -> int:
        return self.options.size ** 2 + 1

    def head(self, scale: dict, outputs: int, hidden: int, dropout: float):
        return siamese(self.options.size, hidden, dropout)

    def loss(self):
        return mask_and_visibility_loss()

    def pairs(self, views) -> list[tuple[str, str]]:
        """(query, target) view pairs of one object, from the views it was annotated in; none
        without an ego view."""
        egos = [v for v in views if is_ego(v)]
        if not egos:
            return []
        exos = sorted(v for v in views if not is_ego(v))
        return [(egos[0], exo) if self.direction == "ego-exo" else (exo, egos[0]) for exo in exos]

    def examples(self, release, features, split: str, train: bool) -> Examples:
        size = self.options.size
        takes = []
        for uid, rel in sorted(release.relations(split).items()):
            items = []
            for obj in sorted(rel.annotated_frames):
                for query, target in self.pairs(rel.annotated_frames[obj]):
                    for frame in sorted(rel.object_masks[obj].get(query, {})):
                        annotated = frame in rel.annotated_frames[obj].get(target, ())
                        if annotated or not train:
                            items.append((obj, query, target, frame, annotated))
            if items:
                takes.append((uid, rel, items))
        frames = self.frames(release, features, split,
                             {uid: {(v, f) for _, q, t, f, _ in items for v in (q, t)} for uid, _, items in takes})
        xs, ys, meta = [], [], []
        for uid, rel, items in takes:
            take_name = release.take(uid).take_name
            sizes = {view: (m.height, m.width) for tracks in rel.object_masks.values()
                     for view, track in tracks.items() for m in track.values()}
            for obj, query, target, frame, annotated in items:
                query_mask = rel.object_masks[obj][query][frame].decode()
                xs.append(np.concatenate([frames[uid, query, frame].reshape(-1), area_resize(query_mask, size).reshape(-1),
                                          frames[uid, target, frame].reshape(-1)]))
                truth = rel.object_masks[obj].get(target, {}).get(frame)
                if not annotated:
                    ys.append(np.full(size * size + 1, np.nan, np.float32))
                else:
                    target_mask = area_resize(truth.decode(), size) if truth else np.zeros((size, size), np.float32)
                    ys.append(np.append(target_mask.reshape(-1), float(truth is not None)))
                meta.append({"take_uid": uid, "take_name": take_name, "object": obj, "query": query, "target": target,
                             "frame": frame,
                             # A view without any mask in the take is never scored on its masks: any shape does.
                             "shape": longest_side_shape(*sizes.get(target, (EVAL_MAX_SIDE, EVAL_MAX_SIDE)))})
        return Examples(np.asarray(xs, np.float32).reshape(-1, 7 * size * size),
                        np.asarray(ys, np.float32).reshape(-1, size * size + 1), meta)

    def frames(self, release, features, split: str,
               wanted: dict[str, set[tuple[str, int]]]) -> dict[tuple[str, str, int], np.ndarray]:
        """(take uid, view key, frame) -> uint8 [size, size, 3] for ``wanted`` ({take uid: {(view
        key, frame)}}): from the shards the features were computed from (``frames: shards``), each
        sample read once; or from the release's videos, each view decoded in one pass."""
        from engine import stage as stages
        from engine.pretrain.data import frames_by_take

        size = self.options.size
        if self.options.frames == "shards":
            shards = stages.upstream(features.url, "shard", features.storage_options)
            out = frames_by_take(shards, split, wanted, size, features.storage_options)
            where = f"the shards at {shards}"
        else:
            out, where = {}, f"the release's {self.options.resolution} videos"
            for uid, pairs in sorted(wanted.items()):
                views = {v.key: v for v in release.take(uid).views(self.options.resolution)}
                for key in sorted({v for v, _ in pairs}):
                    if key in views:
                        decoded = view_frames(release, views[key], {f for v, f in pairs if v == key}, size)
                        out.update({(uid, key, f): image for f, image in decoded.items()})
        for uid, pairs in sorted(wanted.items()):
            if missing := sorted(p for p in pairs if (uid, *p) not in out):
                raise ValueError(f"take {uid}: view {missing[0][0]} frame {missing[0][1]}, which relations annotate, "
                                 f"is not in {where} ({len(missing)} such frames)")
        return out

    def truth(self, release, split: str) -> dict:
        return {uid: {"masks": {obj: {view: {str(f): coco_rle(m) for f, m in sorted(track.items())}
                                      for view, track in sorted(views.items())}
                                for obj, views in sorted(rel.object_masks.items())},
                      "annotated_frames": {obj: {view: list(frames) for view, frames in sorted(views.items())}
                                           for obj, views in sorted(rel.annotated_frames.items())}}
                for uid, rel in sorted(release.relations(split).items())}

    def submission(self, logits: np.ndarray, examples: Examples, split: str) -> dict:
        import torch

        size = self.options.size
        logits = torch.from_numpy(np.asarray(logits, np.float32))
        results: dict = {}
        for m, row in zip(examples.meta, logits):
            probability = torch.sigmoid(row[:-1].view(1, 1, size, size))
            mask = torch.nn.functional.interpolate(probability, size=tuple(m["shape"]), mode="bilinear",
                                                   align_corners=False)[0, 0].numpy() > 0.5
            take = results.setdefault(m["take_uid"], {"masks": {}, "subsample_idx": set()})
            take["masks"].setdefault(m["object"], {}).setdefault(f"{m['query']}_{m['target']}", {})[str(m["frame"])] = {
                "pred_mask": rle(mask), "confidence": round(float(torch.sigmoid(row[-1])), 5)}
            take["subsample_idx"].add(m["frame"])
        for take in results.values():
            take["subsample_idx"] = sorted(take["subsample_idx"])
        return {self.direction: {"version": "1", "challenge": f"correspondence_{self.direction}", "results": results}}

    def evaluate(self, submission: dict, truth: dict, lenient: bool = False) -> dict:
        results = (submission.get(self.direction) or {}).get("results")
        if not isinstance(results, dict):
            raise ValueError(f"submission has no {self.direction!r} results (expected "
                             f'{{"{self.direction}": {{"results": {{take_uid: ...}}}}}})')
        visible_truth, visible_predicted, iou, boundary, location, missing = [], [], [], [], [], []
        for uid, gt in truth.items():
            for obj, annotated in gt["annotated_frames"].items():
                for query, target in self.pairs(gt["masks"][obj]):
                    pair = f"{query}_{target}"
                    for frame in gt["masks"][obj][query]:
                        if int(frame) not in annotated.get(target, ()):
                            continue
                        predicted = results.get(uid, {}).get("masks", {}).get(obj, {}).get(pair, {}).get(frame)
                        if predicted is None:
                            if not lenient:
                                raise ValueError(f"submission has no prediction for take {uid} object {obj!r} "
                                                 f"{pair} frame {frame} (the official script stops here; --lenient "
                                                 "scores without it)")
                            missing.append((uid, obj, pair, frame))
                            continue
                        truth_mask = gt["masks"][obj][target].get(frame)
                        visible_truth.append(int(truth_mask is not None))
                        visible_predicted.append(int(float(predicted["confidence"]) > CONFIDENCE_THRESHOLD))
                        if truth_mask is None:
                            continue
                        expected = resize_longest_side(decode_rle(truth_mask))
                        mask = decode_rle(predicted["pred_mask"])
                        if mask.shape != expected.shape:
                            raise ValueError(f"take {uid} object {obj!r} {pair} frame {frame}: pred_mask is "
                                             f"{list(mask.shape)}, the scored shape is {list(expected.shape)} "
                                             f"(the target's mask with its longest side at {EVAL_MAX_SIDE})")
                        iou.append(mask_iou(expected, mask))
                        boundary.append(boundary_f(expected, mask))
                        location.append(location_error(expected, mask))
        if not visible_truth:
            raise ValueError("no frame is scored: no query mask falls on a frame its target view annotated")
        return {**pooled_scores(iou, boundary, location, visible_truth, visible_predicted),
                "frames": len(visible_truth), "visible_frames": len(iou), "missing": len(missing),
                "ignored": sum(uid not in truth for uid in results)}

    def baselines(self, train: Examples, evaluated: Examples, truth: dict, split: str) -> dict:
        """mean_mask: always visible, with the object's mean mask in the target view over the
        train examples (the same object and target view; else that view; else all).
        never_visible: confidence 0 and an empty mask."""
        always = prior_logits(train, evaluated, [lambda m: (m["object"], m["target"]), lambda m: m["target"]])
        never = np.full_like(always, -10.0)
        return {name: self.evaluate(self.submission(logits, evaluated, split), truth)[self.metric]
                for name, logits in (("mean_mask", always), ("never_visible", never))}

    def showcase(self, submission: dict, release):
        """The first val take's prediction with the largest true target mask: the query frame with
        its mask, the target frame with the true mask and with the predicted one."""
        results = (submission.get(self.direction) or {}).get("results") or {}
        relations = release.relations("val")
        uid = next((u for u in sorted(results) if u in relations), None)
        if uid is None:
            return None
        rel, predicted = relations[uid], results[uid]["masks"]
        candidates = [(int(truth.decode().sum()), obj, query, target, frame)
                      for obj in sorted(rel.annotated_frames) for query, target in self.pairs(rel.annotated_frames[obj])
                      for frame, truth in sorted(rel.object_masks[obj].get(target, {}).items())
                      if str(frame) in predicted.get(obj, {}).get(f"{query}_{target}", {})]
        if not candidates:
            return None
        _, obj, query, target, frame = max(candidates)
        views = {v.key: v for v in release.take(uid).views(self.options.resolution)}
        images = {key: view_frames(release, views[key], {frame})[frame] for key in (query, target)}
        prediction = predicted[obj][f"{query}_{target}"][str(frame)]
        truth, guess = rel.object_masks[obj][target][frame].decode(), decode_rle(prediction["pred_mask"])
        iou = mask_iou(resize_longest_side(truth), guess)
        panels = [(images[query], rel.object_masks[obj][query][frame].decode(), f"query {query}: {obj}"),
                  (images[target], truth, f"target {target}: truth"),
                  (images[target], guess, f"predicted (IoU {iou:.2f}, confidence {prediction['confidence']:.2f})")]
        figure = panel_figure([(overlay(image, mask), title) for image, mask, title in panels])
        caption = (f"Take {release.take(uid).take_name}, frame {frame}: the object's mask in the query view (left), "
                   f"its true mask in the target view (middle) and the model's (right); outside each mask the frame is darkened.")
        return figure, caption

    def official_files(self, submission: dict, release, split: str) -> dict[str, dict]:
        """correspondence-gt.json, as the official process_annotations.py writes it."""
        return {f"official_ground_truth_{split}.json": {"version": "1", "challenge": "correspondence",
                                                         "annotations": self.truth(release, split)}}


@register
class CorrespondenceEgoExo(Correspondence):
    name = "correspondence_ego_exo"
    direction = "ego-exo"


@register
class CorrespondenceExoEgo(Correspondence):
    name = "correspondence_exo_ego"
    direction = "exo-ego"
