"""Analyses of an SAE over a store: evaluate, probes, and the coming comparison and interventions."""
