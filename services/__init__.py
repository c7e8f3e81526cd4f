"""The services of the stack, one sub-package each, and what they share: the serve() helper,
configuration, the error table, channels and structured logs."""
