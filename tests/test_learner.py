"""Check mode: each classic mistake warns with a message saying what to change; ordinary inputs do not."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import losskit
import losskit.functional as LF
from losskit import LosskitWarning, _learner


@pytest.fixture
def checks():
    before = losskit.checks_enabled()
    losskit.set_checks(True)
    yield
    losskit.set_checks(before)


def _logits(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype) * 3


def _targets(n, c, *rest):
    return torch.randint(0, c, (n, *rest), generator=torch.Generator().manual_seed(1))


def _no_warning(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error", LosskitWarning)
        fn()


# -- the switch ---------------------------------------------------------------------------------------


def test_off_by_default_and_silent_when_off(monkeypatch):
    monkeypatch.delenv("LOSSKIT_CHECKS", raising=False)
    assert not _learner._from_environment()
    before = losskit.checks_enabled()
    losskit.set_checks(False)
    try:
        _no_warning(lambda: LF.cross_entropy(_logits(4, 5).softmax(1), _targets(4, 5)))
    finally:
        losskit.set_checks(before)


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("ON", True), ("0", False),
                                             ("", False), ("off", False)])
def test_environment_variable_values(monkeypatch, value, expected):
    monkeypatch.setenv("LOSSKIT_CHECKS", value)
    assert _learner._from_environment() is expected


def test_environment_variable_read_at_import():
    env = dict(os.environ, LOSSKIT_CHECKS="1")
    out = subprocess.run([sys.executable, "-c", "import losskit; print(losskit.checks_enabled())"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_set_checks_round_trip_and_bad_value():
    before = losskit.checks_enabled()
    try:
        losskit.set_checks(True)
        assert losskit.checks_enabled()
        losskit.set_checks(False)
        assert not losskit.checks_enabled()
    finally:
        losskit.set_checks(before)
    with pytest.raises(TypeError, match="enabled"):
        losskit.set_checks("yes")


# -- softmax applied before cross_entropy / focal_loss ------------------------------------------------


@pytest.mark.parametrize("loss", [LF.cross_entropy, LF.focal_loss])
@pytest.mark.parametrize("shape", [(6, 5), (2, 5, 3), (2, 5, 40, 30), (5,)])
def test_probabilities_given_to_a_logits_loss(checks, loss, shape):
    probs = _logits(*shape).softmax(0 if len(shape) == 1 else 1)
    target = torch.tensor(2) if len(shape) == 1 else _targets(shape[0], shape[1], *shape[2:])
    with pytest.warns(LosskitWarning, match=rf"{loss.__name__} .*already probabilities.*Pass the logits"):
        loss(probs, target)


@pytest.mark.parametrize("loss", [LF.cross_entropy, LF.focal_loss])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_do_not_warn(checks, loss, dtype):
    _no_warning(lambda: loss(_logits(64, 7, dtype=dtype), _targets(64, 7)))
    # Log-probabilities are valid logits (log_softmax is idempotent): no warning either.
    _no_warning(lambda: loss(_logits(64, 7, dtype=dtype).log_softmax(1), _targets(64, 7)))


def test_warning_points_at_the_callers_line_through_a_module(checks):
    module = losskit.nn.CrossEntropyLoss()
    with pytest.warns(LosskitWarning) as record:
        module(_logits(4, 5).softmax(1), _targets(4, 5))
    assert record[0].filename == __file__


# -- nll_loss wants log-probabilities -----------------------------------------------------------------


def test_nll_loss_given_logits(checks):
    with pytest.warns(LosskitWarning, match=r"nll_loss .*not log-probabilities.*log_softmax\(input, dim=1\)"):
        LF.nll_loss(_logits(8, 5), _targets(8, 5))


def test_nll_loss_given_probabilities(checks):
    with pytest.warns(LosskitWarning, match=r"nll_loss .*probabilities.*Pass log_softmax"):
        LF.nll_loss(_logits(8, 5).softmax(1), _targets(8, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_nll_loss_given_log_probabilities(checks, dtype):
    _no_warning(lambda: LF.nll_loss(_logits(16, 5, 3).log_softmax(1).to(dtype), _targets(16, 5, 3)))
    # A large vocabulary rounded to bfloat16: the slack grows with log(C).
    _no_warning(lambda: LF.nll_loss(_logits(4, 50_000).log_softmax(1).to(dtype), _targets(4, 50_000)))


# -- binary_cross_entropy_with_logits (and the other with-logits binary losses) want logits -----------


@pytest.mark.parametrize("loss", [LF.binary_cross_entropy_with_logits, LF.multilabel_soft_margin_loss])
def test_binary_logits_given_probabilities(checks, loss):
    target = (torch.rand(4, 4, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    with pytest.warns(LosskitWarning, match=rf"{loss.__name__} .*look like probabilities.*Pass the logits"):
        loss(_logits(4, 4).sigmoid(), target)


def test_binary_logits_given_logits(checks):
    target = (torch.rand(4, 4, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    _no_warning(lambda: LF.binary_cross_entropy_with_logits(_logits(4, 4), target))
    # Too few entries to tell small logits from probabilities.
    _no_warning(lambda: LF.binary_cross_entropy_with_logits(torch.tensor([0.2, 0.7]), torch.tensor([0.0, 1.0])))


# -- kl_div: input log-probabilities, target probabilities unless log_target --------------------------


def test_kl_div_target_in_log_space_without_log_target(checks):
    logp = _logits(4, 5).log_softmax(1)
    with pytest.warns(LosskitWarning, match="kl_div .*log-probabilities. Pass log_target=True"):
        LF.kl_div(logp, _logits(4, 5).log_softmax(1), reduction="batchmean")
    _no_warning(lambda: LF.kl_div(logp, _logits(4, 5).log_softmax(1), reduction="batchmean", log_target=True))


@pytest.mark.parametrize("transform, match", [(lambda x: x.softmax(1), "probabilities"),
                                              (lambda x: x, "raw logits")])
def test_kl_div_input_not_log_probabilities(checks, transform, match):
    with pytest.warns(LosskitWarning, match=rf"log-probabilities .*looks like {match}.*log_softmax"):
        LF.kl_div(transform(_logits(4, 5)), _logits(4, 5).softmax(1), reduction="batchmean")


def test_kl_div_ordinary_inputs(checks):
    _no_warning(lambda: LF.kl_div(_logits(4, 5).log_softmax(1), _logits(4, 5).softmax(1), reduction="batchmean"))


def test_checks_skip_empty_inputs(checks):
    _no_warning(lambda: _learner.check_logits("cross_entropy", torch.empty(0, 3), 1))
    _no_warning(lambda: _learner.check_log_probabilities("nll_loss", torch.empty(0, 3), 1))
    _no_warning(lambda: _learner.check_kl_div(torch.empty(0), torch.empty(0), log_target=False))
