"""Safe reading of safetensors files: header-only validation and tensor loads that never unpickle.

The header is parsed here (8-byte little-endian length, then JSON) rather than through the
safetensors library so that validation costs one small read per file and every defect (truncated
data, offsets out of range, a pickle in disguise) becomes a FormatError naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct

import numpy as np
from safetensors import safe_open

from jaxlora.config import is_int
from jaxlora.errors import FormatError

# Extensions of formats that can only be read by unpickling (torch.save, pickle, joblib).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
ITEMSIZES = {
    **FLOAT_DTYPES,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}

# A header larger than this is certainly corrupt (real ones are a few MB for 100k tensors).
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype code, e.g. "F32", "BF16"
    shape: tuple[int, ...]


def refuse_pickle(path: str, what: str) -> None:
    """Raises FormatError for a file that only unpickling could read; never opens it."""
    raise FormatError(
        f"{path}: {what} is a pickle-based file ({os.path.basename(path)}); "
        "jaxlora never unpickles (it can execute code). Expected a .safetensors "
        "file; convert it with safetensors.torch.save_file"
    )


def find_pickle_beside(directory: str, stems: tuple[str, ...]) -> str | None:
    """The first pickle-format file in directory whose name starts with one of stems."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return None
    for name in names:
        if name.endswith(PICKLE_SUFFIXES) and name.startswith(stems):
            return os.path.join(directory, name)
    return None


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validates a safetensors file from its header alone; returns (tensors, metadata).

    Checks that the header is well-formed JSON, that each tensor's byte range matches its dtype
    and shape, and that every range lies inside the file (so a truncated download is caught here,
    not by a crash when the data is read).
    """
    if path.endswith(PICKLE_SUFFIXES):
        refuse_pickle(path, "the weights file")
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(9)
            # A safetensors header is a JSON object: the byte after the 8-byte length is "{".
            if len(prefix) < 9 or prefix[8:9] != b"{":
                if prefix.startswith((b"PK\x03\x04", b"\x80")):  # torch.save zip / raw pickle
                    refuse_pickle(path, "this file")
                raise FormatError(
                    f"{path}: not a safetensors file (expected an 8-byte header "
                    "length followed by a JSON header)"
                )
            (header_len,) = struct.unpack("<Q", prefix[:8])
            if header_len > min(MAX_HEADER_BYTES, file_size - 8):
                raise FormatError(
                    f"{path}: not a valid safetensors file (header length "
                    f"{header_len} does not fit in a file of {file_size} bytes)"
                )
            f.seek(8)
            raw = f.read(header_len)
    except FileNotFoundError as e:
        raise FormatError(f"{path}: file not found") from e
    except OSError as e:
        raise FormatError(f"{path}: cannot be read ({e})") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: not a valid safetensors file (header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise FormatError(f"{path}: not a valid safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_size = file_size - 8 - header_len
    tensors = {}
    for name, entry in header.items():
        fields = _entry_fields(entry)
        if fields is None:
            raise FormatError(
                f"{path}: tensor {name!r} has a malformed header entry {_clip(entry)} (expected "
                "dtype: a string, shape: a list of ints >= 0, data_offsets: [begin, end] ints)"
            )
        dtype, shape, (begin, end) = fields
        if dtype not in ITEMSIZES:
            raise FormatError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        expected_bytes = math.prod(shape) * ITEMSIZES[dtype]
        if begin > end or end - begin != expected_bytes:
            raise FormatError(
                f"{path}: tensor {name!r} has data_offsets [{begin}, {end}] that do "
                f"not match dtype {dtype} and shape {list(shape)} "
                f"({expected_bytes} bytes)"
            )
        if end > data_size:
            raise FormatError(
                f"{path}: truncated or corrupt: tensor {name!r} ends at byte {end} "
                f"of the data section, which holds only {data_size} bytes"
            )
        tensors[name] = TensorInfo(dtype=dtype, shape=shape)
    return tensors, metadata


def _clip(value, limit: int = 200) -> str:
    """repr(value), cut to limit characters (a corrupt header's entry may be megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def _entry_fields(entry) -> tuple[str, tuple[int, ...], tuple[int, int]] | None:
    """(dtype, shape, (begin, end)) of a header entry, or None where any has the wrong type.

    Checked strictly, not coerced: int() would read the shape "64" as [6, 4] and [64.7] as [64],
    and a negative dimension pair would pass the byte count ([-2, -2] holds 4 values)."""
    if not isinstance(entry, dict):
        return None
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not (
        isinstance(dtype, str)
        and isinstance(shape, list)
        and all((is_int(d) and d >= 0) for d in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all((is_int(o) and o >= 0) for o in offsets)
    ):
        return None
    return dtype, tuple(shape), (offsets[0], offsets[1])


# Elements per check in all_finite: a chunk's temporaries (a few MB) stay in the CPU's cache
# (chunks of 16M elements ran 3-4x slower, their temporaries going through memory).
_FINITE_CHUNK = 1 << 20

# The exponent bits of the 16-bit floats: a value is NaN or infinite exactly when they are all
# set. np.isfinite converts each such element to a wider float first (float16 ~1.4 GB/s,
# ml_dtypes' bfloat16 ~3.6 GB/s on one core); testing the bits reads them at ~15 GB/s.
# float32 and float64 keep np.isfinite, faster still (~20 GB/s; their bits' test ran at ~16).
_EXPONENT_MASKS = {"float16": 0x7C00, "bfloat16": 0x7F80}


def all_finite(array: np.ndarray) -> bool:
    """Whether every element of a floating-point array is finite (no NaN, no inf)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    chunks = range(0, flat.size, _FINITE_CHUNK)
    mask = _EXPONENT_MASKS.get(flat.dtype.name)
    if mask is None:
        return all(np.isfinite(flat[i : i + _FINITE_CHUNK]).all() for i in chunks)
    bits, mask = flat.view(np.uint16), np.uint16(mask)
    return not any(np.any((bits[i : i + _FINITE_CHUNK] & mask) == mask) for i in chunks)


def check_finite(path: str, tensor: str, stored: np.ndarray, served: np.ndarray) -> None:
    """FormatError unless ``served`` (tensor ``stored`` as read from path, cast to the dtype it is
    served in) is finite everywhere. Two causes, told apart: NaN or inf in the file itself, or a
    finite value beyond the served dtype's range (an F64 weight past float32's 3.4e38), which the
    cast made infinite."""
    if all_finite(served):
        return
    bad = int(np.count_nonzero(~np.isfinite(stored)))
    if bad:
        raise FormatError(
            f"{path}: tensor {tensor!r} holds {bad} NaN or infinite values; expected finite weights"
        )
    largest = float(np.max(np.abs(stored.astype(np.float64))))
    raise FormatError(
        f"{path}: tensor {tensor!r} holds values up to {largest:.3g} in magnitude, which become "
        f"infinite as {served.dtype}, the dtype it is served in; expected weights within "
        f"{served.dtype}'s range"
    )


def read_tensors(path: str, names: list[str]) -> dict[str, np.ndarray]:
    """Reads the named tensors (already validated by read_header) as numpy arrays."""
    try:
        with safe_open(path, framework="numpy") as f:
            return {name: f.get_tensor(name) for name in names}
    except FormatError:
        raise
    except Exception as e:  # the safetensors library raises its own (Rust-side) error types
        raise FormatError(f"{path}: cannot read tensors ({type(e).__name__}: {e})") from e
