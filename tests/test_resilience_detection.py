"""Detection building blocks: exact fingerprints, majority attribution, spike judgement."""
import math

import pytest
import torch

from engine.resilience.guard import flip_bit
from engine.resilience.sdc import fingerprint, loss_bits, odd_ones_out
from engine.resilience.spikes import SpikeDetector


@pytest.mark.parametrize("dtype, bit", [(torch.float32, b) for b in (0, 7, 22, 30, 31)] +
                         [(torch.bfloat16, b) for b in (0, 7, 14, 15)])
def test_any_single_bit_flip_changes_the_fingerprint(dtype, bit):
    t = torch.randn(1000, generator=torch.Generator().manual_seed(0)).to(dtype)
    before = fingerprint(t)
    flip_bit(t, 123, bit)
    assert fingerprint(t) != before
    flip_bit(t, 123, bit)
    assert fingerprint(t) == before  # flipping back restores it exactly


def test_fingerprint_depends_only_on_the_bits():
    t = torch.randn(64, 65, generator=torch.Generator().manual_seed(1))
    assert fingerprint(t) == fingerprint(t.clone()) == fingerprint(t.t().contiguous().t())
    assert fingerprint(t[:, :63]) == fingerprint(t[:, :63].contiguous())  # odd sizes: the narrow path
    assert fingerprint(t) != fingerprint(t + 1e-7)


def test_flipping_the_exponent_msb_makes_a_huge_value():
    t = torch.tensor([1e-3])
    flip_bit(t, 0, 30)
    assert t.item() > 1e30


def test_odd_ones_out_names_the_minority_or_everyone_in_a_tie():
    assert odd_ones_out([5, 5, 7, 5]) == [2]
    assert odd_ones_out([5, 5, 5]) == []
    assert odd_ones_out([5, 7]) == [0, 1]


def test_loss_bits_are_the_exact_bits_of_the_fp32_value():
    assert loss_bits(torch.tensor(2.5)) == 0x40200000
    assert loss_bits(torch.tensor(2.5)) != loss_bits(torch.tensor(2.5).nextafter(torch.tensor(3.0)))


def test_spike_detector_waits_for_its_window_then_judges_against_the_median():
    det = SpikeDetector(window=5, loss_factor=1.5, grad_factor=10.0, sigmas=0)  # the ratio alone
    for loss in (9.0, 7.0, 5.0, 4.0, 3.5):  # the steep start never counts as a spike
        assert det.judge(loss, 1.0) is None
        det.accept(loss, 1.0)
    assert det.judge(5.5, 1.0) is None              # 5.5 < 1.5 x median 5.0
    assert "loss 8.0000 > 1.5 x median" in det.judge(8.0, 1.0)
    assert "grad norm" in det.judge(3.0, 11.0)
    assert det.judge(float("nan"), 1.0) == "loss is nan"
    assert det.judge(3.0, math.inf) == "grad norm is inf"


def test_a_noisy_fine_tuning_loss_is_no_spike_but_a_jump_beyond_its_spread_is():
    # SFT losses around 0.46, batch to batch 0.30-0.62 (the walkthrough's SFT, whose ratio-only
    # detector called 0.77 a spike four times in 100 steps and stopped the run).
    window = [0.46, 0.35, 0.58, 0.41, 0.52, 0.30, 0.62, 0.44, 0.49, 0.38]
    ratio_only, default = SpikeDetector(window=10, sigmas=0), SpikeDetector(window=10)
    for det in (ratio_only, default):
        for loss in window:
            det.accept(loss, 1.0)
    assert "1.5 x median" in ratio_only.judge(0.77, 1.0)
    assert default.judge(0.77, 1.0) is None  # median 0.45, spread 0.104: 0.77 is 3.1 spreads above
    assert "and > median + 6 x their spread 0.1038" in default.judge(1.30, 1.0)
    steady = SpikeDetector(window=10)  # a pre-training loss: the ratio decides, as before
    for loss in (3.02, 3.00, 2.99, 3.01, 2.98, 3.00, 2.97, 3.01, 2.99, 2.98):
        steady.accept(loss, 1.0)
    assert steady.judge(4.4, 1.0) is None and "1.5 x median" in steady.judge(4.6, 1.0)


def test_spike_detector_state_round_trips():
    det = SpikeDetector(window=3)
    for x in (3.0, 2.0, 1.0, 0.5):
        det.accept(x, x)
    again = SpikeDetector(window=3)
    again.load_state_dict(det.state_dict())
    assert list(again.losses) == [2.0, 1.0, 0.5] and again.judge(10.0, 1.0) == det.judge(10.0, 1.0)
