"""Typed helpers for powerserve over the official ``openai`` SDK: choose a decoder per request
and read what it cost. ``python -m powerserve_client.loadgen`` drives a mix of decoders against
a local server and prints latency and cost per decoder.

    from openai import OpenAI
    from powerserve_client import power_mcmc, read_cost

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    resp = client.completions.create(model="SmolLM2-135M-Instruct", prompt="2+2=", max_tokens=16,
                                     extra_body=power_mcmc(alpha=4, block_size=16))
    print(resp.choices[0].text, read_cost(resp).cost_multiplier)
"""

from powerserve_client.cost import ChoiceCost, Cost, SelfReward, read_cost
from powerserve_client.decoders import decoder, decoder_label, parse_decoder, power_mcmc, standard, temperature

__all__ = [
    "ChoiceCost",
    "Cost",
    "SelfReward",
    "decoder",
    "decoder_label",
    "parse_decoder",
    "power_mcmc",
    "read_cost",
    "standard",
    "temperature",
]
