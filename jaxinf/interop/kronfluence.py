"""kronfluence's files, read and written without torch: factors and scores as safetensors, arguments as JSON.

kronfluence (1.0) keeps an analysis under ``OUTPUT_DIR/ANALYSIS_NAME/``:

- ``factors_NAME/``: ``factor_arguments.json`` (its ``FactorArguments``) and one
  safetensors file per factor, each holding one tensor per tracked module, keyed
  by the module's name in the torch model (``model.layers.0.mlp.up_proj``):

  ========================================== ===============================================
  ``activation_covariance``                  ``sum_{n,t} a a^T`` ``[d_in', d_in']`` (a sum)
  ``gradient_covariance``                    ``sum_{n,t} g g^T`` ``[d_out, d_out]`` (a sum)
  ``num_activation_covariance_processed``    ``N_tok`` (int64 ``[1]``)
  ``num_gradient_covariance_processed``      ``N_tok`` (int64 ``[1]``)
  ``activation_eigenvectors`` / ``_eigenvalues``  ``Q_A`` (columns), ``e_A`` of ``A = sum / N_tok``
  ``gradient_eigenvectors`` / ``_eigenvalues``    ``Q_S``, ``e_S``
  ``lambda_matrix``                          ``sum_n (Q_S^T G[n] Q_A)^2`` ``[d_out, d_in']`` (a sum;
                                             ``sum_n G[n]^2`` for the diagonal strategy)
  ``num_lambda_processed``                   ``N_seq`` (int64 ``[1]``)
  ========================================== ===============================================

  Which files exist depends on the strategy: none for ``identity``, the Lambda
  files for ``diagonal``, covariance and eigendecomposition for ``kfac``, all
  of them for ``ekfac``. Partitioned fits write ``..._data_partitionI_module_partitionJ``
  files first and aggregated ones when every partition is done.
- ``scores_NAME/``: ``score_arguments.json``, ``factor_arguments.json``,
  ``pairwise_scores.safetensors`` (``all_modules``: ``[queries, documents]``, or
  one such matrix per module with ``compute_per_module_scores``) and/or
  ``self_scores.safetensors`` (``all_modules``: ``[documents]``).

These are the same quantities jaxinf computes (A and S per token, Lambda per
sequence, the bias as an appended 1, matrices ``[d_out, d_in']``); jaxinf keeps
the normalized ``Lambda`` where kronfluence keeps its sum and count.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, cast

import numpy as np

from jaxinf.engine.curvature.strategies import STRATEGIES
from jaxinf.errors import UserError, missing

FACTOR_ARGUMENTS = "factor_arguments.json"
SCORE_ARGUMENTS = "score_arguments.json"
PAIRWISE = "pairwise_scores.safetensors"
SELF = "self_scores.safetensors"
ALL_MODULES = "all_modules"

COVARIANCE = (
    "activation_covariance",
    "gradient_covariance",
    "num_activation_covariance_processed",
    "num_gradient_covariance_processed",
)
EIGEN = ("activation_eigenvectors", "activation_eigenvalues", "gradient_eigenvectors", "gradient_eigenvalues")
LAMBDA = ("lambda_matrix", "num_lambda_processed")
GROUPS = {"covariance": COVARIANCE, "eigen": EIGEN, "lambda": LAMBDA}

# What each strategy's fit writes (kronfluence's FactorConfig), and what scoring with it needs: the groups the
# strategies declare (jaxinf.engine.curvature.strategies), which are kronfluence's.
WRITES = {name: s.writes for name, s in STRATEGIES.items()}
NEEDS = {name: s.needs for name, s in STRATEGIES.items()}

# kronfluence 1.0.1's FactorArguments, field by field (its defaults), so that
# ``FactorArguments(**json.load(factor_arguments.json))`` accepts what jaxinf writes.
FACTOR_ARGUMENT_DEFAULTS: dict[str, Any] = {
    "strategy": "ekfac",
    "use_empirical_fisher": False,
    "amp_dtype": None,
    "amp_scale": 65536.0,
    "has_shared_parameters": False,
    "covariance_max_examples": 100000,
    "covariance_data_partitions": 1,
    "covariance_module_partitions": 1,
    "activation_covariance_dtype": "torch.float32",
    "gradient_covariance_dtype": "torch.float32",
    "eigendecomposition_dtype": "torch.float64",
    "lambda_max_examples": 100000,
    "lambda_data_partitions": 1,
    "lambda_module_partitions": 1,
    "use_iterative_lambda_aggregation": False,
    "offload_activations_to_cpu": False,
    "per_sample_gradient_dtype": "torch.float32",
    "lambda_dtype": "torch.float32",
}


class InteropError(UserError):
    """A kronfluence directory or file that cannot be used as asked; the message names the file, module or tensor."""


# --------------------------------------------------------------------------- directories


@dataclasses.dataclass(frozen=True)
class KronfluenceDirs:
    """The factors directory and the scores directories of a kronfluence analysis.

    ``pairwise`` holds ``pairwise_scores.safetensors`` and ``self_scores`` holds
    ``self_scores.safetensors`` (kronfluence writes them under separate score
    names, so they are usually two directories); any of the three may be None.
    """

    factors: Path | None
    pairwise: Path | None
    self_scores: Path | None


def _is_scores_dir(p: Path) -> bool:
    return (p / PAIRWISE).exists() or (p / SELF).exists() or (p / SCORE_ARGUMENTS).exists()


def _is_factors_dir(p: Path) -> bool:
    return (p / FACTOR_ARGUMENTS).exists() and not _is_scores_dir(p)


def _subdirs(root: Path, prefix: str, names: list[str] | None, option: str) -> list[Path]:
    found = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix))
    if not names:
        return found
    out = []
    for name in names:
        want = root / (name if name.startswith(prefix) else prefix + name)
        if not want.is_dir():
            have = ", ".join(p.name for p in found) or "none"
            raise InteropError(f"{want}: no such kronfluence directory ({prefix}* here: {have}; {option})")
        out.append(want)
    return out


def _only(paths: list[Path], what: str, root: Path, option: str) -> Path | None:
    if len(paths) > 1:
        raise InteropError(
            f"{root}: several kronfluence directories with {what} ({', '.join(p.name for p in paths)}); "
            f"choose with {option}"
        )
    return paths[0] if paths else None


def locate(path: str | Path, factors: str | None = None, scores: str | list[str] | None = None) -> KronfluenceDirs:
    """The factors and scores directories of ``path``: an analysis directory (``OUTPUT_DIR/ANALYSIS_NAME``,
    holding ``factors_*`` and ``scores_*``), or one ``factors_*`` or ``scores_*`` directory itself.

    ``factors`` picks a factors directory by name, ``scores`` one or more score
    directories (with or without their prefix) when an analysis holds several.
    """
    root = Path(path)
    if not root.is_dir():
        why = "a file, not a kronfluence directory" if root.exists() else missing(root, "no such kronfluence directory")
        raise InteropError(f"{root}: {why}")
    own = "scores" if _is_scores_dir(root) else "factors" if _is_factors_dir(root) else None
    names = {
        "--factors": [factors] if factors else [],
        "--scores": [scores] if isinstance(scores, str) else scores or [],
    }
    given = [  # a name given is the directory's own, or it was ignored without a word
        option for option, values in names.items() if any(root.name not in (v, option[2:] + "_" + v) for v in values)
    ]
    if own is not None and given:
        raise InteropError(
            f"{given[0]} NAME: picks among the factors_* and scores_* of an analysis directory, but {root} is one "
            f"{own} directory itself; give the analysis directory ({root.parent}), or leave {given[0]} out"
        )
    if _is_scores_dir(root):
        return KronfluenceDirs(
            None, root if (root / PAIRWISE).exists() else None, root if (root / SELF).exists() else None
        )
    if _is_factors_dir(root):
        return KronfluenceDirs(root, None, None)
    fdirs = _subdirs(root, "factors_", [factors] if factors else None, "--factors NAME")
    sdirs = _subdirs(root, "scores_", [scores] if isinstance(scores, str) else scores, "--scores NAME")
    if not fdirs and not sdirs:
        raise InteropError(
            f"{root}: not a kronfluence analysis directory (no factors_* or scores_* directory, no {FACTOR_ARGUMENTS})"
        )
    return KronfluenceDirs(
        _only(fdirs, "factors", root, "--factors NAME"),
        _only([p for p in sdirs if (p / PAIRWISE).exists()], PAIRWISE, root, "--scores NAME"),
        _only([p for p in sdirs if (p / SELF).exists()], SELF, root, "--scores NAME"),
    )


# --------------------------------------------------------------------------- files


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InteropError(f"{path}: {missing(path)}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InteropError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(obj, dict):
        raise InteropError(f"{path}: expected a JSON object")
    return obj


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as numpy arrays (kronfluence writes float32/float64 and int64)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.exists():
        raise InteropError(f"{path}: {missing(path)}")
    if path.is_dir():  # safetensors' mmap says "No such device (os error 19)"
        raise InteropError(f"{path}: a directory where a file is expected")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise InteropError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())})") from None


def write_tensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file, written atomically (:func:`jaxinf.atomic.write_atomic`)."""
    from safetensors.numpy import save

    from jaxinf.atomic import write_atomic

    write_atomic(path, save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata))


def file_of(directory: Path, factor: str) -> Path:
    return Path(directory) / f"{factor}.safetensors"


# --------------------------------------------------------------------------- factors


@dataclasses.dataclass
class Factors:
    """The factors of one kronfluence ``factors_*`` directory.

    ``tensors[factor][module]`` as stored (sums and counts, not normalized);
    ``arguments``: ``factor_arguments.json``; ``groups``: which of covariance,
    eigen and lambda are present.
    """

    directory: Path
    arguments: dict
    tensors: dict[str, dict[str, np.ndarray]]

    @property
    def strategy(self) -> str:
        return str(self.arguments.get("strategy", "ekfac"))

    @property
    def fisher(self) -> str:
        return "empirical" if self.arguments.get("use_empirical_fisher", False) else "sampled"

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(g for g, names in GROUPS.items() if names[0] in self.tensors)

    @property
    def modules(self) -> list[str]:
        """Module names, in file order, of the first group present."""
        for g in self.groups:
            return list(self.tensors[GROUPS[g][0]])
        return []

    def count(self, factor: str, module: str) -> int:
        return int(np.asarray(self.tensors[factor][module]).reshape(-1)[0])

    def A(self, module: str) -> np.ndarray:
        """``A = sum a a^T / N_tok`` in float64."""
        return self.tensors["activation_covariance"][module].astype(np.float64) / self.count(
            "num_activation_covariance_processed", module
        )

    def S(self, module: str) -> np.ndarray:
        """``S = sum g g^T / N_tok`` in float64."""
        return self.tensors["gradient_covariance"][module].astype(np.float64) / self.count(
            "num_gradient_covariance_processed", module
        )

    def Lambda(self, module: str) -> np.ndarray:
        """``Lambda = sum / N_seq`` in float64 (kronfluence normalizes the same way before damping)."""
        return self.tensors["lambda_matrix"][module].astype(np.float64) / self.count("num_lambda_processed", module)


def read_factors(directory: str | Path, groups: tuple[str, ...] | None = None) -> Factors:
    """A ``factors_*`` directory: its arguments and the files of ``groups`` (default: what its strategy writes).

    Every file a group needs must exist and hold the same modules; a group whose
    files are absent altogether is left out (the caller decides whether it needs it).
    """
    directory = Path(directory)
    arguments = read_json(directory / FACTOR_ARGUMENTS)
    strategy = str(arguments.get("strategy", "ekfac"))
    if strategy not in WRITES:
        raise InteropError(f"{directory / FACTOR_ARGUMENTS}: unknown strategy {strategy!r}")
    tensors: dict[str, dict[str, np.ndarray]] = {}
    for group in groups if groups is not None else WRITES[strategy]:
        names = GROUPS[group]
        present = [n for n in names if file_of(directory, n).exists()]
        if not present:
            partial = sorted(directory.glob(f"{names[0]}_data_partition*.safetensors"))
            if partial:
                raise InteropError(
                    f"{partial[0]}: only partitioned {group} files; aggregate the partitions with "
                    f"kronfluence first (no {file_of(directory, names[0]).name})"
                )
            continue
        for n in names:
            if n not in present:
                raise InteropError(
                    f"{file_of(directory, n)}: {missing(file_of(directory, n))} ({group} of strategy {strategy})"
                )
            tensors[n] = read_tensors(file_of(directory, n))
        modules = list(tensors[names[0]])
        for n in names[1:]:
            if set(tensors[n]) != set(modules):
                extra = sorted(set(tensors[n]) ^ set(modules))
                raise InteropError(
                    f"{file_of(directory, n)}: modules differ from {file_of(directory, names[0]).name} "
                    f"(module {extra[0]})"
                )
    return Factors(directory, arguments, tensors)


def require(factors: Factors, strategy: str) -> None:
    """Raises naming the first file that scoring with ``strategy`` needs and ``factors`` lacks."""
    for group in NEEDS[strategy]:
        if group not in factors.groups:
            raise InteropError(
                f"{file_of(factors.directory, GROUPS[group][0])}: file is missing "
                f"(strategy {strategy} needs the {group} factors)"
            )


def factor_arguments(strategy: str, fisher: str, dtype: str) -> dict:
    """``factor_arguments.json`` for factors written by jaxinf (every example used; the arrays' dtype)."""
    torch_dtype = f"torch.{dtype}"
    return dict(
        FACTOR_ARGUMENT_DEFAULTS,
        strategy=strategy,
        use_empirical_fisher=fisher == "empirical",
        covariance_max_examples=None,
        lambda_max_examples=None,
        activation_covariance_dtype=torch_dtype,
        gradient_covariance_dtype=torch_dtype,
        per_sample_gradient_dtype=torch_dtype,
        lambda_dtype=torch_dtype,
    )


def write_factors(directory: str | Path, arguments: dict, tensors: dict[str, dict[str, np.ndarray]]) -> Path:
    """A ``factors_*`` directory: ``factor_arguments.json`` and one safetensors file per factor.

    Each file carries the arguments as string metadata, as kronfluence's own do.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {k: str(v) for k, v in arguments.items()}
    for factor, per_module in tensors.items():
        write_tensors(file_of(directory, factor), per_module, metadata)
    from jaxinf.atomic import write_json

    write_json(directory / FACTOR_ARGUMENTS, arguments)
    return directory


# --------------------------------------------------------------------------- scores


@dataclasses.dataclass
class Scores:
    """A ``scores_*`` directory: pairwise ``[Q, N]`` and/or self-influence ``[N]`` (summed over modules), float64."""

    directory: Path
    arguments: dict
    pairwise: np.ndarray | None
    self_influence: np.ndarray | None
    per_module: dict[str, np.ndarray] | None


def _total(tensors: dict[str, np.ndarray], path: Path) -> tuple[np.ndarray, dict | None]:
    if ALL_MODULES in tensors:
        return tensors[ALL_MODULES].astype(np.float64), None
    if not tensors:
        raise InteropError(f"{path}: holds no scores")
    shapes = {v.shape for v in tensors.values()}
    if len(shapes) != 1:
        raise InteropError(f"{path}: per-module scores of different shapes {sorted(shapes)}")
    per = {k: v.astype(np.float64) for k, v in tensors.items()}
    return cast(np.ndarray, sum(per.values())), per  # tensors is not empty: refused above


def read_scores(directory: str | Path) -> Scores:
    """Pairwise and self-influence scores of a ``scores_*`` directory (per-module scores are summed)."""
    directory = Path(directory)
    arguments = read_json(directory / SCORE_ARGUMENTS) if (directory / SCORE_ARGUMENTS).exists() else {}
    pairwise = self_scores = per_module = None
    if (directory / PAIRWISE).exists():
        pairwise, per_module = _total(read_tensors(directory / PAIRWISE), directory / PAIRWISE)
        if pairwise.ndim != 2:
            raise InteropError(f"{directory / PAIRWISE}: expected [queries, documents], got shape {pairwise.shape}")
    if (directory / SELF).exists():
        self_scores, _ = _total(read_tensors(directory / SELF), directory / SELF)
        if self_scores.ndim != 1:
            raise InteropError(f"{directory / SELF}: expected [documents], got shape {self_scores.shape}")
    if pairwise is None and self_scores is None:
        raise InteropError(f"{directory}: no {PAIRWISE} or {SELF}")
    return Scores(directory, arguments, pairwise, self_scores, per_module)
