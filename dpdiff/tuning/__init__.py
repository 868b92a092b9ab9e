"""`dpdiff tune`: private hyperparameter search (Papernot & Steinke, ICLR 2022) whose whole cost is one (epsilon, delta).

space.py (the public YAML search space), trials.py (the secret trial count), accounting.py (repeat-and-select in
dp-accounting's RDP accountant; the per-trial sigma), score.py (the one DP release that trials are compared by),
search.py (the run and its private resume state), report.py (the one privacy.json and model card), cli.py."""
