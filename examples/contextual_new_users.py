"""New users the training data never had: how well does each reward model score them?

``MultiUser(d_context=...)`` draws users whose personal reward is partly a linear function of a
context ``x_u`` (share ``1 − ν``) and partly their own (``ν = context_noise``). Models are fitted
on the training users' comparisons; each *new* user is then scored with

* ``pooled``: one reward for everybody;
* ``shared θ0``: ``SharedBasis``'s shared reward (its fallback for an unknown user);
* ``shared + N pairs``: ``SharedBasis.adapt_user`` on ``N`` of the new user's comparisons;
* ``contextual``: ``Contextual``'s ``θ(x_u)``, from the new user's context alone (no pairs);
* ``oracle``: the user's true ``θ_u``.

The score is pairwise accuracy on fresh comparisons of the new users (Bradley–Terry labels, so
even the oracle stays below 1). Run: ``python examples/contextual_new_users.py`` (about a
minute on one core); ``--markdown`` prints the table as markdown.
"""

from __future__ import annotations

import argparse

import numpy as np

from pluralign.data import PreferenceData
from pluralign.envs import MultiUser
from pluralign.rewards import Contextual, Pooled, SharedBasis

METHODS = ("pooled", "shared θ0", "shared + 5 pairs", "shared + 20 pairs", "contextual", "oracle")


def accuracy(thetas: np.ndarray, data: PreferenceData, index: np.ndarray) -> float:
    margins = np.einsum("nd,nd->n", thetas[index], data.delta_phi)
    return float(np.mean(np.where(margins == 0, 0.5, (margins > 0) == (data.y == 1))))


def one_run(
    noise: float,
    seed: int,
    *,
    n_users: int,
    d_phi: int,
    rank: int,
    d_context: int,
    n_per_user: int,
    n_new: int,
    n_test: int,
    ridge: float,
) -> dict[str, float]:
    env = MultiUser(
        n_users=n_users,
        d_phi=d_phi,
        rank=rank,
        n_per_user=n_per_user,
        seed=[seed],
        d_context=d_context,
        context_noise=noise,
    )
    train = env.sample_offline(seed=[seed, 1])
    l2 = ridge / train.n
    contexts, thetas = env.new_context_users(n_new, seed=[seed, 2])
    new_ids = np.arange(n_users, n_users + n_new)
    test = env.sample_comparisons(
        thetas, np.full(n_new, n_test), seed=[seed, 3], users=new_ids, contexts=contexts
    )
    adapt = env.sample_comparisons(
        thetas, np.full(n_new, 20), seed=[seed, 4], users=new_ids, contexts=contexts
    )
    index = test.users - n_users
    pooled = Pooled(l2).fit(train)
    shared = SharedBasis(rank, l2, seed=seed).fit(train)
    contextual = Contextual(rank, l2, seed=seed).fit(train)
    out = {
        "pooled": accuracy(np.tile(pooled.theta0_, (n_new, 1)), test, index),
        "shared θ0": accuracy(np.tile(shared.theta0_, (n_new, 1)), test, index),
        "contextual": accuracy(contextual.context_theta(contexts), test, index),
        "oracle": accuracy(thetas, test, index),
    }
    rows = np.concatenate([[0], np.cumsum(np.full(n_new, 20))])
    for n in (5, 20):
        pick = np.concatenate([np.arange(rows[u], rows[u] + n) for u in range(n_new)])
        model = SharedBasis(rank, l2, seed=seed).fit(train)
        model.adapt_user(adapt.subset(pick))
        out[f"shared + {n} pairs"] = accuracy(model.user_theta(new_ids), test, index)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0])
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    settings = dict(
        n_users=40, d_phi=16, rank=3, d_context=6, n_per_user=40, n_new=50, n_test=100, ridge=1.0
    )
    print(
        f"settings: {settings}, seeds 0..{args.seeds - 1}; mean ± s.e. over seeds of the "
        "new users' pairwise accuracy"
    )
    header = ["ν (context noise)", *METHODS]
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + " --- |" * len(header))
    else:
        print("  ".join(f"{h:>18}" for h in header))
    for noise in args.noise:
        runs = [one_run(noise, seed, **settings) for seed in range(args.seeds)]
        cells = []
        for method in METHODS:
            values = np.array([r[method] for r in runs])
            se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
            cells.append(f"{values.mean():.3f} ± {se:.3f}")
        if args.markdown:
            print("| " + " | ".join([f"{noise:g}", *cells]) + " |")
        else:
            print("  ".join(f"{c:>18}" for c in [f"{noise:g}", *cells]))


if __name__ == "__main__":
    main()
