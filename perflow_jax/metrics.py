"""Run logs written by process 0: ``metrics.jsonl``, TensorBoard scalars and images, a console progress line.

The workdir gets ``metrics.jsonl`` (one JSON object per logged step, at least ``step`` and ``loss``) and
``tensorboard/`` event files. ``image_grid`` makes the labelled uint8 grids that go both to TensorBoard and to
``samples/*.png``. ``check_finite`` stops a run whose loss went NaN/inf with an error that says where the last
good checkpoint is.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from perflow_jax import storage

METRICS_FILE = "metrics.jsonl"
REMOTE_UPLOAD_SECONDS = 30.0  # how stale a bucket's metrics.jsonl may get (buckets cannot append; see _JsonlLog)


class NonFiniteLossError(ValueError):
  """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


def check_finite(step: int, loss: Any, last_checkpoint_step: int | None, checkpoint_dir: str) -> None:
  """Raises ``NonFiniteLossError`` when ``loss`` (a host scalar or 0-d array) is not finite.

  Call it where the loss has been fetched to the host anyway (each logged step), so it adds no device sync.

  Args:
    step: the step whose loss this is.
    loss: the loss value.
    last_checkpoint_step: newest committed checkpoint step (``manager.latest_step()``), or None.
    checkpoint_dir: where the checkpoints are, for the message.
  """
  value = float(np.asarray(jax.device_get(loss)))  # Explicit: allowed under a 'disallow' transfer guard.
  if math.isfinite(value):
    return
  if last_checkpoint_step is None:
    where = f"No checkpoint was written yet (in {checkpoint_dir}); a rerun starts from scratch."
  else:
    where = (f"The last good checkpoint, step {last_checkpoint_step} in {checkpoint_dir}, is intact: rerun with the "
             "same --workdir to resume from it.")
  raise NonFiniteLossError(f"loss is {value} at step {step}; training stopped before saving this state. {where} "
                           "Lower the learning rate or check the data/teacher outputs before resuming.")


def format_duration(seconds: float) -> str:
  """3725 -> '1h02m05s'; 65 -> '1m05s'; 5.2 -> '5s'."""
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(max(seconds, 0.0)))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m{secs:02d}s"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


def format_progress(step: int, total_steps: int, steps_per_s: float | None, scalars: Mapping[str, float]) -> str:
  """The console line: 'step 120/1000 (12.0%) | 3.21 steps/s | ETA 4m34s | loss 0.1234 | lr 0.0001'."""
  parts = [f"step {step}/{total_steps} ({100.0 * step / max(total_steps, 1):.1f}%)"]
  if steps_per_s:
    parts.append(f"{steps_per_s:.3g} steps/s")
    parts.append(f"ETA {format_duration((total_steps - step) / steps_per_s)}")
  for name, value in scalars.items():
    parts.append(f"{name} {value:.4g}")
  return " | ".join(parts)


def _to_float(name: str, value: Any) -> float:
  array = np.asarray(jax.device_get(value))  # Explicit transfer: the trainer runs under a transfer guard.
  if array.size != 1:
    raise ValueError(f"metric {name!r} has shape {array.shape}; log scalars only (reduce it with .mean()).")
  return float(array.reshape(()))


def _json_number(value: float) -> float | None:
  return value if math.isfinite(value) else None  # JSON has no NaN/inf; null keeps every line valid JSON.


class MetricsWriter:
  """Writes ``metrics.jsonl``, TensorBoard events and the progress line; a no-op on processes other than 0.

  It holds open files and the tensorboardX writer, so it is an object; use it as a context manager or call
  ``close``. On resume pass ``start_step``: logged lines after it are dropped from ``metrics.jsonl`` and TensorBoard
  purges its events after it, so the logs match the resumed run.
  """

  def __init__(self, workdir: str, total_steps: int, start_step: int = 0, enabled: bool | None = None,
               clock: Callable[[], float] = time.monotonic):
    """Opens the logs in ``workdir``.

    Args:
      workdir: the run's directory.
      total_steps: for the progress line's percentage and ETA.
      start_step: the step the run starts from (the restored checkpoint's step, or 0).
      enabled: write anything at all; default: ``jax.process_index() == 0``.
      clock: seconds, monotonic (tests pass a fake one).
    """
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.total_steps = total_steps
    self._clock = clock
    self._last = (start_step, clock())
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    workdir = storage.absolute(workdir)
    storage.makedirs(workdir)
    self._jsonl = _JsonlLog(storage.join(workdir, METRICS_FILE), start_step)
    # Imported here so that processes other than 0 never load TensorBoard's protobufs.
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    # tensorboardX writes gs:// itself (google-cloud-storage; each flush re-uploads the event file).
    self._tb = SummaryWriter(storage.join(workdir, "tensorboard"), purge_step=start_step + 1 if start_step else None)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> dict[str, Any] | None:
    """Logs scalars (host values or 0-d arrays) at ``step``; adds ``steps_per_s`` over the interval since the
    previous call. Returns the JSON record written (None when disabled)."""
    if not self.enabled:
      return None
    values = {name: _to_float(name, v) for name, v in scalars.items()}
    now = self._clock()
    last_step, last_time = self._last
    steps_per_s = (step - last_step) / (now - last_time) if now > last_time and step > last_step else None
    self._last = (step, now)
    record: dict[str, Any] = {"step": int(step)}
    record.update({k: _json_number(v) for k, v in values.items()})
    if steps_per_s is not None:
      record["steps_per_s"] = steps_per_s
      values["steps_per_s"] = steps_per_s
    self._jsonl.append(json.dumps(record) + "\n")
    for name, value in values.items():
      self._tb.add_scalar(name, value, global_step=step)
    # The console line leaves out the cumulative wall-time split (time/*): it is in the logs.
    logging.info("%s", format_progress(step, self.total_steps, steps_per_s,
                                       {k: v for k, v in values.items()
                                        if k != "steps_per_s" and not k.startswith("time/")}))
    return record

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """Logs uint8 images [H, W, 3] (e.g. from ``image_grid``) to TensorBoard at ``step``."""
    if not self.enabled:
      return
    for name, image in images.items():
      image = np.asarray(image)
      if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"image {name!r} is {image.dtype} {image.shape}; pass uint8 [H, W, C] (see image_grid).")
      self._tb.add_image(name, image, global_step=step, dataformats="HWC")

  def flush(self) -> None:
    if self.enabled:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    if self.enabled and self._jsonl is not None:
      self._jsonl.close()
      self._tb.close()
      self._jsonl = None

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class _JsonlLog:
  """``metrics.jsonl``, continued from ``start_step``: lines logged after it (by a run that died before its next
  checkpoint) are dropped first, so the log matches the resumed run.

  Locally the file is appended to and flushed per line. A bucket cannot append, so for a URL the lines are kept
  in memory and the whole object is re-uploaded at most every ``REMOTE_UPLOAD_SECONDS`` and on flush/close
  (lines after the last checkpoint are dropped on resume anyway, so a crash loses nothing a resume would keep).
  """

  def __init__(self, path: str, start_step: int, clock: Callable[[], float] = time.monotonic):
    self._path, self._clock = path, clock
    lines = []
    if storage.exists(path):
      lines = storage.read_text(path).splitlines(keepends=True)
    keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= start_step]
    self._remote = storage.is_remote(path)
    if len(keep) != len(lines):
      storage.write_text(path, "".join(keep))
    self._lines, self._uploaded = keep, clock()
    self._file = None if self._remote else open(path, "a", encoding="utf-8")

  def append(self, line: str) -> None:
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
      return
    self._lines.append(line)
    if self._clock() - self._uploaded >= REMOTE_UPLOAD_SECONDS:
      self.flush()

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
    else:
      storage.write_text(self._path, "".join(self._lines))
      self._uploaded = self._clock()

  def close(self) -> None:
    self.flush()
    if self._file is not None:
      self._file.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of ``workdir/metrics.jsonl`` in order."""
  text = storage.read_text(storage.join(workdir, METRICS_FILE))
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Images [N, H, W, C] as uint8: floats are read as [-1, 1] (the models' range), uint8 is kept."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  return np.clip(np.round((images.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, ncols: int | None = None, labels: Sequence[str] | None = None,
               pad: int = 2, background: int = 255) -> np.ndarray:
  """Tiles images into one labelled grid.

  Args:
    images: [N, H, W, C] with C in {1, 3}; float in [-1, 1] or uint8.
    ncols: images per row (default: ceil(sqrt(N))).
    labels: one caption per image, drawn in black in a band under it (cut to the image width); or None.
    pad: pixels between and around cells.
    background: gray level of the padding and label bands.

  Returns:
    uint8 [rows * (H + band + pad) + pad, ncols * (W + pad) + pad, 3]; image i sits at row i // ncols,
    column i % ncols, its top-left pixel at (pad + row * (H + band + pad), pad + col * (W + pad)).
  """
  images = to_uint8(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images have shape {images.shape}; pass [N, H, W, C] with C = 1 or 3.")
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  n, h, w, _ = images.shape
  if labels is not None and len(labels) != n:
    raise ValueError(f"{len(labels)} labels for {n} images; give one label per image.")
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / ncols))
  font = ImageFont.load_default()
  band = 0
  if labels is not None:
    left, top, right, bottom = font.getbbox("Ag")
    band = bottom - top + 4
  grid = np.full((rows * (h + band + pad) + pad, ncols * (w + pad) + pad, 3), background, np.uint8)
  for i in range(n):
    y, x = pad + (i // ncols) * (h + band + pad), pad + (i % ncols) * (w + pad)
    grid[y:y + h, x:x + w] = images[i]
  if labels is None:
    return grid
  canvas = Image.fromarray(grid)
  draw = ImageDraw.Draw(canvas)
  for i, label in enumerate(labels):
    y, x = pad + (i // ncols) * (h + band + pad) + h, pad + (i % ncols) * (w + pad)
    text = str(label)
    while text and draw.textlength(text, font=font) > w:
      text = text[:-1]
    # Draw into a cell-sized layer so a glyph can never spill into the neighbouring image.
    cell = Image.new("RGB", (w, band), (background,) * 3)
    ImageDraw.Draw(cell).text((1, 1), text, fill=(0, 0, 0), font=font)
    canvas.paste(cell, (x, y))
  return np.asarray(canvas)


def save_png(image: np.ndarray, path: str) -> None:
  """Writes a uint8 [H, W, 3] image (e.g. an ``image_grid``) as PNG (a local path or a URL), creating the folder."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"save_png needs uint8 pixels, got {image.dtype}; convert with to_uint8 or image_grid.")
  with storage.atomic_write(path, "wb") as f:
    Image.fromarray(image).save(f, format="PNG")
