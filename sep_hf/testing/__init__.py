"""Test helpers for sep_hf.

``sep_hf.testing.hub`` is a loopback TEST DOUBLE of the Hugging Face Hub HTTP API (offline use and
tests only; not a Hub, no real auth security). See its module docstring for how to run it.
"""
