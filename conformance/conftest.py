pytest_plugins = ["sdze.testing"]
