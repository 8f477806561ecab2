"""The cached engine (prefix reuse) gives the naive engine's losses, on tiny models of every family."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CONFIGS, tiny_model

from atman import AtmanError, Explainer, LoadedModel, enable
from atman.budget import MemoryModel, parse_memory
from atman.schedule import batch_groups
from atman.units import EncodedInput

FAMILIES = sorted(TINY_CONFIGS)
LENGTH, N_TARGET = 14, 3


def _encoded() -> EncodedInput:
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 100, (LENGTH,), generator=generator).tolist()
    n_prompt = LENGTH - N_TARGET
    return EncodedInput(input_ids=tuple(ids), prompt="x" * n_prompt, target="y" * N_TARGET,
                        prompt_spans=tuple((i, i + 1) for i in range(n_prompt)), target_start=n_prompt,
                        target_spans=tuple((i, i + 1) for i in range(N_TARGET)))


def _multipliers() -> torch.Tensor:
    rows = torch.ones(9, LENGTH)
    rows[1, 0] = 0.1           # starts at the first position: nothing to reuse
    rows[2, 5] = 0.1
    rows[3, [6, 9]] = 0.0      # removal, two positions
    rows[4, 10] = 0.1          # the last prompt token
    rows[5, 12] = 0.1          # a target token: only the last target prediction can change
    rows[6, 3:8] = 0.5
    rows[7, 7] = 2.0           # amplification
    # row 8 left at 1: the unperturbed pass again
    return rows


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["log-additive", "multiplicative"])
def test_cached_equals_naive(family, mode):
    lm = LoadedModel(model=enable(tiny_model(family)), tokenizer=None, name=family)
    encoded, rows = _encoded(), _multipliers()
    naive = Explainer(lm, engine="naive").losses(encoded, rows, mode=mode)
    for batch_size in (None, 1, 3):
        cached = Explainer(lm, engine="cached", batch_size=batch_size).losses(encoded, rows, mode=mode)
        assert torch.allclose(cached, naive, atol=2e-6, rtol=0), (family, batch_size)
    assert torch.allclose(naive[8], naive[0])
    assert torch.allclose(naive[5, :2], naive[0, :2])
    # the perturbations matter by more than the tolerance above
    assert (naive[1:8] - naive[0]).abs().max() > 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_passes_cut_into_pieces_give_the_whole_passes_losses(family):
    """piece_tokens cuts the unperturbed pass and long row recomputations into calls that continue
    each other's cache; the losses stay those of whole passes, and progress is called between pieces."""
    from atman.engine import Engine

    lm = LoadedModel(model=enable(tiny_model(family)), tokenizer=None, name=family)
    encoded, rows = _encoded(), _multipliers()
    ids = torch.tensor([encoded.input_ids])
    targets = ids[0, -N_TARGET:]
    for readout_from in (None, 8):
        whole = Engine(lm.model).target_losses({"input_ids": ids}, targets, rows, readout_from=readout_from)
        for piece_tokens, batch_size in ((4, None), (5, 2), (1, 1)):
            engine = Engine(lm.model, piece_tokens=piece_tokens, batch_size=batch_size)
            engine.trace = []
            calls = []
            pieces = engine.target_losses({"input_ids": ids}, targets, rows, readout_from=readout_from,
                                          progress=lambda done, total, calls=calls: calls.append(done))
            assert torch.allclose(pieces, whole, atol=2e-6, rtol=0), (family, readout_from, piece_tokens)
            assert all(record.rows * record.queries <= piece_tokens for record in engine.trace)
            # the unperturbed pass alone is cut into several pieces, each followed by a check
            assert calls[:2] == [0, 0] and calls[-1] == rows.shape[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_laid_side_by_side_against_one_shared_prefix_give_each_rows_attention(family, monkeypatch):
    """Rows that share a long prefix attend to one copy of it, several rows' queries laid end to end
    under a block mask: the same losses as each row attending to its own joined copy (the eager
    kernel) and, for whole-row damping, as the naive engine."""
    from atman import manipulation
    from atman.engine import Engine
    from atman.rows import Suppression

    model = enable(tiny_model(family))
    length, tail = 100, 10
    ids = torch.randint(3, 100, (1, length), generator=torch.Generator().manual_seed(3))
    targets = ids[0, -4:]
    rows = torch.ones(12, length)
    for r in range(1, 12):
        rows[r, 7 * r:7 * r + 5] = 0.0 if r % 2 else 0.3     # damped keys inside the prefix,
        rows[r, length - tail - 1 - r % 3] = 0.2             # one within a sliding window of the tail
    late = torch.ones(6, length)
    for r in range(1, 6):
        late[r, length - tail + r] = 0.1                     # rows starting late: a long shared prefix
    eager = Engine(model, suppression=Suppression(backend="eager"))
    for share in (1, 10**9):                                 # many rows per group; one row per group
        monkeypatch.setattr(manipulation, "FOLD_SHARE", share)
        engine = Engine(model)
        readout = engine.target_losses({"input_ids": ids}, targets, rows, readout_from=length - tail)
        reference = eager.target_losses({"input_ids": ids}, targets, rows, readout_from=length - tail)
        assert torch.allclose(readout, reference, atol=2e-6, rtol=0), (family, share)
        assert (readout[1:] - readout[0]).abs().max() > 1e-4
        cached = engine.target_losses({"input_ids": ids}, targets, late)
        naive = engine.target_losses({"input_ids": ids}, targets, late, engine="naive")
        assert torch.allclose(cached, naive, atol=2e-6, rtol=0), (family, share)


def test_groups_cover_every_row_once_and_respect_limits():
    starts = [0, 50, 3, 99, 99, 40, 41, 42, 7, 120]
    def fits(count, start):
        return count <= 3 and count * (120 - start) <= 200

    groups = batch_groups(starts, 120, fits)
    assert sorted(r for g in groups for r in g) == list(range(len(starts)))
    for g in groups:
        assert len(g) == 1 or fits(len(g), min(min(starts[r] for r in g), 119))


def _cost(groups, starts, length, overhead):
    return sum(overhead + len(g) * (length - min(starts[r] for r in g)) for g in groups)


def test_groups_are_optimal_under_the_cost_model():
    import itertools

    starts = [9, 0, 4, 7, 7, 2, 11]
    length, overhead = 12, 5
    groups = batch_groups(starts, length, lambda count, start: True, overhead)
    order = sorted(range(len(starts)), key=lambda r: -starts[r])
    best = min(
        _cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)), strict=True)], starts, length, overhead)
        for n_cuts in range(len(order))
        for cuts in itertools.combinations(range(1, len(order)), n_cuts)
    )
    assert _cost(groups, starts, length, overhead) == best


def test_groups_trade_call_overhead_against_padding():
    starts = list(range(200))
    one_call = batch_groups(starts, 200, lambda count, start: True, overhead=10**6)
    assert len(one_call) == 1
    no_overhead = batch_groups(starts, 200, lambda count, start: True, overhead=0)
    assert len(no_overhead) == 200
    balanced = batch_groups(starts, 200, lambda count, start: True, overhead=32)
    assert _cost(balanced, starts, 200, 32) <= 1.1 * (sum(200 - s for s in starts) + 32)


def test_memory_budget_splits_batches_without_changing_results(monkeypatch):
    lm = LoadedModel(model=enable(tiny_model("llama")), tokenizer=None, name="llama")
    encoded, rows = _encoded(), _multipliers()
    roomy = Explainer(lm).losses(encoded, rows)
    memory = MemoryModel(lm.model)
    budget = memory.batch(1, LENGTH, LENGTH, N_TARGET + 1) + 1
    tight = Explainer(lm, max_memory=budget)
    tight.engine.trace = []
    squeezed = tight.losses(encoded, rows)
    calls = [(record.rows, record.queries) for record in tight.engine.trace]
    assert len(calls) > 3 and tight.engine.forward_calls == len(calls)
    assert tight.engine.token_forwards == sum(n * q for n, q in calls)
    for rows_, queries in calls:
        assert rows_ == 1 or memory.batch(rows_, queries, LENGTH, N_TARGET + 1) <= budget
    assert torch.allclose(squeezed, roomy, atol=2e-6)


def test_budget_holds_the_kept_prefix_and_plain_means_one_plain_pass():
    lm = LoadedModel(model=enable(tiny_model("llama")), tokenizer=None, name="llama")
    encoded, rows = _encoded(), _multipliers()
    roomy = Explainer(lm).losses(encoded, rows)
    memory = MemoryModel(lm.model)
    given = memory.batch(2, LENGTH, LENGTH, N_TARGET + 1)
    explainer = Explainer(lm, max_memory=given)
    explainer.engine.trace = []
    squeezed = explainer.losses(encoded, rows)
    batches = [(r.rows, r.queries, r.reused) for r in explainer.engine.trace[1:]]
    budgets = [explainer.engine.trace[0].budget]
    # a batch runs beside the unperturbed keys/values it reuses, which count against the budget
    assert all(n == 1 or memory.cache(kept) + memory.batch(n, q, LENGTH, N_TARGET + 1) <= given
               for n, q, kept in batches)
    # latest start first: the kept prefix only shrinks, and a batch reuses exactly what precedes it
    assert [kept for _, _, kept in batches] == sorted((kept for _, _, kept in batches), reverse=True)
    assert all(kept + q == LENGTH for _, q, kept in batches)
    assert torch.allclose(squeezed, roomy, atol=2e-6)
    lean = Explainer(lm, max_memory="plain")
    lean.engine.trace = []
    plain = lean.losses(encoded, rows)
    budgets.append(lean.engine.trace[0].budget)
    assert budgets == [given, memory.plain_forward(LENGTH)]
    assert memory.plain_forward(LENGTH) > memory.cache(LENGTH) > 0
    assert torch.allclose(plain, roomy, atol=2e-6)


def test_out_of_memory_halves_the_batch():
    lm = LoadedModel(model=enable(tiny_model("llama")), tokenizer=None, name="llama")
    encoded, rows = _encoded(), _multipliers()
    expected = Explainer(lm).losses(encoded, rows)
    sizes = []

    def fragile(module, args, kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("simulated")

    handle = lm.model.register_forward_pre_hook(fragile, with_kwargs=True)
    try:
        for engine in ("cached", "naive"):
            got = Explainer(lm, engine=engine, batch_size=8).losses(encoded, rows)
            assert torch.allclose(got, expected, atol=2e-6), engine
    finally:
        handle.remove()
    assert max(sizes) > 2 and sizes[-1] <= 2


def test_parse_memory():
    assert parse_memory("2GB") == 2 * 10**9
    assert parse_memory("512MiB") == 512 * 2**20
    assert parse_memory("1.5g") == 1_500_000_000
    assert parse_memory(1234) == 1234
    assert parse_memory(" Plain ") == "plain"
    for bad in ("lots", "-1GB", "0", "3 parsecs", "1e999", "1e400GB"):
        with pytest.raises(AtmanError):
            parse_memory(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["sdpa", "eager", "flex_attention"])
def test_cuda_losses_equal_cpu_losses(backend):
    # heads of 16 dimensions: flex attention's CUDA kernels need at least 16
    cpu = LoadedModel(model=enable(tiny_model("llama", head_dim=16)), tokenizer=None, name="llama")
    gpu = LoadedModel(model=enable(tiny_model("llama", head_dim=16).cuda()), tokenizer=None, name="llama")
    encoded, rows = _encoded(), _multipliers()
    expected = Explainer(cpu).losses(encoded, rows)
    for engine in ("cached", "naive"):
        got = Explainer(gpu, engine=engine, backend=backend).losses(encoded, rows)
        assert torch.allclose(got, expected, atol=1e-4), (engine, backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision_is_finite_and_engines_agree(dtype):
    gpu = LoadedModel(model=enable(tiny_model("llama").to("cuda", dtype)), tokenizer=None, name="llama")
    encoded, rows = _encoded(), _multipliers()
    rows[6, :4] = 0.0  # removal of the first tokens (factor 1.0): the row minimum must stay finite
    cached = Explainer(gpu, engine="cached").losses(encoded, rows)
    naive = Explainer(gpu, engine="naive").losses(encoded, rows)
    assert torch.isfinite(cached).all() and torch.isfinite(naive).all()
    assert torch.allclose(cached, naive, atol=5e-2), (cached - naive).abs().max()


def test_freed_memory_is_released_between_batches_on_cpu_only(monkeypatch):
    from atman import budget

    calls = []
    monkeypatch.setattr(budget, "_MALLOC_TRIM", lambda pad: calls.append(pad))
    lm = LoadedModel(model=enable(tiny_model("llama")), tokenizer=None, name="llama")
    encoded, rows = _encoded(), _multipliers()
    Explainer(lm, batch_size=2).losses(encoded, rows)
    cached_batches = len(calls)
    assert cached_batches >= 2
    Explainer(lm, engine="naive", batch_size=2).losses(encoded, rows)
    assert len(calls) - cached_batches == (len(rows) + 1) // 2  # one release per naive batch of 2 rows
    monkeypatch.setattr(budget, "RELEASE_BETWEEN_BATCHES", False)
    before = len(calls)
    Explainer(lm, batch_size=2).losses(encoded, rows)
    budget.release_freed_memory(torch.device("meta"))
    assert len(calls) == before
    monkeypatch.setattr(budget, "RELEASE_BETWEEN_BATCHES", True)
    budget.release_freed_memory(torch.device("meta"))  # not a CPU: nothing to trim
    assert len(calls) == before


def test_a_kept_unperturbed_pass_is_reused_by_the_next_call_on_the_same_input():
    from atman.engine import Engine

    model = enable(tiny_model("llama"))
    encoded, rows = _encoded(), _multipliers()
    ids = torch.tensor([encoded.input_ids])
    targets = ids[0, -N_TARGET:]
    engine = Engine(model)
    alone = engine.target_losses({"input_ids": ids}, targets, rows)
    engine.trace = []
    with engine.keeping_unperturbed():
        first = engine.target_losses({"input_ids": ids}, targets, rows[:4])
        passes = len(engine.trace)
        second = engine.target_losses({"input_ids": ids}, targets, torch.cat([rows[:1], rows[4:]]))
        # the second call ran no unperturbed pass (no full-length record)
        assert all(record.queries < LENGTH for record in engine.trace[passes:])
        other = ids.clone()
        other[0, 2] = (other[0, 2] + 1) % 100
        engine.target_losses({"input_ids": other}, targets, rows[:2])
        assert engine.trace[-2].queries == LENGTH   # another input: its own unperturbed pass
    assert engine._kept is None                      # released after the block
    assert torch.allclose(torch.cat([first, second[1:]]), alone, atol=2e-6, rtol=0)
