"""``jaxinf compare``, factor import and export with kronfluence, and bad kronfluence input.

The tiny Llama world of the parity tests (float64, empirical Fisher):

- ``jaxinf compare`` prints per-layer and per-query tables and writes the JSON report;
- kronfluence's factors imported into a run directory and scored by ``jaxinf run``
  give kronfluence's own scores (relative error <= 1e-6), and a run's factors
  exported to kronfluence give the run's scores when kronfluence scores with them;
- round trips are exact: kronfluence -> jaxinf -> kronfluence gives back the same
  tensors for every strategy, jaxinf -> kronfluence -> jaxinf the same stage results;
- missing files, a module that maps to no layer, another model's shapes and
  another strategy are one-line errors naming the file, module or tensor, and
  leave no run directory behind.
"""

from __future__ import annotations

import json
import re
import shutil

import kronfluence_support as ks
import numpy as np
import pytest

from jaxinf import cli
from jaxinf.interop import kronfluence as kf
from jaxinf.interop import transfer

TOL = 1e-6


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    w = ks.world(tmp_path_factory, "llama")
    kron = ks.kronfluence(tmp_path_factory, w)
    for strategy in ("identity", "diagonal", "kfac", "ekfac"):
        kron.fit(strategy)
    return {
        "world": w,
        "run": ks.parity_run(w),
        "kron": kron,
        "pairwise": kron.pairwise("ekfac", None, None, name="pairwise"),
        "self": kron.self_scores("ekfac", None, name="self"),
    }


def _main(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_compare_prints_tables_and_writes_json(llama, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    code, out, err = _main(
        [
            "compare",
            "--kronfluence",
            llama["kron"].root,
            "--factors",
            "ekfac",
            "--scores",
            "pairwise",
            "--scores",
            "self",
            "--run",
            llama["run"],
            "--topk",
            "5",
            "--json",
            report_path,
        ],
        capsys,
    )
    assert code == 0, err
    assert "covariance: layer" in out and "model.layers.2.mlp.down_proj" in out and "Lambda rel. err" in out
    assert "top-5" in out and "self-influence: rel. error" in out
    report = json.loads(report_path.read_text())
    assert set(report["stages"]) == {"covariance", "eigen", "lambda", "scores", "self_influence"}
    assert len(report["stages"]["lambda"]) == 9  # 3 layers x gate, up, down
    assert [q["query"] for q in report["stages"]["scores"]["queries"]] == [f"q{i}" for i in range(5)]
    assert all(v <= TOL for k, v in report["max_rel_error"].items() if not k.startswith("eigen.Q"))
    assert min(q["pearson"] for q in report["stages"]["scores"]["queries"]) > 1 - 1e-9
    code, out, _ = _main(
        [
            "compare",
            "--kronfluence",
            llama["kron"].root,
            "--factors",
            "ekfac",
            "--scores",
            "pairwise",
            "--run",
            llama["run"],
            "--json",
            "-",
        ],
        capsys,
    )
    assert code == 0 and json.loads(out)["stages"]["scores"]["topk"] == 10


def test_imported_kronfluence_factors_score_like_kronfluence(llama, capsys):
    """Factors fitted in PyTorch, scored by ``jaxinf run``: no curvature stage runs, scores are kronfluence's."""
    w = llama["world"]
    args = ks.overrides(w, w["root"] / "imported")
    code, out, err = _main(["kronfluence", "import", "--factors", "ekfac", llama["kron"].root, *args], capsys)
    assert code == 0, err
    record = json.loads((w["root"] / "imported" / "run.json").read_text())
    assert record["stages"]["lambda"]["source"].startswith("kronfluence ")
    assert record["stages"]["queries"]["status"] == "pending"
    run = ks.jaxinf_run(args)
    assert ks.rel_error(np.load(run / "scores.npy"), llama["pairwise"]) <= TOL
    assert ks.rel_error(np.load(run / "self_influence.npy"), llama["self"]) <= TOL
    assert [p.name for p in (run / "state" / "covariance").iterdir()] == ["0"]  # the imported sums, nothing fitted


@pytest.mark.parametrize("strategy", ["identity", "diagonal", "kfac", "ekfac"])
def test_kronfluence_to_jaxinf_to_kronfluence_is_exact(llama, tmp_path, strategy):
    w, kron = llama["world"], llama["kron"]
    config = ks.config(w, tmp_path / "run", **{"factors.strategy": strategy})
    transfer.import_factors(kron.root / f"factors_{strategy}", config)
    out = transfer.export_factors(tmp_path / "run", tmp_path / "factors_back")
    original = kron.root / f"factors_{strategy}"
    files = sorted(p.name for p in original.glob("*.safetensors"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    assert len(files) == {"identity": 0, "diagonal": 2, "kfac": 8, "ekfac": 10}[strategy]
    for name in files:
        a, b = kf.read_tensors(original / name), kf.read_tensors(out / name)
        assert a.keys() == b.keys()
        for module in a:
            assert a[module].dtype == b[module].dtype and np.array_equal(a[module], b[module]), (name, module)
    args = kf.read_json(out / kf.FACTOR_ARGUMENTS)
    assert args["strategy"] == strategy and args["use_empirical_fisher"] is True
    from kronfluence.arguments import FactorArguments

    FactorArguments(**args)  # kronfluence reads what jaxinf writes


def test_jaxinf_to_kronfluence_to_jaxinf_is_exact_and_kronfluence_scores_with_it(llama, tmp_path):
    w, kron = llama["world"], llama["kron"]
    exported = transfer.export_factors(llama["run"], kron.root / "factors_from_jaxinf", overwrite=True)
    theirs = kron.pairwise("ekfac", None, None, name="pairwise_from_jaxinf", factors_name="from_jaxinf")
    assert ks.rel_error(np.load(llama["run"] / "scores.npy"), theirs) <= TOL
    transfer.import_factors(exported, ks.config(w, tmp_path / "back"))
    before, after = transfer.load_run(llama["run"]), transfer.load_run(tmp_path / "back")
    pairs = [
        (before.covariance.A, after.covariance.A),
        (before.covariance.S, after.covariance.S),
        (before.covariance.count, after.covariance.count),
        (before.Lambda, after.Lambda),
    ]
    pairs += [(getattr(before.eigen, f), getattr(after.eigen, f)) for f in ("Q_A", "e_A", "Q_S", "e_S")]
    for x, y in pairs:
        assert x.keys() == y.keys()
        for k in x:
            assert np.asarray(x[k]).dtype == np.asarray(y[k]).dtype and np.array_equal(x[k], y[k]), k


# --------------------------------------------------------------------------- bad input


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, change):
    tensors = kf.read_tensors(path)
    kf.write_tensors(path, change(tensors))


def _bad_missing(d):
    (d / "lambda_matrix.safetensors").unlink()
    return r"lambda_matrix\.safetensors: file is missing"


def _bad_module(d):
    _rewrite(
        d / "gradient_eigenvalues.safetensors",
        lambda t: {
            ("model.layers.0.mlp.up_projection" if k == "model.layers.0.mlp.up_proj" else k): v for k, v in t.items()
        },
    )
    return (
        r"gradient_eigenvalues\.safetensors: modules differ from activation_eigenvectors\.safetensors "
        r"\(module model\.layers\.0\.mlp\.up_proj"
    )


def _bad_unknown(d):
    for f in d.glob("*.safetensors"):
        _rewrite(
            f,
            lambda t: {
                ("model.layers.7.mlp.up_proj" if k == "model.layers.0.mlp.up_proj" else k): v for k, v in t.items()
            },
        )
    return r"module model\.layers\.7\.mlp\.up_proj maps to no layer the config tracks"


def _bad_shape(d):
    _rewrite(
        d / "lambda_matrix.safetensors",
        lambda t: {k: (v[:, :20] if k == "model.layers.1.mlp.down_proj" else v) for k, v in t.items()},
    )
    return (
        r"lambda_matrix\.safetensors: tensor model\.layers\.1\.mlp\.down_proj has shape \(32, 20\), but layer "
        r"model\.layers\.1\.mlp\.down_proj of the config needs \(32, 48\)"
    )


def _bad_strategy(d):
    args = kf.read_json(d / kf.FACTOR_ARGUMENTS)
    (d / kf.FACTOR_ARGUMENTS).write_text(json.dumps(dict(args, strategy="kfac")))
    return r"factor_arguments\.json: kronfluence strategy kfac, but the config uses factors\.strategy ekfac"


def _bad_fisher(d):
    args = kf.read_json(d / kf.FACTOR_ARGUMENTS)
    (d / kf.FACTOR_ARGUMENTS).write_text(json.dumps(dict(args, use_empirical_fisher=False)))
    return r"fitted with the sampled Fisher .* but the config has factors\.fisher empirical"


def _bad_partitioned(d):
    for f in d.glob("lambda_matrix*.safetensors"):
        f.rename(d / "lambda_matrix_data_partition0_module_partition0.safetensors")
    for f in d.glob("num_lambda_processed.safetensors"):
        f.rename(d / "num_lambda_processed_data_partition0_module_partition0.safetensors")
    return r"only partitioned lambda files; aggregate the partitions with kronfluence first"


@pytest.mark.parametrize(
    "damage", [_bad_missing, _bad_module, _bad_unknown, _bad_shape, _bad_strategy, _bad_fisher, _bad_partitioned]
)
def test_bad_kronfluence_factors_are_one_line_errors(llama, tmp_path, capsys, damage):
    d = _copy(llama["kron"].root / "factors_ekfac", tmp_path / "factors_bad")
    message = damage(d)
    out = tmp_path / "run"
    code, _, err = _main(["kronfluence", "import", d, *ks.overrides(llama["world"], out)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("jaxinf kronfluence: error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()


def test_compare_refuses_another_strategy_and_other_shapes(llama, tmp_path, capsys):
    kron = llama["kron"]
    code, _, err = _main(["compare", "--kronfluence", kron.root / "factors_kfac", "--run", llama["run"]], capsys)
    assert code == 2 and "kronfluence strategy kfac, but the run" in err and "uses factors.strategy ekfac" in err
    scores = _copy(kron.root / "scores_pairwise", tmp_path / "scores_short")
    _rewrite(scores / kf.PAIRWISE, lambda t: {k: v[:, :-1] for k, v in t.items()})
    code, _, err = _main(["compare", "--kronfluence", scores, "--run", llama["run"]], capsys)
    assert code == 2 and "pairwise_scores.safetensors: scores of shape (5, 31)" in err and "has (5, 32)" in err
    code, _, err = _main(["compare", "--kronfluence", kron.root, "--run", llama["run"]], capsys)
    assert code == 2 and "several kronfluence directories with factors" in err and "--factors NAME" in err
    code, _, err = _main(["compare", "--kronfluence", tmp_path / "nowhere", "--run", llama["run"]], capsys)
    assert code == 2 and "nowhere: no such kronfluence directory" in err


def test_import_refuses_a_run_that_has_results_and_export_an_unfinished_one(llama, tmp_path, capsys):
    from jaxinf.run.store import RunStore

    code, _, err = _main(
        ["kronfluence", "import", llama["kron"].root / "factors_ekfac", *ks.overrides(llama["world"], llama["run"])],
        capsys,
    )
    assert code == 2 and "the run already has results" in err and "--overwrite" in err
    RunStore.open(ks.config(llama["world"], tmp_path / "pending"))
    code, _, err = _main(["kronfluence", "export", tmp_path / "pending", tmp_path / "out"], capsys)
    assert code == 2 and "state/eigen: the run has no finished eigendecomposition" in err
    code, _, err = _main(["kronfluence", "export", tmp_path / "nothing", tmp_path / "out"], capsys)
    assert code == 2 and "nothing: not a jaxinf run directory (no such directory)" in err


def test_compare_divides_kronfluence_by_the_completion_nll_for_per_nat_runs(llama, tmp_path):
    """A run that exports per-nat scores is compared with kronfluence's raw scores divided the same way."""
    from jaxinf.interop.compare import compare

    run = _copy(llama["run"], tmp_path / "per_nat")
    record = json.loads((run / "run.json").read_text())
    record["config"]["scores"]["normalize"] = "per_nat"
    (run / "run.json").write_text(json.dumps(record))
    losses = np.asarray([json.loads(line)["loss"] for line in (run / "queries.jsonl").read_text().splitlines()])
    np.save(run / "scores.npy", (np.load(run / "scores.npy") / losses[:, None]).astype(np.float32))
    report = compare(llama["kron"].root, run, factors="ekfac", scores=["pairwise"])
    assert report["stages"]["scores"]["rel_error"] <= TOL
    assert any("per nat" in note for note in report["notes"])
