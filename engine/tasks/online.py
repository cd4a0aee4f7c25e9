"""Energy-efficient online keystep detection: a keystep label (or background) for every 0.2 s
step of a take's ego stream (5 fps), from the past alone, under a power budget.

Steps: step k covers [k STEP_S, (k + 1) STEP_S) of the take. At its end the model has heard the
step's audio and seen its last frame, and it emits scores for background (class 0) and each
keystep (class label_id + 1). The truth of step k is the keystep_segment_<split>.json segment
that holds the time of that last frame, or background where none does.

Model (``online_head``): an audio branch (log mel-band energies of the step's audio at 16 kHz,
then a layer) that runs every step; an RGB branch (a small CNN on the step's frame at ``size``
pixels) that runs only when the camera is on; and a classifier over both, told by a flag whether
a frame was seen. Training hides the frame from a share of the examples (``rgb_dropout``), so
one model serves every sensor policy.

Policies (which sensors each step uses, decided from the past only): ``rgb`` (camera and
microphone every step), ``audio`` (microphone only), ``duty_N`` (the camera every Nth step), and
``confidence_T`` (the camera turns on for the next step when this step's top score is below T).

Energy (``engine.tasks.energy``): each policy's steps cost the MACs and bytes moved of the
branches that ran, counted on the model itself, plus the sensors that were on.

Submission: ``{"task": "online_keystep", "split", "step_s": 0.2, "classes": K + 1, "runs":
{policy: {"compute": {sensors: {"macs", "bytes"}}, "takes": {take_uid: {"scores": [[K + 1
scores] per step], "sensors": ["audio+rgb" | "audio" | "rgb" | "" per step]}}}}}``; ``compute``
names the cost of one step for each sensor set the run uses. Metric: per run, mcAP = the mean
over keystep classes with a positive step in the split of the calibrated AP
(``metrics.calibrated_ap``) of that class's scores over every step of the split, and its
average power. ``mcAP@20mW`` and ``mcAP@2.8W`` are the best mcAP among the runs within each
budget (0 when none is); ``mcAP_<policy>`` and ``power_mW_<policy>`` are the curve.

The audio is the take's ``audio/<ego cam>.wav`` from its first sample (taken to be the take's
start), mixed to mono; a take without it is an error naming the file.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from engine import params as P
from engine.tasks import energy
from engine.tasks.base import Examples, Task, TrainConfig, affine, register
from engine.tasks.ego_pose import ego_frames, ego_view, frame_cnn
from engine.tasks.metrics import calibrated_ap

AUDIO_RATE = 16_000
AUDIO_FRAME = 400                     # 25 ms analysis frames, 8 per step
STEP_SAMPLES = int(AUDIO_RATE * energy.STEP_S)
BANDS = 32
EMBED = 64
POLICIES = ("rgb", "audio", "duty_2", "duty_4", "confidence_0.6", "confidence_0.9")


def audio_bands():
    """Log mel-band energies of a step's audio ([B, STEP_SAMPLES] at 16 kHz -> [B, BANDS]),
    averaged over its 25 ms frames; the transform is matrix products, so the FLOP counter sees
    its cost."""
    import torch
    from torch import nn

    n = np.arange(AUDIO_FRAME)
    freqs = np.arange(AUDIO_FRAME // 2 + 1)
    window = np.hanning(AUDIO_FRAME)[:, None]
    angle = 2 * np.pi * np.outer(n, freqs) / AUDIO_FRAME
    mel = 2595 * np.log10(1 + freqs * AUDIO_RATE / AUDIO_FRAME / 700)
    band = np.minimum((mel / mel[-1] * BANDS).astype(int), BANDS - 1)
    pooling = np.eye(BANDS)[band]                      # [bins, BANDS]: each DFT bin in one band

    class AudioBands(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("cos", torch.as_tensor(window * np.cos(angle), dtype=torch.float32))
            self.register_buffer("sin", torch.as_tensor(window * np.sin(angle), dtype=torch.float32))
            self.register_buffer("pool", torch.as_tensor(pooling, dtype=torch.float32))

        def forward(self, audio):
            frames = audio.reshape(len(audio), -1, AUDIO_FRAME)
            re, im = frames @ self.cos, frames @ self.sin
            return torch.log(((re * re + im * im) @ self.pool) + 1e-8).mean(dim=1)

    return AudioBands()


def online_head(x_scale: np.ndarray, size: int, outputs: int, hidden: int, dropout: float, rgb_dropout: float):
    """Inputs: the frame's pixels (3 size^2, HWC), the BANDS audio features, and a flag (1: the
    frame was seen). ``.branches()`` gives the parts the energy model counts."""
    import torch
    from torch import nn

    pixels = 3 * size * size

    class OnlineHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.rgb = frame_cnn(x_scale[:, :pixels], size, EMBED, hidden, dropout)
            self.audio = nn.Sequential(affine(x_scale[:, pixels:-1]), nn.Linear(BANDS, EMBED), nn.ReLU())
            self.classify = nn.Sequential(nn.Linear(2 * EMBED + 1, hidden), nn.ReLU(), nn.Dropout(dropout),
                                          nn.Linear(hidden, outputs))

        def forward(self, x):
            seen = x[:, -1:]
            if self.training:
                seen = seen * (torch.rand_like(seen) >= rgb_dropout)
            return self.classify(torch.cat([self.audio(x[:, pixels:-1]), self.rgb(x[:, :pixels]) * seen, seen], 1))

        def compute(self) -> dict:
            """One step's cost for each sensor set: the audio front-end, the audio branch and the
            classifier always; the RGB branch when the camera is on."""
            audio = energy.count([audio_bands(), self.audio, self.classify],
                                 [torch.zeros(1, STEP_SAMPLES), torch.zeros(1, BANDS), torch.zeros(1, 2 * EMBED + 1)])
            rgb = energy.count([self.rgb], [torch.zeros(1, pixels)])
            return {"audio": audio, "audio+rgb": {k: audio[k] + rgb[k] for k in audio}}

    return OnlineHead()


def step_frames(fps: float, frames: int) -> list[int]:
    """The last frame of each whole step of a video."""
    per_step = fps * energy.STEP_S
    return [int(round((k + 1) * per_step)) - 1 for k in range(int(frames // per_step))]


def step_labels(times: list[float], segments: list) -> list[int]:
    """Class per step: label_id + 1 of the (latest-starting) segment holding the time, else 0."""
    out = []
    for t in times:
        holding = [s for s in segments if s.start_time <= t < s.end_time]
        out.append(max(holding, key=lambda s: s.start_time).label_id + 1 if holding else 0)
    return out


def run_policy(policy: str, with_rgb: np.ndarray, audio_only: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The scores a policy emits and the sensors it uses, step by step, from the model's scores
    with and without the frame ([steps, classes] each)."""
    kind, _, arg = policy.partition("_")
    camera = np.zeros(len(with_rgb), bool)
    if kind == "rgb":
        camera[:] = True
    elif kind == "duty":
        camera[::int(arg)] = True
    elif kind == "confidence":
        camera[:1] = True
        for k in range(len(camera) - 1):    # the decision for step k + 1 uses step k's output
            camera[k + 1] = (with_rgb[k] if camera[k] else audio_only[k]).max() < float(arg)
    elif kind != "audio":
        raise ValueError(f"unknown policy {policy!r}")
    scores = np.where(camera[:, None], with_rgb, audio_only)
    return scores, ["audio+rgb" if c else "audio" for c in camera]


@register
class OnlineKeystep(Task):
    name = "online_keystep"
    metric = "mcAP@2.8W"
    reads_features = False

    @dataclasses.dataclass(frozen=True)
    class Options(TrainConfig):
        size: int = P.setting(32, "side of the square ego frame the RGB branch sees, pixels")
        resolution: str = P.setting("448", "which ego video file frames are decoded from", choices=("448", "full"))
        rgb_dropout: float = P.setting(0.5, "share of training steps whose frame is hidden (one model, every policy)")

        def __post_init__(self):
            super().__post_init__()
            if not 0 < self.rgb_dropout < 1:
                raise ValueError(f"rgb_dropout must be between 0 and 1 (exclusive), got {self.rgb_dropout}: "
                                 "the model must learn with and without the frame")

    def outputs(self, release) -> int:
        return max(m.label_id for m in release.label_mapping()) + 2

    def head(self, scale: dict, outputs: int, hidden: int, dropout: float):
        o = self.options
        return online_head(scale["x"], o.size, outputs, hidden, dropout, o.rgb_dropout)

    def _takes(self, release, split: str) -> dict[str, list]:
        by_take: dict[str, list] = {}
        for seg in release.keystep_segments(split):
            by_take.setdefault(seg.take_uid, []).append(seg)
        return dict(sorted(by_take.items()))

    def _steps(self, release, uid: str) -> tuple[list[int], float]:
        from engine import video

        with release.open_file(ego_view(release, uid, self.options.resolution).path) as f:
            info = video.probe(f, check_tail=False)
        return step_frames(info.fps, info.frames), info.fps

    def _audio(self, release, uid: str, steps: int) -> np.ndarray:
        """[steps, STEP_SAMPLES] mono audio at 16 kHz; zeros past the file's end."""
        from engine import video

        take = release.take(uid)
        path = f"{take.root_dir}/audio/{take.ego_view.cam_id}.wav"
        if not release.exists(path):
            raise FileNotFoundError(f"take {uid}: no ego audio ({path}); online keystep detection needs it")
        with release.open_file(path) as f:
            samples, rate = video.decode_audio(f, 0.0, steps * energy.STEP_S + 1.0)
        if not rate:
            raise ValueError(f"take {uid}: {path} has no audio stream")
        mono = samples.mean(axis=0)
        wanted = np.arange(steps * STEP_SAMPLES) / AUDIO_RATE
        resampled = np.interp(wanted, np.arange(len(mono)) / rate, mono, right=0.0)
        return resampled.reshape(steps, STEP_SAMPLES).astype(np.float32)

    def examples(self, release, features, split: str, train: bool) -> Examples:
        """One example per step; evaluation examples twice, with the frame seen and hidden."""
        import torch

        bands = audio_bands()
        size = self.options.size
        xs, ys, meta = [], [], []
        for uid, segments in self._takes(release, split).items():
            frames, fps = self._steps(release, uid)
            images = ego_frames(release, uid, self.options.resolution, size, set(frames))
            with torch.no_grad():
                sound = bands(torch.from_numpy(self._audio(release, uid, len(frames)))).numpy()
            labels = step_labels([f / fps for f in frames], segments) if segments[0].label_id is not None \
                else [-1] * len(frames)
            for step, (frame, label) in enumerate(zip(frames, labels)):
                for seen in ((1.0,) if train else (1.0, 0.0)):
                    xs.append(np.concatenate([images[frame].reshape(-1), sound[step], [seen]]))
                    ys.append(label)
                    meta.append({"take_uid": uid, "step": step, "rgb": bool(seen)})
        return Examples(np.asarray(xs, np.float32).reshape(-1, 3 * size * size + BANDS + 1),
                        np.asarray(ys, np.int64), meta)

    def truth(self, release, split: str) -> dict:
        takes = {}
        for uid, segments in self._takes(release, split).items():
            if segments[0].label_id is not None:
                frames, fps = self._steps(release, uid)
                takes[uid] = step_labels([f / fps for f in frames], segments)
        return {"step_s": energy.STEP_S, "classes": self.outputs(release), "takes": takes}

    def submission(self, logits: np.ndarray, examples: Examples, split: str) -> dict:
        import torch

        probs = torch.softmax(torch.as_tensor(np.asarray(logits, np.float32)), dim=1).numpy()
        steps: dict[str, dict[bool, dict[int, np.ndarray]]] = {}
        for m, row in zip(examples.meta, probs):
            steps.setdefault(m["take_uid"], {True: {}, False: {}})[m["rgb"]][m["step"]] = row
        compute = self._compute(probs.shape[1])
        runs = {}
        for policy in POLICIES:
            takes = {}
            for uid, by_seen in steps.items():
                n = len(by_seen[True])
                scores, sensors = run_policy(policy, np.asarray([by_seen[True][k] for k in range(n)]),
                                             np.asarray([by_seen[False][k] for k in range(n)]))
                takes[uid] = {"scores": np.round(scores, 5).tolist(), "sensors": sensors}
            runs[policy] = {"compute": {s: compute[s] for s in {s for t in takes.values() for s in t["sensors"]}},
                            "takes": takes}
        return {"task": self.name, "split": split, "step_s": energy.STEP_S,
                "classes": int(probs.shape[1]) if len(probs) else 0, "runs": runs}

    def _compute(self, outputs: int) -> dict:
        """One step's cost for each sensor set, counted on the head this task trains (its
        shapes, not its weights, set the cost)."""
        o = self.options
        width = 3 * o.size ** 2 + BANDS + 1
        scale = np.stack([np.zeros(width), np.ones(width)]).astype(np.float32)
        return online_head(scale, o.size, outputs, o.hidden, o.dropout, o.rgb_dropout).compute()

    def evaluate(self, submission: dict, truth: dict, lenient: bool = False) -> dict:
        wanted = truth["takes"]
        classes = truth["classes"]
        out, curve, ignored, missing = {}, {}, set(), set()
        for name, run in submission.get("runs", {}).items():
            scores, labels, joules, steps = [], [], 0.0, 0
            ignored.update(uid for uid in run["takes"] if uid not in wanted)
            for uid, truth_steps in wanted.items():
                got = run["takes"].get(uid)
                n = len(truth_steps)
                if got is None:
                    if not lenient:
                        raise ValueError(f"run {name!r} has no prediction for take {uid} "
                                         "(--lenient scores without it, its steps lowest)")
                    missing.add(uid)
                    got = {"scores": np.full((n, classes), -np.inf), "sensors": [""] * n}
                given = np.asarray(got["scores"], np.float64)
                if given.shape != (n, classes) or len(got["sensors"]) != n:
                    raise ValueError(f"run {name!r}, take {uid}: {n} steps of {classes} scores and sensors expected, "
                                     f"got scores {list(given.shape)} and {len(got['sensors'])} sensors")
                for sensors in got["sensors"]:
                    cost = run["compute"].get(sensors) if sensors else {"macs": 0, "bytes": 0}
                    if cost is None:
                        raise ValueError(f"run {name!r} uses sensors {sensors!r} but gives no compute for them")
                    joules += energy.step_energy_j(sensors, cost)
                scores.append(given)
                labels.extend(truth_steps)
                steps += n
            scores, labels = np.concatenate(scores) if scores else np.zeros((0, classes)), np.asarray(labels)
            aps = [ap for ap in (calibrated_ap(scores[:, c], labels == c) for c in range(1, classes)) if ap is not None]
            curve[name] = (float(np.mean(aps)) if aps else 0.0, joules / (steps * energy.STEP_S) if steps else 0.0)
        for budget, watts in energy.BUDGETS_W.items():
            out[f"mcAP@{budget}"] = max((m for m, w in curve.values() if w <= watts), default=0.0)
        for name, (m, w) in curve.items():
            out[f"mcAP_{name}"], out[f"power_mW_{name}"] = m, w * 1e3
        return {**out, "steps": sum(len(v) for v in wanted.values()), "takes": len(wanted),
                "missing": len(missing), "ignored": len(ignored)}

    def tradeoff(self, metrics: dict) -> dict | None:
        points = {name: (metrics[f"power_mW_{name}"], metrics[f"mcAP_{name}"])
                  for name in (k[len("mcAP_"):] for k in metrics if k.startswith("mcAP_"))}
        return {"x": "average power (mW)", "y": "mcAP", "points": points,
                "limits": {budget: watts * 1e3 for budget, watts in energy.BUDGETS_W.items()}}

    def baselines(self, train: Examples, evaluated: Examples, truth: dict, split: str) -> dict:
        """background: every step background, no sensor on; random: uniform random scores."""
        steps = {uid: len(v) for uid, v in truth["takes"].items()}
        classes = truth["classes"]
        rng = np.random.default_rng(0)

        def constant(make) -> dict:
            return {"runs": {"baseline": {"compute": {}, "takes": {
                uid: {"scores": make(n).tolist(), "sensors": [""] * n} for uid, n in steps.items()}}}}

        background = constant(lambda n: np.eye(classes)[np.zeros(n, int)])
        random = constant(lambda n: rng.random((n, classes)))
        return {"background": self.evaluate(background, truth)["mcAP_baseline"],
                "random": self.evaluate(random, truth)["mcAP_baseline"]}
