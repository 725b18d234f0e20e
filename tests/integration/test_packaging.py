"""One top-level name: ngrl's agents, bayes and envs install as ``ngrl.agents``,
``ngrl.bayes`` and ``ngrl.envs``, so a user's own ``agents/`` or ``envs/`` package never
shadows them, nor they it; checkpoints from the time they were top-level still load."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import ngrl.agents.policies
from ngrl.agents import ACKTR
from ngrl.envs import make_vec_env

ROOT = Path(__file__).resolve().parents[2]


def _project_with_its_own_agents_and_envs(path: Path) -> Path:
    for name in ("agents", "envs"):
        (path / name).mkdir()
        (path / name / "__init__.py").write_text(f"MINE = {name!r}\n")
    return path


def test_a_project_with_its_own_agents_and_envs_packages_runs_the_cli(tmp_path: Path) -> None:
    project = _project_with_its_own_agents_and_envs(tmp_path)
    # One interpreter (started in the project folder, which is first on sys.path, as for
    # `python -m`) checks the imports, then runs the CLI as `python -m ngrl.train` would.
    argv = ["acktr", "--env", "CartPole", "--timesteps", "64", "--no-progress",
            "--eval-episodes", "0", "--log-dir", str(tmp_path / "run")]  # fmt: skip
    code = (
        "import runpy, sys\n"
        "import agents, envs\n"
        "from ngrl.agents import ACKTR\n"
        "from ngrl.envs import make_vec_env\n"
        "assert (agents.MINE, envs.MINE) == ('agents', 'envs')\n"
        "assert ACKTR.__module__ == 'ngrl.agents.acktr'\n"
        f"sys.argv = ['ngrl.train', *{argv!r}]\n"
        "runpy.run_module('ngrl.train', run_name='__main__', alter_sys=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoint.zip").is_file()


def test_the_wheel_installs_one_top_level_name(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name in ("ngrl", "agents", "bayes", "envs"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "docs/LICENSE"):
        (source / name).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("ngrl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"ngrl"}
    for module in ("agents/acktr.py", "agents/presets.toml", "bayes/evaluation/methods.py"):
        assert f"ngrl/{module}" in names
    assert "ngrl/envs/atari.py" in names
    assert any(name.endswith(".dist-info/licenses/docs/LICENSE") for name in names)


def test_a_checkpoint_from_the_top_level_layout_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = ACKTR("MlpPolicy", make_vec_env("CartPole", 2, 0), n_steps=8, seed=0)
    model.learn(32)
    # Saved as before the packages moved under ngrl: the pickled policy class is
    # `agents.policies.KFACActorCriticPolicy`.
    policy_class = ngrl.agents.policies.KFACActorCriticPolicy
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "agents", sys.modules["ngrl.agents"])
        patch.setitem(sys.modules, "agents.policies", ngrl.agents.policies)
        patch.setattr(policy_class, "__module__", "agents.policies")
        model.save(tmp_path / "old.zip")
    assert b"agents.policies" in zipfile.ZipFile(tmp_path / "old.zip").read("data")
    assert "agents" not in sys.modules
    loaded = ACKTR.load(tmp_path / "old.zip")
    assert type(loaded.policy) is policy_class
    assert loaded.policy.optimizer.steps == model.policy.optimizer.steps
    assert not {m for m in sys.modules if m.split(".")[0] in ("agents", "bayes", "envs")}
