"""The pieces of :mod:`lightning_delta.plan`: edit families and their costs (:mod:`.family`), the one-pass gradient
statistics and candidate scores (:mod:`.scores`), the budgeted allocation (:mod:`.allocate`) and the measured
refinement (:mod:`.measure`)."""
