"""``rayps plot updaters``: the paths come from the real updaters, and the CLI writes a PNG or fails in one line."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from rayps.deploy import cli
from rayps.deploy.updater_paths import (DEFAULT_STEPS, LEARNING_RATES, OBJECTIVES, QUADRATIC, ROSENBROCK,
                                        make_updater, trajectory, updater_paths)
from rayps.updaters import ALL_UPDATERS, Adam, Nadam, Nesterovs, NoOp, Sgd

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- the objectives --------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", [QUADRATIC, ROSENBROCK], ids=lambda o: o.name)
def test_gradient_matches_central_differences(objective):
    h = 1e-6
    for point in ([-1.2, 1.0], [0.3, -0.7], [2.0, 0.5]):
        p = np.array(point)
        numeric = [(objective.value(*(p + h * e)) - objective.value(*(p - h * e))) / (2 * h) for e in np.eye(2)]
        np.testing.assert_allclose(objective.gradient(p), numeric, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("objective", [QUADRATIC, ROSENBROCK], ids=lambda o: o.name)
def test_minimum_has_zero_gradient(objective):
    np.testing.assert_array_equal(objective.gradient(np.array(objective.minimum)), [0.0, 0.0])


def test_every_updater_has_a_learning_rate_entry_on_every_objective():
    names = {cls.__name__ for cls in ALL_UPDATERS}
    for objective in OBJECTIVES:
        assert set(LEARNING_RATES[objective]) == names
        assert LEARNING_RATES[objective]["AdaDelta"] is None
        assert LEARNING_RATES[objective]["NoOp"] is None


# -- trajectories run the real updaters --------------------------------------------------------------------


def test_sgd_first_step_is_start_minus_lr_times_gradient():
    lr = 0.09
    x, y = QUADRATIC.start
    expected = np.array([x - lr * x, y - lr * 20.0 * y])  # grad 0.5*(x^2 + 20 y^2) = (x, 20 y)
    path = trajectory(Sgd(learning_rate=lr), QUADRATIC, QUADRATIC.start, 5)
    np.testing.assert_array_equal(path[0], QUADRATIC.start)
    np.testing.assert_allclose(path[1], expected, rtol=1e-15)


def test_nesterovs_path_follows_nd4j_formula():
    lr, mu = 0.02, 0.9
    p, v = np.array(QUADRATIC.start), np.zeros(2)
    expected = [p.copy()]
    for _ in range(4):
        g = np.array([p[0], 20.0 * p[1]])
        v_prev = v.copy()
        v = mu * v - lr * g
        p = p - (mu * v_prev - (1.0 + mu) * v)
        expected.append(p.copy())
    path = trajectory(Nesterovs(learning_rate=lr, momentum=mu), QUADRATIC, QUADRATIC.start, 4)
    np.testing.assert_allclose(path, expected, rtol=1e-13)


def test_adam_first_step_is_about_lr_per_coordinate():
    # ND4J: m = 0.1 g, v = 0.001 g^2, alpha_1 = lr*sqrt(1-0.999)/(1-0.9): update = lr*sign(g) up to eps.
    lr = 0.2
    path = trajectory(Adam(learning_rate=lr), QUADRATIC, QUADRATIC.start, 1)
    np.testing.assert_allclose(path[1] - path[0], -lr * np.sign(QUADRATIC.gradient(path[0])), rtol=1e-6)


def test_nadam_first_step_shows_nd4j_uncorrected_v():
    # ND4J's Nadam bias-corrects m only: update_1 = lr * (1.9 g) / (sqrt(0.001) |g|) ~ 60.08 lr per coordinate.
    lr = 0.02
    path = trajectory(Nadam(learning_rate=lr), QUADRATIC, QUADRATIC.start, 1)
    factor = 1.9 / np.sqrt(0.001)
    np.testing.assert_allclose(path[1] - path[0], -lr * factor * np.sign(QUADRATIC.gradient(path[0])), rtol=1e-6)


def test_noop_path_is_constant():
    path = trajectory(NoOp(), ROSENBROCK, ROSENBROCK.start, 20)
    assert path.shape == (21, 2)
    np.testing.assert_array_equal(path, np.tile(ROSENBROCK.start, (21, 1)))


def test_adam_on_quadratic_gets_closer_to_the_minimum():
    path = trajectory(make_updater("Adam", QUADRATIC), QUADRATIC, QUADRATIC.start, 200)
    distance = np.hypot(path[:, 0], path[:, 1])
    assert distance[-1] < 1e-3 * distance[0]
    assert QUADRATIC.value(*path[-1]) < QUADRATIC.value(*path[0])


def test_trajectory_does_not_touch_start_and_is_deterministic():
    start = np.array(ROSENBROCK.start)
    first = trajectory(make_updater("AdaBelief", ROSENBROCK), "rosenbrock", start, 30)
    second = trajectory(make_updater("AdaBelief", ROSENBROCK), ROSENBROCK, start, 30)
    np.testing.assert_array_equal(start, ROSENBROCK.start)
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("objective", [QUADRATIC, ROSENBROCK], ids=lambda o: o.name)
def test_default_paths_stay_finite_and_in_view(objective):
    paths = updater_paths(objective, DEFAULT_STEPS)
    assert list(paths) == [cls.__name__ for cls in ALL_UPDATERS]
    for name, path in paths.items():
        assert path.shape == (DEFAULT_STEPS + 1, 2), name
        assert np.all(np.isfinite(path)), name
        assert objective.x_range[0] <= path[:, 0].min() and path[:, 0].max() <= objective.x_range[1], name
        assert objective.y_range[0] <= path[:, 1].min() and path[:, 1].max() <= objective.y_range[1], name
        if name != "NoOp":
            assert objective.value(*path[-1]) < objective.value(*path[0]), name


@pytest.mark.parametrize("steps", [-1, 2.5, True])
def test_trajectory_rejects_bad_steps(steps):
    with pytest.raises(ValueError, match="steps must be an integer >= 0"):
        trajectory(Sgd(), QUADRATIC, QUADRATIC.start, steps)


def test_trajectory_rejects_unknown_objective_and_bad_start():
    with pytest.raises(ValueError, match="objective must be an Objective or one of"):
        trajectory(Sgd(), "himmelblau", (0.0, 0.0), 1)
    with pytest.raises(ValueError, match=r"start must be a point \(x, y\)"):
        trajectory(Sgd(), QUADRATIC, (0.0, 0.0, 0.0), 1)


# -- the CLI ---------------------------------------------------------------------------------------------


def test_cli_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "paths.png"
    assert cli.main(["plot", "updaters", "--out", str(out), "--steps", "50"]) == 0
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    assert str(out) in capsys.readouterr().out


def _one_line_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("rayps plot: error: ")
    return lines[0]


def test_cli_missing_out_directory_is_exit_2(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "missing" / "paths.png"
    assert cli.main(["plot", "updaters", "--out", str(out), "--steps", "5"]) == 2
    assert "does not exist" in _one_line_error(capsys)
    assert not out.exists()


def test_cli_unwritable_out_is_exit_2(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "taken.png"
    out.mkdir()  # a directory where the file should go: unwritable even for root
    assert cli.main(["plot", "updaters", "--out", str(out), "--steps", "5"]) == 2
    assert "cannot write" in _one_line_error(capsys)


def test_cli_unknown_suffix_is_exit_2(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert cli.main(["plot", "updaters", "--out", str(tmp_path / "paths.txt"), "--steps", "5"]) == 2
    assert ".png" in _one_line_error(capsys)


def test_cli_rejects_non_positive_steps(tmp_path, capsys):
    assert cli.main(["plot", "updaters", "--out", str(tmp_path / "p.png"), "--steps", "0"]) == 2
    assert "--steps must be >= 1, got 0" in _one_line_error(capsys)


def test_cli_unknown_figure_is_an_argparse_error(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plot", "schedules", "--out", str(tmp_path / "p.png")])
    assert exit_info.value.code == 2


def test_cli_without_matplotlib_prints_the_install_hint(tmp_path, capsys, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    assert cli.main(["plot", "updaters", "--out", str(tmp_path / "p.png"), "--steps", "5"]) == 2
    assert 'pip install "rayps[plot]"' in _one_line_error(capsys)
    assert not (tmp_path / "p.png").exists()
