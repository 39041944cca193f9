"""Reading a local folder of images with captions, skipping (never aborting on) bad files.

Three layouts are recognised, checked in this order:
  1. ``metadata.jsonl`` in the folder: one JSON object per line with ``file_name`` (relative to the folder) and
     ``text`` (the caption key is configurable);
  2. ``metadata.csv`` in the folder: a header row with ``file_name`` and ``text`` columns;
  3. otherwise every image under the folder (recursively) with a same-stem ``.txt`` file holding its caption.

Bad inputs are skipped and recorded with a reason (``SKIP_REASONS``): an image that PIL cannot fully decode, an
image without a (non-empty) caption, an image whose short side is under ``min_size``, a metadata row naming a
file that does not exist, or a metadata line that does not parse.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
import json
import os
from typing import Any, Iterator

from PIL import Image, ImageOps

from perflow_jax.data import writer

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
SKIP_REASONS = ("unreadable_image", "missing_caption", "too_small", "missing_file", "bad_metadata")
# Encoded bytes are stored unchanged when they already are RGB JPEG/PNG; anything else is re-encoded.
_KEEP_FORMATS = frozenset({"JPEG", "PNG"})


@dataclasses.dataclass(frozen=True)
class Candidate:
  """An image file and its caption (None when no caption was found)."""
  path: str
  caption: str | None


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A file left out of the dataset: path relative to the folder, reason (one of SKIP_REASONS), detail."""
  file: str
  reason: str
  detail: str


def _is_image(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def image_files(root: str) -> list[str]:
  """Every image file under `root` (by extension), in a deterministic sorted walk order."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
  return found


def _from_txt(root: str) -> tuple[list[Candidate], list[Skipped]]:
  candidates = []
  for path in image_files(root):
    txt = os.path.splitext(path)[0] + ".txt"
    caption = None
    if os.path.isfile(txt):
      with open(txt, encoding="utf-8", errors="replace") as f:
        caption = f.read()
    candidates.append(Candidate(path, caption))
  return candidates, []


def _metadata_rows(root: str, filename: str, caption_key: str) -> tuple[list[tuple[str, Any]], list[Skipped]]:
  """(file_name, caption) rows of metadata.jsonl / metadata.csv, and the lines that did not parse."""
  path = os.path.join(root, filename)
  rows, bad = [], []
  with open(path, encoding="utf-8", newline="") as f:
    if filename.endswith(".jsonl"):
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
          rows.append((obj["file_name"], obj.get(caption_key)))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          bad.append(Skipped(f"{filename}:{lineno}", "bad_metadata", f"{type(e).__name__}: {e}"))
    else:
      reader = csv.DictReader(f)
      if reader.fieldnames is None or "file_name" not in reader.fieldnames:
        raise ValueError(f"{path} needs a header row with a 'file_name' column (and '{caption_key}'); "
                         f"found columns {reader.fieldnames}")
      for row in reader:
        rows.append((row["file_name"], row.get(caption_key)))
  return rows, bad


def _from_metadata(root: str, filename: str, caption_key: str) -> tuple[list[Candidate], list[Skipped]]:
  rows, skipped = _metadata_rows(root, filename, caption_key)
  captions: dict[str, Any] = {}
  for file_name, caption in rows:
    full = os.path.normpath(os.path.join(root, str(file_name)))
    if not os.path.isfile(full):
      skipped.append(Skipped(str(file_name), "missing_file", f"listed in {filename} but not found"))
      continue
    captions[full] = caption
  # Images in the folder that the metadata does not mention have no caption: report them too.
  candidates = [Candidate(p, captions.pop(p, None)) for p in image_files(root)]
  candidates += [Candidate(p, c) for p, c in sorted(captions.items())]
  return candidates, skipped


def scan_folder(root: str, caption_key: str = "text") -> tuple[list[Candidate], list[Skipped], str]:
  """Candidates (sorted, deterministic), metadata problems, and the layout used ('jsonl', 'csv' or 'txt')."""
  if not os.path.isdir(root):
    raise ValueError(f"image folder {root!r} does not exist or is not a directory (--source=folder:PATH)")
  for filename, layout in (("metadata.jsonl", "jsonl"), ("metadata.csv", "csv")):
    if os.path.isfile(os.path.join(root, filename)):
      candidates, skipped = _from_metadata(root, filename, caption_key)
      return candidates, skipped, layout
  candidates, skipped = _from_txt(root)
  return candidates, skipped, "txt"


def _encode(image: Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  if fmt == "JPEG":
    image.save(buf, format="JPEG", quality=95)
  else:
    image.save(buf, format="PNG")
  return buf.getvalue()


def load_candidate(candidate: Candidate, root: str, min_size: int = 0,
                   max_size: int = 0) -> tuple[dict[str, Any] | None, Skipped | None]:
  """({'image': encoded bytes, 'text': caption}, None) for a good file, (None, Skipped) for a bad one.

  The image is decoded in full (truncated files fail here, not in training). It is re-encoded only when it is
  not RGB JPEG/PNG, carries an EXIF rotation, or has a short side over ``max_size`` (> 0), which then becomes
  ``max_size``; otherwise its bytes are kept as they are.
  """
  rel = os.path.relpath(candidate.path, root)
  caption = candidate.caption.strip() if isinstance(candidate.caption, str) else None
  if not caption:
    return None, Skipped(rel, "missing_caption", "no caption (empty or absent)")
  try:
    with open(candidate.path, "rb") as f:
      raw = f.read()
    with Image.open(io.BytesIO(raw)) as img:
      img.load()
      fmt = img.format
      orientation = img.getexif().get(0x0112, 1)
      image = ImageOps.exif_transpose(img) if orientation != 1 else img.copy()
  except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
    return None, Skipped(rel, "unreadable_image", f"{type(e).__name__}: {e}")
  width, height = image.size
  if min(width, height) < min_size:
    return None, Skipped(rel, "too_small", f"{width}x{height}: short side under --min_size={min_size}")
  keep = fmt in _KEEP_FORMATS and image.mode == "RGB" and orientation == 1
  if max_size > 0 and min(width, height) > max_size:
    scale = max_size / min(width, height)
    image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)
    keep = False
  if not keep:
    data = _encode(image.convert("RGB"), "JPEG" if fmt == "JPEG" else "PNG")
  else:
    data = raw
  return {"image": data, "text": caption}, None


def iter_folder_examples(candidates: list[Candidate], root: str, skipped: list[Skipped], *, min_size: int = 0,
                         max_size: int = 0, num_threads: int = 4) -> Iterator[dict[str, Any]]:
  """Yields good examples in candidate order and appends every bad one to ``skipped``.

  Decoding runs on ``num_threads`` threads (PIL releases the GIL while decoding), in chunks so that memory
  stays bounded however large the folder is.
  """
  chunk = max(1, 16 * num_threads)
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
    for start in range(0, len(candidates), chunk):
      part = candidates[start:start + chunk]
      for record, skip in pool.map(lambda c: load_candidate(c, root, min_size, max_size), part):
        if skip is not None:
          skipped.append(skip)
        else:
          yield record


def make_report(dataset_path: str, layout: str, written: int, skipped: list[Skipped]) -> dict[str, Any]:
  """JSON-able build report: counts per skip reason and every skipped file with its reason."""
  by_reason = {r: 0 for r in SKIP_REASONS}
  for s in skipped:
    by_reason[s.reason] += 1
  return {
      "dataset": dataset_path,
      "layout": layout,
      "written": written,
      "skipped": len(skipped),
      "skipped_by_reason": by_reason,
      "skipped_files": [dataclasses.asdict(s) for s in skipped],
  }


def format_report(report: dict[str, Any]) -> str:
  """Human-readable report: totals, then one line per skipped file."""
  lines = [f"wrote {report['written']} examples to {report['dataset']} (layout: {report['layout']}); "
           f"skipped {report['skipped']}"]
  lines += [f"  {reason}: {n}" for reason, n in report["skipped_by_reason"].items() if n]
  lines += [f"  skipped {s['file']}: {s['reason']} ({s['detail']})" for s in report["skipped_files"]]
  return "\n".join(lines)


def build_folder_dataset(root: str, data_dir: str, name: str, *, min_size: int = 0, max_size: int = 0,
                         caption_key: str = "text", split: str = "train", examples_per_shard: int = 1000,
                         num_threads: int = 4, overwrite: bool = False) -> dict[str, Any]:
  """Folder of captioned images -> tfds dataset ``name`` in ``data_dir``; returns the report (also saved).

  The report (see ``make_report``) is written as ``prepare_report.json`` in the dataset's version folder. A
  build never stops for a bad file; it raises only for problems with the folder itself, or when no file at all
  was usable.
  """
  candidates, skipped, layout = scan_folder(root, caption_key)
  examples = iter_folder_examples(candidates, root, skipped, min_size=min_size, max_size=max_size,
                                  num_threads=num_threads)
  description = f"Images with captions from {os.path.abspath(root)} (layout: {layout})."
  path, written = writer.write_dataset(data_dir, name, writer.image_features(), examples, split=split,
                                       description=description, examples_per_shard=examples_per_shard,
                                       overwrite=overwrite)
  report = make_report(path, layout, written, skipped)
  with open(os.path.join(path, writer.REPORT_FILENAME), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  if written == 0:
    raise ValueError(f"no usable image in {root!r} ({len(skipped)} skipped; see "
                     f"{os.path.join(path, writer.REPORT_FILENAME)}): check the layout (same-stem .txt files, "
                     "metadata.jsonl or metadata.csv with file_name and text) and --min_size")
  return report
