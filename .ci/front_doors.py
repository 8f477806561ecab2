"""One front door of an extra, run once inside a virtual environment that holds the wheel and that extra alone.

    python .ci/front_doors.py server|ray|cite|inseq

Run from outside the checkout (``.ci/extras`` runs it in a temporary folder), so that ``import atman``
finds the installed wheel, not the source tree. Exits non-zero, with the reason, when the door fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
# generous: a first load converts the embedded GGUF model (20-35 s on a 2-core machine), Ray starts a cluster
DEADLINE_S = 600
CONTEXT = "Doran Vesk repairs clocks in Lindhaven.\n\nMira sails to Olvereth."
QUESTION = "Where does Doran work?"
RESPONSE = "He works in Lindhaven."


def fail(message: str) -> None:
    raise SystemExit(f"front door failed: {message}")


def run_atman(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "atman"), *args], capture_output=True, text=True, cwd=cwd,
                            timeout=DEADLINE_S)
    if result.returncode != 0:
        fail(f"atman {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result


def installed_from_wheel() -> None:
    import atman as package

    if "site-packages" not in Path(package.__file__).parts:
        fail(f"atman was imported from {package.__file__}, not from the installed wheel")


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.headers.get("content-type", ""), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("content-type", ""), error.read().decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server(work: Path) -> None:
    """``atman serve`` with the embedded model answers /health, its page and an error in the documented shape."""
    port = free_port()
    log = (work / "serve.log").open("w")
    process = subprocess.Popen([str(BIN / "atman"), "serve", "--model", "smollm2", "--port", str(port)],
                               stdout=log, stderr=subprocess.STDOUT, cwd=work)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            if process.poll() is not None:
                fail(f"atman serve exited {process.returncode}:\n{(work / 'serve.log').read_text()[-4000:]}")
            if time.monotonic() > deadline:
                fail(f"atman serve did not answer /health within {DEADLINE_S} s")
            try:
                status, _, body = get(base + "/health")
                break
            except OSError:
                time.sleep(0.5)
        health = json.loads(body)
        if status != 200 or health.get("status") != "ok" or "smollm2" not in health.get("models", []):
            fail(f"/health answered {status} {body}")
        status, kind, body = get(base + "/")
        if status != 200 or not kind.startswith("text/html") or "<html" not in body.lower():
            fail(f"the page at / answered {status} {kind}")  # the page is package data of the wheel
        status, kind, body = get(base + "/no-such-endpoint")
        if status != 404 or set(json.loads(body)) != {"error", "code"}:
            fail(f"an unknown path answered {status} {body}")
        print(f"atman serve: /health {health}, the page and a 404 in the error shape")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def ray(work: Path) -> None:
    """A batch of two requests on a local Ray cluster, one JSON result per line."""
    requests = work / "requests.jsonl"
    requests.write_text(
        json.dumps({"id": "a", "prompt": CONTEXT.replace("\n\n", " ") + " " + QUESTION + " In",
                    "target": " Lindhaven", "granularity": "sentence"}) + "\n"
        + json.dumps({"id": "b", "prompt": "The capital of France is", "target": " Paris"}) + "\n")
    out = work / "results.jsonl"
    run_atman("explain", "--input", str(requests), "-o", str(out), "--ray", "--workers", "1", "-q", cwd=work)
    results = [json.loads(line) for line in out.read_text().splitlines()]
    if sorted(r.get("id") for r in results) != ["a", "b"] or any("error" in r for r in results):
        fail(f"the Ray batch wrote {results}")
    print(f"atman explain --ray: {len(results)} results")


def cite(work: Path) -> None:
    """``atman cite`` on the embedded model, then the extra's ContextCite and the surrogate fit (scikit-learn)."""
    result = run_atman("cite", "--context", CONTEXT, "-Q", QUESTION, "-r", RESPONSE, "--format", "json", cwd=work)
    citations = json.loads(result.stdout)
    if not isinstance(citations, dict) or not citations:
        fail(f"atman cite wrote {result.stdout[:400]}")
    import numpy as np

    import atman
    from atman.baselines.contextcite import contextcite_scores
    from atman.evaluate.citation import CitationTask, Sources, readout_surrogate

    lm = atman.load_model()
    first = CONTEXT.index("\n")
    sources = Sources.from_spans(CONTEXT, [(0, first), (CONTEXT.index("Mira"), len(CONTEXT))])
    task = CitationTask(sources, QUESTION, RESPONSE)
    for name, scores in (("ContextCite", contextcite_scores(lm, task, num_ablations=4)),
                         ("readout surrogate", readout_surrogate(lm, task, 8))):
        scores = np.asarray(scores)
        if scores.shape != (2,) or not np.isfinite(scores).all():
            fail(f"{name} gave {scores}")
    print("atman cite, ContextCite and the readout surrogate: one finite score per source")


def inseq(work: Path) -> None:
    """inseq's "atman" method (registered by atman.integrations.inseq) on the embedded model."""
    import inseq as package

    import atman
    import atman.integrations.inseq  # noqa: F401  registers the method

    lm = atman.load_model()
    model = package.load_model(lm.model, "atman", tokenizer=lm.tokenizer)
    prompt = "Ada lives in Oslo. Ada lives in"
    out = model.attribute(prompt, prompt + " Oslo", show_progress=False)
    scores = out.sequence_attributions[0].target_attributions
    if scores is None or scores.numel() == 0 or out.info["attribution_method"] != "atman":
        fail(f"inseq's atman method returned {out}")
    if "Oslo" not in out.show(display=False, return_html=True):
        fail("inseq's view of the attribution does not show the prompt")
    print(f"inseq atman: target attributions of shape {tuple(scores.shape)}, and its view")


DOORS = {"server": server, "ray": ray, "cite": cite, "inseq": inseq}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in DOORS:
        raise SystemExit(f"usage: python .ci/front_doors.py {'|'.join(DOORS)}")
    installed_from_wheel()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        DOORS[sys.argv[1]](Path(folder))
