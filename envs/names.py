"""Environment names as users type them: ``Breakout``, ``HalfCheetah``, ``CartPole``.

Short names come from gymnasium's registry (with ale-py's environments registered), so
every Atari game ale-py ships and every MuJoCo and classic-control task gymnasium ships is
known, at its newest registered version, and so are the classic tasks without velocities
(``CartPoleNoVel``, ``PendulumNoVel``: :mod:`ngrl.envs.masked`). Full gymnasium ids pass
through unchanged.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import cache
from typing import Literal

import ale_py
import gymnasium as gym

import ngrl.envs.masked  # noqa: F401  (registers the tasks without velocities)

__all__ = ["EnvSpec", "known_names", "resolve"]

Family = Literal["atari", "mujoco", "classic", "gym"]

_FAMILY_BY_ENTRY_POINT: dict[str, Family] = {
    "ale_py": "atari",
    "gymnasium.envs.mujoco": "mujoco",
    "gymnasium.envs.classic_control": "classic",
    "ngrl.envs.masked": "classic",
}


@dataclass(frozen=True)
class EnvSpec:
    """What a name resolves to.

    Attributes:
        name: the short name (``Breakout``) or the full id the user gave.
        gym_id: the gymnasium id (``ALE/Breakout-v5``, ``HalfCheetah-v5``).
        family: ``atari``, ``mujoco``, ``classic`` or ``gym`` (any other registered id).
        game: ale-py's ROM id for Atari games (``breakout``), else ``None``.
    """

    name: str
    gym_id: str
    family: Family
    game: str | None = None


def _family(gym_id: str) -> Family:
    entry_point = str(gym.spec(gym_id).entry_point)
    for prefix, family in _FAMILY_BY_ENTRY_POINT.items():
        if entry_point.startswith(prefix):
            return family
    return "gym"


def _version(gym_id: str) -> int:
    match = re.search(r"-v(\d+)$", gym_id)
    return int(match.group(1)) if match else -1


@cache
def known_names() -> dict[str, EnvSpec]:
    """Every short name, mapped to its newest registered version."""
    gym.register_envs(ale_py)
    names: dict[str, EnvSpec] = {}
    for gym_id, spec in gym.registry.items():
        family = _family(gym_id)
        if family == "gym":
            continue
        if family == "atari":
            # ale-py registers ALE/<Game>-v5 (and older ids without the namespace).
            if not gym_id.startswith("ALE/"):
                continue
            short = gym_id[len("ALE/") :].rsplit("-v", 1)[0]
            game = spec.kwargs.get("game")
        else:
            short = gym_id.rsplit("-v", 1)[0]
            if "/" in short:  # e.g. phys2d/CartPole-v1: other implementations
                continue
            game = None
        current = names.get(short)
        if current is None or _version(gym_id) > _version(current.gym_id):
            names[short] = EnvSpec(short, gym_id, family, game)
    return names


def resolve(name: str) -> EnvSpec:
    """The environment a name stands for.

    Short names match case-insensitively (``breakout`` is ``Breakout``); a full gymnasium
    id is taken as it is. An unknown name raises ``ValueError`` listing the closest ones.
    """
    names = known_names()
    if name in names:
        return names[name]
    folded = {short.lower(): spec for short, spec in names.items()}
    if name.lower() in folded:
        return folded[name.lower()]
    if name in gym.registry:
        family = _family(name)
        game = gym.spec(name).kwargs.get("game") if family == "atari" else None
        return EnvSpec(name, name, family, game)
    candidates = list(names) + [i for i in gym.registry if i not in names]
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    close += [c for c in candidates if c.lower().startswith(name.lower()) and c not in close]
    hint = f"; closest known names: {', '.join(close[:5])}" if close else ""
    raise ValueError(
        f"Unknown environment {name!r}{hint}. Use a short name such as Breakout, "
        "HalfCheetah or CartPole, or a full gymnasium id."
    )
