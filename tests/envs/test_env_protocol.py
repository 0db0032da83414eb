"""The simulators' shared sampling protocol: ``sample_offline(n, *, seed)``,
``sample_targets(m, *, seed)``, every seed keyword-only, the same seed giving the same draws."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from pluralign.envs import KLBandit, LowRankContextual, MultiUser
from pluralign.errors import ConfigError

SIMULATORS = {
    "lowrank_contextual": lambda: LowRankContextual(d_x=4, d_phi=5, rank=2, seed=0),
    "kl_bandit": lambda: KLBandit(d=4, n_actions=5, seed=0),
    "multi_user": lambda: MultiUser(n_users=3, d_phi=5, n_per_user=[4, 2, 3], seed=0),
}
SEEDED = {
    "lowrank_contextual": ["sample_offline", "sample_targets"],
    "kl_bandit": ["sample_offline", "sample_targets", "source_states", "compare"],
    "multi_user": [
        "sample_offline",
        "sample_targets",
        "sample_comparisons",
        "new_users",
        "new_context_users",
    ],
}


@pytest.mark.parametrize("name", sorted(SIMULATORS))
def test_every_seed_is_keyword_only(name):
    env = SIMULATORS[name]()
    for method in SEEDED[name]:
        params = inspect.signature(getattr(env, method)).parameters
        assert params["seed"].kind is inspect.Parameter.KEYWORD_ONLY, (name, method)
    first = next(iter(inspect.signature(env.sample_targets).parameters))
    assert first == "m"
    with pytest.raises(TypeError):
        env.sample_targets(3, 1)


def _arrays(data):
    return [a for a in (data.x, data.phi0, data.phi1, data.y, data.users) if a is not None]


@pytest.mark.parametrize("name", sorted(SIMULATORS))
def test_same_seed_same_draws_other_seed_other_draws(name):
    env = SIMULATORS[name]()
    a, b, c = (env.sample_offline(6, seed=s) for s in ([1, 2], [1, 2], [1, 3]))
    for u, v in zip(_arrays(a), _arrays(b), strict=True):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a.phi0, c.phi0)
    s, t = env.sample_targets(4, seed=5), env.sample_targets(4, seed=5)
    np.testing.assert_array_equal(s.phi, t.phi)
    assert s.m == 4
    assert not np.array_equal(s.phi, env.sample_targets(4, seed=6).phi)


def test_multi_user_n_is_per_user_and_defaults_to_the_constructor():
    env = SIMULATORS["multi_user"]()
    default = env.sample_offline(seed=0)
    assert np.bincount(default.users).tolist() == [4, 2, 3]
    assert np.bincount(env.sample_offline(5, seed=0).users).tolist() == [5, 5, 5]
    # nested: each user's first comparisons do not depend on the counts
    more = env.sample_offline([6, 6, 6], seed=0)
    for u, count in enumerate([4, 2, 3]):
        np.testing.assert_array_equal(
            more.phi0[more.users == u][:count], default.phi0[default.users == u]
        )


@pytest.mark.parametrize("bad", [True, 2.5, None, [3, 3], [1.0] * 4, "40"])
def test_multi_user_refuses_a_bad_n_per_user_with_a_config_error(bad):
    with pytest.raises(ConfigError, match="n_per_user must be an integer or a list of 4"):
        MultiUser(n_users=4, n_per_user=bad)
