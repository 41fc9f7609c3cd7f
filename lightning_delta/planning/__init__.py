"""Plan an edit per tensor under a budget (beyond the paper): :func:`~lightning_delta.planning.plan.plan_edit` and its
four stages (:mod:`.plan`), the ``lightning-delta plan`` command (:mod:`.command`), edit families and their costs
(:mod:`.family`), the one-pass gradient statistics and candidate scores (:mod:`.scores`), the budgeted allocation
(:mod:`.allocate`) and the measured refinement (:mod:`.measure`)."""
