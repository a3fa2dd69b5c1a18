"""Sampling and stop strings (`seftc.runtime.sampling`): pure functions, tested directly."""
import pytest
import torch
from pydantic import ValidationError

from seftc.runtime.sampling import SamplingParams, find_stop, held_back, make_generator, sample, top_p_filter


def test_temperature_zero_is_argmax_and_draws_nothing():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    gen = make_generator(0)
    state = gen.get_state().clone()
    assert sample(logits, SamplingParams(temperature=0.0), gen) == 1
    assert torch.equal(gen.get_state(), state)


def test_same_seed_same_draws_other_seed_differs():
    logits = torch.zeros(1000)
    params = SamplingParams(temperature=1.0)
    draws = lambda seed: [sample(logits, params, g) for g in [make_generator(seed)] for _ in range(8)]  # noqa: E731
    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = top_p_filter(probs, 0.7)  # 0.5 alone < 0.7; 0.5 + 0.3 reaches it
    torch.testing.assert_close(kept, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert torch.equal(top_p_filter(probs, 1.0), probs)
    top = top_p_filter(probs, 1e-6)  # the most likely token always stays
    assert top.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_top_p_sampling_never_draws_a_filtered_token():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.09, 0.01]))
    gen = make_generator(1)
    params = SamplingParams(temperature=1.0, top_p=0.8)
    assert {sample(logits, params, gen) for _ in range(200)} == {0, 1}


def test_low_temperature_concentrates_on_the_top_token():
    logits = torch.tensor([1.0, 0.5, 0.0])
    gen = make_generator(2)
    cold = [sample(logits, SamplingParams(temperature=0.05), gen) for _ in range(100)]
    assert set(cold) == {0}


def test_find_stop_earliest_of_several():
    assert find_stop("abc STOP def END", ["END", "STOP"]) == 4
    assert find_stop("nothing here", ["END"]) is None
    assert find_stop("x", []) is None


@pytest.mark.parametrize("text, stops, n", [
    ("hello wor", ["world"], 3),  # "wor" may become "world"
    ("hello", ["world"], 0),
    ("abab", ["abc"], 2),
    ("a\n", ["\n\n", "xyz"], 1),
    ("", ["x"], 0),
])
def test_held_back_is_the_longest_suffix_that_starts_a_stop(text, stops, n):
    assert held_back(text, stops) == n


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(temperature=2.5), dict(top_p=0.0), dict(top_p=1.1),
                                 dict(max_tokens=0), dict(unknown=1)])
def test_params_are_validated(bad):
    with pytest.raises(ValidationError):
        SamplingParams(**bad)
