"""The lesson says nothing its own numbers contradict (residual_bandwidth.course.claims).

Rule for the prose (``claims.unchecked_prose``), sentence by sentence: every fragment (sentence, list
item, table row) of a typed markdown cell that states a number or a comparison carries its own marker
``<!-- claims: id -->``, unless the number is notation or structure (math, code, headings, citations,
cross-references, quotations). A marker covers only the fragment it ends, never the rest of its cell.
Generated sentences (``claims.say``) are built from the values of the cell that displays them. The
notebook is executed once per session (``executed_source`` in conftest.py) and:

* every claim holds;
* every marker names a claim that was registered, by a cell of the same numbered section (cells of the
  introduction, section 10 (claims you will meet), the accessibility notes and the summary may cite any
  section);
* a typed claim's statement is the very sentence its marker ends (in its own section), so the check
  tests that sentence and not something weaker;
* every generated claim is displayed by the cell that computed it.

The prose rule covers every markdown cell, exercise text and hints included (an exercise's
"Difficulty" line and the hint headers are structure).
"""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
from bs4 import BeautifulSoup

from residual_bandwidth.course.claims import Claims, fragments, markers, normalize, unchecked_prose
from residual_bandwidth.course import load_lesson

ROOT = Path(__file__).resolve().parents[1]
META = load_lesson()
SOURCE = ROOT / "solutions" / META.lesson_id / META.notebook
TEXT_SOURCE = ROOT / "solutions" / META.lesson_id / "lesson.py"
# cells of these parts summarise the lesson and may cite claims of any section
SUMMARY_PARTS = {"intro", "10", "Accessibility", "Summary", "Claims checked in this run"}



def parts(nb) -> list[str]:
    """The part of the notebook each cell belongs to: "intro", a section number, or a named ## heading."""
    part, out = "intro", []
    for c in nb.cells:
        if c.cell_type == "markdown":
            m = re.match(r"## (?:(\d+)\.|([^\n]+))", c.source)
            if m:
                part = m.group(1) or m.group(2).strip()
        out.append(part)
    return out


def claims_of(nb) -> dict[str, dict]:
    found = [o for c in nb.cells for o in c.get("outputs", [])
             if o.get("metadata", {}).get("claims_summary")]
    assert len(found) == 1, f"expected one claims summary output, found {len(found)}"
    # shown as a table (no JSON renderer in JupyterLab); the data rides in the output's metadata
    assert {"text/html", "text/markdown"} <= set(found[0]["data"]) and "application/json" not in found[0]["data"]
    data = found[0]["metadata"]["claims"]
    return {c["id"]: c for c in data["claims"]}


def registering_cell(nb, cid: str) -> int:
    """Index of the code cell that calls claims.say("cid", ...) or claims.check("cid", ...)."""
    pat = re.compile(r"claims\.(?:say|check)\(\s*\"" + re.escape(cid) + r"\"")
    found = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and pat.search(c.source)]
    assert len(found) == 1, f"claim {cid!r} is registered by {len(found)} cells"
    return found[0]


# ---- the executed notebook ---------------------------------------------------------------------------
def test_every_claim_holds(executed_source):
    claims = claims_of(executed_source)
    assert len(claims) >= 20, sorted(claims)
    bad = {cid: (c["statement"][:200], c["values"]) for cid, c in claims.items() if not c["holds"]}
    assert not bad, f"claims that the notebook's own numbers contradict: {bad}"


def test_markers_name_claims_registered_in_their_section(executed_source):
    claims = claims_of(executed_source)
    where = parts(executed_source)
    cited = set()
    for i, c in enumerate(executed_source.cells):
        if c.cell_type != "markdown":
            continue
        for cid in markers(c.source):
            cited.add(cid)
            assert cid in claims, f"markdown cell {i} ({where[i]}) names claim {cid!r}, which no cell registered"
            made_in = where[registering_cell(executed_source, cid)]
            if where[i] not in SUMMARY_PARTS:
                assert made_in == where[i], (f"claim {cid!r} is cited in section {where[i]} but computed in "
                                             f"section {made_in}")
    typed = {cid for cid, c in claims.items() if not c["generated"]}
    assert typed <= cited, f"checked claims that no typed sentence cites: {sorted(typed - cited)}"


def test_each_typed_claim_states_exactly_the_sentence_its_marker_ends(executed_source):
    claims = claims_of(executed_source)
    where = parts(executed_source)
    homes = {}
    for i, c in enumerate(executed_source.cells):
        if c.cell_type != "markdown":
            continue
        for f in fragments(c.source):
            for cid in f.ids:
                if cid not in claims or claims[cid]["generated"]:
                    continue
                made_in = where[registering_cell(executed_source, cid)]
                if where[i] == made_in:
                    homes.setdefault(cid, []).append(f.text)
                    assert normalize(claims[cid]["statement"]) == normalize(f.text), (
                        f"claim {cid!r} checks {claims[cid]['statement']!r}, but its marker ends the sentence "
                        f"{f.text!r}")
    typed = {cid for cid, c in claims.items() if not c["generated"]}
    assert typed <= set(homes), f"typed claims without a sentence in their own section: {sorted(typed - set(homes))}"


def test_generated_claims_are_displayed_by_the_cell_that_computed_them(executed_source):
    claims = claims_of(executed_source)
    for cid, c in claims.items():
        if not c["generated"]:
            continue
        cell = executed_source.cells[registering_cell(executed_source, cid)]
        shown = [o for o in cell.outputs if o.get("metadata", {}).get("claim") == cid]
        assert len(shown) == 1, f"claim {cid!r} is not displayed by its cell"
        text = shown[0]["data"]["text/markdown"]
        assert text.endswith(c["statement"]), cid
        # a generated sentence's numbers come from the cell: at least one number is in it
        assert re.search(r"\d", text), f"generated claim {cid!r} states no number"


def test_figures_are_described_once(executed_source):
    """Alt text names the figure; the caption holds the description: a screen reader reads it once."""
    figures = [o["data"]["text/html"] for c in executed_source.cells for o in c.get("outputs", [])
               if "text/html" in o.get("data", {}) and "<figure>" in o["data"]["text/html"]]
    assert len(figures) >= 8, len(figures)
    for page in figures:
        soup = BeautifulSoup(page, "html.parser")
        for fig in soup.find_all("figure"):
            alt = fig.find("img")["alt"]
            caption = fig.find("figcaption").get_text()
            assert alt and caption and len(caption) > len(alt), (alt, caption[:80])
            assert alt not in caption and caption not in alt, f"alt text and caption repeat each other: {alt!r}"
            assert len(alt) <= 160, f"alt text should name the figure, the caption describes it: {alt!r}"


# ---- the source, without executing it --------------------------------------------------------------
def test_typed_prose_states_no_unchecked_number_or_comparison():
    nb = nbformat.read(SOURCE, 4)
    offending = {}
    for i, c in enumerate(nb.cells):
        if c.cell_type == "markdown":      # every markdown cell, exercises and marked cells included
            found = unchecked_prose(c.source)
            if found:
                offending[f"cell {i}: {c.source.splitlines()[0][:50]}"] = found
    assert not offending, ("typed sentences with numbers or comparisons but no <!-- claims: ... --> marker "
                           f"(generate them in a code cell, or register a check): {offending}")


def test_claim_ids_are_unique_in_the_source():
    ids = re.findall(r"claims\.(?:say|check)\(\s*\"(\w+)\"", TEXT_SOURCE.read_text())
    assert ids and len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


# ---- the rule and the registry themselves (these can fail) ---------------------------------------------
@pytest.mark.parametrize("text,flagged", [
    ("The loudest vector is 162x the median.", True),
    ("One vector thousands of times larger than the rest.", True),
    ("Most pairs exceed the baseline.", True),
    ("It reads 100 % on noise.", True),
    ("This test can never fire.", True),
    ("The residual stream has no privileged basis.", False),
    ("## 3. Massive activations", False),
    ("The variance is $\\sigma_1^2 + 0.5$ and `x[0:256]`.", False),
    ("(Elhage et al. 2021) and Roy & Vetterli (2007), see Section 4 and Checkpoint 2.", False),
    ('The original lesson said "16,384 dims".', False),
    ("Without the hub it uses SmolLM2-135M, otherwise GPT-2.", False),
    ("It is 162x larger. <!-- claims: some_claim -->", False),
    ("It is 162x larger.\n<!-- claims: some_claim -->", False),
    # one marker vouches for one sentence, not for its neighbours
    ("The first is 5x larger. The second is 3x. <!-- claims: some_claim -->", True),
    ("* a list item with 12 things\n* another item <!-- claims: some_claim -->", True),
    ("| a | 12 |\n| b | 3 | <!-- claims: some_claim -->", True),
    ("The first is 5x. <!-- claims: a --> The second is 3x. <!-- claims: b -->", False),
    ("**Predict, then run.** Will the loss rise by more than 0.05 nats?", False),
])
def test_prose_rule(text, flagged):
    assert bool(unchecked_prose(text)) is flagged, unchecked_prose(text)


def test_fragments_attach_each_marker_to_its_sentence():
    fs = fragments("The first is 5x. <!-- claims: a --> Nothing here. The second is 3x larger.\n<!-- claims: b, c -->")
    assert [(f.text, f.ids, f.quantitative) for f in fs] == [
        ("The first is 5x.", ["a"], True), ("Nothing here.", [], False), ("The second is 3x larger.", ["b", "c"], True)]
    assert normalize("The **second** is 3x larger. <!-- claims: b -->") == normalize(fs[2].text)


def test_markers_are_parsed():
    assert markers("text <!-- claims: a_b, c -->\n<!--claims:d-->") == ["a_b", "c", "d"]
    assert markers("no marker") == []


def test_registry_records_values_and_flags_a_false_claim(monkeypatch):
    shown = []
    monkeypatch.setattr("residual_bandwidth.course.claims._display_markdown", lambda text, meta: shown.append((text, meta)))
    reg = Claims()
    assert reg.check("typed_one", np.bool_(True), "a typed sentence", value=np.float64(1.5)) is None
    assert reg["typed_one"].holds is True and not reg["typed_one"].generated
    reg.say("said_one", False, "It is 3x larger.", ratio=np.array([3.0]))
    assert reg["typed_one"].values == {"value": 1.5} and reg["said_one"].values == {"ratio": [3.0]}
    assert [c.id for c in reg.failed()] == ["said_one"]
    text, meta = shown[0]
    assert text.startswith("**Warning") and text.endswith("It is 3x larger.") and meta == {"claim": "said_one", "holds": False}
    with pytest.raises(ValueError, match="lower_snake_case"):
        reg.check("Bad Id", True, "x")
    with pytest.raises(TypeError, match="bool"):
        reg.check("not_bool", 1.0, "x")
    assert "| `said_one` | generated | **NO** |" in reg.table_markdown()


def test_stated_duration_covers_the_measured_reading_load(executed_source):
    """The YAML's duration is at least the reading time of every word a student reads (typed markdown, the
    sentences the cells write, what the cells print and the figures' visible captions, at 150 words per
    minute) plus the exercises' own time estimates. A figure's alt text and data table are its equivalent
    for a reader who cannot see it, read instead of the picture, so they are not added on top."""
    def n_words(text):
        return len(re.findall(r"[A-Za-z][A-Za-z'-]*", text))

    words = 0
    for c in executed_source.cells:
        if c.cell_type == "markdown":
            words += n_words(re.sub(r"<!--.*?-->", " ", c.source, flags=re.S))
        for o in c.get("outputs", []):
            data = o.get("data", {})
            if o.get("metadata", {}).get("claims_summary"):
                continue                      # the appendix table of every claim's numbers: for checking, not reading
            if o.get("output_type") == "stream":
                words += n_words(o["text"])
            elif "<figure" in data.get("text/html", ""):
                soup = BeautifulSoup(data["text/html"], "html.parser")
                words += sum(n_words(f.get_text()) for f in soup.find_all("figcaption"))
            elif "text/markdown" in data:     # generated claims and other written output
                words += n_words(data["text/markdown"])
    exercise_minutes = sum(int(m) for c in executed_source.cells if c.cell_type == "markdown"
                           for m in re.findall(r"\*\*Time:\*\* about (\d+) minutes", c.source))
    assert exercise_minutes >= 60, exercise_minutes
    needed = words / 150 + exercise_minutes
    stated = META.raw["metadata"]["execution"]["estimated_duration_minutes"]
    assert stated >= needed, (f"{words} words ({words / 150:.0f} min at 150 wpm) + {exercise_minutes} "
                              f"exercise minutes = {needed:.0f} min > the stated {stated}")
