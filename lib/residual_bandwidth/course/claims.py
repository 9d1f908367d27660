"""Claims: the lesson's quantitative sentences, with their truth computed where they are made.

Every sentence of the lesson that states a number or a comparison is one of two kinds:

* **generated**: a code cell builds the sentence from the values it just computed and displays it
  (:meth:`Claims.say`); the numbers in it cannot disagree with the printed output beside it;
* **registered**: the sentence is typed in a markdown cell and carries an invisible marker
  ``<!-- claims: some_id -->`` right after it; a code cell of the same section computes whether that
  sentence holds (:meth:`Claims.check`), and the statement it registers *is* the sentence (the tests
  compare the two with :func:`normalize`). A marker covers one sentence, list item or table row
  (:func:`fragments`), never a whole cell.

Each claim records its id, the statement, the computed truth value ``holds`` and the numbers it rests
on; the cell that made it is the one whose source calls ``claims.say("id", ...)`` or
``claims.check("id", ...)`` (ids are unique in the lesson source, which the tests check). :meth:`Claims.show` (the lesson's last cell)
displays all of them as a table (the data as JSON in the output metadata); the course's tests execute the notebook once and fail
on any claim that does not hold, on a marker naming an unknown claim, and on typed prose that
states a number or a comparison without a marker (:func:`unchecked_prose` is that rule).

When a claim does not hold on a run (another model, other prompts), :meth:`Claims.say` shows the
sentence under a visible warning instead of hiding it, so a reader never sees an unflagged
statement that the numbers beside it contradict.
"""
from __future__ import annotations

import html
import json
import math
import re
from dataclasses import asdict, dataclass, field

#: the marker a typed markdown cell uses to name the claims that check its sentences
MARKER = re.compile(r"<!--\s*claims:\s*([\w\s,.-]+?)\s*-->")
_ID = re.compile(r"^[a-z][a-z0-9_]*$")

#: words that make a sentence quantitative or comparative (whole words, case-insensitive)
COMPARATIVES = ("more", "less", "fewer", "larger", "largest", "smaller", "smallest", "higher", "highest", "lower",
                "lowest", "bigger", "biggest", "greater", "louder", "loudest", "quieter", "most", "least", "never",
                "always", "thousands", "hundreds", "dozens", "tens", "twice", "half", "majority", "understates",
                "overstates", "exceeds", "exceed")
_COMPARATIVE = re.compile(r"\b(" + "|".join(COMPARATIVES) + r")\b|[×%]", re.IGNORECASE)
_DIGIT = re.compile(r"\d")

# what a typed number may be without a claim: structure and notation, not a finding
_STRIP = [
    re.compile(r"```.*?```", re.S),                       # fenced code
    re.compile(r"\$\$.*?\$\$", re.S),                     # display math
    re.compile(r"\$[^$\n]+\$"),                           # inline math
    re.compile(r"`[^`\n]+`"),                             # inline code
    re.compile(r"<summary>[^<]*</summary>"),              # "Hint 1" headers of collapsible hints
    re.compile(r"^\*\*Difficulty:\*\*.*$", re.M),          # an exercise's difficulty / importance / time line
    re.compile(r"<!--.*?-->", re.S),                      # comments (the markers themselves)
    re.compile(r"<[^>\n]+>"),                             # html tags (<details>, <summary>)
    re.compile(r"^[ \t]{0,3}#{1,6} .*$", re.M),           # headings
    re.compile(r"\]\([^)]*\)"),                           # link targets
    re.compile(r"^[ \t]*\d+\.[ \t]", re.M),                # numbered-list markers (not across lines)
    re.compile(r"\b(?:et al\.|[A-Z][a-z]+(?: (?:&|and) [A-Z][a-z]+)?)\s*,?\s*\(?(?:19|20)\d\d\)?"),  # citations
    re.compile(r"\bat (?:most|least)\b", re.IGNORECASE),  # bounds ("spans at most n - 1 directions"): a digit still counts
    re.compile(r'"[^"]{1,120}"'),                           # quotations of the original lesson
    re.compile(r"\b[A-Za-z][\w.]*\d[\w.]*(?:-[\w.]+)*\b|\b[A-Za-z]+-\d[\w.-]*\b"),  # names: GPT-2, SmolLM2-135M
    re.compile(r"\b(?:Sections?|Checkpoints?|Q|LO|[Mm]odule|[Ll]esson|layer|block)\s*\d+(?:\.\d+)?"
               r"(?:\s*(?:and|-|–|,)\s*\d+)*"),           # cross-references
]


def _plain(value):
    """JSON-safe copy of a value (numpy / torch scalars and arrays become Python numbers / lists)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    return str(value)


@dataclass
class Claim:
    """One claim: ``holds`` is computed, ``values`` are the numbers it rests on."""
    id: str
    statement: str
    holds: bool
    values: dict = field(default_factory=dict)
    generated: bool = False


class Claims:
    """The lesson's claims, by id (a re-run cell replaces its own claims)."""

    def __init__(self):
        self._items: dict[str, Claim] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, cid: str) -> Claim:
        return self._items[cid]

    def __iter__(self):
        return iter(self._items.values())

    def _add(self, cid: str, holds, statement: str, values: dict, generated: bool) -> Claim:
        if not isinstance(cid, str) or not _ID.match(cid):
            raise ValueError(f"claim id: expected lower_snake_case, got {cid!r}")
        if not isinstance(statement, str) or not statement.strip():
            raise ValueError(f"claim {cid!r}: the statement is empty")
        holds = holds.item() if hasattr(holds, "item") else holds   # numpy / torch booleans
        if not isinstance(holds, bool):
            raise TypeError(f"claim {cid!r}: holds must be a bool, got {type(holds).__name__}")
        c = Claim(cid, statement.strip(), holds, _plain(dict(values)), generated)
        self._items[cid] = c
        return c

    def check(self, cid: str, holds, statement: str, **values) -> None:
        """Register a claim that typed prose makes (its cell names ``cid`` in a marker). Returns nothing,
        so a check at the end of a cell prints nothing; read it back with ``claims[cid]``."""
        self._add(cid, holds, statement, values, generated=False)

    def say(self, cid: str, holds, text: str, **values) -> None:
        """Register a generated claim and display its markdown ``text`` (with a warning if it does not hold)."""
        c = self._add(cid, holds, text, values, generated=True)
        shown = text if c.holds else (f"**Warning: on this run the following statement does not hold "
                                      f"(claim `{cid}`); read the numbers above instead.** {text}")
        _display_markdown(shown, {"claim": cid, "holds": c.holds})

    def failed(self) -> list[Claim]:
        return [c for c in self if not c.holds]

    def to_dict(self) -> dict:
        return {"claims": [asdict(c) for c in self]}

    def table_markdown(self) -> str:
        rows = ["| claim | kind | holds | numbers it rests on |", "|---|---|---|---|"]
        for c in self:
            nums = "; ".join(f"{k} = {_short(v)}" for k, v in c.values.items())
            rows.append(f"| `{c.id}` | {'generated' if c.generated else 'typed, checked'} | "
                        f"{'yes' if c.holds else '**NO**'} | {nums.replace('|', '/')} |")
        return "\n".join(rows)

    def table_html(self) -> str:
        """The table of :meth:`table_markdown` as an HTML table (escaped)."""
        cells = [(c.id, "generated" if c.generated else "typed, checked", "yes" if c.holds else "NO",
                  "; ".join(f"{k} = {_short(v)}" for k, v in c.values.items())) for c in self]
        body = "".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in row) + "</tr>" for row in cells)
        return ("<table><thead><tr><th>claim</th><th>kind</th><th>holds</th><th>numbers it rests on</th>"
                f"</tr></thead><tbody>{body}</tbody></table>")

    def show(self) -> None:
        """Display every claim as a table (HTML and markdown: JupyterLab, Colab and nbconvert render it as
        a table), with the same data as JSON in the output's metadata (``claims``) for the tests."""
        head = (f"{len(self)} claims, {len(self.failed())} not holding on this run"
                + (": " + ", ".join(f"`{c.id}`" for c in self.failed()) if self.failed() else "") + ".")
        try:
            from IPython.display import display
        except ImportError:  # pragma: no cover
            print(head)
            print(json.dumps(self.to_dict(), indent=1))
            return
        display({"text/markdown": head + "\n\n" + self.table_markdown(),
                 "text/html": f"<p>{html.escape(head)}</p>" + self.table_html()},
                raw=True, metadata={"claims_summary": True, "claims": self.to_dict()})


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_short(x) for x in v[:8]) + (", ...]" if len(v) > 8 else "]")
    return str(v)


def _display_markdown(text: str, metadata: dict) -> None:
    try:
        from IPython.display import Markdown, display
    except ImportError:  # pragma: no cover
        print(text)
        return
    display(Markdown(text), metadata=metadata)


# ---- the prose rule --------------------------------------------------------------------------------
def markers(markdown: str) -> list[str]:
    """Claim ids named by ``<!-- claims: a, b -->`` markers in a markdown cell."""
    return [s.strip() for m in MARKER.finditer(markdown) for s in m.group(1).split(",") if s.strip()]


_SENTINEL = re.compile(r"\u27e6([a-z]+)\u27e7")
_SPLIT = re.compile(r"(?<=[.!?])\s+|\n\s*\n|\n\s*[*-]\s|\n\s*\|")


def _sentinel(i: int) -> str:
    """A placeholder for the i-th marker made of letters only (no digit, no comparative word)."""
    return "\u27e6" + "abcdefghijklmnopqrstuvwxyz"[i % 26] * (i // 26 + 1) + "\u27e7"


@dataclass
class Fragment:
    """One sentence or list item of a markdown cell, after the notation is removed (:func:`fragments`).

    ``ids``: the claims whose marker is attached to this fragment; ``quantitative``: it states a
    number or a comparison."""
    text: str
    ids: list[str]
    quantitative: bool


def fragments(markdown: str) -> list[Fragment]:
    """Split a markdown cell into sentences / list items / table rows and attach each marker to one.

    A marker ``<!-- claims: a, b -->`` belongs to the fragment it stands in or ends: written right
    after a sentence's full stop (on the same line or the next), it covers that sentence only. The
    notation of :data:`_STRIP` is removed before the test for digits and comparatives.
    """
    found_ids: list[list[str]] = []

    def mark(m):
        found_ids.append([x.strip() for x in m.group(1).split(",") if x.strip()])
        return " " + _sentinel(len(found_ids) - 1) + " "

    text = MARKER.sub(mark, markdown)
    # a marker right after the end of a sentence belongs to that sentence: move it before the stop
    text = re.sub(r"([.!?])(\s*)(\u27e6[a-z]+\u27e7)", r" \3\1\2", text)
    for pat in _STRIP:
        text = pat.sub(" ", text)
    out = []
    for piece in _SPLIT.split(text):
        ids = []
        for m in _SENTINEL.finditer(piece):
            letters = m.group(1)
            ids += found_ids[(len(letters) - 1) * 26 + (ord(letters[0]) - ord("a"))]
        plain = re.sub(r"\s+([.!?:;,])", r"\1", " ".join(_SENTINEL.sub(" ", piece).split()))
        if not plain.strip(" .,;:|-*"):
            continue
        # a question states nothing: "will the loss rise by more or less?" needs no claim
        asks = plain.rstrip(" *").endswith("?")
        out.append(Fragment(plain, ids, not asks and bool(_DIGIT.search(plain) or _COMPARATIVE.search(plain))))
    return out


def normalize(sentence: str) -> str:
    """A sentence as :func:`fragments` reads it, for comparing a claim's statement with its fragment:
    notation removed, emphasis and end punctuation dropped, whitespace collapsed."""
    text = MARKER.sub(" ", sentence)
    for pat in _STRIP:
        text = pat.sub(" ", text)
    text = re.sub(r"[*_]", "", text)
    text = re.sub(r"\s+([.!?:;,])", r"\1", " ".join(text.split()))
    return text.strip(" .;:").lower()


def unchecked_prose(markdown: str) -> list[str]:
    """The rule for typed prose: quantitative fragments of a markdown cell that no claim checks.

    Each sentence, list item and table row is one fragment (:func:`fragments`). After removing what
    is notation or structure (code, math, headings, HTML tags and comments, link targets, list
    markers, citation years, quotations in double quotes, names that contain digits such as GPT-2,
    cross-references such as "Section 4" or "layer 12"), a fragment that still contains a digit or a
    comparative word (:data:`COMPARATIVES`, "×", "%") must carry its own marker. A marker covers only
    the fragment it is attached to, so one marker at the end of a cell no longer vouches for the
    sentences before it. A question (a fragment ending in "?") states nothing and needs no claim.
    Returns the offending fragments.
    """
    return [f.text[:160] for f in fragments(markdown) if f.quantitative and not f.ids]
