import math

import pytest
import torch

from steer.errors import InvalidInput
from steer.sampling import SamplingParams, StopStringDetokenizer, sample_tokens

# -- references: one row at a time, the plain way ------------------------------------------------

def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, top-k, then top-p on one row of logits ``(V,)``; removed entries become -inf.

    The plain full-sort reference that :func:`steer.sampling.sample_tokens` must agree with.
    ``temperature`` must be > 0 (greedy is an argmax, not a distribution). The row is shifted so
    its maximum is 0 before dividing: the result is <= 0 everywhere and cannot overflow for any
    positive temperature (softmax and the kept set do not change under a shift).
    """
    if not temperature > 0:
        raise ValueError(f"filter_logits needs temperature > 0, got {temperature!r} (greedy decoding is an argmax)")
    logits = logits.float()
    logits = (logits - logits.max()) / min(temperature, torch.finfo(torch.float32).max)
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass *before* it already reaches top_p: the most likely token stays.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick the next token id from one row of logits ``(V,)``: :func:`steer.sampling.sample_tokens`
    on a batch of one."""
    return sample_tokens(logits[None, :], [params], [generator])[0]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_new_tokens": 0}, "sampling.max_new_tokens"),
        ({"temperature": -0.1}, "sampling.temperature"),
        ({"temperature": math.nan}, "sampling.temperature"),
        ({"top_p": 0.0}, "sampling.top_p"),
        ({"top_p": 1.01}, "sampling.top_p"),
        ({"top_k": -1}, "sampling.top_k"),
        ({"seed": -1}, "sampling.seed"),
        ({"stop": ("",)}, "sampling.stop[0]"),
        ({"stop": tuple("abcdefghi")}, "sampling.stop"),
    ],
)

def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidInput) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field


def test_overrides_ignore_none():
    p = SamplingParams(max_new_tokens=10).with_overrides(max_new_tokens=None, temperature=0.0)
    assert (p.max_new_tokens, p.temperature, p.greedy) == (10, 0.0, True)


def test_top_k_and_top_p_keep_the_hand_computed_sets():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    kept = torch.isfinite(filter_logits(logits, 1.0, 2, 1.0))
    assert kept.tolist() == [True, True, False, False, False]
    # cumulative mass before each token: 0, .5, .7, .85, .95 -> top_p=0.8 keeps the first three
    kept = torch.isfinite(filter_logits(logits, 1.0, 0, 0.8))
    assert kept.tolist() == [True, True, True, False, False]
    # top_p smaller than the best token's mass still keeps the best token
    kept = torch.isfinite(filter_logits(logits, 1.0, 0, 0.1))
    assert kept.tolist() == [True, False, False, False, False]


def test_seeded_sampling_is_reproducible_and_respects_filters():
    logits = torch.randn(100)
    p = SamplingParams(temperature=1.0, top_k=3, seed=42)
    a = [sample_token(logits, p, g) for g in [p.make_generator()] for _ in range(20)]
    b = [sample_token(logits, p, g) for g in [p.make_generator()] for _ in range(20)]
    assert a == b
    assert set(a) <= set(torch.topk(logits, 3).indices.tolist())
    assert sample_token(logits, SamplingParams(temperature=0.0), p.make_generator()) == int(logits.argmax())


class CharTokenizer:
    """One token per character; id 0 decodes to nothing (a special token)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i != 0)


def feed(detok, text):
    return [detok.push(ord(c)) for c in text]


def test_detokenizer_holds_back_possible_stop_prefix_and_cuts_at_stop():
    d = StopStringDetokenizer(CharTokenizer(), stop=("END",))
    deltas = feed(d, "abcEN")
    assert "".join(deltas) == "abc"  # "EN" could start "END"
    deltas = feed(d, "Dxyz")
    assert d.stopped and d.text == "abc"
    assert "".join(deltas) == ""


def test_detokenizer_releases_false_alarm_and_flushes():
    d = StopStringDetokenizer(CharTokenizer(), stop=("END",))
    out = "".join(feed(d, "aEbENc")) + d.flush()
    assert out == "aEbENc" and not d.stopped
    plain = StopStringDetokenizer(CharTokenizer())
    assert feed(plain, "hi") == ["h", "i"]




@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 5, 1.0), (1.0, 40, 0.5), (2.0, 0, 0.999), (1.0, 300, 0.97)],
)
def test_sample_tokens_matches_the_full_sort_reference_distribution(temperature, top_k, top_p):
    """Empirical frequencies over many seeds match softmax(filter_logits(...)) (a full-sort reference).

    The (2.0, 0, 0.999) and (1.0, 300, 0.97) cases on a flat 1000-token row need more than the 256
    candidates examined first, so they exercise the full-sort fallback.
    """
    torch.manual_seed(0)
    logits = torch.randn(1000) * 0.5
    logits[:3] += 4.0  # a few likely tokens, a long flat tail
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    expected = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    draws = 6000
    gens = [torch.Generator().manual_seed(s) for s in range(draws)]
    tokens = sample_tokens(logits.expand(draws, -1), [params] * draws, gens)
    counts = torch.bincount(torch.tensor(tokens), minlength=1000).float() / draws
    assert set(tokens) <= set(torch.nonzero(expected > 0).flatten().tolist())
    # Compare on bins (the 3 likely tokens alone, the tail in 4 groups): per-token frequencies of a
    # flat 1000-token tail are too noisy at this sample size, binned ones are not (noise ~0.01).
    edges = [0, 1, 2, 3, 250, 500, 750, 1000]
    binned = lambda p: torch.stack([p[a:b].sum() for a, b in zip(edges, edges[1:])])  # noqa: E731
    assert 0.5 * (binned(counts) - binned(expected)).abs().sum() < 0.04


def test_batched_rows_equal_rows_sampled_alone():
    torch.manual_seed(1)
    logits = torch.randn(5, 300)
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, seed=i) for i, (t, k, p) in
              enumerate([(0.0, 0, 1.0), (1.0, 0, 0.9), (0.5, 10, 1.0), (1.5, 0, 0.3), (1.0, 0, 1.0)])]
    batch = sample_tokens(logits, params, [p.make_generator() for p in params])
    alone = [sample_token(logits[i], params[i], params[i].make_generator()) for i in range(5)]
    assert batch == alone
    assert batch[0] == int(logits[0].argmax())


# -- temperatures at the edges of what the contract admits -------------------------------------------

from steer.sampling import GREEDY_TEMPERATURE  # noqa: E402

TINY = [1e-45, 1e-40, 1e-38, 1e-30, 1e-300, 1e-8, 1e-6, 9.99e-6]  # below GREEDY_TEMPERATURE (subnormal float32 too)
SMALL = [GREEDY_TEMPERATURE, 2e-5, 1e-4, 1e-3]  # sampled, but a logit gap of 1 leaves only the argmax
HUGE = [1e4, 1e30, 3.4e38, 1e300]  # the last two are at and past float32's largest value


def gapped_logits(rows=4, vocab=300, seed=0):
    """Random logits whose best token beats the second by at least 1 (so tiny temperatures are argmax)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 3
    best = logits.argmax(dim=-1)
    logits[torch.arange(rows), best] = logits.max(dim=-1).values + 1.0
    return logits


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 1.0), (0, 0.5), (5, 0.5), (1, 1.0), (0, 1e-6), (300, 0.9)])
def test_extreme_temperatures_sample_valid_tokens(top_k, top_p):
    """Every temperature the contract admits gives a token; tiny ones give the argmax (the T -> 0
    limit); huge ones stay inside the top-k set. Rows of all kinds share one batch."""
    logits = gapped_logits()
    rows, vocab = logits.shape
    temperatures = TINY + SMALL + HUGE
    params = [SamplingParams(temperature=t, top_k=top_k, top_p=top_p, seed=j) for j, t in enumerate(temperatures)]
    batch = logits.repeat_interleave(len(temperatures), dim=0)  # (rows * temps, V)
    tokens = sample_tokens(batch, params * rows, [p.make_generator() for p in params * rows])
    argmax = logits.argmax(dim=-1).tolist()
    for r in range(rows):
        allowed = set(torch.topk(logits[r], top_k).indices.tolist()) if 0 < top_k < vocab else set(range(vocab))
        for j, t in enumerate(temperatures):
            token = tokens[r * len(temperatures) + j]
            assert 0 <= token < vocab and token in allowed, (t, token)
            if t < 1e-2:
                assert token == argmax[r], f"temperature {t}: got {token}, argmax is {argmax[r]}"


@pytest.mark.parametrize("temperature", [1e30, 3.4e38, 1e300])
def test_huge_temperatures_are_uniform_over_the_kept_set(temperature):
    logits = gapped_logits(rows=1, vocab=20)[0]
    for top_k, support in ((0, 20), (4, 4)):
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=1.0)
        draws = 4000
        tokens = sample_tokens(logits.expand(draws, -1), [params] * draws,
                               [torch.Generator().manual_seed(s) for s in range(draws)])
        counts = torch.bincount(torch.tensor(tokens), minlength=20)
        kept = torch.topk(logits, support).indices
        assert counts.sum() == counts[kept].sum() == draws
        expected = draws / support  # binomial sd <= sqrt(draws/support) ~ 14..32: allow ~5 sd
        assert (counts[kept].float() - expected).abs().max() < 5 * expected ** 0.5


def test_tiny_temperature_is_greedy_and_draws_nothing():
    assert SamplingParams(temperature=9e-6).greedy and not SamplingParams(temperature=GREEDY_TEMPERATURE).greedy
    logits = gapped_logits(rows=1)[0]
    params = SamplingParams(temperature=1e-38, top_k=5, top_p=0.5, seed=3)
    g = params.make_generator()
    before = g.get_state()
    assert sample_token(logits, params, g) == int(logits.argmax())
    assert torch.equal(g.get_state(), before)


@pytest.mark.parametrize("temperature", [1e-45, 1e-38, 1e-8, 1.0, 1e30, 1e300])
def test_filter_logits_reference_is_finite_at_any_positive_temperature(temperature):
    logits = gapped_logits(rows=1)[0]
    filtered = filter_logits(logits, temperature, 5, 0.9)
    assert not torch.isnan(filtered).any() and not torch.isposinf(filtered).any()
    probs = torch.softmax(filtered, dim=-1)
    assert torch.isfinite(probs).all() and abs(float(probs.sum()) - 1) < 1e-5
    if temperature < 1e-5:
        assert int(probs.argmax()) == int(logits.argmax()) and float(probs.max()) == 1.0
    with pytest.raises(ValueError, match="temperature > 0"):
        filter_logits(logits, 0.0, 0, 1.0)


@pytest.mark.parametrize("poison, what", [(float("nan"), "NaN"), (float("inf"), r"\+inf")])
def test_non_finite_logits_name_the_row_and_advance_no_generator(poison, what):
    logits = gapped_logits(rows=3)
    logits[1, 7] = poison
    params = [SamplingParams(temperature=1.0, seed=i) for i in range(3)]
    gens = [p.make_generator() for p in params]
    before = [g.get_state() for g in gens]
    with pytest.raises(ValueError, match=f"row 1 of 3 contain {what}"):
        sample_tokens(logits, params, gens)
    assert all(torch.equal(g.get_state(), b) for g, b in zip(gens, before))
    all_masked = torch.full((1, 10), float("-inf"))
    with pytest.raises(ValueError, match="no finite value"):
        sample_tokens(all_masked, [SamplingParams(temperature=0.0)], [torch.Generator()])


def test_only_rows_whose_nucleus_outgrows_the_candidates_are_fully_sorted(monkeypatch):
    """A flat row (its top-p set needs more than the 256 candidates) beside peaked ones: the flat row
    alone is sorted, it still reaches tokens past rank 256, and every row samples as it does alone."""
    torch.manual_seed(3)
    vocab = 1000
    peaked = torch.randn(vocab) * 0.5
    peaked[7] += 12.0  # nearly all the mass on one token: covered by the candidates
    flat = torch.randn(vocab) * 0.1  # top_p 0.99 of a near-uniform row spans ~990 tokens
    logits = torch.stack([peaked, flat, peaked.roll(5)])
    params = [SamplingParams(temperature=1.0, top_p=0.99, seed=s) for s in range(3)]
    sorted_rows = []
    real_sort = torch.sort

    def recording_sort(x, *args, **kwargs):
        sorted_rows.append(x.shape[0])
        return real_sort(x, *args, **kwargs)

    monkeypatch.setattr(torch, "sort", recording_sort)
    batch = sample_tokens(logits, params, [p.make_generator() for p in params])
    assert sorted_rows == [1]  # the flat row only
    monkeypatch.setattr(torch, "sort", real_sort)
    alone = [sample_token(logits[i], params[i], params[i].make_generator()) for i in range(3)]
    assert batch == alone
    draws = [sample_tokens(logits[1:2], [SamplingParams(temperature=1.0, top_p=0.99)],
                           [torch.Generator().manual_seed(s)])[0] for s in range(300)]
    ranks = torch.argsort(torch.argsort(flat, descending=True))  # rank of each token id
    assert max(int(ranks[t]) for t in draws) >= 256
