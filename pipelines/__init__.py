"""Prefect 3 flows that compose the ``nucleiseg`` library into the project's pipelines.

Flows run locally against Prefect's ephemeral API (no server to start by hand). Importing a flow module
has no side effects: nothing runs and no server starts until a flow is called.
"""
