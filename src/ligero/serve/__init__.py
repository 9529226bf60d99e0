"""`ligero serve`: an OpenAI-compatible HTTP server for a model variant, with guardrails, feedback and A/B tests.

`store` persists what the server saw (requests, responses, guardrail events, A/B assignments, feedback) in
SQLite or PostgreSQL so `ligero monitor` can analyse drift and experiments; `abtest` assigns users to variants.
"""
