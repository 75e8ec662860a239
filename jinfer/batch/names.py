"""The run-batch tasks and output formats (a module of its own: the CLI's flags need no JAX)."""

TASKS = ("generate", "score", "embed")
FORMATS = ("jinfer", "openai")
