"""Loading: from_pretrained arguments, wrapping a loaded model, models split across devices and disk,
and names that match nothing failing at once without a network."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import atman
from atman import Explainer, ModelLoadError, Steerer, TextControl, load_model

PROMPT = "Ada lives in Oslo. Bo lives in Rome. Where does Ada live? In"
TARGET = " Oslo, Norway"
ROOT = Path(__file__).resolve().parent.parent
# every module of the tiny Llama but one layer on the CPU; that layer goes to disk (accelerate's hooks
# bring its weights to the CPU for each forward)
CPU_AND_DISK = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                "model.layers.1": "disk", "model.layers.2": "cpu", "model.norm": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2.tokenizer


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory) -> Path:
    """A tiny random-init Llama with SmolLM2's tokenizer, saved as a model directory."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _scores(lm, **options) -> list[tuple[int, str, float]]:
    """(target token, unit, score) of a per-target-token, word-level explanation."""
    explanation = Explainer(lm).explain(PROMPT, TARGET, granularity="word", target_granularity="token", **options)
    return [(index, item.text, item.score) for index, target in enumerate(explanation.explanations)
            for item in target.items]


def _assert_same_scores(first, second, tolerance: float) -> None:
    assert [(index, text) for index, text, _ in first] == [(index, text) for index, text, _ in second]
    assert [score for *_, score in first] == pytest.approx([score for *_, score in second], abs=tolerance)


# --- Hugging Face conventions -----------------------------------------------------------------


def test_a_loaded_model_is_wrapped_without_reloading(tokenizer, saved, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(saved)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", None)  # any reload would fail
    lm = load_model(model, tokenizer=tokenizer)
    assert lm.model is model and lm.tokenizer is tokenizer and lm.name == saved.name
    assert model.config._attn_implementation == "atman" and not model.training
    monkeypatch.undo()
    assert _scores(lm) == _scores(load_model(saved))


def test_wrapping_keeps_or_changes_dtype_and_device_as_asked(tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    assert load_model(model, tokenizer=tokenizer).model.dtype == torch.float32
    assert load_model(model, tokenizer=tokenizer, dtype="bfloat16", device="cpu").model.dtype == torch.bfloat16


def test_wrapping_refuses_what_it_cannot_honour(tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    with pytest.raises(ModelLoadError, match="needs its tokenizer"):
        load_model(model)
    with pytest.raises(ModelLoadError, match="used as it is"):
        load_model(model, tokenizer=tokenizer, device_map="auto")
    with pytest.raises(ModelLoadError, match="used as it is"):
        load_model(model, tokenizer=tokenizer, revision="main")
    with pytest.raises(ModelLoadError, match="model object"):
        load_model("smollm2", tokenizer=tokenizer)


def test_from_pretrained_arguments_are_passed_on(saved, monkeypatch):
    calls = {}
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        original = cls.from_pretrained

        def spy(name, *args, _original=original, _cls=cls, **kwargs):
            calls[_cls.__name__] = kwargs
            return _original(name, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    load_model(str(saved), revision="main", trust_remote_code=False, token=False, local_files_only=True,
               attn_implementation="eager", torch_dtype=torch.float16)
    assert calls["AutoModelForCausalLM"] == {"dtype": torch.float16, "revision": "main", "trust_remote_code": False,
                                             "token": False, "local_files_only": True,
                                             "attn_implementation": "eager"}
    assert calls["AutoTokenizer"] == {"revision": "main", "trust_remote_code": False, "token": False,
                                      "local_files_only": True}


def test_dtype_spellings(saved):
    assert load_model(str(saved), dtype="bfloat16").model.dtype == torch.bfloat16
    assert load_model(str(saved), dtype=torch.float16).model.dtype == torch.float16
    assert load_model(str(saved), dtype="auto").model.dtype == torch.float32  # the checkpoint's
    with pytest.raises(ModelLoadError, match="not both"):
        load_model(str(saved), dtype="float16", torch_dtype=torch.float16)
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(str(saved), dtype="float8")


# --- models bigger than one device -------------------------------------------------------------


def test_a_model_split_between_cpu_and_disk_gives_the_scores_of_the_whole_model(saved, tmp_path):
    whole = load_model(str(saved))
    split = load_model(str(saved), device_map=CPU_AND_DISK, offload_folder=tmp_path / "offload")
    assert split.model.hf_device_map == CPU_AND_DISK
    offloaded = split.model.model.layers[1]
    assert hasattr(offloaded, "_hf_hook")  # accelerate's hook loads the layer for each forward
    assert {param.device.type for param in offloaded.parameters()} == {"meta"}
    _assert_same_scores(_scores(split), _scores(whole), 1e-6)
    _assert_same_scores(_scores(split, mode="multiplicative"), _scores(whole, mode="multiplicative"), 1e-6)


def test_steering_works_on_a_split_model(saved, tmp_path):
    whole = load_model(str(saved))
    split = load_model(str(saved), device_map=CPU_AND_DISK, offload_folder=tmp_path / "offload")
    controls = [TextControl(0, 18, 0.0)]
    assert (Steerer(split).generate(PROMPT, controls, max_new_tokens=4).text
            == Steerer(whole).generate(PROMPT, controls, max_new_tokens=4).text)


def test_device_map_auto_and_max_memory_are_accepted(saved, tmp_path):
    lm = load_model(str(saved), device_map="auto", max_memory={"cpu": "1GiB"}, offload_folder=tmp_path)
    _assert_same_scores(_scores(lm), _scores(load_model(str(saved))), 1e-6)
    # the embeddings (6 MB) and the largest layer accelerate keeps room for do not fit in 8 MB
    with pytest.raises(ModelLoadError, match="input embeddings"):
        load_model(str(saved), device_map="auto", max_memory={"cpu": "8MB"}, offload_folder=tmp_path)
    with pytest.raises(ModelLoadError, match="not both"):
        load_model(str(saved), device="cpu", device_map="auto")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the split is across the GPU and the CPU")
def test_a_model_split_across_gpu_and_cpu_gives_the_scores_of_the_whole_model(saved):
    whole = load_model(str(saved))
    across = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
              "model.layers.2": 0, "model.norm": 0, "lm_head": 0}
    split = load_model(str(saved), device_map=across)
    assert split.model.model.layers[1].self_attn.q_proj.weight.device.type == "cpu"
    assert split.model.model.layers[0].self_attn.q_proj.weight.device.type == "cuda"
    _assert_same_scores(_scores(split), _scores(whole), 1e-4)


# --- names that match nothing ------------------------------------------------------------------


class _CountingRefuser:
    """A TCP endpoint that counts connections and closes each at once: a hub that cannot answer."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            connection.close()


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    environment |= {"PYTHONPATH": str(ROOT), **env}
    # the timeout only guards against a hang; one hub lookup without retries takes well under it
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                          timeout=120, cwd=ROOT)


def test_a_mistyped_name_fails_with_a_suggestion_when_offline():
    # more than one slip from 'smollm2', so it is looked up (a slip is refused before any lookup, below)
    result = _run("import sys; from atman.cli import main; sys.exit(main(['explain', '--model', 'smol', "
                  "'Ada lives in', '-t', ' Oslo']))", HF_HUB_OFFLINE="1")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "offline" in lines[0] and "did you mean 'smollm2'?" in lines[0]


def test_a_slip_of_an_alias_fails_before_torch_loads():
    # the command checks the name before the heavy imports: no torch, no transformers, no hub lookup
    result = _run("import sys; from atman.cli import main; code = main(['explain', '--model', 'smolm2', "
                  "'Ada lives in', '-t', ' Oslo']); print(sorted({'torch', 'transformers'} & set(sys.modules))); "
                  "sys.exit(code)")
    assert result.returncode == 2 and result.stdout.strip() == "[]", result.stderr
    assert "did you mean 'smollm2'?" in result.stderr


def test_a_mistyped_name_asks_an_unreachable_hub_once():
    hub = _CountingRefuser()
    result = _run("import atman\ntry:\n    atman.load_model('gemma3')\nexcept atman.ModelLoadError as e:\n"
                  "    print(e)", HF_ENDPOINT=f"http://127.0.0.1:{hub.port}")
    assert result.returncode == 0, result.stderr
    assert "cannot be reached" in result.stdout and "did you mean 'gemma3-270m'?" in result.stdout
    # one lookup, no retries (the HTTP client itself reconnects once when a connection drops; the hub
    # client's retries made 7 connections here)
    assert hub.connections <= 2


def _hub_cache(saved: Path, cache: Path, repo: str = "atman-test/tiny-llama") -> Path:
    """``saved`` laid out as the hub client's cache holds a downloaded model."""
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for file in saved.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    return cache


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "unreachable"])
def test_a_cached_hub_model_loads_without_the_hub(saved, tmp_path, offline):
    cache = _hub_cache(saved, tmp_path / "hub")
    hub = _CountingRefuser()
    env = {"HF_HUB_CACHE": str(cache)} | (
        {"HF_HUB_OFFLINE": "1"} if offline == "HF_HUB_OFFLINE" else {"HF_ENDPOINT": f"http://127.0.0.1:{hub.port}"})
    result = _run("import atman; print(atman.load_model('atman-test/tiny-llama').name)", **env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "atman-test/tiny-llama"
    assert hub.connections <= (0 if offline == "HF_HUB_OFFLINE" else 2)


def test_a_slip_of_an_embedded_name_fails_at_once_without_the_hub():
    hub = _CountingRefuser()
    result = _run("import sys; from atman.cli import main; sys.exit(main(['explain', '--model', 'smolm2', "
                  "'Ada lives in', '-t', ' Oslo']))", HF_ENDPOINT=f"http://127.0.0.1:{hub.port}")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "did you mean 'smollm2'?" in lines[0], lines
    assert hub.connections == 0


@pytest.mark.parametrize("name, alias", [
    ("smolm2", "smollm2"), ("smollm", "smollm2"), ("SmolLM2", "smollm2"), ("smlolm2", "smollm2"),
    ("smollm3", "smollm2"), ("gemma-3-270m", "gemma3-270m"), ("Gemma3-270M", "gemma3-270m"),
    ("gemma3-207m", "gemma3-270m"), ("gema-3-270m", "gemma3-270m"),
])
def test_slips_of_embedded_names_are_refused_before_any_lookup(name, alias, monkeypatch, tmp_path):
    asked = []
    monkeypatch.setattr(huggingface_hub, "model_info", lambda repo, **_: asked.append(repo))
    with pytest.raises(ModelLoadError, match=f"no model '{name}'.*has an owner.*did you mean '{alias}'\\?$"):
        load_model(name, cache_dir=str(tmp_path))
    assert asked == []


def _unreachable_hub(monkeypatch) -> list[str]:
    """The names looked up on a hub that cannot be reached (connection refused)."""
    asked = []

    def refuse(repo, **_):
        asked.append(repo)
        raise ConnectionRefusedError("refused")

    monkeypatch.setattr(huggingface_hub, "model_info", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)
    return asked


@pytest.mark.parametrize("name", ["HuggingFaceTB/smolm2", "smollm2-360m", "gemma3", "gpt2"])
def test_hub_ids_and_names_further_off_are_looked_up(name, monkeypatch, tmp_path):
    asked = _unreachable_hub(monkeypatch)
    with pytest.raises(ModelLoadError, match="cannot be reached") as caught:
        load_model(name, cache_dir=str(tmp_path))
    assert asked == [name] and "has an owner" not in str(caught.value)


def test_a_cached_model_named_like_a_slip_loads(saved, tmp_path, monkeypatch):
    cache = _hub_cache(saved, tmp_path / "hub", repo="smolm2")
    asked = _unreachable_hub(monkeypatch)
    assert load_model("smolm2", cache_dir=str(cache)).name == "smolm2"
    assert asked == ["smolm2"]


def test_suggestions_name_the_close_embedded_models():
    with pytest.raises(ModelLoadError, match="did you mean 'smollm2'"):
        load_model("./smollm2.gguf")
    with pytest.raises(ModelLoadError, match="not an embedded model, a file, a directory or a hub id"):
        load_model("two words")
    assert atman.names.EMBEDDED_MODELS == ("smollm2", "gemma3-270m")


def test_the_server_works_on_a_split_model(saved, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from atman.server import Limits, create_app

    body = {"model": "tiny", "prompt": PROMPT, "target": " Oslo", "prompt_granularity": {"type": "word"}}
    answers = []
    for lm in (load_model(str(saved)),
               load_model(str(saved), device_map=CPU_AND_DISK, offload_folder=tmp_path / "offload")):
        with TestClient(create_app({"tiny": lm}, limits=Limits(max_prompt_tokens=lm.context_length))) as client:
            response = client.post("/explain", json=body)
        assert response.status_code == 200, response.text
        answers.append([score for item in response.json()["explanations"][0]["items"] for score in item["scores"]])
    assert [(s["start"], s["length"]) for s in answers[1]] == [(s["start"], s["length"]) for s in answers[0]]
    assert [s["score"] for s in answers[1]] == pytest.approx([s["score"] for s in answers[0]], abs=1e-6)
