"""The algorithms the CLI knows, their presets (``presets.toml``) and ``--set`` overrides."""

from __future__ import annotations

import difflib
import inspect
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from sb3_contrib import RecurrentPPO
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import VecEnv, VecNormalize
from torch import nn

from ngrl.agents.acktr import ACKTR
from ngrl.agents.npg import NPG
from ngrl.agents.recurrent import RecurrentACKTR
from ngrl.envs import EnvSpec
from ngrl.helpers import parse_override

__all__ = [
    "ALGORITHMS",
    "LinearDecay",
    "RunConfig",
    "algorithm_class",
    "hyperparameter_defaults",
    "named_presets",
    "parse_override",
    "resolve_config",
]

#: CLI name -> algorithm class. ``trpo`` is NPG with the line search (see presets.toml);
#: ``acktr-lstm`` and ``ppo-lstm`` train LSTM policies (``ppo-lstm``: sb3-contrib's).
ALGORITHMS: dict[str, type[BaseAlgorithm]] = {
    "acktr": ACKTR,
    "acktr-lstm": RecurrentACKTR,
    "npg": NPG,
    "trpo": NPG,
    "a2c": A2C,
    "ppo": PPO,
    "ppo-lstm": RecurrentPPO,
}
#: Keys of a run that are not arguments of the algorithm, with their types.
RUN_KEYS: dict[str, type] = {
    "n_envs": int,
    "timesteps": int,
    "policy": str,
    "normalize": bool,
    "normalize_reward": bool,
    "schedule_timesteps": int,
}
#: Arguments the CLI sets itself (from its own flags), never from presets or ``--set``.
_MANAGED = {"policy", "env", "seed", "device", "verbose", "tensorboard_log", "_init_setup_model"}
_RUN_DEFAULTS: dict[str, Any] = {
    "n_envs": 8,
    "timesteps": 1_000_000,
    "policy": "MlpPolicy",
    "normalize": False,
    "normalize_reward": True,
    "schedule_timesteps": 0,
}
#: ``policy_kwargs.activation_fn`` by name, as the presets write it.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


#: Valid values of the common numeric settings, checked once presets and overrides merge.
_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    **dict.fromkeys(
        (
            "timesteps",
            "n_envs",
            "n_steps",
            "batch_size",
            "n_epochs",
            "cg_max_steps",
        ),
        (lambda v: v >= 1, ">= 1"),
    ),
    "n_critic_updates": (lambda v: v >= 0, ">= 0"),
    "gamma": (lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    "gae_lambda": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    **dict.fromkeys(("ent_coef", "vf_coef", "vf_fisher_coef"), (lambda v: v >= 0.0, ">= 0")),
    **dict.fromkeys(("max_grad_norm", "learning_rate", "clip_range"), (lambda v: v > 0.0, "> 0")),
}


def _check_range(key: str, value: Any) -> None:
    """A named error for a value out of its range (``lin_X`` schedules: ``X``)."""
    if key not in _RANGES or isinstance(value, bool):
        return
    number = float(value[4:]) if isinstance(value, str) and value.startswith("lin_") else value
    valid, text = _RANGES[key]
    if isinstance(number, (int, float)) and not valid(number):
        raise ValueError(f"hyperparameter {key!r} must be {text}, got {value!r}")


@dataclass
class RunConfig:
    """Everything a training run is made from, after presets and overrides."""

    algo: str
    env: EnvSpec
    n_envs: int
    timesteps: int
    policy: str
    normalize: bool
    #: With ``normalize``: also scale rewards (VecNormalize's ``norm_reward``).
    normalize_reward: bool = True
    #: ``"lin_X"`` schedules decay to 0 over this many timesteps (0: over the run), so a
    #: shorter run follows the first part of a published schedule (baselines' Atari
    #: learning rate decays over 10M steps).
    schedule_timesteps: int = 0
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    def algorithm_kwargs(self) -> dict[str, Any]:
        """The hyperparameters as algorithm arguments (``"lin_X"`` strings become schedules)."""
        horizon = self.schedule_timesteps or self.timesteps
        kwargs = {
            key: _schedule(value, self.timesteps, horizon)
            for key, value in self.hyperparameters.items()
        }
        policy_kwargs = kwargs.get("policy_kwargs")
        if isinstance(policy_kwargs, dict) and "activation_fn" in policy_kwargs:
            name = policy_kwargs["activation_fn"]
            kwargs["policy_kwargs"] = {**policy_kwargs, "activation_fn": ACTIVATIONS[name]}
        return kwargs

    def normalized(self, env: VecEnv) -> VecEnv:
        """``env`` wrapped in SB3's ``VecNormalize`` as this run asks (or as it is)."""
        return VecNormalize(env, norm_reward=self.normalize_reward) if self.normalize else env


@dataclass(frozen=True)
class LinearDecay:
    """``start`` decaying linearly to 0 over ``horizon`` timesteps, as a schedule of SB3's
    remaining progress in a run of ``timesteps`` (``horizon == timesteps``: SB3's
    ``LinearSchedule(start, 0, 1)``)."""

    start: float
    timesteps: int
    horizon: int

    def __call__(self, progress_remaining: float) -> float:
        elapsed = (1.0 - progress_remaining) * self.timesteps
        return self.start * max(0.0, 1.0 - elapsed / self.horizon)


def algorithm_class(algo: str) -> type[BaseAlgorithm]:
    """The class of a CLI algorithm name; an unknown name lists the valid ones."""
    try:
        return ALGORITHMS[algo]
    except KeyError:
        raise ValueError(
            f"unknown algorithm {algo!r}; choose one of: {', '.join(ALGORITHMS)}"
        ) from None


def hyperparameter_defaults(algo: str) -> dict[str, Any]:
    """Every argument of the algorithm a run may set, with its default."""
    signature = inspect.signature(algorithm_class(algo).__init__)
    return {
        name: parameter.default
        for name, parameter in signature.parameters.items()
        if name not in _MANAGED
        and name != "self"
        and parameter.kind is parameter.POSITIONAL_OR_KEYWORD
    }


@cache
def _presets() -> dict[str, Any]:
    text = resources.files(__package__).joinpath("presets.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def named_presets(algo: str) -> list[str]:
    """The named presets of ``algo``: its tables ``[ALGO-NAME]`` in presets.toml (other
    than the algorithms named so, ``acktr-lstm``)."""
    return sorted(
        key.split("-", 1)[1]
        for key in _presets()
        if key.startswith(f"{algo}-") and key not in ALGORITHMS
    )


def _preset_tables(algo: str, spec: EnvSpec) -> dict[str, Any]:
    table = _presets().get(algo, {})
    merged = _preset_tables(table["inherit"], spec) if "inherit" in table else {}
    scalars = {k: v for k, v in table.items() if k != "inherit" and not _is_section(k, v)}
    merged.update(scalars)
    short = spec.name.split("/")[-1].split("-v")[0]
    for key in (spec.family, short):
        merged.update(table.get(key, {}))
    return merged


def _is_section(key: str, value: Any) -> bool:
    # Sub-tables of an algorithm are families or env names; dict-valued hyperparameters
    # (kfac_kwargs, policy_kwargs) are written inline and are never capitalised families.
    return isinstance(value, dict) and (
        key in ("atari", "mujoco", "classic", "gym") or key[:1].isupper()
    )


def _check_type(key: str, value: Any, reference: Any) -> None:
    def fail(expected: str) -> None:
        raise ValueError(f"hyperparameter {key!r} takes {expected}, got {value!r}")

    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    schedule = isinstance(value, str) and value.startswith("lin_")
    if schedule:
        try:
            float(value[4:])
        except ValueError:
            fail("lin_X with X a number")
    if reference is None:
        return
    if isinstance(reference, bool):
        if not isinstance(value, bool):
            fail("true or false")
    elif isinstance(reference, int):
        if not (isinstance(value, int) and not isinstance(value, bool)):
            fail("an integer")
    elif isinstance(reference, float) or callable(reference):
        if not (number or (schedule and key in ("learning_rate", "clip_range", "clip_range_vf"))):
            fail("a number" + (" or lin_X" if key == "learning_rate" else ""))
    elif isinstance(reference, str):
        if not isinstance(value, str):
            fail("a string")
    elif isinstance(reference, dict) and not isinstance(value, dict):
        fail("a table, e.g. {a = 1}")


def resolve_config(
    algo: str, spec: EnvSpec, overrides: list[tuple[str, Any]], preset_name: str | None = None
) -> RunConfig:
    """The run's settings: defaults, then the presets for ``spec`` (those of the named
    preset ``[ALGO-NAME]`` if ``preset_name`` is given), then ``overrides``."""
    defaults = hyperparameter_defaults(algo)
    table = algo
    if preset_name is not None:
        names = named_presets(algo)
        if preset_name not in names:
            valid = ", ".join(names) if names else "none"
            raise ValueError(f"{algo} has no preset {preset_name!r}; its presets: {valid}")
        table = f"{algo}-{preset_name}"
    preset = _preset_tables(table, spec)
    settings: dict[str, Any] = {**_RUN_DEFAULTS, **preset}
    for key, value in overrides:
        top, _, rest = key.partition(".")
        if top not in defaults and top not in RUN_KEYS:
            close = difflib.get_close_matches(top, [*defaults, *RUN_KEYS], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"{algo} has no hyperparameter {top!r}{hint} (see --help for the list)"
            )
        if rest:  # a key inside a dict-valued argument: kfac_kwargs.weight_sharing=reduce
            reference = settings.get(top, defaults.get(top))
            if reference is not None and not isinstance(reference, dict):
                raise ValueError(f"hyperparameter {top!r} is not a table; {key!r} is invalid")
            table = dict(reference or {})
            node = table
            *parents, leaf = rest.split(".")
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = value
            settings[top] = table
            continue
        if top in RUN_KEYS:
            _check_type(top, value, RUN_KEYS[top]())
        else:
            _check_type(top, value, settings.get(top, defaults[top]))
        settings[top] = value
    _drop_foreign_curvature_options(settings, preset, defaults, overrides)
    for key, value in settings.items():
        _check_range(key, value)
    activation = (settings.get("policy_kwargs") or {}).get("activation_fn")
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(
            f"policy_kwargs.activation_fn {activation!r} is unknown; choose one of: "
            f"{', '.join(ACTIVATIONS)}"
        )
    run = {key: settings.pop(key) for key in RUN_KEYS}
    for key in run:
        _check_type(key, run[key], RUN_KEYS[key]())
    reward_given = "normalize_reward" in preset or any(
        k == "normalize_reward" for k, _ in overrides
    )
    if reward_given and not run["normalize"]:
        raise ValueError("normalize_reward has no effect without normalize=true; set both")
    if run["schedule_timesteps"] < 0:
        raise ValueError(f"schedule_timesteps must be >= 0, got {run['schedule_timesteps']}")
    return RunConfig(algo=algo, env=spec, hyperparameters=settings, **run)


def _drop_foreign_curvature_options(
    settings: dict[str, Any],
    preset: dict[str, Any],
    defaults: dict[str, Any],
    overrides: list[tuple[str, Any]],
) -> None:
    """A preset's ``kfac_kwargs.curvature_options`` are written for the preset's
    curvature (e.g. K-FAC's factored damping on Atari); ``--set curvature=ekfac`` gets
    that block's own defaults instead, unless the options are also set explicitly."""
    kfac_kwargs = settings.get("kfac_kwargs")
    if not isinstance(kfac_kwargs, dict) or "curvature_options" not in kfac_kwargs:
        return
    preset_curvature = preset.get("curvature", defaults.get("curvature"))
    if settings.get("curvature", preset_curvature) == preset_curvature:
        return
    if any(
        key == "kfac_kwargs" or key.startswith("kfac_kwargs.curvature_options")
        for key, _ in overrides
    ):
        return
    settings["kfac_kwargs"] = {k: v for k, v in kfac_kwargs.items() if k != "curvature_options"}


def _schedule(value: Any, timesteps: int, horizon: int) -> Any:
    if isinstance(value, str) and value.startswith("lin_"):
        return LinearDecay(float(value[4:]), timesteps, horizon)
    return value
