"""Every PyAV encode, decode and probe of the engine goes through here.

This is the package's one PyAV import (the miniature release generator aside): PyAV's errors
leave it as ``VideoError``, and the frame arithmetic every reader and writer must agree on is
written here once: which source frame a time shows (``source_frame``), which frames a reader
at a lower rate keeps (``frames_at_rate``), how to seek to a frame (``_seek_frame``) and the
size with a given short side (``short_side_size``).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import io
from collections.abc import Iterator
from fractions import Fraction
from typing import IO

import av
import numpy as np

from engine.errors import ContentError


class VideoError(ContentError):
    """A video could not be opened, decoded or encoded; the message says why."""


def _video_errors(fn):
    """PyAV's errors raised in ``fn`` (a function or a generator function) leave as VideoError."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except av.error.FFmpegError as e:
                raise VideoError(str(e)) from e
        return generator

    @functools.wraps(fn)
    def function(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except av.error.FFmpegError as e:
            raise VideoError(str(e)) from e
    return function


# ----------------------------------------------------------------------------- frame arithmetic

def source_frame(t: float, fps: float) -> int:
    """The source frame on screen at time t (seconds): frame i covers [i/fps, (i+1)/fps)."""
    return int(np.floor(t * fps + 1e-6))


def frames_at_rate(start: int, end: int, src_fps: float, fps: float | None) -> list[int]:
    """The source frames of [start, end) that a reader at ``fps`` shows: the one on screen every
    ``1/fps`` s from ``start``; every frame when ``fps`` is None or not below ``src_fps``."""
    if fps is None or fps >= src_fps:
        return list(range(start, end))
    n = int(np.floor((end - start) / src_fps * fps - 1e-9)) + 1
    return sorted({f for f in (start + source_frame(k / fps, src_fps) for k in range(n)) if f < end})


def short_side_size(width: int, height: int, short: int | None, at_least: bool = False) -> tuple[int, int]:
    """(width, height) scaled so the short side is ``short``, aspect kept, each rounded to an even
    size (as the scaler and yuv420p like); unchanged for None. ``at_least``: neither side below
    ``short`` (an odd ``short`` stays odd), so a ``short`` x ``short`` centre crop fits."""
    if not short:
        return width, height
    scale = short / min(width, height)
    w, h = 2 * round(width * scale / 2), 2 * round(height * scale / 2)
    return (max(short, w), max(short, h)) if at_least else (w, h)


def _rate(stream) -> Fraction:
    return stream.average_rate or stream.guessed_rate


def frame_index_of_pts(pts: int, stream) -> int:
    """Index of the frame with timestamp ``pts`` on the video's own timeline (0 = first frame)."""
    return int(round(float((pts - (stream.start_time or 0)) * stream.time_base * _rate(stream))))


def frame_index(frame: av.VideoFrame, stream) -> int:
    """Index of a decoded frame on the video's own timeline (0 = first frame)."""
    return frame_index_of_pts(frame.pts, stream)


def _seek_frame(container, stream, frame: int) -> None:
    """Position ``container`` at the keyframe at or before frame ``frame`` of ``stream``
    (exact arithmetic: the target never passes the frame's own timestamp)."""
    container.seek(int((stream.start_time or 0) + frame / _rate(stream) / stream.time_base),
                   stream=stream, backward=True)


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    codec: str
    width: int
    height: int
    fps: float
    frames: int
    duration: float
    has_audio: bool
    size_bytes: int | None = None


def _open(source: str | IO[bytes]):
    try:
        return av.open(source, "r")
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"cannot open as video: {e}") from e


@_video_errors
def probe(source: str | IO[bytes], check_tail: bool = True) -> VideoInfo:
    """Read a video's header, decode its first frame and, cheaply, prove its tail is there.

    The tail check seeks to the last second and reads (without decoding) every packet to the
    end: a file cut short after a complete header is caught without decoding the take.
    """
    with _open(source) as container:
        if not container.streams.video:
            raise VideoError("no video stream")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        fps = float(_rate(stream) or 0)
        duration = float(stream.duration * stream.time_base) if stream.duration else (
            container.duration / av.time_base if container.duration else 0.0)
        frames = stream.frames or int(round(duration * fps))
        info = VideoInfo(codec=ctx.name, width=ctx.width, height=ctx.height, fps=fps, frames=frames,
                         duration=duration, has_audio=bool(container.streams.audio))
        if frames <= 0 or fps <= 0:
            raise VideoError("video stream declares no frames")
        try:
            if next(container.decode(stream), None) is None:
                raise VideoError("no frame decodes")
            if check_tail and frames > 1:
                container.seek(max(0, int((duration - 1.0) / stream.time_base)), stream=stream, backward=True)
                last_index = max((frame_index_of_pts(p.pts, stream) for p in container.demux(stream)
                                  if p.pts is not None and p.size), default=-1)
                if last_index != frames - 1:
                    raise VideoError(f"truncated: header declares {frames} frames, the data ends at frame {last_index}")
        except av.error.FFmpegError as e:
            raise VideoError(f"decode failed: {e}") from e
        return info


@_video_errors
def decode(source: str | IO[bytes], size: tuple[int, int] | None = None,
           indices: set[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(frame_index, rgb uint8 [H, W, 3])`` in order, optionally resized to (W, H)."""
    with _open(source) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        last = max(indices) if indices else None
        for frame in container.decode(stream):
            i = frame_index(frame, stream)
            if indices is not None and i not in indices:
                if last is not None and i > last:
                    break
                continue
            yield i, _rgb(frame, size)


def _rgb(frame: av.VideoFrame, size: tuple[int, int] | None = None) -> np.ndarray:
    """A decoded frame as rgb uint8 [H, W, 3], optionally resized to (W, H) first."""
    if size:
        frame = frame.reformat(width=size[0], height=size[1])
    return frame.to_ndarray(format="rgb24")


@_video_errors
def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An rgb uint8 [H, W, 3] image resized to (W, H)."""
    return _rgb(av.VideoFrame.from_ndarray(image, format="rgb24"), size)


class VideoWriter:
    """H.264 yuv420p mp4 writer at a constant frame rate, with an optional AAC track.

    Packets are muxed at close, in timestamp order: the file's bytes then depend only on the
    encoded streams, not on when the encoders happened to return packets.
    """

    @_video_errors
    def __init__(self, target: str | IO[bytes], width: int, height: int, fps: int = 30,
                 crf: int = 24, gop: int = 250, preset: str = "veryfast",
                 audio: np.ndarray | None = None, audio_rate: int = 48000):
        self.container = av.open(target, "w", format="mp4")
        self.fps = fps
        self.stream = self.container.add_stream("libx264", rate=fps)
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p"
        self.stream.codec_context.gop_size = gop
        self.stream.options = {"crf": str(crf), "preset": preset}
        self.frames = 0
        self.packets: list[av.Packet] = []
        self.audio = None
        if audio is not None:
            self.audio = np.ascontiguousarray(audio, dtype=np.float32)  # [channels, samples]
            self.audio_rate = audio_rate
            self.audio_stream = self.container.add_stream("aac", rate=audio_rate)
            self.audio_stream.layout = "mono" if self.audio.shape[0] == 1 else "stereo"

    @_video_errors
    def write(self, image: np.ndarray | av.VideoFrame) -> None:
        """Append one frame (RGB array or PyAV frame), resized to the stream's size if needed."""
        frame = image if isinstance(image, av.VideoFrame) else av.VideoFrame.from_ndarray(image, format="rgb24")
        if (frame.width, frame.height, frame.format.name) != (self.stream.width, self.stream.height, "yuv420p"):
            frame = frame.reformat(width=self.stream.width, height=self.stream.height, format="yuv420p",
                                   interpolation="AREA")
        frame.pts = self.frames
        frame.time_base = Fraction(1, self.fps)
        self.packets += self.stream.encode(frame)
        self.frames += 1

    def _encode_audio(self) -> None:
        """Whole frames of audio up to the video's end (a partial last frame is dropped)."""
        chunk = self.audio_stream.codec_context.frame_size or 1024
        end = min(self.audio.shape[1], self.frames * self.audio_rate // self.fps)
        for start in range(0, end - chunk + 1, chunk):
            frame = av.AudioFrame.from_ndarray(self.audio[:, start:start + chunk].copy(), format="fltp",
                                               layout=self.audio_stream.layout.name)
            frame.sample_rate = self.audio_rate
            frame.pts = start
            frame.time_base = Fraction(1, self.audio_rate)
            self.packets += self.audio_stream.encode(frame)
        self.packets += self.audio_stream.encode(None)

    @_video_errors
    def close(self) -> None:
        self.packets += self.stream.encode(None)
        if self.audio is not None:
            self._encode_audio()
        for packet in sorted(self.packets, key=lambda p: (float(p.dts * p.time_base), p.stream.index)):
            self.container.mux(packet)
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------- clips for shards

@dataclasses.dataclass(frozen=True)
class Clip:
    """One view's media for a window, and which source frame each of its frames is."""
    data: bytes | list[bytes]     # an mp4, or one JPEG per frame
    # Entry k is the source frame shown by the clip's frame k (its timestamp-derived index,
    # as ``frame_index`` computes it, or the k-th JPEG).
    source_frames: list[int]
    width: int
    height: int


def _copy_packets(source, start_frame: int, end_frame: int):
    """Packets of the source's video stream from the keyframe at or before ``start_frame`` through
    every packet that frames before ``end_frame`` need (they precede, in decode order, the
    first packet whose dts reaches ``end_frame``)."""
    container = _open(source)
    try:
        stream = container.streams.video[0]
        _seek_frame(container, stream, start_frame)
        packets = []
        for packet in container.demux(stream):
            if packet.dts is None:
                continue
            if not packets and not packet.is_keyframe:
                continue
            if frame_index_of_pts(packet.dts, stream) >= end_frame:
                break
            packets.append(packet)
        if not packets or frame_index_of_pts(packets[0].pts, stream) > start_frame:
            raise VideoError(f"no keyframe at or before frame {start_frame}")
    except BaseException:
        container.close()
        raise
    # Frames past the window that no kept frame follows (so none references them) are dropped.
    while frame_index_of_pts(packets[-1].pts, stream) >= end_frame:
        packets.pop()
    return container, stream, packets


@_video_errors
def remux(source, start_frame: int, end_frame: int) -> Clip:
    """Copy the packets covering [start_frame, end_frame) into a new mp4, without re-encoding.

    The clip starts at the keyframe at or before ``start_frame`` (so it may hold earlier
    frames) and may end with reference frames past ``end_frame``; ``source_frames`` says
    exactly which source frame each clip frame is, so readers trim.
    """
    container, stream, packets = _copy_packets(source, start_frame, end_frame)
    with container:
        first = frame_index_of_pts(packets[0].pts, stream)
        shift = packets[0].pts
        out_buf = io.BytesIO()
        with av.open(out_buf, "w", format="mp4") as out:
            out_stream = out.add_stream_from_template(stream)
            for packet in packets:
                packet.pts -= shift
                packet.dts -= shift
                packet.stream = out_stream
                out.mux(packet)
        last = max(frame_index_of_pts(p.pts + shift, stream) for p in packets)
        width, height = stream.codec_context.width, stream.codec_context.height
    # Timestamps were shifted by the first keyframe's: clip frame k is source frame first + k.
    return Clip(out_buf.getvalue(), list(range(first, last + 1)), width, height)


def _window_frames(source, start_frame: int, end_frame: int, fps: float | None):
    """Decode [start_frame, end_frame), keeping the source frames a reader at ``fps`` shows."""
    with _open(source) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        wanted_set = set(frames_at_rate(start_frame, end_frame, float(_rate(stream)), fps))
        _seek_frame(container, stream, start_frame)
        for frame in container.decode(stream):
            i = frame_index(frame, stream)
            if i >= end_frame:
                break
            if i in wanted_set:
                yield i, frame


@_video_errors
def transcode(source, start_frame: int, end_frame: int, short_side: int | None = None,
              fps: float | None = None, gop: int = 30, crf: int = 23, preset: str = "veryfast") -> Clip:
    """Re-encode exactly [start_frame, end_frame): a keyframe on the window's first frame."""
    buf = io.BytesIO()
    frames, writer = [], None
    for i, frame in _window_frames(source, start_frame, end_frame, fps):
        if writer is None:
            width, height = short_side_size(frame.width, frame.height, short_side)
            out_fps = int(round(fps)) if fps else 30
            writer = VideoWriter(buf, width, height, fps=out_fps, crf=crf, gop=gop, preset=preset)
        writer.write(frame)
        frames.append(i)
    if writer is None:
        raise VideoError(f"no frame decodes in [{start_frame}, {end_frame})")
    writer.close()
    return Clip(buf.getvalue(), frames, width, height)


@_video_errors
def jpeg_frames(source, start_frame: int, end_frame: int, short_side: int | None = None,
                fps: float | None = None, quality: int = 3) -> Clip:
    """One JPEG per kept frame of [start_frame, end_frame), at ``fps`` and ``short_side``."""
    images, frames, ctx = [], [], None
    for i, frame in _window_frames(source, start_frame, end_frame, fps):
        if ctx is None:
            width, height = short_side_size(frame.width, frame.height, short_side)
            ctx = av.CodecContext.create("mjpeg", "w")
            ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuvj420p"
            ctx.time_base = Fraction(1, 30)
            ctx.qmin = ctx.qmax = quality
        small = frame.reformat(width=width, height=height, format="yuvj420p", interpolation="AREA")
        images.append(b"".join(bytes(p) for p in ctx.encode(small)))
        frames.append(i)
    if ctx is None:
        raise VideoError(f"no frame decodes in [{start_frame}, {end_frame})")
    return Clip(images, frames, width, height)


@_video_errors
def decode_jpeg(data: bytes, size: tuple[int, int] | None = None) -> np.ndarray:
    """One JPEG as rgb uint8 [H, W, 3], optionally resized to (W, H) (from the rgb image)."""
    ctx = av.CodecContext.create("mjpeg", "r")
    image = ctx.decode(av.Packet(data))[0].to_ndarray(format="rgb24")
    return resize(image, size) if size else image


@_video_errors
def decode_at(data: bytes, wanted: list[int], size: tuple[int, int] | None = None) -> dict[int, np.ndarray]:
    """Decode the frames of an in-memory video at the given indices (its own 0-based indices).

    Seeks to a later keyframe whenever one lies between the current position and the next
    wanted frame, so a few frames from a long clip cost a few GOPs, not the whole clip.
    """
    targets = sorted(set(wanted))
    out: dict[int, np.ndarray] = {}
    with _open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        keyframes = sorted(frame_index_of_pts(p.pts, stream) for p in container.demux(stream)
                           if p.is_keyframe and p.pts is not None)
        position, frames = None, None
        for target in targets:
            later_key = max((k for k in keyframes if k <= target), default=0)
            if position is None or later_key > position or target < position:
                _seek_frame(container, stream, later_key)
                frames = container.decode(stream)
            for frame in frames:
                position = frame_index(frame, stream) + 1
                if position - 1 == target:
                    out[target] = _rgb(frame, size)
                    break
            if target not in out:
                raise VideoError(f"frame {target} not in clip")
    return out


@_video_errors
def decode_audio(source, start: float, end: float) -> tuple[np.ndarray, int]:
    """Audio samples in [start, end) seconds as float32 [channels, samples], and the rate.

    Returns an empty [0, 0] array when the file has no audio track."""
    with _open(source) as container:
        if not container.streams.audio:
            return np.zeros((0, 0), np.float32), 0
        stream = container.streams.audio[0]
        rate = stream.rate
        first, last = int(round(start * rate)), int(round(end * rate))
        container.seek(max(0, int(start / stream.time_base) - rate // 10), stream=stream, backward=True)
        chunks = []
        for frame in container.decode(stream):
            at = int(round(float(frame.pts * stream.time_base) * rate)) if frame.pts is not None else None
            if at is None or at >= last:
                if at is not None:
                    break
                continue
            data = frame.to_ndarray()
            if frame.format.name not in ("fltp", "flt"):
                data = frame.reformat(format="fltp").to_ndarray()
            if not frame.format.is_planar:
                data = data.reshape(-1, stream.channels).T
            lo, hi = max(first - at, 0), min(last - at, data.shape[1])
            if hi > lo:
                chunks.append(data[:, lo:hi])
        out = np.concatenate(chunks, axis=1) if chunks else np.zeros((stream.channels, 0), np.float32)
        return out.astype(np.float32), rate
