"""The sections of a privacy report, one module each, every figure computed by one small
function from a run folder (``fedslm.report.runfiles``). ``fedslm.report.build`` runs the
checks and assembles them into a :class:`fedslm.report.model.Report`.

Modules: ``run`` (which run), ``privacy`` (record-level and central epsilons, budgets),
``fingerprints`` (data sets, model, adapter, keys), ``egress`` (egress, policies, refusals,
failures), ``utility`` (metrics and baselines), ``summary`` (summary, trust model, notes).
"""
