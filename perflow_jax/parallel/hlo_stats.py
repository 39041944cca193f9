"""Counting the collectives of a compiled program, inside and outside its loops, from its optimised HLO text
(`jax.stages.Compiled.as_text()`).

Where FSDP puts its communication matters for PeRFlow: the teacher's window solve is a `fori_loop` of S UNet
calls, so a collective inside that loop's body runs S times per step. `loop_collectives` reports, for every while
loop, the collectives its body reaches (through nested calls, fusions and inner loops), with their result shapes,
and `entry_collectives` those outside every loop.
"""

from __future__ import annotations

import collections
import dataclasses
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_OPCODE = re.compile(r"\s*([\w\-]+)\(")
_CALLEES = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations|called_computations)="
                      r"(?:\{([^}]*)\}|%?([\w.\-]+))")
_WHILE_BODY = re.compile(r"\bbody=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_RESULT_SHAPE = re.compile(r"=\s*(\S+\[[^\]]*\])")


@dataclasses.dataclass
class LoopCollectives:
  """The collectives a while loop's body runs per iteration."""
  op_name: str  # the JAX op_name metadata of the while (where in the program it came from)
  counts: dict[str, int]  # collective kind -> number of ops
  shapes: dict[str, list[str]]  # collective kind -> result shapes, e.g. 'f32[8,4,4,256]'

  @property
  def total(self) -> int:
    return sum(self.counts.values())


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
  """{computation name: its instruction lines}, and the entry computation's name."""
  computations: dict[str, list[str]] = {}
  entry, current = "", None
  for line in hlo_text.splitlines():
    if current is None:
      match = _HEADER.match(line)
      if match and "=" not in line.split("(")[0]:
        current = match.group(2)
        computations[current] = []
        if match.group(1):
          entry = current
    elif line.strip() == "}":
      current = None
    else:
      computations[current].append(line)
  return computations, entry


def _opcode(line: str) -> str:
  """'%x = f32[2,3]{1,0} all-gather(%y), ...' -> 'all-gather' (the result type may be a tuple of types)."""
  _, eq, rest = line.partition(" = ")
  if not eq:
    return ""
  rest = rest.lstrip()
  if rest.startswith("("):  # a tuple type: skip to its closing parenthesis
    depth = 0
    for i, ch in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        rest = rest[i + 1:]
        break
  else:
    rest = rest.partition(" ")[2]
  match = _OPCODE.match(rest)
  return match.group(1) if match else ""


def _callees(line: str) -> list[str]:
  names = []
  for listed, single in _CALLEES.findall(line):  # calls={%a, %b} or body=%a
    names += [n.strip().lstrip("%") for n in (listed or single).split(",") if n.strip()]
  return names


def _reachable(root: str, computations: dict[str, list[str]], skip_loops: bool) -> list[str]:
  """Instruction lines of `root` and every computation it calls (not into while bodies when `skip_loops`)."""
  seen, stack, lines = set(), [root], []
  while stack:
    name = stack.pop()
    if name in seen or name not in computations:
      continue
    seen.add(name)
    for line in computations[name]:
      lines.append(line)
      if skip_loops and _opcode(line) == "while":
        continue
      stack.extend(_callees(line))
  return lines


def _count(lines: list[str]) -> tuple[dict[str, int], dict[str, list[str]]]:
  counts: dict[str, int] = collections.Counter()
  shapes: dict[str, list[str]] = collections.defaultdict(list)
  for line in lines:
    op = _opcode(line)
    kind = next((c for c in COLLECTIVES if op in (c, c + "-start")), None)
    if kind:
      counts[kind] += 1
      shape = _RESULT_SHAPE.search(line)
      shapes[kind].append(shape.group(1) if shape else "?")
  return dict(counts), dict(shapes)


def loop_collectives(hlo_text: str) -> list[LoopCollectives]:
  """Every while loop of the program with the collectives one iteration of its body runs (inner loops included)."""
  computations, _ = _computations(hlo_text)
  out = []
  for lines in computations.values():
    for line in lines:
      if _opcode(line) != "while":
        continue
      body = _WHILE_BODY.search(line).group(1)
      op_name = _OP_NAME.search(line)
      counts, shapes = _count(_reachable(body, computations, skip_loops=False))
      out.append(LoopCollectives(op_name.group(1) if op_name else "", counts, shapes))
  return out


def entry_collectives(hlo_text: str) -> dict[str, int]:
  """Collective kind -> ops the program runs once, outside every loop."""
  computations, entry = _computations(hlo_text)
  return _count(_reachable(entry, computations, skip_loops=True))[0]
