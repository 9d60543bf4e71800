"""A griffe extension for the API reference: losskit's docstrings are written in reStructuredText roles
and directives (they also serve ``help()`` and doctest); mkdocstrings renders Markdown. Each docstring is
rewritten as it is loaded, the source untouched:

* ``.. math::`` blocks become ``$$ ... $$`` and ``:math:`x``` becomes ``$x$`` (pymdownx.arithmatex);
* ``.. code-block:: python`` and ``::`` literal blocks become fenced code;
* ``:func:`x```, ``:mod:``, ``:class:``, ``:data:`` become code spans;
* simple tables (``===  ===`` rules) are kept as preformatted text.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|mod|class|data|meth|attr|obj):`~?([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_TABLE_RULE = re.compile(r"^\s*=+(\s+=+)+\s*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block(lines: list[str], start: int, base: int) -> int:
    """Index after the block that follows line ``start - 1``: lines blank or indented deeper than ``base``."""
    end = start
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > base):
        end += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return end


def _fence(body: list[str], pad: str, lang: str) -> list[str]:
    depth = min((_indent(line) for line in body if line.strip()), default=0)
    return [f"{pad}```{lang}", *(pad + line[depth:] if line.strip() else "" for line in body), f"{pad}```"]


def markdown(text: str) -> str:
    """``text`` (a docstring in reStructuredText) as Markdown."""
    lines, out, i = _MATH_ROLE.sub(r"$\1$", text).splitlines(), [], 0  # a role may span lines
    while i < len(lines):
        line = lines[i]
        pad = " " * _indent(line)
        stripped = line.strip()
        if stripped.startswith(".. math::"):
            end = _block(lines, i + 1, _indent(line))
            formula = [stripped[len(".. math::"):].strip(), *(l.strip() for l in lines[i + 1:end])]
            out += [f"{pad}$$", *(pad + f for f in formula if f), f"{pad}$$"]
            i = end
        elif stripped.startswith(".. code-block::") or (stripped.endswith("::") and not stripped.startswith("..")):
            lang = stripped.split("::", 1)[1].strip() if stripped.startswith("..") else "python"
            if not stripped.startswith(".."):
                out.append(line[:-1] if not line.endswith(" ::") else line[:-3])
            end = _block(lines, i + 1, _indent(line))
            out += ["", *_fence(lines[i + 1:end], pad, lang or "text")]
            i = end
        elif _TABLE_RULE.match(line):
            end = i + 1
            rules = 1
            while end < len(lines) and rules < 3:
                rules += bool(_TABLE_RULE.match(lines[end]))
                end += 1
            out += _fence(lines[i:end], pad, "text")
            i = end
        else:
            out.append(_ROLE.sub(r"`\1`", line))
            i += 1
    return "\n".join(out)


class RstDocstrings(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
