"""The plan as ``jaxinf plan`` gives it to the user: the table it prints (:func:`format_plan`), the check of every
planned step against ``plan.device_memory_gib`` (:func:`check_fit`), and the command that makes, prints and checks
the plan (:func:`command`). The plan itself is made by :func:`jaxinf.run.plan.plan`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jaxinf.atomic import write_atomic
from jaxinf.run.index_store import format_size
from jaxinf.run.plan import GiB, PlanError, plan


def check_fit(result: dict, memory_gib: float | None) -> list[str]:
    """One message per step (and mesh) whose peak exceeds ``memory_gib`` per device."""
    from jaxinf.engine.programs import SHRINK

    if memory_gib is None:
        return []
    limit = memory_gib * GiB
    bad = []
    for m in result["meshes"]:
        static = sum(m["static"][k] for k in ("parameters", "factors", "Lambda", "queries"))
        if not m["steps"] and static > limit:
            bad.append(
                f"mesh {m['data']}x{m['model']}: parameters, factors, Lambda and query gradients alone need "
                f"{static / GiB:.2f} GiB per device, more than plan.device_memory_gib={memory_gib:g}"
            )
        rows = m.get("index_rows", {})
        for s in m["steps"]:
            peak = s["peak"] + (rows["bytes_per_device"] if s["name"] == rows.get("step") else 0)
            if peak > limit:
                msg = (
                    f"mesh {m['data']}x{m['model']}: stage {s['name']} needs {peak / GiB:.2f} GiB per "
                    f"device{' with the index rows it holds' if s['name'] == rows.get('step') else ''}, more than "
                    f"plan.device_memory_gib={memory_gib:g}"
                )
                largest = m.get("largest_layers", {}).get(s["name"])
                if largest is not None:
                    msg += (
                        f"; its largest layer statistic is {largest[0]} (about {largest[1] / GiB:.2f} GiB); "
                        f"lower {SHRINK[s['name']]}"
                    )
                params = m["static"]["parameters"]
                if not result.get("fsdp") and m["data"] > 1:  # the parameters could be split over data too
                    msg += (
                        f"; or set mesh.fsdp=true (the parameters take {params / GiB:.2f} GiB per device split over "
                        f"model alone, about {params / m['data'] / GiB:.2f} over data as well)"
                    )
                bad.append(msg)
    return bad


def format_plan(result: dict, config) -> str:
    """The plan as text: a header, and per mesh the static bytes and one row per step."""

    def gib(b):
        return f"{b / GiB:8.2f}"

    lines = [
        f"model {result['model']} ({result['family']}, {result['parameters']:,} parameters in "
        f"{result['parameter_dtype']}); tracking {result['tracked_layers']} layers "
        f"({result['tracked_parameters']:,} parameters), factors.track={config.factors.track}, "
        f"strategy {config.factors.strategy}, engine precision {result['precision']}",
        f"queries {config.plan.queries}, query rank {config.scores.query_rank or 'full'}, "
        f"{config.data.max_length} tokens per row, data.batch_size {config.data.batch_size} per corpus slice",
    ]
    for m in result["meshes"]:
        st = m["static"]
        lines += [
            "",
            f"mesh data={m['data']} x model={m['model']} ({m['devices']} devices, {m['hosts']} host(s), "
            f"{m['corpus_slices']} corpus slice(s), {m['global_batch']} documents per step)",
            "  per device (GiB): parameters "
            + gib(st["parameters"]).strip()
            + (" (over data and model: mesh.fsdp)" if config.mesh.fsdp else "")
            + ", factors A+S "
            + gib(st["factors"]).strip()
            + " (eigenbases "
            + gib(st["eigenbases"]).strip()
            + "), Lambda "
            + gib(st["Lambda"]).strip()
            + ", query gradients "
            + gib(st["queries"]).strip(),
        ]
        if m.get("largest_layers"):
            lines.append(
                "  largest layer statistic per stage (GiB, estimate): "
                + ", ".join(f"{stage} {name} {size / GiB:.2f}" for stage, (name, size) in m["largest_layers"].items())
            )
        if m["steps"]:
            chip = result.get("chip")
            lines.append(
                f"  {'step':<16} {'peak GiB':>9} {'args GiB':>9} {'temp GiB':>9} {'TFLOP/doc':>10} "
                f"{'hours':>9} {'compile s':>9}"
                + (f" {'GB/doc':>8} {'compute s':>9} {'memory s':>9} {'hours@chip':>10}  bound" if chip else "")
            )
            for s in m["steps"]:
                fl = (
                    f"{s['flops_per_document'] / 1e12:9.3f}{'*' if s.get('flops_from') == 'one device' else ' '}"
                    if "flops_per_document" in s
                    else f"{'-':>10}"
                )
                hours = f"{s['hours']:9.1f}" if "hours" in s else f"{'-':>9}"
                row = (
                    f"  {s['name']:<16} {gib(s['peak']):>9} {gib(s['arguments']):>9} "
                    f"{gib(s['temporaries']):>9} {fl} {hours} {s['seconds']:9.1f}"
                )
                if chip and "roofline" in s:
                    r = s["roofline"]
                    per_doc_gb = s["bytes_accessed"] * m["devices"] / s["documents"] / 1e9
                    row += (
                        f" {per_doc_gb:8.3f} {r['compute_s']:9.3g} {r['memory_s']:9.3g} {r['hours']:10.1f}  "
                        f"{r['bound']}"
                    )
                elif chip:
                    row += f" {'-':>8} {'-':>9} {'-':>9} {'-':>10}  -"
                lines.append(row)
        if "index_rows" in m:
            r = m["index_rows"]
            lines.append(
                f"  index rows held by the {r['step']} step between flushes: {r['batches']} batches, "
                f"{gib(r['bytes_per_device']).strip()} GiB per device (in its peak for plan.device_memory_gib)"
            )
    if "index" in result:
        lines += ["", format_size(result["index"])]
    tokens = config.plan.tokens_per_document or config.data.max_length
    if any(s.get("flops_from") == "one device" for m in result["meshes"] for s in m["steps"]):
        lines += [
            "",
            "*: FLOPs counted on one device and divided evenly (the unstacked layers the count uses have "
            "a factor that no mesh axis divides)",
        ]
    if config.model.remat:
        lines += ["", "model.remat: the FLOPs leave out the recomputed forward pass (about a third more per step)"]
    lines += [
        "",
        f"hours: {config.plan.documents:,} documents (factors.max_documents for covariance and Lambda when "
        f"set) of {tokens} tokens at {config.plan.device_flops:.3g} FLOP/s per device; peaks are XLA's "
        "CPU-backend memory analysis of each partitioned step",
    ]
    if result.get("chip"):
        c = result["chip"]
        lines += [
            f"chip {c['name']}: roofline of each per-document step per call and device (compute s, memory s: "
            f"the model's pass at its dtype's rate ({c['bf16'] / 1e12:g} TFLOP/s in bfloat16), the statistics "
            f"at the float32 rate of run.matmul_precision={config.run.matmul_precision}, XLA's bytes accessed "
            f"at {c['hbm'] / 1e9:g} GB/s); hours@chip: the larger of the two for the documents above; bound: "
            "the binding resource (jaxinf/run/chips.py)"
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command


def parse_mesh(text: str) -> tuple[int, int]:
    try:
        data, model = text.lower().split("x")
        d, m = int(data), int(model)
    except ValueError:
        raise PlanError(f"--mesh {text!r}: expected DATAxMODEL, e.g. 8x8") from None
    if d < 1 or m < 1:
        raise PlanError(f"--mesh {text!r}: both sizes must be at least 1, e.g. 8x8")
    return d, m


def table_stream(json_out: str | None):
    """Where the plan's table goes: stdout, or stderr when ``--json -`` prints the JSON there (as ``jaxinf compare
    --json -`` does; the plan wrote it into a file named ``-``)."""
    return sys.stderr if json_out == "-" else sys.stdout


def command(config, meshes: list[tuple[int, int]] | None, compile: bool, json_out: str | None, chip=None) -> int:
    meshes = meshes or [(config.mesh.data, config.mesh.model)]
    result = plan(config, meshes, compile=compile, chip=chip)
    print(format_plan(result, config), file=table_stream(json_out))
    return finish(result, config, json_out)


def finish(result: dict, config, json_out: str | None) -> int:
    """The end of every ``jaxinf plan``: the plan written as JSON (``--json``), each step that does not fit
    ``plan.device_memory_gib`` named, and the exit code (1 when one does not fit)."""
    if json_out == "-":
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
    elif json_out:
        write_atomic(Path(json_out), json.dumps(result, indent=1) + "\n")  # never a half-written file
    problems = check_fit(result, config.plan.device_memory_gib)
    for p in problems:
        print(f"jaxinf plan: does not fit: {p}", file=table_stream(json_out))
    return 1 if problems else 0
