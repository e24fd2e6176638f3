"""``powerserve eval``: run task sets against a running powerserve once per decoder and compare
true reward (accuracy by a verifier), self-reward, engine tokens per answer and latency.

    powerserve eval --server http://127.0.0.1:8000 --tasks arithmetic:50,humaneval:20 \\
        --decoders standard,temperature,power_mcmc:block_size=16,mcmc_steps=2,distilled --out results/

Modules: :mod:`.tasks` (offline task sets and their verifiers), :mod:`.sandbox` (running model
code), :mod:`.run` (requests, one row per answer), :mod:`.report` (table, JSON, plots),
:mod:`.cli`.
"""
