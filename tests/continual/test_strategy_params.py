"""Strategy hyper-parameters set by name, as the command line does."""

import pytest

from everseg.learn.strategies import LwF, PLOP, Replay, build_strategies, strategy_parameters


def test_params_reach_the_right_strategy_with_the_default_type():
    replay, plop = build_strategies("plop+replay", {"plop.pod_weight": "0.05", "plop.scales": "1,2",
                                                     "replay.fraction": 0.25})
    assert isinstance(replay, Replay) and isinstance(plop, PLOP)
    assert plop.pod_weight == 0.05 and plop.scales == (1, 2) and replay.fraction == 0.25
    (lwf,) = build_strategies("lwf", {"lwf.weight": "5"})
    assert isinstance(lwf, LwF) and lwf.weight == 5.0 and isinstance(lwf.weight, float)
    assert strategy_parameters("lwf") == {"weight": 1.0, "temperature": 2.0}


@pytest.mark.parametrize("spec, params, message", [
    ("lwf", {"mib.distill_weight": "1"}, "not one of this run's strategies"),
    ("lwf", {"lwf.alpha": "1"}, "lwf takes"),
    ("lwf", {"lwf.weight": "lots"}, "expected a float"),
    ("finetune", {"lwf.weight": "1"}, "no hyper-parameters"),
    ("mib", {"mib.distill_weight": "-1"}, "must be a finite number >= 0"),
    ("mib", {"mib.distill_weight": "nan"}, "must be a finite number >= 0"),
    ("lwf", {"lwf.weight": float("inf")}, "must be a finite number >= 0"),
    ("ewc", {"ewc.max_batches": -2}, "must be a finite number >= 0"),
])
def test_bad_params_are_refused_by_name(spec, params, message):
    with pytest.raises(ValueError, match=message):
        build_strategies(spec, params)


def test_the_default_strategy_depends_on_whether_classes_are_added():
    from everseg.learn.strategies import build_strategies, default_strategy

    assert [s.name for s in build_strategies(default_strategy(True))] == ["mib"]
    assert [s.name for s in build_strategies(default_strategy(False))] == ["replay", "reptile"]
