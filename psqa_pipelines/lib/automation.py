"""Automation conditions shared by the domains."""

import dagster as dg

# eager, but a missing/failed study partition does not block the lake-wide table
lake_automation_condition = (
    dg.AutomationCondition.eager()
    .without(~dg.AutomationCondition.any_deps_missing())
    .with_label("eager (tolerates missing partitions)")
)
