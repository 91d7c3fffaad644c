"""Video input and output with PyAV: one reading session per input, H.264 files and streams.

- :mod:`.inputs`: what an input is (file, URL, ``-``, device), opened with one-line errors.
- :mod:`.records`: :class:`VideoInfo` and :class:`Frame`, what reading gives.
- :mod:`.reader`: :class:`VideoReader` opens an input once and gives its info, its frames and
  their audio packets; :func:`probe` and :func:`read_frames` are one-call shortcuts.
- :mod:`.audio`: the input's audio packets into the output, copied or re-encoded.
- :mod:`.writer`: :class:`VideoWriter` to files, HLS playlists and live streams.
- :mod:`.files`: still images and :func:`atomic_output`.
- :mod:`.reconnect`: a live network input reopened with backoff when it breaks or ends.
- :mod:`.timeline`: a live source's timestamps kept going forward across its restarts.
"""

from .encoders import check_encoder
from .files import (
    IMAGE_CODECS,
    atomic_output,
    check_output_dir,
    check_output_dirs,
    visible_output,
    write_image,
)
from .inputs import STDIN, is_glob, is_live_source, is_url
from .reader import LIVE_READ_TIMEOUT_S, VideoReader, probe, read_frames, rotate_upright
from .reconnect import ReconnectingInput, is_network_input, open_when_up, reconnect_attempts
from .records import Frame, VideoInfo
from .timeline import Timeline
from .writer import HLS_SUFFIX, OUTPUT_FORMATS, VideoWriter, output_kind

__all__ = [
    "HLS_SUFFIX",
    "IMAGE_CODECS",
    "LIVE_READ_TIMEOUT_S",
    "OUTPUT_FORMATS",
    "STDIN",
    "Frame",
    "ReconnectingInput",
    "Timeline",
    "VideoInfo",
    "VideoReader",
    "VideoWriter",
    "atomic_output",
    "check_encoder",
    "check_output_dir",
    "check_output_dirs",
    "is_glob",
    "is_live_source",
    "is_network_input",
    "is_url",
    "open_when_up",
    "output_kind",
    "probe",
    "read_frames",
    "reconnect_attempts",
    "rotate_upright",
    "visible_output",
    "write_image",
]
