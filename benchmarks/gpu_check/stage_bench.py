"""The ``bench`` stage: ``fastenc bench --plan gpu-check`` (``fastenc.bench.suite.check_plan``): the cases issue
13's goals need, and ModernBERT-base against transformers' own ModernBERT, within the stage's time, in the
committed results format (rewritten after every case).

The dry run runs the same plan at small shapes on the CPU; the compile stage's plan records fastenc's
launches at the GPU's shapes (``plan_launches``), to count what the compile stage does not already build.
"""

from __future__ import annotations

from .launches import plan_keys
from .records import Stage, remaining


def run(stage: Stage) -> None:
    from fastenc.bench.report import write_results
    from fastenc.bench.suite import check_plan, run as run_suite

    plan = check_plan(stage.device, small=stage.dry)
    plan.triton_warm = bool(stage.options.get("triton_warm"))
    plan.budget_s = max(remaining(stage.deadline) - 8, 1)  # the process's exit, the markdown and the plot
    output = stage.work / "bench"
    stage.record.update(plan=[{"suite": "e2e", "case": c.name, "dtype": c.dtype, "providers": list(c.providers)}
                              for c in plan.e2e] + [{"suite": "kernel", "case": r.name, "dtype": r.dtype,
                                                     "providers": list(r.providers)} for r in plan.kernels],
                        budget_s=round(plan.budget_s, 1), output=str(output))
    if stage.dry:
        stage.record.update(plan_keys=plan_keys(stage.work, "bench"))
    report = run_suite(plan, output=output)
    paths = write_results(report, output)
    stage.record.update(results=str(paths["json"]), markdown=str(paths["md"]),
                        plot=str(paths["png"]) if "png" in paths else None,
                        rows=len(report.rows), skipped=len(report.skipped), status="ok",
                        note=f"{len([r for r in report.rows if r['metric'] == 'ms'])} timings, "
                             f"{len(report.skipped)} not measured, {report.env.get('seconds')} s in the suite")


def plan_launches() -> None:
    """The GPU plan's fastenc launches at its shapes, for a plan (``launches.record(plan_only=True)``): each e2e
    model's layer kinds (one layer; ModernBERT's three) on the case's lengths, and the fastenc kernel cases."""
    import dataclasses

    import torch

    from fastenc.bench.measure import compute_dtype
    from fastenc.bench.suite import check_plan

    from . import encoders

    plan = check_plan(torch.device("cuda"))
    built = {}
    for case in plan.e2e:
        if not any(p.startswith("fastenc") for p in case.providers):
            continue
        key = (case.model.name, case.dtype)
        if key not in built:
            layers = min(case.model.layers, case.model.global_every if case.model.family == "modernbert" else 1)
            built[key] = encoders.shape_encoder(dataclasses.replace(case.model, layers=layers), case.dtype)
        encoder = built[key]
        encoder.forward_packed(encoders.packed(encoder, case.shape.lengths()))
    for run in plan.kernels:
        if "fastenc" in run.providers:
            inputs = run.case.make_inputs(torch.device("cpu"), compute_dtype(run.dtype))
            call, _ = run.case.providers["fastenc"](inputs)
            call()
