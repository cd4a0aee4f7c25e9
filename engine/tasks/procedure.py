"""Procedure understanding, instance level: for a keystep segment s_i of a procedural take,
given its keystep and the keysteps of the segments before it (nothing after s_i), answer five
questions: which keysteps s_i requires (``previous``), whether s_i is optional (``optional``),
whether it is a procedural mistake (``mistake``), which required keysteps are still missing
(``missing``), and which keysteps may come next (``next``).

The counting graph (``CountingGraph``) answers all five from the train split's takes alone:
how often keystep A came before B among the takes that hold both (scaled by how often A occurs
at all), how often B occurs, and how often C directly followed B. The model is that graph plus a
learned correction: an MLP over the segment's pooled ego features, the history (multi-hot),
its keystep (one-hot) and the graph's answers, added to the graph's logits behind a gate that
starts at zero, so training begins from the graph.

Examples: one per segment of procedure_understanding_<split>.json; targets are 3K + 2 values
(K keystep classes of label_mapping.csv: previous, missing, next as K each, then optional and
mistake), NaN for keysteps of other scenarios, which take no part in the loss or the metric.

Submission: ``{"task": "procedure_understanding", "split", "segments": [{"take_uid",
"start_time", "end_time", "previous": {step_unique_id: score}, "missing": {...}, "next": {...},
"optional": score, "mistake": score}]}``, scores in [0, 1]. Metric: calibrated AP
(``metrics.calibrated_ap``) per question, over the split's segments; for the keystep questions
per keystep over the segments of its scenario, then the mean over keysteps with positives;
``mean_cAP`` is the mean of the five. A segment without a prediction scores lowest.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np

from engine.tasks.base import Examples, Task, build_head, match_segments, pool, register, segment_key
from engine.tasks.metrics import calibrated_ap

if TYPE_CHECKING:
    from engine.features.store import FeatureStore

KEYSTEP_QUESTIONS = ("previous", "missing", "next")
BINARY_QUESTIONS = ("optional", "mistake")


@dataclasses.dataclass
class CountingGraph:
    """Keystep statistics of the train takes, per scenario."""
    before: dict            # (a, b) -> share of the takes holding both where a first came before b's first
    presence: dict          # step -> share of its scenario's takes that hold it
    follows: dict           # (b, c) -> share of b's occurrences directly followed by c

    @staticmethod
    def count(sequences: list[tuple[str, list[int]]]) -> CountingGraph:
        """From (scenario, step_unique_ids in time order) per take."""
        takes = defaultdict(int)
        holding, first_before, both = defaultdict(int), defaultdict(int), defaultdict(int)
        followed, occurrences = defaultdict(int), defaultdict(int)
        for scenario, steps in sequences:
            takes[scenario] += 1
            first = {}
            for i, step in enumerate(steps):
                first.setdefault(step, i)
                if i + 1 < len(steps):
                    followed[(step, steps[i + 1])] += 1
                    occurrences[step] += 1
            for a in first:
                holding[(scenario, a)] += 1
                for b in first:
                    if a != b:
                        both[(a, b)] += 1
                        first_before[(a, b)] += first[a] < first[b]
        return CountingGraph(before={ab: first_before[ab] / n for ab, n in both.items()},
                             presence={step: n / takes[scenario] for (scenario, step), n in holding.items()},
                             follows={bc: n / occurrences[bc[0]] for bc, n in followed.items()})

    def answers(self, step: int, history: set[int], scenario_steps: list[int]) -> dict:
        """Scores in [0, 1] for the five questions about a segment of ``step`` after ``history``."""
        previous = {a: self.before.get((a, step), 0.0) * self.presence.get(a, 0.0) for a in scenario_steps if a != step}
        missing = {a: score * (a not in history) for a, score in previous.items()}
        return {"previous": previous, "missing": missing,
                "next": {c: self.follows.get((step, c), 0.0) for c in scenario_steps},
                "optional": 1.0 - self.presence.get(step, 0.0),
                "mistake": max(missing.values(), default=0.0)}


def graph_head(x_scale: np.ndarray, outputs: int, hidden: int, dropout: float):
    """The graph's answers (the last ``outputs`` inputs) as logits, plus an MLP's correction
    behind a gate that starts at zero: the model starts as the graph and departs from it only
    as far as the gradient keeps pushing (a zero last layer instead would move every logit by
    about lr x hidden units at Adam's first step)."""
    import torch
    from torch import nn

    class GraphPlusCorrection(nn.Module):
        def __init__(self):
            super().__init__()
            self.correction = build_head(x_scale, outputs, hidden, dropout)
            self.gate = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.logit(x[:, -outputs:].clamp(0.02, 0.98)) + self.gate * self.correction(x)

    return GraphPlusCorrection()


def masked_bce():
    """Binary cross-entropy over the known targets (NaN elsewhere)."""
    import torch

    class MaskedBCE(torch.nn.Module):
        def forward(self, logits, target):
            known = torch.isfinite(target)
            return torch.nn.functional.binary_cross_entropy_with_logits(logits[known], target[known])

    return MaskedBCE()


@register
class ProcedureUnderstanding(Task):
    name = "procedure_understanding"
    metric = "mean_cAP"

    def _classes(self, release) -> tuple[list[int], dict[str, list[int]]]:
        """Keystep step_unique_ids in label_id order, and each scenario's."""
        mapping = sorted(release.label_mapping(), key=lambda m: m.label_id)
        by_scenario = defaultdict(list)
        for m in mapping:
            by_scenario[m.scenario_name].append(m.step_unique_id)
        return [m.step_unique_id for m in mapping], dict(by_scenario)

    def outputs(self, release) -> int:
        return 3 * len(self._classes(release)[0]) + len(BINARY_QUESTIONS)

    def head(self, scale: dict, outputs: int, hidden: int, dropout: float):
        return graph_head(scale["x"], outputs, hidden, dropout)

    def loss(self):
        return masked_bce()

    def _graph(self, release) -> CountingGraph:
        return CountingGraph.count([(take.scenario, [s.step_unique_id for s in sorted(take.segments,
                                                                                      key=lambda s: s.start_time)])
                                    for take in release.procedure_understanding("train").values()])

    def examples(self, release, features: FeatureStore, split: str, train: bool) -> Examples:
        classes, by_scenario = self._classes(release)
        index = {step: i for i, step in enumerate(classes)}
        k = len(classes)
        graph = self._graph(release)
        xs, ys, meta = [], [], []
        for uid, take in sorted(release.procedure_understanding(split).items()):
            ego, _ = features.views(uid)
            if ego is None or take.scenario not in by_scenario:
                continue
            steps = by_scenario[take.scenario]
            history: set[int] = set()
            for seg in sorted(take.segments, key=lambda s: s.start_time):
                if seg.step_unique_id not in index:
                    continue
                answers = graph.answers(seg.step_unique_id, history, steps)
                given = np.zeros(2 * k, np.float32)
                given[[index[s] for s in history]] = 1.0
                given[k + index[seg.step_unique_id]] = 1.0
                xs.append(np.concatenate([pool(*features.load(ego), seg.start_time, seg.end_time), given,
                                          self._layout(answers, index, steps, fill=0.0)]))
                truth = self._segment_truth(seg, steps)
                ys.append(self._layout(truth, index, steps) if truth else np.full(3 * k + 2, np.nan, np.float32))
                meta.append({"take_uid": uid, "start_time": seg.start_time, "end_time": seg.end_time,
                             "steps": {str(step): index[step] for step in steps}})
                history.add(seg.step_unique_id)
        width = features.dim + 2 * k + 3 * k + 2
        return Examples(np.asarray(xs, np.float32).reshape(-1, width),
                        np.asarray(ys, np.float32).reshape(-1, 3 * k + 2), meta)

    @staticmethod
    def _segment_truth(seg, steps: list[int]) -> dict | None:
        """The five answers of an annotated segment as scores (1 or 0); None when unannotated."""
        if seg.is_optional is None or seg.missing_keysteps is None or seg.next_keysteps is None:
            return None
        lists = {"previous": set(seg.previous_keysteps), "missing": set(seg.missing_keysteps),
                 "next": set(seg.next_keysteps)}
        out = {q: {s: float(s in lists[q]) for s in steps} for q in KEYSTEP_QUESTIONS}
        out["optional"] = float(bool(seg.is_optional))
        out["mistake"] = float(bool(seg.is_procedural_mistake))
        return out

    @staticmethod
    def _layout(answers: dict, index: dict, steps: list[int], fill: float = np.nan) -> np.ndarray:
        """Answers as the 3K + 2 vector: keysteps outside the scenario get ``fill``."""
        k = len(index)
        out = np.full(3 * k + 2, fill, np.float32)
        for q, question in enumerate(KEYSTEP_QUESTIONS):
            for step in steps:
                out[q * k + index[step]] = answers[question].get(step, 0.0)
        out[3 * k], out[3 * k + 1] = answers["optional"], answers["mistake"]
        return out

    def truth(self, release, split: str) -> dict:
        _, by_scenario = self._classes(release)
        segments = {}
        for uid, take in release.procedure_understanding(split).items():
            steps = by_scenario.get(take.scenario)
            for seg in take.segments:
                answers = self._segment_truth(seg, steps) if steps else None
                if answers:
                    segments[segment_key(uid, seg.start_time, seg.end_time)] = {
                        "steps": steps, **{q: [s for s, v in answers[q].items() if v] for q in KEYSTEP_QUESTIONS},
                        **{q: bool(answers[q]) for q in BINARY_QUESTIONS}}
        return {"segments": segments}

    def submission(self, logits: np.ndarray, examples: Examples, split: str) -> dict:
        scores = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
        k = (scores.shape[1] - 2) // 3 if len(scores) else 0
        rows = []
        for m, row in zip(examples.meta, scores):
            entry = {"take_uid": m["take_uid"], "start_time": m["start_time"], "end_time": m["end_time"]}
            entry.update({q: {step: round(float(row[n * k + i]), 5) for step, i in m["steps"].items()}
                          for n, q in enumerate(KEYSTEP_QUESTIONS)})
            entry.update(optional=round(float(row[3 * k]), 5), mistake=round(float(row[3 * k + 1]), 5))
            rows.append(entry)
        return {"task": self.name, "split": split, "segments": rows}

    def evaluate(self, submission: dict, truth: dict, lenient: bool = False) -> dict:
        wanted = truth["segments"]
        predicted, ignored = match_segments(submission.get("segments", []), wanted)
        keys = sorted(wanted)
        out = {}
        for question in BINARY_QUESTIONS:
            scores = [float(predicted[k][question]) if k in predicted else -np.inf for k in keys]
            out[f"cAP_{question}"] = calibrated_ap(scores, [wanted[k][question] for k in keys])
        for question in KEYSTEP_QUESTIONS:
            per_step = defaultdict(lambda: ([], []))
            for k in keys:
                given = predicted.get(k, {}).get(question, {})
                for step in wanted[k]["steps"]:
                    scores, labels = per_step[step]
                    scores.append(float(given.get(str(step), -np.inf)))
                    labels.append(step in wanted[k][question])
            aps = [ap for ap in (calibrated_ap(s, lab) for s, lab in per_step.values()) if ap is not None]
            out[f"cAP_{question}"] = float(np.mean(aps)) if aps else None
        scored = [v for v in out.values() if v is not None]
        return {"mean_cAP": float(np.mean(scored)) if scored else 0.0, **out, "segments": len(keys),
                "missing": sum(k not in predicted for k in keys), "ignored": ignored}

    def baselines(self, train: Examples, evaluated: Examples, truth: dict, split: str) -> dict:
        """random: uniform scores (seed 0); graph: the counting graph's answers alone."""
        graph = np.clip(evaluated.x[:, -evaluated.y.shape[1]:], 0.02, 0.98)     # inputs end with its answers
        rng = np.random.default_rng(0)
        return {"random": self.evaluate(self.submission(rng.normal(size=graph.shape), evaluated, split), truth)[self.metric],
                "graph": self.evaluate(self.submission(np.log(graph / (1 - graph)), evaluated, split), truth)[self.metric]}
