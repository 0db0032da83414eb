"""The personalization workflow as Python functions: fit a personalized reward model on a
preference file (:func:`fit_personalized`, what ``pluralign fit`` runs) and rank candidate
responses for one user with a saved model (:func:`rank_candidates`, what ``pluralign rank``
runs).

Layer: above the data readers (:mod:`pluralign.data`), the text encoder
(:mod:`pluralign.features`), the reward models (:mod:`pluralign.rewards`), the confidence sets
(:mod:`pluralign.confidence`) and the policies (:mod:`pluralign.policies`); below the command
line (:mod:`pluralign.cli.personalize`), which only parses flags and prints what these return.

Ranking with pessimism is the pointwise pessimistic policy (Zhu, Jordan & Jiao 2023;
docs/design.md §4): per prompt, the candidate with the highest lower confidence bound
``θ̂_uᵀφ − β‖φ − φ̄‖_{M_u⁻¹}`` (``φ̄`` the mean candidate, ``M_u`` the user's design matrix
saved by :func:`fit_personalized`).

Errors about user input are :class:`~pluralign.errors.PluralignError`; their messages are the
command line's (they name ``rank``'s options ``--adapt``, ``--context``, ``--pessimism`` where
those are the keyword arguments of the same names).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pluralign.errors import PluralignError

if TYPE_CHECKING:
    import numpy as np

    from pluralign.data import PreferenceData
    from pluralign.rewards.protocols import SavableUserModel

__all__ = [
    "MODELS",
    "FitResult",
    "RankResult",
    "check_model",
    "design_matrices",
    "fit_personalized",
    "known_users_text",
    "load_training_data",
    "rank_candidates",
    "split_per_user",
]

# the models `fit_personalized` (``pluralign fit --model``) builds
MODELS = ("shared_basis", "per_user", "pooled", "contextual")


# ---------------------------------------------------------------------------------------- fit
def check_model(model: str) -> None:
    """Refuse a ``model`` name that is not one of :data:`MODELS` (a PluralignError naming them)."""
    if model not in MODELS:
        raise PluralignError(f"unknown model {model!r}; valid: {', '.join(MODELS)}")


def load_training_data(
    data: Path,
    format: str = "auto",
    survey: Path | None = None,
    encoder_model: str | None = None,
    mode: str = "joint",
    cache_dir: Path | None = None,
    seed: int = 0,
    columns: Mapping[str, str] | None = None,
) -> tuple[PreferenceData, dict[str, Any]]:
    """``(PreferenceData, feature metadata)`` from a numeric or text preference file.

    Numeric rows are read as they are; text rows (TRL, summarize_from_feedback, PRISM) are
    encoded into ``φ(s,a)`` by a :class:`~pluralign.features.TextEncoder` (``encoder_model``,
    ``mode``, embedding cache ``cache_dir``; ``seed`` orders each pair). ``columns``: the
    readers' ``*_column`` keywords (``user_column="worker"``, ...). The metadata says how the
    features were made (saved with the model, so that ranking encodes candidates alike)."""
    from pluralign.data import load_preferences
    from pluralign.data.loaders import detect_format, read_text_preferences

    columns = dict(columns or {})
    fmt = detect_format(data) if format == "auto" else format
    if fmt == "numeric":
        from pluralign.data.contexts import ContextSchema

        pdata = load_preferences(data, **columns)
        meta: dict[str, Any] = {"kind": "numeric", "format": fmt}
        if pdata.x is not None:
            meta["context"] = ContextSchema.vector(pdata.d_x).to_dict()
        return pdata, meta
    prefs = read_text_preferences(data, format=fmt, survey=survey, **columns)
    from pluralign.features import TextEncoder

    encoder = TextEncoder(
        encoder_model, mode=mode, cache_dir=cache_dir if cache_dir is not None else None
    )
    pdata = prefs.to_preference_data(encoder, seed=seed)
    meta = {
        "kind": "text",
        "format": fmt,
        "encoder": encoder.config(),
        "template": prefs.template or encoder.template,
        "context_names": prefs.context_names,
    }
    if prefs.context_schema is not None:
        meta["context"] = prefs.context_schema.to_dict()
    return pdata, meta


def split_per_user(
    data: PreferenceData, test_size: float, seed: int
) -> tuple[PreferenceData, PreferenceData | None]:
    """``(train, test)``: per user, a seeded ``test_size`` share of the comparisons is held out
    (users with one comparison, and at least one comparison of every user, stay in training);
    ``test`` is ``None`` when nothing is held out."""
    from pluralign.data.split import per_user_test_mask

    test = per_user_test_mask(data.users, test_size, seed)  # type: ignore[arg-type]  # per-user data has ids
    return data.subset(~test), (data.subset(test) if test.any() else None)


def design_matrices(model: SavableUserModel, train: PreferenceData) -> dict[str, np.ndarray]:
    """Per-user design matrices ``M_u = Σ̂_u + λI`` of the user views of a fitted multi-user
    ``model`` on its training data (for pessimistic ranking): ``design`` ``(G, p, p)``,
    ``design_index`` ``(U,)`` (user → matrix; a pooled model has one matrix for everybody),
    ``design_lam`` and ``design_n`` ``(G,)``. Empty when the matrices would hold more than
    20 million numbers."""
    import numpy as np

    from pluralign.confidence import ConfidenceSet
    from pluralign.rewards import Pooled

    users = model.users_.tolist()
    groups = users[:1] if isinstance(model, Pooled) else users
    p = model.user_basis().shape[1]
    if len(groups) * p * p > 20_000_000:
        return {}
    mats, lams, ns = [], [], []
    for user in groups:
        view = model.user_model(user)
        rows = model.confidence_rows(user, train)
        cs = ConfidenceSet.fit(view, rows, beta=0.0)
        mats.append(cs.M)
        lams.append(cs.lam)
        ns.append(cs.n)
    index = (
        np.zeros(len(users), dtype=np.int64)
        if len(groups) == 1 and len(users) > 1
        else np.arange(len(users))
    )
    return {
        "design": np.array(mats),
        "design_index": index,
        "design_lam": np.array(lams),
        "design_n": np.array(ns),
    }


@dataclass
class FitResult:
    """What :func:`fit_personalized` returns.

    ``estimator`` is the fitted reward model; ``train`` / ``test`` the per-user split (``test``
    ``None`` without a held-out share); ``summary`` and ``users`` the totals and the per-user
    accuracy records (report.json's ``summary`` and ``users``); ``designs`` the per-user design
    matrices (:func:`design_matrices`); ``metadata`` what :meth:`save` stores beside the model
    (how the features were made, ridge, seed, split, the data file)."""

    estimator: Any
    data: Path
    train: PreferenceData
    test: PreferenceData | None
    summary: dict[str, Any]
    users: list[dict[str, Any]]
    designs: dict[str, np.ndarray]
    metadata: dict[str, Any]

    @property
    def report(self) -> dict[str, Any]:
        """report.json's document: ``{"summary": ..., "users": ...}``."""
        return {"summary": self.summary, "users": self.users}

    def save(self, out: Path) -> None:
        """Write the model (``model.npz`` + ``model.json``, no pickle; what ``rank`` loads) and
        the report (``report.json``, ``per_user_accuracy.csv``, ``accuracy.png``) to ``out``."""
        import csv
        import io

        from pluralign._atomic import atomic_write_text
        from pluralign.plots import per_user_accuracy_plot
        from pluralign.rewards.persistence import save_model

        save_model(self.estimator, out, designs=self.designs, metadata=self.metadata)
        atomic_write_text(out / "report.json", json.dumps(self.report, indent=2) + "\n")
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(self.users[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.users)
        atomic_write_text(out / "per_user_accuracy.csv", buffer.getvalue())
        per_user_accuracy_plot(
            self.users,
            out / "accuracy.png",
            f"{self.summary['model']} on {self.data.name}: per-user pairwise accuracy",
        )


def fit_personalized(
    data: Path,
    model: str = "shared_basis",
    rank: int = 4,
    *,
    format: str = "auto",
    survey: Path | None = None,
    encoder: str | None = None,
    mode: str = "joint",
    ridge: float = 1.0,
    test_size: float = 0.2,
    seed: int = 0,
    unknown_user: str = "error",
    cache_dir: Path | None = None,
    columns: Mapping[str, str] | None = None,
    parameter_names: Mapping[str, str] | None = None,
) -> FitResult:
    """Fit a personalized reward model on the preference file ``data``, with a per-user
    accuracy report; :meth:`FitResult.save` writes it for :func:`rank_candidates`.

    ``model``: ``shared_basis`` (``θ_u = θ0 + B w_u``, rank ``rank``; P-ShareLoRA's shared
    structure, Liu et al. 2025, arXiv 2503.19201), ``per_user``, ``pooled`` (one reward for
    everybody), or ``contextual`` (``xᵀΘφ`` of LoCo-RLHF, Lee, Sun & Liu 2024, arXiv 2412.19436,
    on the users' contexts, rank ``rank``; needs a user context on every row, and scores a new
    user from their context). The data are read as by :func:`load_training_data` (``format``,
    ``survey``, ``encoder``, ``mode``, ``cache_dir``, ``columns``), split per user
    (:func:`split_per_user`, ``test_size``, ``seed``) and fitted
    with ``l2 = ridge / N_train`` (a prior on the summed loss); ``unknown_user`` (``error`` or
    ``shared``: unknown users get ``θ0``) is the model's. ``parameter_names`` maps the
    estimator's parameters (``rank``, ``unknown_user``) to the names an error about their
    value should use (the command line passes its flags, ``--rank``)."""
    from pluralign.errors import DataValidationError
    from pluralign.rewards import Contextual, PerUser, Pooled, SharedBasis

    check_model(model)
    data = Path(data)
    pdata, features = load_training_data(
        data, format, survey, encoder, mode, cache_dir, seed, columns
    )
    if pdata.users is None:
        raise PluralignError(f"{data}: personalized models need user ids (user / user_id)")
    if model == "contextual" and pdata.x is None:
        raise PluralignError(
            f"{data}: --model contextual needs user contexts, and the rows have none "
            "(user_context on every row, x for numeric rows; --context-column names "
            "another column)"
        )
    train, test = split_per_user(pdata, test_size, seed) if test_size > 0 else (pdata, None)
    l2 = ridge / train.n
    names = parameter_names or {}
    try:
        estimator = {
            "shared_basis": lambda: SharedBasis(rank, l2, unknown_user=unknown_user, seed=seed),
            "per_user": lambda: PerUser(l2, unknown_user=unknown_user),
            "pooled": lambda: Pooled(l2),
            "contextual": lambda: Contextual(rank, l2, unknown_user=unknown_user, seed=seed),
        }[model]().fit(train)
    except DataValidationError as err:
        if err.path is None and err.field in names:  # a parameter's value, not the data
            raise PluralignError(f"{names[err.field]}: {err.bare}") from None  # type: ignore[index]
        raise
    train_acc = estimator.per_user_accuracy(train)
    test_acc = estimator.per_user_accuracy(test) if test is not None else {}
    users = [
        {
            "user": u,
            "n_train": train_acc[u][1],
            "train_accuracy": train_acc[u][0],
            "n_test": test_acc.get(u, (None, 0))[1],
            "test_accuracy": test_acc.get(u, (None, 0))[0],
        }
        for u in train_acc
    ]
    summary = {
        "model": model,
        "rank": rank if model in ("shared_basis", "contextual") else None,
        "n_train": train.n,
        "n_test": 0 if test is None else test.n,
        "users": len(users),
        "d_phi": pdata.d_phi,
        "d_x": pdata.d_x if model == "contextual" else None,
        "train_accuracy": estimator.accuracy(train),
        "test_accuracy": None if test is None else estimator.accuracy(test),
        "train_loglik": estimator.log_likelihood(train),
        "test_loglik": None if test is None else estimator.log_likelihood(test),
        "converged": bool(estimator.converged_),
    }
    return FitResult(
        estimator=estimator,
        data=data,
        train=train,
        test=test,
        summary=summary,
        users=users,
        designs=design_matrices(estimator, train),
        metadata={
            "features": features,
            "ridge": ridge,
            "seed": seed,
            "test_size": test_size,
            "data": str(data),
        },
    )


# --------------------------------------------------------------------------------------- rank
def _user_id(user: Any, users: list[Any]) -> Any:
    """``user`` as the model's id type (a string of digits is an int where the ids are)."""
    if users and all(isinstance(u, int) for u in users):
        try:
            return int(user)
        except ValueError:
            return user
    return user


def known_users_text(users: list[Any]) -> str:
    """The first ten of ``users`` (and how many there are), for messages."""
    known = ", ".join(map(repr, users[:10]))
    return known + ("" if len(users) <= 10 else f", … ({len(users)} users)")


def _read_candidates(path: Path, text: bool, d_phi: int) -> list[tuple[int, dict[str, Any]]]:
    """``(line, row)`` of each candidate set of a JSONL file: ``{"prompt", "responses"}`` rows
    (``text``; strings or TRL message lists, rendered as the training rows were) or
    ``{"phi": [[...], ...]}`` rows of ``d_phi`` numbers per candidate."""
    import math

    from pluralign.data.io import iter_jsonl_objects
    from pluralign.data.loaders import render_text
    from pluralign.errors import DataValidationError

    if not path.is_file():
        raise DataValidationError("file not found", path=str(path))
    rows = []
    for row, where in iter_jsonl_objects(path):
        if text:  # strings, or TRL message lists rendered as the training rows were
            if "prompt" not in row:
                raise DataValidationError("missing", field="prompt", **where)
            prompt = (
                row["prompt"]
                if isinstance(row["prompt"], str)
                else render_text(row["prompt"], "prompt", **where)
            )
            responses = row.get("responses")
            if not isinstance(responses, list) or not responses:
                raise DataValidationError(
                    "must be a non-empty list of non-empty strings or message lists",
                    field="responses",
                    **where,
                )
            texts = [render_text(r, f"responses[{i}]", **where) for i, r in enumerate(responses)]
            row = {**row, "text_prompt": prompt, "text_responses": texts}
        else:
            phi = row.get("phi")
            ok = (
                isinstance(phi, list)
                and phi
                and all(
                    isinstance(v, list)
                    and len(v) == d_phi
                    and all(
                        isinstance(c, int | float) and not isinstance(c, bool) and math.isfinite(c)
                        for c in v
                    )
                    for v in phi
                )
            )
            if not ok:
                raise DataValidationError(
                    f"must be a non-empty list of length-{d_phi} lists of finite numbers",
                    field="phi",
                    **where,
                )
        rows.append((where["line"], row))
    if not rows:
        raise DataValidationError("no candidates", path=str(path))
    return rows


def _encode_candidates(
    encoder: Any, row: dict[str, Any], template: str, model_dir: Path, d_phi: int
) -> np.ndarray:
    """``φ(prompt, response)`` of a candidate row with the encoder a model folder names; a model
    that cannot be loaded (a missing folder, an unreachable hub name) is a clear error."""
    try:
        phi = encoder.features(
            [row["text_prompt"]] * len(row["text_responses"]),
            row["text_responses"],
            template=template,
        )
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as exc:
        if isinstance(exc, PluralignError):
            raise
        raise PluralignError(
            f"{model_dir}/model.json: field 'features.encoder': cannot load or "
            f"run the text encoder {encoder.model_path!r} "
            f"({type(exc).__name__}: {str(exc)[:160]})"
        ) from None
    if phi.shape[1] != d_phi:
        raise PluralignError(
            f"{model_dir}: the text encoder gives {phi.shape[1]} features but "
            f"the model was fitted on d_phi = {d_phi}"
        )
    return phi


def _read_adapt_pairs(
    path: Path, uid: Any, features: dict[str, Any], encoder: Any, d_phi: int
) -> PreferenceData:
    """``adapt``: the preference pairs of ``path`` (numeric, or text encoded with the model's
    encoder and template) as ``PreferenceData``; every row must be of user ``uid`` (numeric rows
    without user ids are taken as theirs), else an error naming the row."""
    from pluralign.data import load_preferences
    from pluralign.data.loaders import detect_format, read_text_preferences
    from pluralign.errors import DataValidationError

    if not path.is_file():
        raise DataValidationError("--adapt: file not found", path=str(path))
    fmt = detect_format(path)
    text = features.get("kind") == "text"
    if (fmt != "numeric") != text:
        raise DataValidationError(
            f"--adapt: {fmt} pairs, but the model was fitted on "
            + (
                "text; give text pairs (trl, summarize or prism) of the user"
                if text
                else "numeric features; give numeric pairs (phi0, phi1, y) of the user"
            ),
            path=str(path),
        )
    if text:
        prefs = read_text_preferences(path, format=fmt)
        users = prefs.users.tolist()
        lines = [line for _, line in prefs.where] if len(prefs.where) == len(users) else None
    else:
        data = load_preferences(path)
        users = None if data.users is None else data.users.tolist()
        lines = None
        if users is not None and path.suffix.lower() != ".npz":
            from pluralign.data.sources import Problems, iter_rows

            lines = [
                line
                for _, line, _ in iter_rows(
                    path, Problems("raise"), typed=("x", "phi0", "phi1", "y")
                )
            ]
            lines = lines if len(lines) == len(users) else None
    if users is not None:
        other = [i for i, u in enumerate(users) if str(u) != str(uid)]
        if other:
            i = other[0]
            raise DataValidationError(
                f"--adapt: a pair of user {users[i]!r}, not of --user {uid!r}"
                + (f" (and {len(other) - 1} more such row(s))" if len(other) > 1 else "")
                + "; --adapt takes the pairs of the user being ranked only",
                path=str(path),
                field="user_id" if text else "user",
                **({"line": lines[i]} if lines is not None else {"row": i}),
            )
    if text:
        import dataclasses

        # joined as the model's training rows were
        prefs = dataclasses.replace(prefs, template=features["template"])
        data = prefs.to_preference_data(encoder, orient="chosen_second")
    if data.d_phi != d_phi:
        raise DataValidationError(
            f"--adapt: pairs with {data.d_phi} features, but the model "
            f"was fitted on d_phi = {d_phi}",
            path=str(path),
        )
    return data


def _rank_context(
    model: Any,
    model_dir: Path,
    uid: Any,
    known: bool,
    context: Any,
    features: dict[str, Any],
    adapting: bool,
    pessimism: float,
) -> bool:
    """``context``: for a contextual model, register an unseen ``uid`` by the context
    (``True``: the user is scored from it); a known user's context must be the one the model
    has. Anything else with a context is an error, naming why."""
    import numpy as np

    from pluralign.data.contexts import ContextSchema
    from pluralign.rewards import Contextual

    contextual = isinstance(model, Contextual)
    if adapting and contextual:
        raise PluralignError(
            f"{model_dir}: a contextual model scores a new user from their "
            "context; give --context JSON instead of --adapt"
        )
    if context is None:
        return False
    if not contextual:
        raise PluralignError(
            f"--context applies to a contextual model (`pluralign fit --model "
            f"contextual`); {model_dir} holds a {type(model).__name__}"
        )
    if isinstance(context, str):
        try:
            value = json.loads(context)
        except json.JSONDecodeError as err:
            raise PluralignError(
                f"--context: not JSON ({err.msg} at character {err.pos}); give "
                "e.g. '{\"age\": \"25-34\"}' or '[0.1, 2.0]'"
            ) from None
    else:
        value = context
    schema = (
        ContextSchema.from_dict(features["context"], field="features.context")
        if "context" in features
        else ContextSchema.vector(model.d_x_)
    )
    x = schema.encode(value, name="--context")
    if known:
        stored = model.contexts_[model.user_index(uid, allow_unknown=False)[0]]
        if not np.array_equal(stored, x):
            raise PluralignError(
                f"user {uid!r} is known to {model_dir} with another context; "
                "drop --context to rank them with theirs, or give a new "
                "user id"
            )
        return False
    if pessimism > 0:
        raise PluralignError(
            "--pessimism needs the design matrix of a fitted user; a user "
            "scored from --context has none (rank without --pessimism)"
        )
    model.add_users([uid], x[None, :])
    return True


@dataclass
class RankResult:
    """What :func:`rank_candidates` returns: one record per candidate set (``line``, ``user``,
    ``unknown_user``, ``from_context`` for contextual models, ``lcb`` with pessimism, ``best``,
    ``response`` for text candidates, ``reward``), the user as the model's id, whether the user
    is ``known`` (fitted, adapted or scored from a context; ``False``: ranked with the shared
    reward θ0), whether they were scored ``from_context``, and the model's ``known_users``."""

    records: list[dict[str, Any]]
    user: Any
    known: bool
    from_context: bool
    known_users: list[Any]


def rank_candidates(
    model_dir: Path,
    candidates: Path,
    user: Any,
    *,
    pessimism: float = 0.0,
    cache_dir: Path | None = None,
    adapt: Path | None = None,
    context: Any = None,
) -> RankResult:
    """Personalized best-of-n with the model that :meth:`FitResult.save` wrote to
    ``model_dir``: per candidate set of the JSONL file ``candidates`` (``{"prompt",
    "responses"}`` rows for text models, ``{"phi": [[...], ...]}`` for numeric ones), the
    candidate with the highest reward ``θ̂_uᵀφ`` for ``user``, or, with ``pessimism`` β > 0, the
    highest lower confidence bound ``θ̂_uᵀφ − β‖φ − φ̄‖_{M_u⁻¹}`` (``φ̄`` the mean candidate;
    the pointwise pessimistic policy, :class:`~pluralign.policies.Pessimistic`).

    A user the model does not know is an error, unless ``adapt`` (a preference file of the
    user's pairs) fits them first (the model's ``adapt_user``), ``context`` (contextual models:
    the user's context as JSON text or as the parsed value, in the form of the training rows'
    ``user_context``) scores them from their context (their reward is ``θ(x) = Θᵀ[1, z(x)]``),
    or the model was fitted with ``unknown_user="shared"``: then they are ranked with the shared
    reward θ0 (``RankResult.known`` is ``False``). ``cache_dir``: the embedding cache of text
    models. Pessimism needs the design matrix of a fitted user."""
    import numpy as np

    from pluralign.confidence import ConfidenceSet
    from pluralign.data import TargetStates
    from pluralign.policies import Pessimistic
    from pluralign.rewards import Contextual
    from pluralign.rewards.persistence import load_model

    model_dir, candidates = Path(model_dir), Path(candidates)
    adapt = None if adapt is None else Path(adapt)
    model, meta, designs = load_model(model_dir)
    uid = _user_id(user, meta["users"])
    features = meta.get("features", {"kind": "numeric"})
    text = features.get("kind") == "text"
    rows = _read_candidates(candidates, text, model.d_phi_)
    encoder = None
    if text:
        from pluralign.features import TextEncoder

        enc = features["encoder"]
        encoder = TextEncoder(
            enc["model"],
            mode=enc["mode"],
            template=enc["template"],
            normalize=enc["normalize"],
            cache_dir=cache_dir,
        )
    known = bool(model.user_index(uid, allow_unknown=True)[0] >= 0)
    from_context = _rank_context(
        model, model_dir, uid, known, context, features, adapt is not None, pessimism
    )
    known = known or from_context
    if adapt is not None:
        if not hasattr(model, "adapt_user"):
            raise PluralignError(
                f"{model_dir}: a {type(model).__name__} model has one "
                "reward for every user; --adapt does not apply"
            )
        if known:
            raise PluralignError(
                f"user {uid!r} is already known to {model_dir}; --adapt "
                "fits new users only (rank without it)"
            )
        if pessimism > 0:
            raise PluralignError(
                "--pessimism needs the design matrix of a fitted user; "
                "an adapted user has none (rank without --pessimism, or "
                "refit with the user's pairs)"
            )
        pairs = _read_adapt_pairs(adapt, uid, features, encoder, model.d_phi_)
        model.adapt_user(pairs, user=uid)
        known = True
    elif not known and model.unknown_user != "shared":
        how = (
            f"Give --context JSON (the context of {uid!r}) to score them from it"
            if isinstance(model, Contextual)
            else f"Give --adapt PAIRS.jsonl (a few preference pairs of {uid!r}) to fit them first"
        )
        raise PluralignError(
            f"unknown user {uid!r}; known users: {known_users_text(meta['users'])}. "
            f"{how}, or refit with `pluralign fit --unknown-user shared` to rank unknown "
            "users with the shared reward θ0"
        )
    elif not known and pessimism > 0:
        raise PluralignError(
            f"--pessimism needs the design matrix of a fitted user; "
            f"{uid!r} is unknown (rank without --pessimism, or give "
            "--adapt PAIRS.jsonl)"
        )
    theta = model.user_theta(uid)[0]
    policy = None
    if pessimism > 0:
        if not designs:
            raise PluralignError(
                f"{model_dir} has no design matrices; refit, or rank without --pessimism"
            )
        view = model.user_model(uid)
        design_row = int(designs["design_index"][model.user_index(uid, allow_unknown=False)[0]])
        p = int(np.asarray(view.params_).size)
        if designs["design"].shape[1] != p:
            raise PluralignError(
                f"{model_dir}/model.npz: field 'design': matrices are "
                f"{designs['design'].shape[1]}×{designs['design'].shape[1]}"
                f" but the user model has {p} parameters"
            )
        cs = ConfidenceSet(
            view.params_,
            designs["design"][design_row],
            pessimism,
            lam=float(designs["design_lam"][design_row]),
            n=int(designs["design_n"][design_row]),
            kind="design",
            bound_feature=float("nan"),
            bound_theta=float("nan"),
        )
        policy = Pessimistic(view, cs, pointwise=True)
    records = []
    for line, row in rows:
        if text:
            phi = _encode_candidates(
                encoder, row, meta["features"]["template"], model_dir, model.d_phi_
            )
        else:
            phi = np.asarray(row["phi"], dtype=np.float64)
        reward = phi @ theta
        record: dict[str, Any] = {"line": line, "user": uid, "unknown_user": not known}
        if isinstance(model, Contextual):
            record["from_context"] = from_context
        if policy is not None:
            best = int(np.argmax(policy.probs(TargetStates(None, phi[None]))[0]))
            z = policy.model.features(None, phi - phi.mean(axis=0))
            record["lcb"] = (reward - pessimism * policy.confidence.norm(z)).tolist()
        else:
            best = int(np.argmax(reward))
        record["best"] = best
        if text:
            record["response"] = row["responses"][best]
        record["reward"] = reward.tolist()
        records.append(record)
    return RankResult(records, uid, known, from_context, list(meta["users"]))
