"""The explain service. Until its work item lands, the stack serves its contract through
`llmos.services.unimplemented.PlannedService` (see `llmos.kernel.stack`)."""
