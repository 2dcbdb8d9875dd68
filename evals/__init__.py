"""saekit.evals"""
