"""AttnLRP (Achtibat et al., ICML 2024) through the ``lxt`` package, in a child process of its own.

lxt's efficient AttnLRP rules patch a transformers modeling module for the whole process (norms,
gated MLPs and every attention function of the module), and lxt 2.1 imports only with transformers
4. Neither may happen in the process that runs AtMan, so this process never imports lxt: it starts
:mod:`atman.baselines.lrp_child` with the Python of a separate virtual environment (lxt 2.1,
transformers 4.52.4, this process's torch version), hands it this model's weights and config once,
and asks it for the relevance of each input. Create the environment once::

    python -m atman.baselines.lrp --setup            # at the default path, cache_dir()/lxt-venv
    python -m atman.baselines.lrp --setup DIR        # elsewhere; then ATMAN_LXT_PYTHON=DIR/bin/python

The child explains the sum of the target tokens' logits (LRP explains a logit, not a
log-probability: the softmax over the vocabulary has no relevance rule), so a token's score is its
relevance for that sum; positive = evidence for the target. Relevances add up to roughly that sum.

Example::

    >>> AttnLRP(load_model()).attribute("Ada lives in Oslo. Ada lives in", " Oslo", granularity="word")
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import venv
import weakref
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_model

from ..errors import AtmanError
from ..models import LoadedModel, cache_dir
from ..units import EncodedInput
from .base import BaselineUnavailableError, TokenMethod, target_logprob_from_logits

CHILD = Path(__file__).with_name("lrp_child.py")
ENV_VAR = "ATMAN_LXT_PYTHON"
SETUP_COMMAND = "python -m atman.baselines.lrp --setup"
# lxt 2.1's README: tested with transformers 4.52.4 (its efficient rules read ALL_ATTENTION_FUNCTIONS,
# which transformers has from 4.48; lxt's BERT rules import names that later 4.x releases removed)
LXT_REQUIREMENT = "lxt==2.1"
TRANSFORMERS_REQUIREMENT = "transformers==4.52.4"
# the model classes lxt 2.1 has AttnLRP rules for, and the transformers module it patches for each
FAMILIES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
            "Gemma3ForCausalLM": "gemma3"}
# the start-up check: log p of a probe target under the child's model against this process's, in
# nats per target token (float32 forward passes of the same weights agree to about 1e-5)
PROBE_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-3, torch.bfloat16: 0.1, torch.float16: 0.1}
PROBE_LENGTH, PROBE_TARGET = 48, 16
# lxt's two rule sets: AttnLRP (relevance through the attention weights too, by a softmax rule that
# does not conserve it) and CP-LRP (attention weights held constant: relevance only through the
# values, conserved end to end)
RULES = ("attnlrp", "cp-lrp")


def default_environment() -> Path:
    """Where ``--setup`` puts the environment when no path is given, and where it is looked for."""
    return cache_dir() / "lxt-venv"


def environment_python(path: str | os.PathLike) -> Path:
    """The Python of the virtual environment at ``path``."""
    return Path(path) / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def child_python() -> Path | None:
    """The Python that runs lxt: ``$ATMAN_LXT_PYTHON`` if set, else the default environment's, if it exists."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    python = environment_python(default_environment())
    return python if python.is_file() else None


def setup_commands(path: str | os.PathLike) -> list[list[str]]:
    """The pip installs that fill a new environment at ``path`` (after ``python -m venv``).

    torch first, pinned to this process's version (so that the child computes with the same kernels,
    and pip takes a wheel it may have locally instead of resolving a new one); lxt without its
    dependencies: it asks for torchvision, open_clip_torch and bitsandbytes for its vision and
    quantisation paths, and torchvision's wheel must match torch's build exactly (PyPI's, built for
    CUDA, fails to load with a CPU torch and then breaks transformers' own imports).
    """
    python = str(environment_python(path))
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "--quiet"]
    return [[*pip, torch_pin],
            [*pip, torch_pin, TRANSFORMERS_REQUIREMENT, "safetensors"],
            [*pip, "--no-deps", LXT_REQUIREMENT]]


def setup_environment(path: str | os.PathLike | None = None, log=print) -> Path:
    """Create the virtual environment that runs lxt (at :func:`default_environment` when ``path`` is None);
    returns its Python. Reaches the package index; takes about a minute where torch is on local disk."""
    path = Path(path) if path is not None else default_environment()
    started = time.perf_counter()
    log(f"creating {path}")
    venv.EnvBuilder(with_pip=True, clear=path.exists()).create(path)
    for command in setup_commands(path):
        log(" ".join(command[3:]))
        subprocess.run(command, check=True)
    python = environment_python(path)
    check = subprocess.run([str(python), "-I", str(CHILD), "--check"], check=True, capture_output=True, text=True)
    found = json.loads(check.stdout.splitlines()[-1])
    log(f"ready in {time.perf_counter() - started:.0f} s: {', '.join(f'{k} {v}' for k, v in found.items())}")
    if str(path) != str(default_environment()):
        log(f"use it with: export {ENV_VAR}={python}")
    return python


class _Child:
    """The lxt worker process: one JSON request a line, one JSON answer a line."""

    def __init__(self, python: Path) -> None:
        self.log = tempfile.TemporaryFile(mode="w+", prefix="atman-lxt-")
        self.process = subprocess.Popen([str(python), "-I", str(CHILD)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1)
        self._stop = weakref.finalize(self, _stop, self.process, self.log)

    def ask(self, request: dict) -> dict:
        if not self._stop.alive:
            raise AtmanError("the lxt worker ended: this method was closed")
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except OSError:  # the worker ended and closed its end
            line = ""
        if not line:
            raise AtmanError(f"the lxt worker ended (exit code {self.process.poll()}): {self.stderr_tail()}")
        answer = json.loads(line)
        if "error" in answer:
            raise AtmanError(f"the lxt worker failed: {answer['error']}")
        return answer

    def stderr_tail(self, lines: int = 5) -> str:
        self.log.seek(0)
        return " | ".join(self.log.read().strip().splitlines()[-lines:]) or "no output"

    def close(self) -> None:
        self._stop()


def _stop(process: subprocess.Popen, log) -> None:
    if process.poll() is None:
        try:
            process.stdin.close()  # the worker's loop ends at the end of its input
            process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()
    log.close()


class AttnLRP(TokenMethod):
    """AttnLRP relevance of each input token for the target's logits, computed by lxt in a child process.

    ``python``: the child environment's Python (default :func:`child_python`). ``rules``:
    ``"attnlrp"`` (the default; Achtibat et al.'s rules) or ``"cp-lrp"`` (lxt's conservative
    propagation, whose relevances add up to the target's logits). The child is started here, loads
    a copy of this model's weights, and must reproduce this model's log-probabilities on a probe
    sequence; it ends with the method (or :meth:`close`). This process's transformers modules are
    never patched.
    """

    name = "attnlrp"

    def __init__(self, model: LoadedModel, python: str | os.PathLike | None = None, rules: str = "attnlrp") -> None:
        super().__init__(model)
        if rules not in RULES:
            raise AtmanError(f"unknown rules {rules!r}; choose {' or '.join(RULES)}")
        self.rules = rules
        architecture = type(model.model).__name__
        family = FAMILIES.get(architecture)
        if family is None:
            raise BaselineUnavailableError(f"lxt has no AttnLRP rules for {architecture} "
                                           f"(it has for {', '.join(FAMILIES)})")
        found = Path(python) if python is not None else child_python()
        if found is None:
            raise BaselineUnavailableError(
                f"AttnLRP runs lxt in a virtual environment of its own (lxt 2.1 needs transformers 4); there is "
                f"none at {default_environment()}: create it with `{SETUP_COMMAND}`, or set {ENV_VAR} to the "
                "Python of one")
        if not found.is_file():
            source = "python=" if python is not None else f"{ENV_VAR}="
            raise BaselineUnavailableError(f"{source}{found} is not a file: no lxt environment there; create one "
                                           f"with `{SETUP_COMMAND} DIR` and point {ENV_VAR} at DIR/bin/python")
        self.python = found
        self._child = _Child(found)
        try:
            self.versions = self._load(model, family, architecture)
            self._probe()
        except AtmanError as exc:
            self._child.close()
            raise BaselineUnavailableError(f"AttnLRP: {exc}") from None

    def _load(self, lm: LoadedModel, family: str, architecture: str) -> dict:
        config = lm.model.config.to_dict()
        dtype = str(lm.model.dtype).removeprefix("torch.")
        with tempfile.TemporaryDirectory(prefix="atman-lxt-") as tmp:
            weights = Path(tmp) / "model.safetensors"
            save_model(lm.model, str(weights))
            answer = self._child.ask({"op": "load", "architecture": architecture, "family": family, "rules": self.rules,
                                      "config": config, "weights": str(weights), "dtype": dtype,
                                      "device": str(lm.device), "threads": torch.get_num_threads()})
        return answer["versions"]

    def _probe(self) -> None:
        vocab = self.lm.model.get_input_embeddings().num_embeddings
        ids = [(7 * i + 11) % vocab for i in range(PROBE_LENGTH)]
        start = PROBE_LENGTH - PROBE_TARGET
        child = self._child.ask({"op": "relevance", "input_ids": ids, "target_start": start})["target_logprob"]
        ours = self.target_logprob(ids, start)
        tolerance = PROBE_TOLERANCE.get(self.lm.model.dtype, 0.1) * PROBE_TARGET
        if not abs(child - ours) <= tolerance:
            raise AtmanError(f"the model in the lxt environment gives log p = {child:.4f} on the probe, this process "
                             f"{ours:.4f}: its config or weights were not carried over faithfully")

    def target_logprob(self, input_ids, target_start: int) -> float:
        """log p(target | prompt) under this process's model (the child reports its own in each answer)."""
        ids = torch.tensor([list(input_ids)], device=self.lm.device)
        with torch.no_grad():
            logits = self.lm.model(input_ids=ids, use_cache=False).logits
        return float(target_logprob_from_logits(logits, ids, target_start)[0])

    def relevance(self, encoded: EncodedInput) -> dict:
        """The child's answer for ``encoded``: ``relevance`` (one value per input position, the target's
        included), ``target_logits`` and ``target_logprob``."""
        return self.relevance_of_ids(encoded.input_ids, encoded.target_start)

    def relevance_of_ids(self, input_ids, target_start: int) -> dict:
        """:meth:`relevance` for a token sequence whose target starts at ``target_start``."""
        return self._child.ask({"op": "relevance", "input_ids": [int(i) for i in input_ids],
                                "target_start": int(target_start)})

    def source_scores(self, task) -> np.ndarray:
        """AttnLRP at source level for a citation task (:class:`atman.evaluate.citation.CitationTask`): the
        relevance of every prompt token for the response's logits, summed over each source's tokens."""
        from ..evaluate.citation import layout

        lay = layout(self.lm.tokenizer, task)
        relevance = np.asarray(self.relevance_of_ids(lay.input_ids, lay.response_start)["relevance"],
                               dtype=np.float64)
        return np.array([relevance[list(positions)].sum() for positions in lay.source_positions])

    def worker_cpu_seconds(self) -> float:
        """CPU seconds the lxt worker process has used so far (this process's clock does not see them)."""
        import psutil

        times = psutil.Process(self._child.process.pid).cpu_times()
        return times.user + times.system

    def token_scores(self, encoded: EncodedInput) -> torch.Tensor:
        return torch.tensor(self.relevance(encoded)["relevance"], dtype=torch.float64)

    def settings(self) -> dict:
        return {"rules": self.rules, "explains": "target logits", "lxt": self.versions["lxt"],
                "transformers": self.versions["transformers"]}

    def close(self) -> None:
        """End the child process (it also ends when the method is garbage-collected, or at exit)."""
        self._child.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m atman.baselines.lrp",
                                     description="Create the virtual environment in which AttnLRP runs lxt.")
    parser.add_argument("--setup", nargs="?", const="", metavar="DIR", required=True,
                        help=f"create it at DIR (default {default_environment()})")
    args = parser.parse_args(argv)
    try:
        setup_environment(args.setup or None)
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or "").strip().splitlines()[-3:]  # the import check's own words
        sys.exit(f"set-up failed: {' '.join(map(str, exc.cmd))} exited with {exc.returncode}"
                 + "".join(f"\n  {line}" for line in detail))


if __name__ == "__main__":
    main()
