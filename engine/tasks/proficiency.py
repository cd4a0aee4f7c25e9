"""Proficiency estimation: who is demonstrating (demonstrator) and where they did well or could
improve (demonstration).

Demonstrator: four classes (Novice .. Late Expert) per take. Examples are clips of
``CLIP_WINDOWS`` consecutive feature windows, mean-pooled, from every view. Our submission keeps
every clip: ``{"task", "split", "takes": {take_uid: {"ego": [clip logits], "exo": {cam_id: [clip
logits]}}}}``. A view's class probabilities are its clips' softmax averaged; then, as the official
demonstrator_proficiency/eval_script.py scores: ego is the ego view's; exo averages the exo views
with equal weight; ego+exo averages the ego view and each exo view with equal weight (1/5 each
with four exo cameras). Metrics: top-1 for ego, exo and ego+exo (early stopping uses ego+exo); a
take without a prediction is wrong. Beside it the training run writes the file the official script
reads (``official_submission_<split>.json``, one 4-vector per view: the log of its averaged
probabilities, so the script's softmax gives them back) and, for a labelled split, the ground
truth in the script's layout (``official_ground_truth_<split>.json``).

Demonstration: temporal points of good executions and tips for improvement. Each ego feature
window is classified as nothing, good execution or tip (the class of an event whose time falls
in it); detections are the local maxima of a class's probability over a take's windows, at the
window centres. Submission: ``{"task", "split", "takes": {take_uid: {"good_executions":
[{"video_time", "score"}], "tips_for_improvement": [...]}}}``. Metric: mAP at L1 thresholds
0.25, 0.5 and 1.0 s and their mean (``engine.tasks.metrics``); as in the official
demonstration_proficiency/libs/utils/metrics.py, a detection in a take the ground truth does not
hold is a false positive.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from engine.features import store
from engine.release.catalog import PROFICIENCY_LEVELS
from engine.tasks.base import Examples, Task, register
from engine.tasks.metrics import detection_map, majority_class, top1_accuracy

if TYPE_CHECKING:
    from engine.features.store import FeatureStore

CLIP_WINDOWS = 4           # feature windows per demonstrator clip (about 2.1 s at the official stride)
EVENT_CLASSES = ("good_executions", "tips_for_improvement")


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _view_probabilities(submission: dict) -> dict[str, tuple[np.ndarray | None, list[np.ndarray]]]:
    """take_uid -> (the ego view's class probabilities or None, each exo view's, by camera): a
    view's are its clips' softmax averaged."""
    def view(clips) -> np.ndarray:
        return _softmax(np.asarray(clips, float).reshape(-1, 4)).mean(axis=0)

    return {uid: (view(entry["ego"]) if entry.get("ego") else None,
                  [view(clips) for _, clips in sorted((entry.get("exo") or {}).items()) if clips])
            for uid, entry in submission.get("takes", {}).items()}


@register
class DemonstratorProficiency(Task):
    name = "demonstrator_proficiency"
    metric = "top1_ego_exo"

    def outputs(self, release) -> int:
        return len(PROFICIENCY_LEVELS)

    def examples(self, release, features: FeatureStore, split: str, train: bool) -> Examples:
        xs, ys, meta = [], [], []
        for entry in release.demonstrator_proficiency(split):
            label = PROFICIENCY_LEVELS.index(entry.proficiency_score) if entry.proficiency_score in PROFICIENCY_LEVELS else -1
            ego, exo = features.views(entry.take_uid)
            for name in ([ego] if ego else []) + exo:
                vectors = features.load(name)[2]
                for clip, start in enumerate(range(0, len(vectors), CLIP_WINDOWS)):
                    xs.append(vectors[start:start + CLIP_WINDOWS].mean(axis=0))
                    ys.append(label)
                    meta.append({"take_uid": entry.take_uid, "view": name, "clip": clip, "ego": name == ego})
        return Examples(np.asarray(xs, np.float32).reshape(-1, features.dim), np.asarray(ys, np.int64), meta)

    def truth(self, release, split: str) -> dict:
        return {"takes": {e.take_uid: PROFICIENCY_LEVELS.index(e.proficiency_score)
                          for e in release.demonstrator_proficiency(split) if e.proficiency_score in PROFICIENCY_LEVELS}}

    def submission(self, logits: np.ndarray, examples: Examples, split: str) -> dict:
        takes: dict[str, dict] = {}
        for m, row in sorted(zip(examples.meta, logits), key=lambda pair: pair[0]["clip"]):
            entry = takes.setdefault(m["take_uid"], {"ego": [], "exo": {}})
            row = [round(float(v), 5) for v in row]
            if m["ego"]:
                entry["ego"].append(row)
            else:
                entry["exo"].setdefault(store.parse_name(m["view"]).cam_id, []).append(row)
        return {"task": self.name, "split": split, "takes": takes}

    def evaluate(self, submission: dict, truth: dict, lenient: bool = False) -> dict:
        wanted = truth["takes"]
        preds = {"ego": {}, "exo": {}, "ego_exo": {}}
        for uid, (ego, exo) in _view_probabilities(submission).items():
            if uid not in wanted:
                continue
            if ego is not None:
                preds["ego"][uid] = int(np.argmax(ego))
            if exo:
                preds["exo"][uid] = int(np.argmax(np.mean(exo, axis=0)))
            if ego is not None or exo:
                preds["ego_exo"][uid] = int(np.argmax(np.mean(([ego] if ego is not None else []) + exo, axis=0)))
        keys = sorted(wanted)
        result = {f"top1_{k}": top1_accuracy([p.get(u, -1) for u in keys], [wanted[u] for u in keys])
                  for k, p in preds.items()}
        ignored = sum(uid not in wanted for uid in submission.get("takes", {}))
        return dict(result, takes=len(keys), ignored=ignored)

    def official_files(self, submission: dict, release, split: str) -> dict[str, dict]:
        """The official script's two inputs: takes named and ordered as the split's annotation
        file lists them; a take without a prediction is left out (the script then refuses the
        file, as it would anyone's incomplete submission)."""
        names = {t.take_uid: t.take_name for t in release.takes()}
        entries = release.demonstrator_proficiency(split)
        probabilities = _view_probabilities(submission)
        predicted = [e for e in entries if e.take_uid in probabilities and probabilities[e.take_uid][0] is not None]

        def logits(p: np.ndarray) -> list[float]:
            return [round(float(v), 6) for v in np.log(np.maximum(p, 1e-12))]

        files = {f"official_submission_{split}.json": {
            "videos": [names.get(e.take_uid, e.take_uid) for e in predicted],
            "ego_model_predictions": [logits(probabilities[e.take_uid][0]) for e in predicted],
            "exo_model_predictions": [[logits(p) for p in probabilities[e.take_uid][1]] for e in predicted]}}
        labelled = [e for e in entries if e.proficiency_score in PROFICIENCY_LEVELS]
        if labelled and len(labelled) == len(entries):
            files[f"official_ground_truth_{split}.json"] = {
                "videos": [names.get(e.take_uid, e.take_uid) for e in entries],
                "gt_annotations": [PROFICIENCY_LEVELS.index(e.proficiency_score) for e in entries],
                "scenario_names": [e.scenario_name for e in entries]}
        return files

    def baselines(self, train: Examples, evaluated: Examples, truth: dict, split: str) -> dict:
        per_take = {m["take_uid"]: int(y) for m, y in zip(train.meta, train.y) if y >= 0}
        majority = majority_class(per_take.values())
        wanted = truth["takes"]
        return {"majority": top1_accuracy([majority] * len(wanted), list(wanted.values()))}


@register
class DemonstrationProficiency(Task):
    name = "demonstration_proficiency"
    metric = "mAP"

    def outputs(self, release) -> int:
        return 1 + len(EVENT_CLASSES)

    def examples(self, release, features: FeatureStore, split: str, train: bool) -> Examples:
        xs, ys, meta = [], [], []
        for entry in release.demonstration_proficiency(split):
            ego, _ = features.views(entry.take_uid)
            if ego is None:
                continue
            t0, t1, vectors = features.load(ego)
            labels = np.zeros(len(vectors), np.int64)
            for cls, events in enumerate((entry.good_executions, entry.tips_for_improvement), start=1):
                for event in events:
                    labels[(t0 <= event.video_time) & (event.video_time < t1)] = cls
            # An event is a brief change within a take: give each window its difference from the
            # take's mean and from its neighbours, so the scene itself does not dominate.
            padded = np.concatenate([vectors[:1], vectors, vectors[-1:]])
            context = (padded[:-2] + padded[2:]) / 2
            xs.append(np.concatenate([vectors - vectors.mean(axis=0), vectors - context], axis=1))
            ys.append(labels)
            meta += [{"take_uid": entry.take_uid, "window": i, "time": float((a + b) / 2)}
                     for i, (a, b) in enumerate(zip(t0, t1))]
        if not xs:
            return Examples(np.zeros((0, 2 * features.dim), np.float32), np.zeros(0, np.int64), [])
        return Examples(np.concatenate(xs), np.concatenate(ys), meta)

    def truth(self, release, split: str) -> dict:
        known = {t.take_uid: t.duration_sec for t in release.takes()}
        takes = {}
        for e in release.demonstration_proficiency(split):
            duration = known.get(e.take_uid)
            takes[e.take_uid] = {"good_executions": [x.video_time for x in e.good_executions],
                                 "tips_for_improvement": [x.video_time for x in e.tips_for_improvement],
                                 "duration": duration}
        return {"takes": takes}

    def submission(self, logits: np.ndarray, examples: Examples, split: str) -> dict:
        probs = _softmax(logits)
        by_take: dict[str, list[int]] = {}
        for i, m in enumerate(examples.meta):
            by_take.setdefault(m["take_uid"], []).append(i)
        takes = {}
        for uid, rows in by_take.items():
            rows = sorted(rows, key=lambda i: examples.meta[i]["window"])
            times = [examples.meta[i]["time"] for i in rows]
            takes[uid] = {}
            for cls, name in enumerate(EVENT_CLASSES, start=1):
                p = probs[rows, cls]
                peaks = [k for k in range(len(p)) if (k == 0 or p[k] >= p[k - 1]) and (k == len(p) - 1 or p[k] > p[k + 1])]
                takes[uid][name] = [{"video_time": round(times[k], 4), "score": round(float(p[k]), 6)} for k in peaks]
        return {"task": self.name, "split": split, "takes": takes}

    def evaluate(self, submission: dict, truth: dict, lenient: bool = False) -> dict:
        """Detections in takes the truth does not hold count as false positives (``unknown_takes``
        says how many such takes), as in the official script."""
        wanted = truth["takes"]
        predictions = {name: [] for name in EVENT_CLASSES}
        for uid, entry in submission.get("takes", {}).items():
            for name in EVENT_CLASSES:
                predictions[name] += [(uid, float(d["video_time"]), float(d["score"])) for d in entry.get(name, [])]
        truths = {name: [(uid, t) for uid, take in wanted.items() for t in take[name]] for name in EVENT_CLASSES}
        unknown = sum(uid not in wanted for uid in submission.get("takes", {}))
        return dict(detection_map(predictions, truths), takes=len(wanted), unknown_takes=unknown)

    def baselines(self, train: Examples, evaluated: Examples, truth: dict, split: str) -> dict:
        """uniform: a detection of each class every second, all with the same score; random: as
        many at random times with random scores (seed 0)."""
        rng = np.random.default_rng(0)
        uniform, random = {}, {}
        for uid, take in truth["takes"].items():
            duration = take["duration"] or max([1.0] + take["good_executions"] + take["tips_for_improvement"])
            times = np.arange(0.5, duration, 1.0)
            uniform[uid] = {name: [{"video_time": float(t), "score": 1.0} for t in times] for name in EVENT_CLASSES}
            random[uid] = {name: [{"video_time": float(t), "score": float(s)}
                                  for t, s in zip(rng.uniform(0, duration, len(times)), rng.uniform(size=len(times)))]
                           for name in EVENT_CLASSES}
        return {"uniform": self.evaluate({"takes": uniform}, truth)["mAP"],
                "random": self.evaluate({"takes": random}, truth)["mAP"]}
