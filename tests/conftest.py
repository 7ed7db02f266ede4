"""Shared pytest fixtures."""

pytest_plugins = ["conftest_node", "conftest_gateway", "conftest_browser", "conftest_pg"]
