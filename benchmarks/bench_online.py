"""Online iterative GSHF (Xiong et al. 2024, ICML 2024, arXiv 2312.11456): the cost of one
round (refit + enhancer search + sampling).

Budget (issue 5): one round at d = 64, K = 32, m = 1000 takes at most 2 s (met by the
eigen-direction scan; the default exact enhancer of issue 11 takes about 5 s there, see
docs/gshf.md §6). A "round" is what
:class:`pluralign.online.OnlineGSHF` times as ``seconds``: draw m contexts, the main agent's Gibbs
policy, the enhancer's search, the two actions and the oracle's labels, then the Bradley–Terry
refit on all data so far and its confidence set (evaluation on held-out contexts excluded). It
is measured after a few rounds, so the refit sees a few thousand comparisons; the parts are also
timed alone at the same state, and the round is timed across d and K to show how it scales.
BLAS runs on one thread (the machine these budgets target is a shared 2-core box, where
multi-threaded BLAS on a contended core slows small matrix products by up to 100×).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator

import numpy as np

from pluralign.envs import KLBandit
from pluralign.online import Enhancer, OnlineGSHF, RoundState, sample_actions
from pluralign.policies import gibbs_probs

BUDGET_SECONDS = 2.0


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        limiter = contextlib.nullcontext()
    else:
        limiter = threadpool_limits(1)
    try:
        with limiter:
            yield
    finally:
        torch.set_num_threads(threads)


def _round_seconds(
    d: int, n_actions: int, m: int, rounds: int, warmup: int = 1
) -> tuple[float, OnlineGSHF, KLBandit]:
    """Median per-round time of the enhancer loop over rounds ``warmup+1..rounds``."""
    env = KLBandit(d=d, n_actions=n_actions, eta=0.2, seed=0)
    loop = OnlineGSHF("enhancer", batch_size=m, n_rounds=rounds, seed=1).fit(env)
    times = [h["seconds"] for h in loop.history_[1 + warmup :]]
    return statistics.median(times), loop, env


def _parts(loop: OnlineGSHF, env: KLBandit, m: int) -> dict[str, float]:
    """The parts of the next round, timed alone from the loop's final state."""
    rng = np.random.default_rng(123)
    start = time.perf_counter()
    states = env.sample_targets(m, seed=rng)
    main = gibbs_probs(states.phi @ loop.theta_, env.reference_probs(states), env.eta)
    contexts = time.perf_counter() - start
    state = RoundState(
        states=states, main_probs=main, theta=loop.theta_, confidence=loop.confidence_, eta=env.eta
    )
    start = time.perf_counter()
    Enhancer(exact=False).second_policy(state)
    scan = time.perf_counter() - start
    start = time.perf_counter()
    second, _ = Enhancer().second_policy(state)  # exact: scan + SLSQP + certified bound
    search = time.perf_counter() - start
    start = time.perf_counter()
    a1, a2 = sample_actions(main, rng), sample_actions(second, rng)
    rows = np.arange(m)
    env.compare(states.phi[rows, a1], states.phi[rows, a2], seed=rng)
    sampling = time.perf_counter() - start
    start = time.perf_counter()
    loop._refit(loop.data_, env.d)
    refit = time.perf_counter() - start
    return {
        "contexts_and_main_agent": contexts,
        "enhancer_search": search,
        "enhancer_scan_only": scan,
        "sampling_and_labels": sampling,
        "refit_mle_and_confidence": refit,
    }


def bench_online_round() -> dict:
    """Issue 5: one online round at d=64, K=32, m=1000 ≤ 2 s; scaling with d and K."""
    d, n_actions, m, rounds = 64, 32, 1000, 6
    out: dict = {
        "setting": f"d={d} K={n_actions} m={m}, round {rounds} (N={rounds * m} "
        "comparisons refitted), exact enhancer (4-direction scan + SLSQP), "
        "1 BLAS thread"
    }
    with _one_thread():
        median, loop, env = _round_seconds(d, n_actions, m, rounds)
        out["round_seconds_median"] = round(median, 3)
        out["round_seconds_each"] = [round(h["seconds"], 3) for h in loop.history_[1:]]
        for name, seconds in _parts(loop, env, m).items():
            out[f"part_{name}_seconds"] = round(seconds, 3)
        out[f"budget_round<={BUDGET_SECONDS:g}s"] = median <= BUDGET_SECONDS
        for d_scan in (16, 32, 64, 128):
            out[f"scaling_d={d_scan}_K=32_seconds"] = round(
                _round_seconds(d_scan, 32, m, rounds=3)[0], 3
            )
        for k_scan in (8, 32, 128):
            out[f"scaling_d=64_K={k_scan}_seconds"] = round(
                _round_seconds(64, k_scan, m, rounds=3)[0], 3
            )
    for key, value in out.items():
        print(f"   {key:<40} {value}")
    return out


if __name__ == "__main__":  # pragma: no cover
    bench_online_round()
