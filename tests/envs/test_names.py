"""Short names resolve to the newest registered environment; unknown names get suggestions."""

from __future__ import annotations

import ale_py
import gymnasium as gym
import pytest

from ngrl.envs import known_names, resolve


@pytest.mark.parametrize(
    ("name", "gym_id", "family", "game"),
    [
        ("Breakout", "ALE/Breakout-v5", "atari", "breakout"),
        ("SpaceInvaders", "ALE/SpaceInvaders-v5", "atari", "space_invaders"),
        ("Qbert", "ALE/Qbert-v5", "atari", "qbert"),
        ("BeamRider", "ALE/BeamRider-v5", "atari", "beam_rider"),
        ("breakout", "ALE/Breakout-v5", "atari", "breakout"),
        ("HalfCheetah", "HalfCheetah-v5", "mujoco", None),
        ("InvertedDoublePendulum", "InvertedDoublePendulum-v5", "mujoco", None),
        ("CartPole", "CartPole-v1", "classic", None),
        ("Pendulum", "Pendulum-v1", "classic", None),
        ("CartPole-v0", "CartPole-v0", "classic", None),
        ("ALE/Pong-v5", "ALE/Pong-v5", "atari", "pong"),
    ],
)
def test_names_resolve(name: str, gym_id: str, family: str, game: str | None) -> None:
    spec = resolve(name)
    assert (spec.gym_id, spec.family, spec.game) == (gym_id, family, game)


def test_every_game_ale_py_ships_has_a_short_name() -> None:
    names = known_names()
    games = {spec.game for spec in names.values() if spec.family == "atari"}
    gym.register_envs(ale_py)
    registered = {gym.spec(i).kwargs["game"] for i in gym.registry if i.startswith("ALE/")}
    assert games == registered and len(games) > 100
    for body in ("Ant", "Hopper", "Walker2d", "Humanoid", "Swimmer", "Reacher"):
        assert names[body].family == "mujoco"


def test_newest_version_wins() -> None:
    versions = [i for i in gym.registry if i.startswith("HalfCheetah-v")]
    newest = max(versions, key=lambda i: int(i.rsplit("-v", 1)[1]))
    assert resolve("HalfCheetah").gym_id == newest


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [("Breakuot", "Breakout"), ("Cheetah", "HalfCheetah"), ("cartpol", "CartPole")],
)
def test_unknown_names_list_the_closest(name: str, suggestion: str) -> None:
    with pytest.raises(ValueError, match=f"closest known names: .*{suggestion}"):
        resolve(name)
