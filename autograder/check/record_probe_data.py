"""Record the real-model inputs of the out-of-kernel probes (run once; the result is committed).

``python -m autograder.check.record_probe_data`` loads the embedded model (SmolLM2-135M), runs one
paragraph through it and saves ``resid_post`` of blocks 3 and 6 (62 positions x 576, float16) to
``autograder/data/smollm2_resid_post.npz``. The probes use them as they are (no model at grading
time, so grading stays fast): Checkpoint 2 must find the massive positions of a real layer, and
Checkpoint 1 must report the pooled rank of two real layers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / "data" / "smollm2_resid_post.npz"
PROMPT = ("The residual stream is a shared channel: every attention head and every MLP reads from it and adds "
          "its output back, so the width of the stream limits how much the layers can say to each other. "
          "Some positions carry far more energy than the rest, and a few heads seem to erase what they read.")
LAYERS = (3, 6)


def record(path: Path = DATA) -> Path:
    """Capture and save the layers (needs the embedded model)."""
    import torch
    from residual_bandwidth import capture_residuals, load_model
    torch.set_num_threads(1)
    m = load_model("embedded")
    cap = capture_residuals(m.model, m.tokenizer, [PROMPT], kinds=("resid_post",), layers=list(LAYERS), progress=False)
    arrays = {f"layer{layer}": cap.get("resid_post", layer).numpy().astype(np.float16) for layer in LAYERS}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, model=np.array(m.name if hasattr(m, "name") else "embedded"), prompt=np.array(PROMPT),
                        **arrays)
    return path


def load(path: Path = DATA) -> dict[int, np.ndarray]:
    """The recorded layers as float32 arrays, by block index."""
    with np.load(path) as z:
        return {layer: z[f"layer{layer}"].astype(np.float32) for layer in LAYERS}


if __name__ == "__main__":
    print(record())
