"""The README's library examples run as a practitioner would paste them: every ```python block of
"Use the library on your own model", in order, in one namespace, on the embedded model."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def library_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("## Use the library on your own model", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_library_examples_run_in_order():
    blocks = library_blocks()
    assert len(blocks) >= 3, "the section lost its examples"
    namespace: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:   # name the block a reader would be stuck at
            raise AssertionError(f"README python block {i + 1} fails: {type(e).__name__}: {e}\n{block}") from e
    assert namespace["report"].n_rows > 0
    assert namespace["erasure"].current_attention is not None
    assert len(namespace["all_rows"]) == namespace["lm"].model.config.num_hidden_layers
