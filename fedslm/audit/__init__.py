"""The empirical privacy audit (``fedslm audit``): a lower bound on epsilon from one training
run with canaries (Steinke, Nasr, Jagielski 2023), beside the formal epsilon.

Modules: ``bound`` (the pure math), ``canaries`` (random records, inclusion bits, the rule that
keeps them out of real data), ``run`` (the audited run and its DP-off control), ``report`` (the
"Empirical check" section of the privacy report), ``cli``. Only light constants live here, so
that building the command line does not import torch.
"""

DEFAULT_CANARIES = 500
MIN_CONTROL_EPSILON = 0.5  # the control's bound below this: the audit had no power
EXIT_OK, EXIT_VIOLATION, EXIT_NO_POWER = 0, 1, 3
AUDIT_JSON, AUDIT_MD, CANARIES_JSON = "audit.json", "audit.md", "canaries.json"
