"""The run report: one self-contained HTML file (plots embedded as PNG).

It shows the lineage of every stage (inputs, fingerprint, duration, counts, rejects), each
benchmark's metric beside its baselines, training curves, a strip of frames from one take in
every view with body keypoints and object masks drawn, and links to the submission files.
Links are relative, so the run folder can be moved or synced as a whole.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
import posixpath
import time

import numpy as np

from engine import params as P
from engine import stage as stages
from engine import storage
from engine.release.catalog import FINGERS

ROOT = "@@run-root@@/"      # stands for the path from the report to the run folder
BONES = [("left-shoulder", "right-shoulder"), ("left-shoulder", "left-elbow"), ("left-elbow", "left-wrist"),
         ("right-shoulder", "right-elbow"), ("right-elbow", "right-wrist"), ("left-shoulder", "left-hip"),
         ("right-shoulder", "right-hip"), ("left-hip", "right-hip"), ("left-hip", "left-knee"),
         ("left-knee", "left-ankle"), ("right-hip", "right-knee"), ("right-knee", "right-ankle")]
# Hand bones: the wrist to each finger's first joint, then along the finger.
HAND_BONES = [(f"{side}_{a}", f"{side}_{finger}_{k}")
              for side in ("left", "right") for finger in FINGERS
              for a, k in [("wrist", 1)] + [(f"{finger}_{k - 1}", k) for k in range(2, 5)]]


@dataclasses.dataclass(frozen=True)
class ReportParams(P.Params):
    take: str | None = P.setting(None, "take_name or take_uid for the strip of frames (default: one with masks)")
    time: float | None = P.setting(None, "seconds into that take (default: a frame with keypoints)")


def write(params: ReportParams, inputs: dict, url: str, ctx: stages.Context) -> dict:
    """Render the report into ``url`` (this stage's folder) and ``<run out>/report.html``."""
    import matplotlib
    matplotlib.use("Agg")

    out = ctx.run_out or url
    records = [r for name, r in ctx.records.items() if name in inputs]
    kinds = stages.kinds()
    sections = [f"<h1>{html.escape(ctx.run_name)}</h1><p>Run folder <code>{html.escape(out)}</code>, report "
                f"written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.</p>"]
    for kind in kinds.values():         # each kind's own section, from its records of this run
        own = [r for r in records if r["kind"] == kind.name]
        if kind.report and own:
            sections.append(kind.report(own, ctx))
    sections += [_frames_section(ctx.urls.get("release"), params), _lineage_section(records, out),
                 _rejects_section(records, kinds)]
    body = "\n".join(s for s in sections if s)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(ctx.run_name)}: ee4d run"
            f"</title><style>{STYLE}</style></head><body>{body}</body></html>")
    fs, path = storage.filesystem(url)
    storage.write_bytes_atomic(fs, storage.join(path, "report.html"), page.replace(ROOT, _to_run(url, out)).encode())
    publish(url, out)
    return {"stages": len(records), "failed": sum(r["status"] in ("failed", "blocked") for r in records)}


def _to_run(url: str, out: str) -> str:
    """The relative path from the report stage's folder to the run folder."""
    return posixpath.relpath(storage.filesystem(out)[1], storage.filesystem(url)[1]) + "/"


def publish(url: str, out: str) -> None:
    """``<run out>/report.html``: the page of the report stage at ``url``, its links made relative to
    the run folder. A run that reuses the report stage publishes it again, so the run folder
    always shows the report of the stages that run used."""
    fs, path = storage.filesystem(url)
    out_fs, out_path = storage.filesystem(out)
    page = fs.cat_file(storage.join(path, "report.html")).decode().replace(f"href='{_to_run(url, out)}", "href='")
    target = storage.join(out_path, "report.html")
    if not out_fs.exists(target) or out_fs.cat_file(target) != page.encode():   # unchanged: left untouched
        storage.write_bytes_atomic(out_fs, target, page.encode())


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#f4f4f4}code{font-size:13px}.bad{color:#b00}
img{max-width:100%}"""


def link(url: str, out: str, text: str) -> str:
    """A link to a file inside the run folder (relative) or elsewhere (as given)."""
    rel = posixpath.relpath(url, out) if url.startswith(out.rstrip("/") + "/") else None
    href = ROOT + rel if rel else url
    return f"<a href='{html.escape(href)}'>{html.escape(text)}</a>"


def fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))


def png(fig) -> str:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return f"<img alt='plot' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _lineage_section(records: list[dict], out: str) -> str:
    rows = ["<tr><th>stage</th><th>status</th><th>fingerprint</th><th>inputs</th><th>seconds</th>"
            "<th>counts</th><th>output</th></tr>"]
    for r in records:
        inputs = "<br>".join(f"{k} <code>{v['fingerprint']}</code>" for k, v in r["inputs"].items())
        counts = "<br>".join(f"{k} {fmt(v)}" for k, v in r.get("result", {}).items()
                             if not isinstance(v, (dict, list)))
        status = r.get("status", "ran")
        if r.get("error"):
            status = f"<span class='bad'>{status}: {html.escape(r['error'])}</span>"
        rows.append(f"<tr><td>{r['stage']}</td><td>{status}</td><td><code>{r['fingerprint']}</code></td>"
                    f"<td>{inputs}</td><td>{r.get('seconds', 0.0):.1f}</td><td>{counts}</td>"
                    f"<td>{link(r['output'], out, posixpath.basename(r['output']) or r['output'])}</td></tr>")
    return ("<h2>Lineage</h2><p>Every stage's output folder is named by its fingerprint: a hash of its "
            "configuration, its inputs' fingerprints and a format version.</p><table>" + "".join(rows) + "</table>")


def _rejects_section(records: list[dict], kinds: dict) -> str:
    parts = []
    for r in records:
        kind = kinds.get(r["kind"])
        if r["status"] not in ("ran", "reused") or not (kind and kind.rejects):
            continue
        items = kind.rejects(r)
        if items:
            lis = "".join(f"<li><code>{html.escape(str(k))}</code>: {html.escape(str(v))}</li>" for k, v in items[:50])
            more = f"<li>... and {len(items) - 50} more</li>" if len(items) > 50 else ""
            parts.append(f"<h3>{r['stage']}: {len(items)}</h3><ul>{lis}{more}</ul>")
    return "<h2>Rejects and problems</h2>" + "".join(parts) if parts else ""


# ----------------------------------------------------------------------------- frames

def _frames_section(release_url: str | None, params) -> str:
    if not release_url:
        return ""
    try:
        figure, caption = frame_strip(release_url, params.take, params.time)
    except LookupError as e:
        return f"<h2>Frames</h2><p>{html.escape(str(e))}</p>"
    return f"<h2>Frames</h2><p>{html.escape(caption)}</p>" + png(figure)


def frame_strip(release_url: str, take: str | None = None, seconds: float | None = None):
    """A matplotlib figure of one frame of one take in every view, with the manual body and
    hand keypoints and the relations object masks of that frame drawn; and its caption."""
    import matplotlib.pyplot as plt

    from engine.release import Release

    release = Release.open(release_url)
    split, chosen, poses, relations = _pick_take(release, take)
    try:
        hands = release.ego_pose(split, "hand", chosen.take_uid)
    except FileNotFoundError:
        hands = {}
    frame = _pick_frame(poses, hands, relations, seconds)
    views = [v for v in chosen.views("448")]
    fig, axes = plt.subplots(1, len(views), figsize=(3.2 * len(views), 2.6), squeeze=False)
    for ax, view in zip(axes[0], views):
        image = _decode_frame(release, view.path, frame)
        height, width = image.shape[:2]
        full = _full_size(release, chosen, view)
        sx, sy = width / full[0], height / full[1]
        ax.imshow(image)
        for i, (_obj, tracks) in enumerate(sorted((relations.object_masks if relations else {}).items())):
            mask = tracks.get(view.key, {}).get(frame)
            if mask is not None:
                m = mask.decode()
                ax.contour(np.linspace(0, width, m.shape[1]), np.linspace(0, height, m.shape[0]), m,
                           levels=[0.5], colors=[plt.cm.tab10(i % 10)], linewidths=1.5)
        for annotation, bones, colour, dot in ((poses, BONES, "lime", "yellow"), (hands, HAND_BONES, "cyan", "white")):
            joints = annotation[frame].joints2d.get(view.cam_id, {}) if frame in annotation else {}
            for a, b in bones:
                if a in joints and b in joints:
                    ax.plot([joints[a][0] * sx, joints[b][0] * sx], [joints[a][1] * sy, joints[b][1] * sy],
                            color=colour, linewidth=1)
            if joints:
                xy = np.array(list(joints.values()))
                ax.scatter(xy[:, 0] * sx, xy[:, 1] * sy, s=4, color=dot)
        ax.set_title(view.key, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    caption = (f"Take {chosen.take_name} ({chosen.take_uid}, {split}), frame {frame} ({frame / 30:.2f} s), "
               f"{len(views)} views: body{' and hand' if frame in hands else ''} keypoints (manual annotation) "
               "and object masks (relations).")
    return fig, caption


def _pick_take(release, wanted: str | None):
    """(split, take, body poses by frame, relations) of the wanted take, or the first take by
    name that has both body keypoints and object masks."""
    by_uid = {t.take_uid: t for t in release.takes()}
    candidates = []
    for split in ("val", "train", "test"):
        try:
            relations = release.relations(split)
        except FileNotFoundError:
            relations = {}
        for uid in release.ego_pose_takes(split, "body"):
            if uid in by_uid:
                candidates.append((uid not in relations, by_uid[uid].take_name, split, uid, relations.get(uid)))
    if wanted:
        candidates = [c for c in candidates if wanted in (c[1], c[3])]
        if not candidates:
            raise LookupError(f"take {wanted!r} has no body keypoints in this release")
    if not candidates:
        raise LookupError("no take in this release has body keypoints to draw")
    _, _, split, uid, relations = min(candidates, key=lambda c: c[:2])
    return split, by_uid[uid], release.ego_pose(split, "body", uid), relations


def _pick_frame(poses: dict, hands: dict, relations, seconds: float | None) -> int:
    """The body frame nearest ``seconds``; or the middle one of those that also have hands and
    masks (or masks, or hands, as the release has them)."""
    frames = sorted(poses)
    if seconds is not None:
        return min(frames, key=lambda f: abs(f - seconds * 30))
    masked = set()
    for tracks in (relations.object_masks.values() if relations else []):
        for per_view in tracks.values():
            masked |= set(per_view)
    for wanted in (masked & set(hands), masked, set(hands)):
        chosen = [f for f in frames if f in wanted]
        if chosen:
            return chosen[len(chosen) // 2]
    return frames[len(frames) // 2]


def _decode_frame(release, path: str, frame: int) -> np.ndarray:
    from engine import video
    with release.open_file(path) as f:
        return video.decode_at(f.read(), [frame])[frame]


def _full_size(release, take, view) -> tuple[int, int]:
    """The full-resolution (width, height) of a view: annotations are in its pixels."""
    from engine import video
    full = next(v for v in take.views("full") if v.key == view.key)
    with release.open_file(full.path) as f:
        info = video.probe(f, check_tail=False)
    return info.width, info.height


KIND = stages.register(stages.StageKind(
    name="report", params=ReportParams, run=write, uses_all_stages=True,
    help="one HTML page: each stage's section, lineage, rejects, frames of one take",
    resources=lambda params: "driver only"))
