"""Natural policy gradient (and TRPO) as a Stable-Baselines3 algorithm."""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal, TypeVar

import torch
import torch.nn.functional as F
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.distributions import kl_divergence
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import (
    ActorCriticCnnPolicy,
    ActorCriticPolicy,
    BasePolicy,
    MultiInputActorCriticPolicy,
)
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import explained_variance
from torch import Tensor

from ngrl import KFAC, fisher_loss
from ngrl.agents.advantages import standardize
from ngrl.agents.checkpoints import PolicyOnlyLoading
from ngrl.agents.policies import (
    ACTION_SPACES,
    KFACActorCriticCnnPolicy,
    KFACActorCriticPolicy,
    KFACMultiInputActorCriticPolicy,
    critic_layer_patterns,
    is_critic,
)
from ngrl.optim import KFACConfig, conjugate_gradient, fisher_vector_product, flat_grad
from ngrl.optim.hyperparams import check_choice

__all__ = ["NPG"]

SelfNPG = TypeVar("SelfNPG", bound="NPG")


class NPG(PolicyOnlyLoading, OnPolicyAlgorithm):
    r"""Natural policy gradient (Kakade 2001; Rajeswaran et al. 2017) and TRPO (Schulman et
    al. 2015, arXiv:1502.05477) with a separately trained critic.

    Per update, with ``g = ∇_θ E[Â·π_θ(a|s)/π_old(a|s)]`` and ``F`` the Fisher of the
    policy (the Hessian of the mean ``KL(π_old ‖ π_θ)``):

    .. code-block:: text

        s = (F + cg_damping·I)⁻¹ g       by conjugate gradient on Fisher-vector products,
                                         or by the K-FAC inverse (preconditioner="kfac")
        β = sqrt(2·target_kl / sᵀ(F + cg_damping·I)s)
        θ ← θ + β·s                      (NPG)
        θ ← θ + α^k·β·s                  (TRPO, line_search=True: the first k = 0, 1, …
                                          whose KL < target_kl and whose surrogate improves;
                                          no step if none does within line_search_max_iter)

    then ``n_critic_updates`` epochs of minibatch regression of ``V(s)`` on the returns,
    with the policy's own optimizer: Adam (``critic="adam"``) or K-FAC (``critic="kfac"``,
    statistics from the value head's unit-variance Gaussian).

    Args:
        policy: ``"MlpPolicy"``, ``"CnnPolicy"``, ``"MultiInputPolicy"`` or an SB3
            ``ActorCriticPolicy`` class.
        env: an SB3 ``VecEnv``, a gymnasium env or its id.
        learning_rate: the critic's learning rate.
        n_steps, batch_size: steps per environment per update; critic minibatch size.
        gamma, gae_lambda: discount and GAE parameter.
        target_kl: the KL the natural-gradient step is scaled to (δ).
        cg_max_steps, cg_damping: conjugate-gradient iterations and damping of ``F``.
        line_search: backtrack as TRPO does.
        line_search_shrinking_factor, line_search_max_iter: ``α`` and the most trials.
        n_critic_updates: critic epochs over the rollout per update.
        normalize_advantage: standardise advantages per batch.
        critic: ``"adam"`` or ``"kfac"``, the critic's optimizer.
        preconditioner: ``"cg"`` or ``"kfac"``: how ``s`` is computed.
        kfac_kwargs: :class:`ngrl.optim.KFAC` options of the actor's K-FAC preconditioner
            (``damping`` defaults to ``cg_damping``); with ``{"cg_steps": k}``, ``s`` is
            ``k`` conjugate-gradient iterations on ``F`` preconditioned by K-FAC.
        The remaining arguments are SB3's ``OnPolicyAlgorithm`` arguments.
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": ActorCriticPolicy,
        "CnnPolicy": ActorCriticCnnPolicy,
        "MultiInputPolicy": MultiInputActorCriticPolicy,
    }
    #: The same aliases when the critic is trained by K-FAC.
    kfac_policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": KFACActorCriticPolicy,
        "CnnPolicy": KFACActorCriticCnnPolicy,
        "MultiInputPolicy": KFACMultiInputActorCriticPolicy,
    }

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 1e-3,
        n_steps: int = 2048,
        batch_size: int = 128,
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        target_kl: float = 0.01,
        cg_max_steps: int = 15,
        cg_damping: float = 0.1,
        line_search: bool = False,
        line_search_shrinking_factor: float = 0.8,
        line_search_max_iter: int = 10,
        n_critic_updates: int = 10,
        normalize_advantage: bool = True,
        critic: Literal["adam", "kfac"] = "adam",
        preconditioner: Literal["cg", "kfac"] = "cg",
        kfac_kwargs: dict[str, Any] | None = None,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: torch.device | str = "auto",
        _init_setup_model: bool = True,
    ) -> None:
        check_choice("critic", critic, ("adam", "kfac"))
        check_choice("preconditioner", preconditioner, ("cg", "kfac"))
        for name, value in (("target_kl", target_kl), ("cg_damping", cg_damping)):
            if not value > 0.0:
                raise ValueError(f"Invalid {name} value: {value!r} (must be > 0)")
        if not 0.0 < line_search_shrinking_factor < 1.0:
            raise ValueError(
                f"Invalid line_search_shrinking_factor value: {line_search_shrinking_factor!r} "
                "(must be in (0, 1))"
            )
        self.critic = critic  # read by _get_policy_from_name during SB3's __init__
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            gamma=gamma,
            gae_lambda=gae_lambda,
            ent_coef=0.0,
            vf_coef=0.0,
            max_grad_norm=0.0,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            device=device,
            seed=seed,
            _init_setup_model=False,
            supported_action_spaces=ACTION_SPACES,
        )
        self.batch_size = batch_size
        self.target_kl = target_kl
        self.cg_max_steps = cg_max_steps
        self.cg_damping = cg_damping
        self.line_search = line_search
        self.line_search_shrinking_factor = line_search_shrinking_factor
        self.line_search_max_iter = line_search_max_iter
        self.n_critic_updates = n_critic_updates
        self.normalize_advantage = normalize_advantage
        self.preconditioner = preconditioner
        self.kfac_kwargs = dict(kfac_kwargs or {})
        if _init_setup_model:
            self._setup_model()

    def _get_policy_from_name(self, policy_name: str) -> type[BasePolicy]:
        aliases = self.kfac_policy_aliases if self.critic == "kfac" else self.policy_aliases
        if policy_name not in aliases:
            raise ValueError(
                f"Invalid policy: {policy_name!r}; use one of {', '.join(aliases)} or a class"
            )
        return aliases[policy_name]

    def _setup_model(self) -> None:
        super()._setup_model()
        if self.critic == "kfac" and not isinstance(self.policy, KFACActorCriticPolicy):
            raise ValueError(
                "Invalid policy: critic='kfac' needs a KFACActorCriticPolicy, got "
                f"{type(self.policy).__name__}"
            )
        self.actor_params = [p for name, p in self.policy.named_parameters() if not is_critic(name)]
        self.actor_kfac: KFAC | None = None
        if self.preconditioner == "kfac":
            config = KFACConfig.from_options(**{"damping": self.cg_damping, **self.kfac_kwargs})
            config = config.replace(
                kl_clip=None,  # used only to precondition
                momentum=0.0,
                lr=1.0,
                skip_layers=critic_layer_patterns(),
            )
            self.actor_kfac = KFAC.from_config(self.policy, config)

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        names = ["policy", "policy.optimizer"]
        return (names + ["actor_kfac"] if self.actor_kfac is not None else names), []

    # --- the actor: one natural-gradient step ---------------------------------------------
    def _search_direction(
        self, policy_gradient: Tensor, product: Any, distribution: Any, kl: Tensor
    ) -> Tensor:
        """``s ≈ (F + damping·I)⁻¹ g``, by CG or by the K-FAC inverse (refined on the
        Hessian of ``kl``, the exact Fisher, with K-FAC's ``cg_steps``)."""
        if self.actor_kfac is None:
            return conjugate_gradient(product, policy_gradient, self.cg_max_steps)
        kfac = self.actor_kfac
        if kfac.capture_due:
            kfac.capture_backward(fisher_loss(distribution.distribution))
        parts = policy_gradient.split([p.numel() for p in self.actor_params])
        for param, part in zip(self.actor_params, parts, strict=True):
            param.grad = part.view_as(param).clone()
        if not kfac.precondition_(divergence=kl if kfac.cg_steps else None):
            return torch.zeros_like(policy_gradient)
        return torch.cat([p.grad.reshape(-1) for p in self.actor_params])

    def _set_actor(self, flat: Tensor) -> None:
        torch.nn.utils.vector_to_parameters(flat, self.actor_params)

    def _train_actor(self, data: Any, actions: Tensor) -> dict[str, float]:
        with torch.no_grad():
            old_distribution = copy.copy(self.policy.get_distribution(data.observations))
        distribution = self.policy.get_distribution(data.observations)
        log_prob = distribution.log_prob(actions)
        advantages = data.advantages
        if self.normalize_advantage:
            advantages = standardize(advantages)
        ratio = torch.exp(log_prob - data.old_log_prob)
        surrogate = (advantages * ratio).mean()
        kl = kl_divergence(old_distribution, distribution).mean()

        gradient = flat_grad(surrogate, self.actor_params, retain_graph=True)
        product = fisher_vector_product(kl, self.actor_params, self.cg_damping)
        direction = self._search_direction(gradient, product, distribution, kl)
        quadratic = float(direction @ product(direction))
        if not quadratic > 0.0 or not torch.isfinite(direction).all():
            return {
                "policy_objective": surrogate.item(),
                "kl_divergence": 0.0,
                "step_fraction": 0.0,
            }
        max_step = (2.0 * self.target_kl / quadratic) ** 0.5

        start = torch.nn.utils.parameters_to_vector(self.actor_params).detach()
        coefficient, accepted, new_kl = max_step, False, 0.0
        with torch.no_grad():
            trials = self.line_search_max_iter if self.line_search else 1
            for _ in range(trials):
                self._set_actor(start + coefficient * direction)
                if not self.line_search:
                    accepted = True
                    break
                trial = self.policy.get_distribution(data.observations)
                trial_ratio = torch.exp(trial.log_prob(actions) - data.old_log_prob)
                new_objective = (advantages * trial_ratio).mean()
                new_kl = float(kl_divergence(old_distribution, trial).mean())
                if new_kl < self.target_kl and new_objective > surrogate:
                    accepted = True
                    break
                coefficient *= self.line_search_shrinking_factor
            if not accepted:
                self._set_actor(start)
            elif not self.line_search:
                new_kl = float(
                    kl_divergence(
                        old_distribution, self.policy.get_distribution(data.observations)
                    ).mean()
                )
        return {
            "policy_objective": surrogate.item(),
            "kl_divergence": new_kl,
            "step_fraction": coefficient / max_step if accepted else 0.0,
        }

    # --- the critic -----------------------------------------------------------------------
    def _train_critic(self) -> list[float]:
        optimizer = self.policy.optimizer
        losses = []
        for _ in range(self.n_critic_updates):
            for data in self.rollout_buffer.get(self.batch_size):
                values = self.policy.predict_values(data.observations)
                if isinstance(optimizer, KFAC) and optimizer.capture_due:
                    optimizer.capture_backward(fisher_loss(values, kind="gaussian"))
                value_loss = F.mse_loss(data.returns, values.flatten())
                optimizer.zero_grad()
                value_loss.backward()
                optimizer.step()
                losses.append(value_loss.item())
        return losses

    def train(self) -> None:
        """One natural-gradient step of the actor, then the critic's regression."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        stats: dict[str, float] = {}
        for data in self.rollout_buffer.get(batch_size=None):  # one full batch
            actions = data.actions
            if isinstance(self.action_space, spaces.Discrete):
                actions = actions.long().flatten()
            stats = self._train_actor(data, actions)
        for param in self.actor_params:
            param.grad = None
        value_losses = self._train_critic()

        self._n_updates += 1
        explained_var = explained_variance(
            self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten()
        )
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/explained_variance", explained_var)
        self.logger.record("train/value_loss", float(torch.tensor(value_losses).mean()))
        for key, value in stats.items():
            self.logger.record(f"train/{key}", value)
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", torch.exp(self.policy.log_std).mean().item())

    def learn(
        self: SelfNPG,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str = "NPG",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfNPG:
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )
