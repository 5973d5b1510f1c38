"""Report stage: tidy tables (`tables`), forgetting-phase detection (`phases`), figures (`plots`).

Verbs (see `cli`): `editscale report-tables`, `editscale phases`, `editscale report-plots`.
"""
