"""Tools for testing gradsift itself (like ``transformers.testing_utils``): not used by the pipeline.

* :mod:`gradsift.testing.families` - a tiny random model of every causal-LM family that
  transformers ships, and the exactness check the support matrix runs on each.
"""
