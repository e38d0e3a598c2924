"""Example trigger functions, registered as entry points in pyproject.toml."""

from __future__ import annotations

import asyncio
import hashlib
import time
import zlib
from typing import Any

from damops.triggers import Context, PermanentError, Wait


def noop(inputs: Any, context: Context) -> None:
    """Does nothing: for measuring the framework's own overhead."""
    return None


def started_at(inputs: Any, context: Context) -> dict[str, float]:
    """Returns the wall-clock time it started: for measuring enqueue → start latency."""
    return {"started_at": time.time()}


async def sleep(inputs: dict[str, Any], context: Context) -> dict[str, float]:
    """Sleeps ``inputs['seconds']`` (default 1), reporting progress each second."""
    seconds = float(inputs.get("seconds", 1.0))
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(left, 1.0))
        context.progress(fraction=min(1.0, 1 - max(0.0, deadline - time.monotonic()) / seconds))
    return {"slept": seconds}


def render_rendition(inputs: dict[str, Any], context: Context) -> dict[str, Any]:
    """An image-rendition stand-in that takes real CPU time: it synthesises a
    ``width`` x ``height`` greyscale image, box-downscales it by ``scale`` and
    compresses the result, returning its size and digest."""
    width = int(inputs.get("width", 256))
    height = int(inputs.get("height", 256))
    scale = int(inputs.get("scale", 4))
    if width <= 0 or height <= 0 or scale <= 0:
        raise PermanentError(f"width, height and scale must be positive, got {width}x{height}/{scale}")
    seed = int(inputs.get("seed", context.operation_id))
    pixels = bytes(((x * 7 + y * 13 + seed) ^ (x * y)) & 0xFF for y in range(height) for x in range(width))
    out_w, out_h = width // scale, height // scale
    rendition = bytearray(out_w * out_h)
    for oy in range(out_h):
        for ox in range(out_w):
            total = 0
            for dy in range(scale):
                row = (oy * scale + dy) * width + ox * scale
                total += sum(pixels[row : row + scale])
            rendition[oy * out_w + ox] = total // (scale * scale)
        if oy % 16 == 0:
            context.progress(fraction=oy / max(out_h, 1))
    compressed = zlib.compress(bytes(rendition), 6)
    return {
        "width": out_w,
        "height": out_h,
        "bytes": len(compressed),
        "sha256": hashlib.sha256(compressed).hexdigest(),
    }


def fail(inputs: dict[str, Any], context: Context) -> None:
    """Always raises: shows how failures are recorded."""
    raise RuntimeError(str(inputs.get("message", "this operation always fails")))


def flaky(inputs: dict[str, Any], context: Context) -> dict[str, int]:
    """Fails until attempt ``inputs['succeed_on']`` (default 2), then succeeds."""
    succeed_on = int(inputs.get("succeed_on", 2))
    if context.attempt < succeed_on:
        raise ConnectionError(f"transient failure on attempt {context.attempt}")
    return {"attempt": context.attempt}


def wait_until(inputs: dict[str, Any], context: Context) -> Any:
    """Waits (status WAIT) until the wall clock passes ``inputs['not_before']`` (epoch seconds)."""
    not_before = float(inputs["not_before"])
    if time.time() < not_before:
        return Wait(f"not before {not_before}")
    return {"ran_at": time.time()}


def hang(inputs: Any, context: Context) -> None:
    """Never returns and never reports progress: an expired worker in the making."""
    while True:
        time.sleep(3600)


def not_serializable(inputs: Any, context: Context) -> Any:
    """Returns a value JSON cannot hold."""
    return {"when": object()}
