"""Reading a local folder of images with captions, skipping (never aborting on) bad files.

Three layouts are recognised, checked in this order:
  1. ``metadata.jsonl`` in the folder: one JSON object per line with ``file_name`` (relative to the folder) and
     ``text`` (the caption key is configurable);
  2. ``metadata.csv`` in the folder: a header row with ``file_name`` and ``text`` columns;
  3. otherwise every image under the folder (recursively) with a same-stem ``.txt`` file holding its caption.

Bad inputs are skipped and recorded with a reason (``SKIP_REASONS``), never fatal:
  unreadable_image  PIL cannot fully decode the image;
  missing_caption   no (non-empty) caption;
  too_small         the short side is under ``min_size`` (default 64 px; read from the header);
  too_many_pixels   width x height is over ``max_pixels`` (default 64 megapixels), or over PIL's decompression-bomb
                    limit: read from the header, the image is never decoded, so memory stays bounded;
  missing_file      a metadata row names a file that does not exist;
  bad_metadata      a metadata line does not parse;
  outside_folder    a file (an image, a caption ``.txt``, a metadata row's ``file_name``) resolves outside the folder
                    (``..``, an absolute path, a symlink pointing out): it is never opened;
  bad_encoding      a caption is not UTF-8: a ``.txt`` caption file, or a line of ``metadata.jsonl`` /
                    ``metadata.csv``. Files are read as bytes and decoded per line, so the other lines are used;
                    the report names the file, line and byte offset. Nothing is stored with replacement characters.
A UTF-8 byte-order mark at the start of a file is accepted. Only problems with the folder itself stop a build (no
such folder, ``metadata.csv`` without a ``file_name`` header, a metadata file resolving outside the folder), or
no usable image at all; the dataset is then not written (see ``writer.write_dataset``: builds are transactional).
"""

from __future__ import annotations

import codecs
import concurrent.futures
import csv
import dataclasses
import io
import json
import os
import warnings
from typing import Any, Iterator

from PIL import Image, ImageOps

from perflow_jax.data import writer

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
SKIP_REASONS = ("unreadable_image", "missing_caption", "too_small", "missing_file", "bad_metadata",
                "outside_folder", "bad_encoding", "too_many_pixels")
DEFAULT_MIN_SIZE = 64  # px, short side: smaller images are thumbnails or icons, not training data
DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; below PIL's decompression-bomb warning (Image.MAX_IMAGE_PIXELS)
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


def _outside(root: str, path: str) -> str | None:
  """None when ``path`` resolves (symlinks and '..' followed; an absolute path as it is) to a place inside the
  folder ``root``; else the reason it is not read, for the report."""
  root_real, real = os.path.realpath(root), os.path.realpath(path)
  if os.path.commonpath([root_real, real]) == root_real:
    return None
  return f"resolves to {real}, outside the folder {root_real}: not read"


def _not_utf8(name: str, data: bytes, err: UnicodeDecodeError, first_line: int = 1, file_offset: int = 0) -> str:
  """Where and what the decoding error ``err`` of ``data`` is: ``data`` starts at line ``first_line`` and byte
  ``file_offset`` of the file ``name``."""
  line = first_line + data.count(b"\n", 0, err.start)
  column = err.start - (data.rfind(b"\n", 0, err.start) + 1)
  return (f"{name} line {line}: byte 0x{data[err.start]:02x} at offset {column} of the line (offset "
          f"{file_offset + err.start} of the file) is not UTF-8 ({err.reason}); save the file as UTF-8")


def _read_caption(path: str, name: str) -> tuple[str | None, str | None]:
  """(caption, None) for a UTF-8 caption file, (None, where it is not UTF-8) otherwise."""
  with open(path, "rb") as f:
    data = f.read()
  bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
  try:
    return data[bom:].decode("utf-8"), None
  except UnicodeDecodeError as e:
    return None, _not_utf8(name, data[bom:], e, file_offset=bom)


def _from_txt(root: str) -> tuple[list[Candidate], list[Skipped]]:
  candidates, skipped = [], []
  for path in image_files(root):
    txt = os.path.splitext(path)[0] + ".txt"
    caption = None
    if os.path.isfile(txt):
      rel, rel_txt = os.path.relpath(path, root), os.path.relpath(txt, root)
      outside = _outside(root, txt)
      if outside:
        skipped.append(Skipped(rel, "outside_folder", f"caption file {rel_txt} {outside}"))
        continue
      caption, problem = _read_caption(txt, rel_txt)
      if problem:
        skipped.append(Skipped(rel, "bad_encoding", f"caption file {problem}"))
        continue
    candidates.append(Candidate(path, caption))
  return candidates, skipped


def _lines(f: Any, filename: str, bad: dict[int, str]) -> Iterator[str]:
  """The lines of the binary file ``f`` as text, line ending kept. A line that is not UTF-8 is recorded in ``bad``
  (line number -> where) and yielded with its bad bytes as lone surrogates (``surrogateescape``), so a csv record
  spanning lines still parses; the caller drops every record that touches a line in ``bad``."""
  offset = 0
  for lineno, raw in enumerate(f, 1):
    start = len(codecs.BOM_UTF8) if lineno == 1 and raw.startswith(codecs.BOM_UTF8) else 0
    try:
      text = raw[start:].decode("utf-8")
    except UnicodeDecodeError as e:
      bad[lineno] = _not_utf8(filename, raw[start:], e, lineno, offset + start)
      text = raw[start:].decode("utf-8", "surrogateescape")
    offset += len(raw)
    yield text


def _metadata_rows(root: str, filename: str, caption_key: str) -> tuple[list[tuple[str, Any]], list[Skipped]]:
  """(file_name, caption) rows of metadata.jsonl / metadata.csv, and the lines that were not UTF-8 or did not
  parse. Read as bytes and decoded line by line: a bad line is skipped and reported, the others are used."""
  path = os.path.join(root, filename)
  outside = _outside(root, path)
  if outside:
    raise ValueError(f"{path} {outside}; a build reads only files inside its folder: copy the file there")
  rows, skipped = [], []
  bad_lines: dict[int, str] = {}
  with open(path, "rb") as f:
    lines = _lines(f, filename, bad_lines)
    if filename.endswith(".jsonl"):
      for lineno, line in enumerate(lines, 1):
        if lineno in bad_lines:
          skipped.append(Skipped(f"{filename}:{lineno}", "bad_encoding", bad_lines[lineno]))
          continue
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
          rows.append((obj["file_name"], obj.get(caption_key)))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          skipped.append(Skipped(f"{filename}:{lineno}", "bad_metadata", f"{type(e).__name__}: {e}"))
    else:
      reader = csv.DictReader(lines)
      if reader.fieldnames is None or "file_name" not in reader.fieldnames:
        hint = f" ({bad_lines[1]})" if 1 in bad_lines else ""
        raise ValueError(f"{path} needs a header row with a 'file_name' column (and '{caption_key}'); "
                         f"found columns {reader.fieldnames}{hint}")
      last = reader.line_num
      for row in reader:
        # A record spans the lines after the previous one up to reader.line_num (quoted fields may hold newlines).
        first, last = last + 1, reader.line_num
        bad = [n for n in range(first, last + 1) if n in bad_lines]
        if bad:
          skipped.append(Skipped(f"{filename}:{bad[0]}", "bad_encoding", bad_lines[bad[0]]))
          continue
        rows.append((row["file_name"], row.get(caption_key)))
  return rows, skipped


def _from_metadata(root: str, filename: str, caption_key: str) -> tuple[list[Candidate], list[Skipped]]:
  rows, skipped = _metadata_rows(root, filename, caption_key)
  captions: dict[str, Any] = {}
  reported: set[str] = set()
  for file_name, caption in rows:
    full = os.path.normpath(os.path.join(root, str(file_name)))
    try:
      outside = _outside(root, full)
    except ValueError as e:  # a NUL byte
      skipped.append(Skipped(repr(file_name), "bad_metadata", f"listed in {filename}; not a usable path: {e}"))
      continue
    if outside:  # never opened
      skipped.append(Skipped(str(file_name), "outside_folder", f"listed in {filename}; {outside}"))
      reported.add(full)
      continue
    if not os.path.isfile(full):
      skipped.append(Skipped(str(file_name), "missing_file", f"listed in {filename} but not found"))
      continue
    captions[full] = caption
  # Images in the folder that the metadata does not mention have no caption: report them too (those reported
  # above, e.g. a listed symlink pointing out of the folder, once only). Keys are normalised paths: root may be
  # given as './images' or 'images/'.
  candidates = [Candidate(p, captions.pop(os.path.normpath(p), None)) for p in image_files(root)
                if os.path.normpath(p) not in reported]
  candidates += [Candidate(p, c) for p, c in sorted(captions.items())]
  return candidates, skipped


def scan_folder(root: str, caption_key: str = "text") -> tuple[list[Candidate], list[Skipped], str]:
  """Candidates (sorted, deterministic), the problems found while scanning (metadata lines, caption files, paths
  outside the folder), and the layout used ('jsonl', 'csv' or 'txt')."""
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


def load_candidate(candidate: Candidate, root: str, min_size: int = DEFAULT_MIN_SIZE, max_size: int = 0,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[dict[str, Any] | None, Skipped | None]:
  """({'image': encoded bytes, 'text': caption}, None) for a good file, (None, Skipped) for a bad one.

  A file resolving outside ``root`` is never opened. The size is read from the header first: an image over
  ``max_pixels`` or with a short side under ``min_size`` is never decoded. Otherwise the image is decoded in full
  (truncated files fail here, not in training). It is re-encoded only when it is not RGB JPEG/PNG, carries an
  EXIF rotation, or has a short side over ``max_size`` (> 0), which then becomes ``max_size``; otherwise its bytes
  are kept as they are.
  """
  rel = os.path.relpath(candidate.path, root)
  outside = _outside(root, candidate.path)
  if outside:
    return None, Skipped(rel, "outside_folder", outside)
  caption = candidate.caption.strip() if isinstance(candidate.caption, str) else None
  if not caption:
    return None, Skipped(rel, "missing_caption", "no caption (empty or absent)")
  try:
    caption.encode("utf-8")
  except UnicodeEncodeError as e:  # a lone surrogate, e.g. a JSON "\udce9" escape: tfds could not store it
    return None, Skipped(rel, "bad_encoding", f"caption has {caption[e.start]!r} at character {e.start}, which UTF-8 "
                         "cannot encode")
  try:
    with open(candidate.path, "rb") as f:
      raw = f.read()
    with Image.open(io.BytesIO(raw)) as img:  # reads the header only
      width, height = img.size
      if width * height > max_pixels:
        return None, Skipped(rel, "too_many_pixels", f"{width}x{height} = {width * height / 1e6:.1f} megapixels, "
                             f"over --max_pixels={max_pixels}: not decoded")
      if min(width, height) < min_size:
        return None, Skipped(rel, "too_small", f"{width}x{height}: short side under --min_size={min_size}")
      img.load()
      fmt = img.format
      orientation = img.getexif().get(0x0112, 1)
      image = ImageOps.exif_transpose(img) if orientation != 1 else img.copy()
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    # PIL's own limit, checked while it reads the header (its warning is an error during build_folder_dataset).
    return None, Skipped(rel, "too_many_pixels", f"over --max_pixels={max_pixels} and PIL's decompression-bomb "
                         f"limit, not decoded: {e}")
  except (OSError, ValueError, SyntaxError) as e:
    return None, Skipped(rel, "unreadable_image", f"{type(e).__name__}: {e}")
  width, height = image.size
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


def iter_folder_examples(candidates: list[Candidate], root: str, skipped: list[Skipped], *,
                         min_size: int = DEFAULT_MIN_SIZE, max_size: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
                         num_threads: int = 4) -> Iterator[dict[str, Any]]:
  """Yields good examples in candidate order and appends every bad one to ``skipped``.

  Decoding runs on ``num_threads`` threads (PIL releases the GIL while decoding), in chunks so that memory
  stays bounded however large the folder is.
  """
  chunk = max(1, 16 * num_threads)
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
    for start in range(0, len(candidates), chunk):
      part = candidates[start:start + chunk]
      for record, skip in pool.map(lambda c: load_candidate(c, root, min_size, max_size, max_pixels), part):
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


def _check_limits(min_size: int, max_size: int, max_pixels: int) -> None:
  if min_size < 0 or max_size < 0:
    raise ValueError(f"--min_size={min_size} and --max_size={max_size} must be >= 0")
  if max_pixels <= 0:
    raise ValueError(f"--max_pixels={max_pixels} must be positive")
  pil_limit = Image.MAX_IMAGE_PIXELS
  if pil_limit is not None and max_pixels > pil_limit:
    raise ValueError(f"--max_pixels={max_pixels} is above PIL's decompression-bomb limit "
                     f"(PIL.Image.MAX_IMAGE_PIXELS = {pil_limit}), which applies too: use at most {pil_limit}, "
                     "or downscale the larger images first")


def _no_usable_image(root: str, report: dict[str, Any]) -> ValueError:
  counts = ", ".join(f"{n} {reason}" for reason, n in report["skipped_by_reason"].items() if n)
  examples = "; ".join(f"{s['file']}: {s['reason']} ({s['detail']})" for s in report["skipped_files"][:5])
  found = f"{report['skipped']} skipped: {counts}; e.g. {examples}" if examples else "no image file found"
  return ValueError(f"no usable image in {root!r} ({found}); nothing was written. Check the layout (same-stem "
                    ".txt files, metadata.jsonl or metadata.csv with file_name and text), --min_size and "
                    "--max_pixels")


def build_folder_dataset(root: str, data_dir: str, name: str, *, min_size: int = DEFAULT_MIN_SIZE,
                         max_size: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS, caption_key: str = "text",
                         split: str = "train", examples_per_shard: int = 1000, num_threads: int = 4,
                         overwrite: bool = False) -> dict[str, Any]:
  """Folder of captioned images -> tfds dataset ``name`` in ``data_dir``; returns the report (also saved).

  The report (see ``make_report``) is written as ``prepare_report.json`` in the dataset's version folder. A
  build never stops for a bad file; it raises only for problems with the folder itself, or when no file at all
  was usable. It is transactional (``writer.write_dataset``): when it raises, nothing is left in ``data_dir``
  and an existing dataset (``overwrite``) is kept as it was.
  """
  _check_limits(min_size, max_size, max_pixels)
  candidates, skipped, layout = scan_folder(root, caption_key)
  examples = iter_folder_examples(candidates, root, skipped, min_size=min_size, max_size=max_size,
                                  max_pixels=max_pixels, num_threads=num_threads)
  description = f"Images with captions from {os.path.abspath(root)} (layout: {layout})."
  report: dict[str, Any] = {}

  def finalize(staging: str, written: int) -> None:  # before the dataset is moved into place
    report.update(make_report(writer.dataset_dir(data_dir, name), layout, written, skipped))
    if written == 0:
      raise _no_usable_image(root, report)
    with open(os.path.join(staging, writer.REPORT_FILENAME), "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)

  # PIL warns (once per call site, easily missed) about images over its decompression-bomb limit as it reads
  # their header: made an error here, load_candidate reports such an image as too_many_pixels. The filter is set
  # in this thread, before the decoding threads start, and applies to them too.
  with warnings.catch_warnings():
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    writer.write_dataset(data_dir, name, writer.image_features(), examples, split=split, description=description,
                         examples_per_shard=examples_per_shard, overwrite=overwrite, finalize=finalize)
  return report
