"""The commands beside fit, validate, test, predict and resume: each a module with ``main(argv)``."""
