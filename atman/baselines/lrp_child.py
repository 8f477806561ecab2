"""The AttnLRP worker: runs lxt in a virtual environment of its own, never in the process running AtMan.

lxt (Achtibat et al., "AttnLRP", ICML 2024) implements its efficient rules by monkey patching a
transformers modeling module for the whole process (the norms, the gated MLP and every attention
function of ``ALL_ATTENTION_FUNCTIONS``), and lxt 2.1 imports only with transformers 4 (it reads
``transformers.modeling_attn_mask_utils``, which transformers 5 removed). So :mod:`atman.baselines.lrp`
starts this file with the Python of a separate environment (``python -m atman.baselines.lrp --setup``
builds it) and talks to it in JSON lines. The file imports nothing from atman: it runs under that
environment's transformers, not the parent's.

Requests on stdin, one JSON object a line; each gets one JSON line on stdout:

* ``{"op": "load", "architecture": "LlamaForCausalLM", "family": "llama", "rules": "attnlrp",
  "config": {...}, "weights": "model.safetensors", "dtype": "float32", "device": "cpu", "threads": 2}``:
  patch ``transformers.models.<family>.modeling_<family>`` with lxt's rules for that family
  (``attnlrp``, or ``cp-lrp``: lxt's CP-LRP, no relevance through the attention weights), build the
  model from the parent's config (translated to this transformers version) and load the parent's
  weights; answers the versions in use.
* ``{"op": "relevance", "input_ids": [...], "target_start": k}``: AttnLRP relevance of every input
  position for the sum of the target tokens' logits (each target token's logit at the position that
  predicts it), computed as lxt prescribes: input embeddings x gradient after one backward pass of
  the patched model. Answers ``relevance`` (one value per input position), ``target_logits`` and
  ``target_logprob`` (log p(target), summed, from the same forward pass).

An error answers ``{"error": "..."}``. ``python lrp_child.py --check`` imports lxt and prints the
versions (the set-up command's last step).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
import warnings

import torch
import transformers


def import_lxt():
    """``lxt.efficient.monkey_patch``, imported without torchvision.

    Importing lxt imports every family it has rules for, torchvision's ViT among them
    (``from torchvision.models import vision_transformer``, read for ``vision_transformer.nn``). The
    torchvision wheels on PyPI are built against CUDA torch and fail to load with a CPU torch, and the
    language models need nothing of it, so while lxt imports (and only then) a module that names
    ``torch.nn`` stands in for it when torchvision is not installed. transformers is imported first:
    it checks once, at import, whether torchvision is installed, and must see that it is not.
    """
    import transformers.models.llama.modeling_llama  # noqa: F401  (transformers' package checks run now)

    stand_in = {}
    if importlib.util.find_spec("torchvision") is None:
        names = ("torchvision", "torchvision.models", "torchvision.models.vision_transformer")
        stand_in = {name: types.ModuleType(name) for name in names}
        stand_in["torchvision.models.vision_transformer"].nn = torch.nn
        stand_in["torchvision"].models = stand_in["torchvision.models"]
        stand_in["torchvision.models"].vision_transformer = stand_in["torchvision.models.vision_transformer"]
        sys.modules.update(stand_in)
    try:
        with warnings.catch_warnings():
            # zennit serves lxt's vision rules only
            warnings.filterwarnings("ignore", message=".*zennit.*")
            from lxt.efficient import monkey_patch
    finally:
        for name in stand_in:
            sys.modules.pop(name, None)
    return monkey_patch


def versions() -> dict:
    from importlib.metadata import version

    return {"lxt": version("lxt"), "transformers": transformers.__version__, "torch": torch.__version__,
            "python": sys.version.split()[0]}


def translate_config(config: dict) -> dict:
    """A config written by transformers 5 in the terms of transformers 4.

    transformers 5 gathers the rotary settings in ``rope_parameters`` (per layer type for models with
    sliding layers); transformers 4 reads ``rope_theta`` and ``rope_scaling`` (and, for Gemma 3,
    ``rope_local_base_freq`` for the sliding layers). Without this the model would silently run with
    the default base frequency. The parent checks the logits of the loaded model against its own.
    """
    out = {key: value for key, value in config.items() if key not in ("dtype", "torch_dtype", "transformers_version")}
    rope = out.pop("rope_parameters", None)
    if isinstance(rope, dict):
        if "full_attention" in rope or "sliding_attention" in rope:
            full = rope.get("full_attention") or {}
            sliding = rope.get("sliding_attention") or {}
            if "rope_theta" in sliding:
                out["rope_local_base_freq"] = sliding["rope_theta"]
            rope = full
        if "rope_theta" in rope:
            out.setdefault("rope_theta", rope["rope_theta"])
        scaling = {key: value for key, value in rope.items() if key != "rope_theta"}
        if scaling.get("rope_type", "default") != "default":
            out["rope_scaling"] = scaling
    return out


class Worker:
    def __init__(self) -> None:
        self.model = None
        self.monkey_patch = None

    def load(self, request: dict) -> dict:
        from safetensors.torch import load_model

        if self.model is not None:
            raise ValueError("a model is loaded already")
        self.monkey_patch = self.monkey_patch or import_lxt()
        family = request["family"]
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        rules = importlib.import_module(f"lxt.efficient.models.{family}")
        self.monkey_patch(module, patch_map={"attnlrp": rules.attnLRP, "cp-lrp": rules.cp_LRP}[request["rules"]])
        cls = getattr(module, request["architecture"])
        config = cls.config_class.from_dict(translate_config(request["config"]))
        torch.set_num_threads(int(request.get("threads") or torch.get_num_threads()))
        dtype = getattr(torch, request.get("dtype", "float32"))
        model = cls._from_config(config, torch_dtype=dtype, attn_implementation="sdpa")
        missing, unexpected = load_model(model, request["weights"], strict=False)
        if missing or unexpected:
            raise ValueError(f"the weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.to(request.get("device", "cpu")).eval()
        for param in model.parameters():
            param.requires_grad_(False)
        self.model = model
        return {"versions": versions(), "patched": module.__name__, "rules": request["rules"]}

    def relevance(self, request: dict) -> dict:
        if self.model is None:
            raise ValueError("no model loaded: send a load request first")
        model = self.model
        device = next(model.parameters()).device
        ids = torch.tensor([request["input_ids"]], device=device)
        start = int(request["target_start"])
        if not 0 < start < ids.shape[1]:
            raise ValueError(f"target_start {start} outside 1..{ids.shape[1] - 1}")
        embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeddings, use_cache=False).logits[0]
        targets = ids[0, start:]
        predicting = logits[start - 1:-1]
        target_logits = predicting.gather(-1, targets[:, None])[:, 0]
        logprob = torch.log_softmax(predicting.detach().float(), dim=-1).gather(-1, targets[:, None]).sum()
        # lxt's rules turn the gradient into relevance: the output's relevance starts as its value
        target_logits.sum().backward()
        relevance = (embeddings * embeddings.grad).float().sum(-1)[0]
        return {"relevance": relevance.tolist(), "target_logits": target_logits.detach().float().tolist(),
                "target_logprob": float(logprob)}


def serve(stdin, stdout) -> None:
    worker = Worker()
    for line in stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            op = request.get("op")
            if op == "load":
                answer = worker.load(request)
            elif op == "relevance":
                answer = worker.relevance(request)
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as exc:  # every failure goes back to the parent as an answer
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        stdout.write(json.dumps(answer) + "\n")
        stdout.flush()


def main() -> None:
    protocol = sys.stdout
    # whatever a library prints must not mix with the answers
    sys.stdout = sys.stderr
    if sys.argv[1:] == ["--check"]:
        import_lxt()
        protocol.write(json.dumps(versions()) + "\n")
        return
    serve(sys.stdin, protocol)


if __name__ == "__main__":
    main()
