"""Compiling a pass's other programs ahead (:mod:`jaxinf.engine.ahead`): the programs for the batch shapes still to
come are traced and compiled in a background thread, and the calls of those shapes run them, with the results of
the step itself."""

from __future__ import annotations

import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.engine.ahead import Ahead


def batch(length: int, fill: float = 0.0) -> dict:
    return {"tokens": jnp.full((2, length), fill, jnp.float32), "index": jnp.arange(2, dtype=jnp.int32)}


def test_the_shapes_still_to_come_compile_in_the_background_and_their_calls_run_those_programs():
    traced: dict[int, list[str]] = {}

    def step(state, weights, b):
        traced.setdefault(b["tokens"].shape[1], []).append(threading.current_thread().name)
        return state + jnp.sum(b["tokens"] * weights[: b["tokens"].shape[1]]), b["index"] * 2

    jitted = jax.jit(step, donate_argnums=(0,))
    ahead = Ahead(jitted, 2, [batch(8), batch(4), batch(6)])
    weights = jnp.arange(8, dtype=jnp.float32)
    state, expected = jnp.zeros(()), 0.0
    for length, fill in ((8, 1.0), (4, 2.0), (6, 3.0), (8, 4.0), (4, 5.0)):
        state, out = ahead(state, weights, batch(length, fill))
        expected += 2 * fill * float(np.arange(length).sum())  # two rows
        np.testing.assert_array_equal(np.asarray(out), [0, 2])
    assert float(state) == expected and ahead.calls_ahead == 3
    assert traced[8] == ["MainThread"]  # the first call's shape: compiled by the step while the others compile
    assert traced[4] == ["jaxinf-compile-ahead"] and traced[6] == ["jaxinf-compile-ahead"]  # never again by the step


def test_a_step_that_cannot_compile_ahead_runs_as_it_would_have():
    calls = []

    def step(state, b):  # not jitted: nothing to lower, so every shape runs the step itself
        calls.append(b["tokens"].shape[1])
        return state + jnp.sum(b["tokens"]), None

    ahead = Ahead(step, 1, [batch(3), batch(5)])
    state = jnp.zeros(())
    for length in (3, 5, 5):
        state, _ = ahead(state, batch(length, 1.0))
    assert calls == [3, 5, 5] and float(state) == 2 * (3 + 5 + 5)


def test_a_pass_compiles_ahead_where_asked_and_not_on_the_cpu_by_default(monkeypatch):
    """``Program.jit`` with the pass's batches wraps the step in :class:`Ahead`, with a batch of each of their
    shapes, where ``JAXINF_COMPILE_AHEAD=1``; ``0`` leaves the plain jitted step, and so does the CPU backend
    when it is not set (an accelerator's would compile ahead)."""
    from jaxinf.engine.programs import Program
    from jaxinf.run.executor import DeviceExecutor

    class Batches:
        def shapes(self):
            return [{"tokens": np.zeros((2, n), np.int32)} for n in (4, 8)]

    program = Program("p", lambda state, b: (state, None), ("state", "batch"))
    monkeypatch.setenv("JAXINF_COMPILE_AHEAD", "1")
    step = program.jit(DeviceExecutor(), Batches())
    assert isinstance(step, Ahead) and step.batch == 1
    assert [b["tokens"].shape for b in step.upcoming] == [(2, 4), (2, 8)]
    monkeypatch.setenv("JAXINF_COMPILE_AHEAD", "0")
    assert not isinstance(program.jit(DeviceExecutor(), Batches()), Ahead)
    monkeypatch.delenv("JAXINF_COMPILE_AHEAD")
    assert isinstance(program.jit(DeviceExecutor(), Batches()), Ahead) == (jax.default_backend() != "cpu")


MESH_CHECK = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxinf.engine.ahead import Ahead

mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
rows, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

def step(state, b, key):
    noise = jax.random.normal(key, b["tokens"].shape)
    return state + jnp.sum(b["tokens"] * noise, axis=1), None

jitted = jax.jit(step, donate_argnums=(0,), out_shardings=(rows, None))
batch = lambda n: {"tokens": jax.device_put(jnp.ones((4, n)), rows)}
state, plain = jax.device_put(jnp.zeros(4), rows), jax.device_put(jnp.zeros(4), rows)
ahead = Ahead(jitted, 1, [batch(8), batch(4)])
for i, n in enumerate((8, 4, 8, 4)):
    key = jax.random.fold_in(jax.random.key(0), i)  # not committed to a device, as a pass's keys are
    state, _ = ahead(state, batch(n), key)
    plain, _ = jax.jit(step, out_shardings=(rows, None))(plain, batch(n), key)
assert ahead.calls_ahead == 2, ahead.calls_ahead
assert np.array_equal(np.asarray(state), np.asarray(plain))
print("ok")
"""


def test_a_program_compiled_ahead_runs_on_a_mesh_with_a_key_made_outside_it(tmp_path):
    """On 4 simulated devices (2 x 2): a step whose state is split over ``data`` and whose PRNG key is made outside
    any placement (not committed to a device: a jitted call moves it) runs its programs compiled ahead, with the
    plain step's results."""
    from sharding_support import device_env

    r = subprocess.run(
        [sys.executable, "-c", MESH_CHECK], env=device_env(4), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
