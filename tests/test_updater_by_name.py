"""Updaters by flag name (updaters/by_name.py), as ``rayps train --updater`` and the benchmarks build them."""

from __future__ import annotations

import pytest

from rayps.updaters import ALL_UPDATERS, AdaDelta, Adam, NoOp, Sgd
from rayps.updaters.by_name import DEFAULT_LEARNING_RATES, UPDATERS_BY_FLAG, build_updater


def test_every_rule_has_its_lower_case_class_name_and_the_cli_offers_each():
    from rayps.deploy.train_command import UPDATER_FLAGS  # noqa: PLC0415 - kept literal there (no NumPy at startup)

    assert UPDATERS_BY_FLAG == {cls.__name__.lower(): cls for cls in ALL_UPDATERS}
    assert sorted(UPDATER_FLAGS) == sorted(UPDATERS_BY_FLAG)


@pytest.mark.parametrize("name", sorted(DEFAULT_LEARNING_RATES))
def test_the_default_learning_rate_is_the_tuned_one(name):
    updater = build_updater(name)
    assert type(updater) is UPDATERS_BY_FLAG[name]
    assert updater.learning_rate == DEFAULT_LEARNING_RATES[name]


def test_a_rule_without_a_tuned_rate_starts_from_its_dl4j_default(monkeypatch):
    monkeypatch.setitem(UPDATERS_BY_FLAG, "plainsgd", Sgd)  # an updater added without a DEFAULT_LEARNING_RATES entry
    assert build_updater("plainsgd") == Sgd(learning_rate=Sgd.defaults["learning_rate"])


def test_a_given_rate_and_a_decay_make_dl4j_s_epoch_schedule():
    updater = build_updater("adam", 0.02, lr_decay=0.5)
    assert isinstance(updater, Adam)
    assert [updater.learning_rate_at(iteration=7, epoch=e) for e in range(3)] == [0.02, 0.01, 0.005]
    assert build_updater("adam", 0.02, lr_decay=1.0).learning_rate == 0.02


def test_rules_without_a_learning_rate_take_none():
    assert build_updater("adadelta") == AdaDelta()
    assert build_updater("noop") == NoOp()
    with pytest.raises(ValueError, match="^learning_rate: AdaDelta has no learning rate$"):
        build_updater("adadelta", 0.1)


def test_an_unknown_name_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"^name: unknown updater 'adamw'; expected one of \['adabelief', "):
        build_updater("adamw")
