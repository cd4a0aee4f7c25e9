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
import struct
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import IO

import av
import numpy as np

from engine import storage
from engine.errors import ContentError


class VideoError(ContentError):
    """A video could not be opened, decoded or encoded; the message says why."""


def _video_errors(fn):
    """PyAV's errors raised in ``fn`` (a function or a generator function) leave as VideoError,
    and a passing storage fault under the video's reads as a StorageFault naming the file."""
    def source(args: tuple) -> str:
        found = next((a for a in args if isinstance(a, str) or hasattr(a, "read")), None)
        return storage.url_of(found) if found is not None else "a video stream"

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                with storage.faults_named(source(args)):
                    yield from fn(*args, **kwargs)
            except av.error.FFmpegError as e:
                raise VideoError(str(e)) from e
        return generator

    @functools.wraps(fn)
    def function(*args, **kwargs):
        try:
            with storage.faults_named(source(args)):
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


def frame_indexer(stream):
    """A function from a timestamp of ``stream`` to the index of its frame on the video's own
    timeline (0 = first frame). Float arithmetic, exact to far less than a frame; Fractions cost
    microseconds per call, and a pass over a video calls it for every packet."""
    start, scale = stream.start_time or 0, float(stream.time_base * _rate(stream))
    return lambda pts: round((pts - start) * scale)


def frame_index_of_pts(pts: int, stream) -> int:
    """Index of the frame with timestamp ``pts`` on the video's own timeline (0 = first frame)."""
    return frame_indexer(stream)(pts)


def frame_index(frame: av.VideoFrame, stream) -> int:
    """Index of a decoded frame on the video's own timeline (0 = first frame)."""
    return frame_index_of_pts(frame.pts, stream)


def _decode_frames(container, stream, wanted: Callable[[int], bool] | None = None) -> Iterator[av.VideoFrame]:
    """The frames of ``stream`` from the container's position, in order. A frame the caller does
    not want (``wanted(index)`` false) or the demuxer marks to discard (a clip's pre-roll) is
    not decoded at all when no other frame refers to it (the decoder's skip_frame NONREF, set
    per packet): on video with B-frames that spares a large share of the frames a window or a
    sparse pick does not show."""
    ctx, index = stream.codec_context, frame_indexer(stream)
    for packet in container.demux(stream):
        if packet.pts is not None:
            unwanted = packet.is_discard or (wanted is not None and not wanted(index(packet.pts)))
            ctx.skip_frame = "NONREF" if unwanted else "DEFAULT"
        yield from packet.decode()


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
        for frame in _decode_frames(container, stream, indices.__contains__ if indices is not None else None):
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
    """H.264 yuv420p mp4 writer at a constant frame rate, with an optional AAC track; the same
    frames give the same bytes.

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
        # mbtree off: with x264's macroblock-tree rate control the bytes vary with what the process
        # encoded before (an encode repeated in one process differs); without it they depend on
        # the frames alone, so a release or a transcoded shard is reproducible.
        self.stream.options = {"crf": str(crf), "preset": preset, "mbtree": "0"}
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


@dataclasses.dataclass
class _Packet:
    """A demuxed packet's bytes and timing, kept apart from PyAV's packet so that one packet can
    go into several clips (the GOP before a window is also the tail of the previous one)."""
    data: bytes
    pts: int
    dts: int
    duration: int
    keyframe: bool

    def to_av(self, shift: int, time_base: Fraction, stream) -> av.Packet:
        packet = av.Packet(self.data)
        packet.pts, packet.dts, packet.duration = self.pts - shift, self.dts - shift, self.duration
        packet.time_base, packet.is_keyframe, packet.stream = time_base, self.keyframe, stream
        return packet


@dataclasses.dataclass(frozen=True)
class AudioClip:
    """A window of a view's audio track, its compressed packets copied into an mp4 of its own.
    It decodes (``decode_audio``) to the window's samples from time 0."""
    data: bytes
    codec: str
    rate: int
    channels: int


# MP4 boxes that hold other boxes, on the way from the file to a track's edit list.
_CONTAINER_BOXES = {b"moov", b"trak", b"edts"}


def _boxes(data: bytearray, start: int, end: int):
    """(type, offset, size) of the boxes in data[start:end], and of those inside moov/trak/edts."""
    while start + 8 <= end:
        size, kind = struct.unpack(">I4s", data[start:start + 8])
        if size == 1:
            size = struct.unpack(">Q", data[start + 8:start + 16])[0]
        elif size == 0:
            size = end - start
        yield kind, start, size
        if kind in _CONTAINER_BOXES:
            yield from _boxes(data, start + 8, start + size)
        start += size


def _set_duration(data: bytearray, duration: Fraction) -> None:
    """Make every track of an mp4 end at ``duration`` seconds: the one edit of each track's edit
    list, its tkhd and the mvhd say so. FFmpeg's mp4 demuxer then marks the packets shown
    before the edit's start or from its end on as discarded; the decoder still decodes them (the
    kept frames reference them) but returns only the frames of the edit."""
    boxes = list(_boxes(data, 0, len(data)))
    movie = [at for kind, at, _ in boxes if kind == b"mvhd"]
    if not movie or sum(kind == b"trak" for kind, *_ in boxes) != sum(kind == b"elst" for kind, *_ in boxes):
        raise VideoError("clip lacks a movie header or a track's edit list")
    version = data[movie[0] + 8]
    timescale = struct.unpack_from(">I", data, movie[0] + (20 if version == 0 else 28))[0]
    # Floor: the edit ends at or before the window's end, and after its last frame's start.
    ticks = int(duration * timescale)
    for kind, at, _ in boxes:
        version = data[at + 8]
        size = ">I" if version == 0 else ">Q"
        if kind == b"mvhd":
            struct.pack_into(size, data, at + (24 if version == 0 else 32), ticks)
        elif kind == b"tkhd":
            struct.pack_into(size, data, at + (28 if version == 0 else 36), ticks)
        elif kind == b"elst":
            # Entries: duration, media time (-1 for an empty edit, i.e. a delay), rate.
            entry, media_time = (12, ">i") if version == 0 else (20, ">q")
            entries = [at + 16 + i * entry for i in range(struct.unpack_from(">I", data, at + 12)[0])]
            edits = [e for e in entries if struct.unpack_from(media_time, data, e + struct.calcsize(size))[0] != -1]
            if len(edits) != 1:
                raise VideoError(f"clip has {len(edits)} edits in a track, expected one")
            struct.pack_into(size, data, edits[0], ticks)


def _mux(template, packets: list[_Packet], shift: int, time_base: Fraction, duration: Fraction) -> bytes:
    """An mp4 of ``packets`` (one stream, copied as they are) whose timeline starts at ``shift``
    (earlier packets become a pre-roll the edit list skips) and lasts ``duration`` seconds."""
    buf = io.BytesIO()
    # The movie's timescale is the track's own, so the edit's end falls exactly where a frame's
    # time does; an edit list is written even when nothing needs skipping, so one always exists.
    options = {"movie_timescale": str(time_base.denominator), "use_editlist": "1"}
    with av.open(buf, "w", format="mp4", options=options) as out:
        stream = out.add_stream_from_template(template)
        for packet in packets:
            out.mux(packet.to_av(shift, time_base, stream))
    data = bytearray(buf.getvalue())
    _set_duration(data, duration)
    return bytes(data)


@_video_errors
def cut_windows(source, windows: list[tuple[int, int]], audio: bool = False) -> Iterator[tuple[Clip, AudioClip | None]]:
    """Remux: copy the packets of each window [start_frame, end_frame) into a clip of its own,
    without re-encoding, in one forward pass over the source (windows in order of start).

    A clip holds the packets from the keyframe at or before the window's first frame through
    the last packet a window frame needs; its edit list makes FFmpeg's demuxer (and so the
    readers built on it) decode exactly the window's frames, clip frame k (time k/fps) being
    source frame start_frame + k.
    With ``audio``, the window's audio packets (and one before, which the decoder needs to
    start) go into an AudioClip; None when the source has no audio track.
    """
    with _open(source) as container:
        video_stream = container.streams.video[0]
        audio_stream = container.streams.audio[0] if audio and container.streams.audio else None
        fps = _rate(video_stream)
        video_tb = video_stream.time_base
        frame = frame_indexer(video_stream)
        audio_tb = float(audio_stream.time_base) if audio_stream is not None else 0.0

        pending = list(windows)
        gop: list[_Packet] = []        # video packets from the latest keyframe the next window may start at
        sound: list[_Packet] = []      # audio packets from shortly before the next window
        video_done, audio_done = False, audio_stream is None

        def ready(end_frame: int) -> bool:
            return ((video_done or bool(gop) and frame(gop[-1].dts) >= end_frame)
                    and (audio_done or bool(sound) and sound[-1].pts * audio_tb >= end_frame / fps))

        def emit(start_frame: int, end_frame: int):
            keys = [i for i, p in enumerate(gop) if p.keyframe and frame(p.pts) <= start_frame]
            if not keys:
                raise VideoError(f"no keyframe at or before frame {start_frame}")
            packets = [p for p in gop[keys[-1]:] if frame(p.dts) < end_frame]
            # Packets after the last one showing a window frame are referenced by none of them.
            while frame(packets[-1].pts) >= end_frame:
                packets.pop()
            duration = Fraction(end_frame - start_frame) / fps
            start_pts = int((video_stream.start_time or 0) + start_frame / fps / video_tb)
            clip = Clip(_mux(video_stream, packets, start_pts, video_tb, duration),
                        list(range(start_frame, end_frame)), video_stream.codec_context.width,
                        video_stream.codec_context.height)
            sound_clip = None
            if audio_stream is not None:
                t0, t1 = float(start_frame / fps), float(end_frame / fps)
                kept = [i for i, p in enumerate(sound) if (p.pts + p.duration) * audio_tb > t0 and p.pts * audio_tb < t1]
                if kept:
                    chunk = sound[max(0, kept[0] - 1):kept[-1] + 1]
                    shift = int(Fraction(start_frame) / fps / audio_stream.time_base)
                    sound_clip = AudioClip(_mux(audio_stream, chunk, shift, audio_stream.time_base, duration),
                                           audio_stream.codec_context.name, audio_stream.rate, audio_stream.channels)
            return clip, sound_clip

        def prune(start_frame: int) -> None:
            keys = [i for i, p in enumerate(gop) if p.keyframe and frame(p.pts) <= start_frame]
            if keys:
                del gop[:keys[-1]]
            if audio_stream is not None:
                t0 = float(start_frame / fps)
                keep = [i for i, p in enumerate(sound) if (p.pts + p.duration) * audio_tb > t0]
                del sound[:max(0, (keep[0] if keep else len(sound)) - 1)]

        streams = [video_stream] + ([audio_stream] if audio_stream is not None else [])
        for packet in container.demux(*streams):
            if packet.dts is None or not packet.size:   # the demuxer's end-of-stream marker
                continue
            copied = _Packet(bytes(packet), packet.pts, packet.dts, packet.duration or 0, packet.is_keyframe)
            (gop if packet.stream is video_stream else sound).append(copied)
            while pending and ready(pending[0][1]):
                yield emit(*pending.pop(0))
                if pending:
                    prune(pending[0][0])
        video_done = audio_done = True
        while pending:
            yield emit(*pending.pop(0))
            if pending:
                prune(pending[0][0])


def _window_frames(source, start_frame: int, end_frame: int, fps: float | None):
    """Decode [start_frame, end_frame), keeping the source frames a reader at ``fps`` shows."""
    with _open(source) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        wanted_set = set(frames_at_rate(start_frame, end_frame, float(_rate(stream)), fps))
        _seek_frame(container, stream, start_frame)
        for frame in _decode_frames(container, stream, wanted_set.__contains__):
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
    wanted = set(wanted)
    targets = sorted(wanted)
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
                frames = _decode_frames(container, stream, wanted.__contains__)
            for frame in frames:
                position = frame_index(frame, stream) + 1
                if position - 1 == target:
                    out[target] = _rgb(frame, size)
                    break
            if target not in out:
                raise VideoError(f"frame {target} not in clip")
    return out


DECODER_THREADS = 2


class ClipChain:
    """Decodes the remux clips of one view (``cut_windows``), given in window order, as one
    stream. A clip repeats the packets from the keyframe before its window, which the clip
    before already holds: they are fed to the decoder once, not once per clip. Where two
    clips share no packet, the decoder is drained and a fresh one starts at the clip's keyframe.

    ``feed`` yields (source frame, rgb uint8 [H, W, 3]) of the wanted frames, in order, each
    once, none from before the window of the clip a decoder started at (that clip's pre-roll:
    in an open GOP its leading frames lack their references); the last frames of a clip may
    come out only with the next clip's packets (decoder delay), and the rest at ``flush``."""

    def __init__(self, wanted: Callable[[int], bool], size: tuple[int, int] | None = None):
        self.wanted = wanted            # frames nothing refers to and not wanted are not decoded
        self.size = size                # (W, H) to resize to
        self.codec = None
        self.stream_key: tuple | None = None    # codec, extradata, time base, frame rate of the clips
        self.origin = 0                 # source frame of tick 0 for the decoder's timestamps
        self.last_dts: int | None = None   # of the last packet fed, in those ticks
        self.floor = 0                  # the first frame the current decoder may give
        self.emitted = -1               # the last frame given
        self.fed = 0                    # packets given to a decoder, all clips together

    def _index(self, pts: int) -> int:
        *_, time_base, fps = self.stream_key
        return self.origin + round(pts * time_base * fps)

    def _images(self, frames) -> Iterator[tuple[int, np.ndarray]]:
        for frame in frames:
            index = self._index(frame.pts)
            if index >= self.floor and index > self.emitted and self.wanted(index):
                self.emitted = index
                yield index, _rgb(frame, self.size)

    @_video_errors
    def feed(self, data: bytes, start_frame: int) -> Iterator[tuple[int, np.ndarray]]:
        """The frames that the clip ``data`` of the window starting at source frame
        ``start_frame`` adds to the stream."""
        with _open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            ctx = stream.codec_context
            key = (ctx.name, ctx.extradata, stream.time_base, _rate(stream))
            # The clip's time 0 is the window's first frame: a clip's ticks plus this shift are
            # the take's. Off the tick grid (no whole number of ticks per frame) a clip is
            # decoded on its own, on its own ticks.
            shift = Fraction(start_frame) / key[3] / key[2]
            on_grid = shift.denominator == 1
            packets = [p for p in container.demux(stream) if p.size and p.dts is not None and p.pts is not None]
            if not packets:
                raise VideoError("clip holds no video packet")
            # An off-grid clip's decoder is drained at its end, so only an on-grid one continues.
            if not (on_grid and self.codec is not None and key == self.stream_key
                    and packets[0].dts + int(shift) <= self.last_dts):
                yield from self.flush()
                self.codec = av.CodecContext.create(ctx.name, "r")
                self.codec.extradata = ctx.extradata
                # Frame threads, but few: a take keeps a decoder open per view, and a decode
                # task holds one CPU.
                self.codec.thread_type, self.codec.thread_count = "AUTO", DECODER_THREADS
                self.stream_key, self.origin, self.last_dts = key, 0 if on_grid else start_frame, None
                self.floor = start_frame
            offset = int(shift) if on_grid else 0
            for p in packets:
                pts, dts = p.pts + offset, p.dts + offset
                if self.last_dts is not None and dts <= self.last_dts:
                    continue          # fed with an earlier clip
                self.last_dts, self.fed = dts, self.fed + 1
                # A packet of our own, without the demuxer's discard flag: a frame past this
                # window's end is the next window's first, and its packet is not fed again.
                packet = av.Packet(bytes(p))
                packet.pts, packet.dts, packet.time_base, packet.is_keyframe = pts, dts, key[2], p.is_keyframe
                self.codec.skip_frame = "DEFAULT" if self.wanted(self._index(pts)) else "NONREF"
                yield from self._images(self.codec.decode(packet))
            if not on_grid:
                yield from self.flush()

    @_video_errors
    def flush(self) -> Iterator[tuple[int, np.ndarray]]:
        """The wanted frames the decoder still holds; the next clip starts a fresh decoder."""
        if self.codec is not None:
            codec, self.codec = self.codec, None
            yield from self._images(codec.decode(None))


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
            if data.dtype.kind == "i":      # integer PCM (a wav file): scale to [-1, 1)
                data = data.astype(np.float32) / (np.iinfo(data.dtype).max + 1.0)
            if not frame.format.is_planar:
                data = data.reshape(-1, stream.channels).T
            lo, hi = max(first - at, 0), min(last - at, data.shape[1])
            if hi > lo:
                chunks.append(data[:, lo:hi])
        out = np.concatenate(chunks, axis=1) if chunks else np.zeros((stream.channels, 0), np.float32)
        return out.astype(np.float32), rate
