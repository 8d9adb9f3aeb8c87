"""DiMSUM model library, no I/O: config framework, nets (nn/, ssm/, models/), objectives, samplers, EMA.

Import what you use from its subpackage (``from dimsum.models import build_model``); the package itself
imports nothing, so ``import dimsum.config`` (the CLI) stays instant and does not pull in torch.
"""
