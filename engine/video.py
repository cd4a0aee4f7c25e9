"""Every PyAV encode, decode and probe of the engine goes through here."""
from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import IO, Iterator

import av
import numpy as np


class VideoError(Exception):
    """A video could not be opened or decoded; the message says why."""


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


def probe(source: str | IO[bytes], check_tail: bool = True) -> VideoInfo:
    """Read a video's header and, cheaply, prove its first and last frames decode.

    The tail check seeks to the last second and decodes to the end, so a file cut short
    after a complete header is caught without decoding the whole take.
    """
    with _open(source) as container:
        if not container.streams.video:
            raise VideoError("no video stream")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        duration = float(stream.duration * stream.time_base) if stream.duration else (
            container.duration / av.time_base if container.duration else 0.0)
        frames = stream.frames or int(round(duration * fps))
        info = VideoInfo(codec=ctx.name, width=ctx.width, height=ctx.height, fps=fps, frames=frames,
                         duration=duration, has_audio=bool(container.streams.audio))
        if frames <= 0 or fps <= 0:
            raise VideoError("video stream declares no frames")
        try:
            first = next(container.decode(stream), None)
            if first is None:
                raise VideoError("no frame decodes")
            if check_tail and frames > 1:
                last_index = -1
                container.seek(max(0, int((duration - 1.0) / stream.time_base)), stream=stream, backward=True)
                for frame in container.decode(stream):
                    last_index = frame_index(frame, stream)
                if last_index != frames - 1:
                    raise VideoError(f"truncated: header declares {frames} frames, last decodable is {last_index}")
        except av.error.FFmpegError as e:
            raise VideoError(f"decode failed: {e}") from e
        return info


def frame_index(frame: av.VideoFrame, stream) -> int:
    """Index of a decoded frame on the video's own timeline (0 = first frame)."""
    start = stream.start_time or 0
    fps = stream.average_rate or stream.guessed_rate
    return int(round(float((frame.pts - start) * stream.time_base * fps)))


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
            if size:
                frame = frame.reformat(width=size[0], height=size[1])
            yield i, frame.to_ndarray(format="rgb24")


class VideoWriter:
    """H.264 yuv420p mp4 writer at a constant frame rate, with an optional AAC track.

    Audio given up front is muxed alongside the frames, one video frame's worth at a time,
    so the file interleaves like a camera recording.
    """

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
        self.audio = None
        if audio is not None:
            self.audio = np.ascontiguousarray(audio, dtype=np.float32)  # [channels, samples]
            self.audio_rate = audio_rate
            self.audio_stream = self.container.add_stream("aac", rate=audio_rate)
            self.audio_stream.layout = "mono" if self.audio.shape[0] == 1 else "stereo"
            self.audio_sent = 0

    def write(self, image: np.ndarray | av.VideoFrame) -> None:
        """Append one frame (RGB array or PyAV frame), resized to the stream's size if needed."""
        frame = image if isinstance(image, av.VideoFrame) else av.VideoFrame.from_ndarray(image, format="rgb24")
        if (frame.width, frame.height, frame.format.name) != (self.stream.width, self.stream.height, "yuv420p"):
            frame = frame.reformat(width=self.stream.width, height=self.stream.height, format="yuv420p",
                                   interpolation="AREA")
        frame.pts = self.frames
        frame.time_base = Fraction(1, self.fps)
        self.container.mux(self.stream.encode(frame))
        self.frames += 1
        if self.audio is not None:
            self._send_audio(self.frames * self.audio_rate // self.fps)

    def _send_audio(self, until: int) -> None:
        chunk = self.audio_stream.codec_context.frame_size or 1024
        while self.audio_sent + chunk <= min(until, self.audio.shape[1]):
            block = self.audio[:, self.audio_sent:self.audio_sent + chunk]
            frame = av.AudioFrame.from_ndarray(block, format="fltp", layout=self.audio_stream.layout.name)
            frame.sample_rate = self.audio_rate
            frame.pts = self.audio_sent
            frame.time_base = Fraction(1, self.audio_rate)
            self.container.mux(self.audio_stream.encode(frame))
            self.audio_sent += chunk

    def close(self) -> None:
        self.container.mux(self.stream.encode(None))
        if self.audio is not None:
            self.container.mux(self.audio_stream.encode(None))
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
